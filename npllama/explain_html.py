"""The explain page: one self-contained HTML file (inline CSS, script and data; nothing is fetched) that draws
the result of npllama.explain.explain: the prompt's tokens, every layer's and head's attention map (a
<canvas data-layer data-head>), a logit-lens row per layer (<tr data-lens-layer>) and the next-token top 10.

The attention weights travel as uint16 (p * 65535, rounded: 1.5e-5 absolute), causal lower triangle only,
base64 per layer; everything else is plain JSON. Every string reaches the DOM through textContent or an
attribute, never as markup.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

QUANT = 65535          # attention weight p is stored as round(p * QUANT) in a uint16


def pack_attention(layer: Any) -> str:
    """One layer's weights (H, T, T) -> base64 of the uint16 lower triangles, head by head, row by row."""
    a = np.asarray(layer, dtype=np.float64)
    H, T, _ = a.shape
    rows, cols = np.tril_indices(T)
    q = np.rint(np.clip(a[:, rows, cols], 0.0, 1.0) * QUANT).astype("<u2")     # (H, T (T + 1) / 2)
    return base64.b64encode(q.tobytes()).decode("ascii")


def unpack_attention(text: str, H: int, T: int) -> np.ndarray:
    """The inverse of pack_attention: (H, T, T) float64, zeros above the diagonal."""
    q = np.frombuffer(base64.b64decode(text), dtype="<u2").reshape(H, -1)
    out = np.zeros((H, T, T))
    rows, cols = np.tril_indices(T)
    out[:, rows, cols] = q / QUANT
    return out


def page_data(result: dict[str, Any], model_name: str = "") -> dict[str, Any]:
    """What the page's script reads: explain's result with the attention packed."""
    data = {k: v for k, v in result.items() if k != "attention"}
    data["attention"] = [pack_attention(layer) for layer in result["attention"]]
    data["model"] = model_name
    return data


def script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' can end the element or open a comment."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def read_page_data(html: str) -> dict[str, Any]:
    """The data a page carries (for tests and tools)."""
    start = html.index(_DATA_OPEN) + len(_DATA_OPEN)
    return json.loads(html[start:html.index("</script>", start)])


def render(result: dict[str, Any], model_name: str = "") -> str:
    """The whole page as one string."""
    return _PAGE.replace("/*CSS*/", _CSS).replace("/*JS*/", _JS).replace(
        "/*DATA*/", script_json(page_data(result, model_name)))


_DATA_OPEN = '<script type="application/json" id="explain-data">'

# default-src 'none': the page can fetch nothing, and a try would show as a console error
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; \
style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>npllama explain</title>
<style>/*CSS*/</style>
</head><body>
<header><h1>npllama explain</h1><p id="meta"></p></header>
<div class="row">
<section><h2>Prompt tokens</h2><div id="tokens"></div></section>
<section><h2>Next token (top 10)</h2><table id="next"></table></section>
</div>
<section><h2>Attention: every layer (rows) and head (columns)</h2>
<p class="note">Each map: query token down, key token across; shade = sqrt(weight). Click a map to enlarge it;
hover the large map to read a weight.</p>
<div class="attn"><div id="grid"></div>
<div id="big-wrap"><div id="big-title"></div><canvas id="big" width="10" height="10"></canvas>
<div id="readout">&nbsp;</div></div></div></section>
<section><h2>Logit lens: the top token read from the residual stream after each layer</h2>
<p class="note">Row = layer, column = position (the token it reads after); hover a cell for the top 3.
Bold: the prompt's actual next token.</p>
<div class="scroll"><table id="lens"></table></div></section>
""" + _DATA_OPEN + """/*DATA*/</script>
<script>/*JS*/</script>
</body></html>
"""

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 20px;color:#1b1f24;background:#fff}
h1{font-size:20px;margin:0 0 2px}h2{font-size:15px;margin:14px 0 6px}
#meta,.note{color:#57606a;margin:2px 0 6px}
.row{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}.row>section{flex:1 1 420px}
#tokens{display:flex;flex-wrap:wrap;gap:3px}
.tok{font:13px ui-monospace,Menlo,Consolas,monospace;white-space:pre;background:#eef3fb;border:1px solid #c9d6ea;
border-radius:3px;padding:1px 4px}
.tok sub{color:#8c959f;font-size:9px;margin-left:2px}
#next{border-collapse:collapse;font-size:13px}#next td{padding:1px 6px}
#next .tokcell{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre}
.bar{height:10px;background:#3b6fc4;border-radius:2px}
.attn{display:flex;gap:24px;align-items:flex-start}
#grid{display:grid;grid-template-columns:26px repeat(var(--heads),32px);gap:3px;align-items:center;flex:none}
#grid .lab{font-size:10px;color:#57606a;text-align:right;padding-right:3px}
#grid canvas{width:30px;height:30px;image-rendering:pixelated;border:1px solid #d0d7de;cursor:pointer}
#grid canvas.sel{border-color:#d1242f;outline:1px solid #d1242f}
#big-wrap{position:sticky;top:8px}#big-title{font-weight:600;margin-bottom:4px}
#readout{font:12px ui-monospace,Menlo,Consolas,monospace;margin-top:4px;white-space:pre}
.scroll{overflow-x:auto}
#lens{border-collapse:collapse;font:11px ui-monospace,Menlo,Consolas,monospace}
#lens td,#lens th{border:1px solid #e1e4e8;padding:1px 3px;white-space:pre;max-width:90px;overflow:hidden}
#lens th{background:#f6f8fa;font-weight:600}#lens td.hit{font-weight:700}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("explain-data").textContent);
const L = D.num_layers, H = D.num_heads, T = D.ids.length;

// a token as shown: spaces and control characters made visible; the raw text stays in data-text
function show(s) {
  return s.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5")
          .replace(/[\u0000-\u001f\u007f]/g, c => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
}
function piece(id) { const s = D.pieces[String(id)]; return s === undefined ? "#" + id : s; }
function el(tag, props, parent) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") e.textContent = v; else if (k === "data") Object.assign(e.dataset, v); else e[k] = v;
  }
  if (parent) parent.appendChild(e);
  return e;
}

// attention: per layer, uint16 lower triangles of H heads; weight(l, h, t, s) for s <= t
const ATT = D.attention.map(b64 => {
  const bin = atob(b64), u8 = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  return new Uint16Array(u8.buffer);
});
const TRI = T * (T + 1) / 2;
function weight(l, h, t, s) { return s > t ? 0 : ATT[l][h * TRI + t * (t + 1) / 2 + s] / 65535; }
function shade(p) {          // white -> deep blue, by sqrt(p) so that small weights still show
  const v = Math.sqrt(p);
  return [Math.round(255 - 215 * v), Math.round(255 - 170 * v), Math.round(255 - 60 * v)];
}

el("span", {text: (D.model ? D.model + " \u2014 " : "") + T + " tokens, " + L + " layers \u00d7 " + H +
  " heads (" + D.num_kv_heads + " KV heads)"}, document.getElementById("meta"));

const toks = document.getElementById("tokens");
D.tokens.forEach((s, i) => {
  const t = el("span", {className: "tok", title: "position " + i + ", id " + D.ids[i],
                        data: {token: String(i), id: String(D.ids[i]), text: s}}, toks);
  el("span", {text: show(s)}, t);
  el("sub", {text: String(i)}, t);
});

const next = document.getElementById("next");
D.next.ids.forEach((id, r) => {
  const p = D.next.probs[r];
  const tr = el("tr", {data: {rank: String(r + 1), id: String(id), text: piece(id)}}, next);
  el("td", {text: String(r + 1)}, tr);
  el("td", {className: "tokcell", text: show(piece(id))}, tr);
  const bar = el("td", {}, tr);
  el("div", {className: "bar", style: "width:" + Math.max(1, Math.round(180 * p)) + "px"}, bar);
  el("td", {text: (100 * p).toFixed(2) + " %"}, tr);
});

const grid = document.getElementById("grid");
grid.style.setProperty("--heads", H);
el("div", {className: "lab", text: ""}, grid);
for (let h = 0; h < H; h++) el("div", {className: "lab", style: "text-align:center", text: "h" + h}, grid);
const small = [];
for (let l = 0; l < L; l++) {
  el("div", {className: "lab", text: "L" + l}, grid);
  for (let h = 0; h < H; h++) {
    const c = el("canvas", {width: T, height: T, title: "layer " + l + ", head " + h,
                           data: {layer: String(l), head: String(h)}}, grid);
    const ctx = c.getContext("2d"), img = ctx.createImageData(T, T);
    for (let t = 0; t < T; t++) for (let s = 0; s < T; s++) {
      const [r, g, b] = s > t ? [238, 238, 238] : shade(weight(l, h, t, s)), o = 4 * (t * T + s);
      img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    c.addEventListener("click", () => select(l, h));
    small.push(c);
  }
}

// the enlarged map: cells with the tokens along both axes
const big = document.getElementById("big"), readout = document.getElementById("readout");
const CELL = Math.max(6, Math.min(24, Math.floor(520 / T))), PAD = 96;
let cur = [L - 1, 0];
function label(s) { const v = show(s); return v.length > 12 ? v.slice(0, 11) + "\u2026" : v; }
function select(l, h) {
  cur = [l, h];
  small.forEach(c => c.classList.toggle("sel", +c.dataset.layer === l && +c.dataset.head === h));
  document.getElementById("big-title").textContent = "layer " + l + ", head " + h +
    " (KV head " + Math.floor(h / (H / D.num_kv_heads)) + ")";
  const n = PAD + CELL * T;
  big.width = n; big.height = n;
  const ctx = big.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, n, n);
  for (let t = 0; t < T; t++) for (let s = 0; s < T; s++) {
    const [r, g, b] = s > t ? [238, 238, 238] : shade(weight(l, h, t, s));
    ctx.fillStyle = "rgb(" + r + "," + g + "," + b + ")";
    ctx.fillRect(PAD + s * CELL, PAD + t * CELL, CELL, CELL);
  }
  ctx.fillStyle = "#1b1f24"; ctx.font = Math.min(12, CELL) + "px monospace"; ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  D.tokens.forEach((s, t) => ctx.fillText(label(s), PAD - 4, PAD + (t + 0.5) * CELL));
  D.tokens.forEach((s, t) => {
    ctx.save(); ctx.translate(PAD + (t + 0.5) * CELL, PAD - 4); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left"; ctx.fillText(label(s), 0, 0); ctx.restore();
  });
}
big.addEventListener("mousemove", ev => {
  const r = big.getBoundingClientRect();
  const s = Math.floor((ev.clientX - r.left - PAD) / CELL), t = Math.floor((ev.clientY - r.top - PAD) / CELL);
  if (s < 0 || t < 0 || s >= T || t >= T) { readout.textContent = "\u00a0"; return; }
  readout.textContent = "query " + t + " " + JSON.stringify(D.tokens[t]) + " \u2192 key " + s + " " +
    JSON.stringify(D.tokens[s]) + ": " + weight(cur[0], cur[1], t, s).toFixed(4);
});
select(L - 1, 0);

// the logit lens: one row per layer, one cell per position
const lens = document.getElementById("lens");
const head = el("tr", {}, el("thead", {}, lens));
el("th", {text: "layer"}, head);
D.tokens.forEach((s, t) => el("th", {text: label(s), title: "after position " + t}, head));
const body = el("tbody", {}, lens);
for (let l = 0; l < L; l++) {
  const tr = el("tr", {data: {lensLayer: String(l)}}, body);
  el("th", {text: String(l)}, tr);
  D.lens[l].forEach((cell, t) => {
    const id = cell.ids[0], p = cell.probs[0];
    const td = el("td", {text: label(piece(id)), data: {id: String(id)},
      title: "layer " + l + ", after " + JSON.stringify(D.tokens[t]) + ": " +
             cell.ids.map((j, k) => JSON.stringify(piece(j)) + " " + (100 * cell.probs[k]).toFixed(1) + "%")
                     .join(", ")},
      tr);
    td.style.background = "rgba(59,111,196," + (0.08 + 0.6 * p).toFixed(3) + ")";
    if (t + 1 < T && id === D.ids[t + 1]) td.classList.add("hit");
  });
}
"""
