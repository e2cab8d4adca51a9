"""SmolLM2-135M-Instruct, float32: long-context prefill (time to first token, tok/s, peak RSS) and eval's memory.

    python bench/bench_longctx.py [--lengths 2048,4096,8190] [--reps 2] [--warmup 1] [--out bench/results]

Every (side, length) runs in a process of its own, so each peak RSS (VmHWM) is that length's alone:
  npllama       Llama.from_pretrained(HF dir); forward(L ids, a fresh KV cache of L, last_only=True)
  torch         transformers, sdpa attention; model(ids, use_cache=True, logits_to_keep=1) under inference_mode
  llama.cpp     llama-cpp-python on the F32 GGUF, n_ctx = L + 16, n_batch = n_ubatch = 512; reset() + eval(L ids)
  npllama-eval  `run.py eval FILE --context L --max-tokens L` run in-process (npllama.cli.main): one window of
                L tokens scored as a user runs it (load and tokenization included); wall time, peak RSS, perplexity

Weights and token ids as in bench_smollm2.py (same HF dir, same F32 GGUF, fixed pseudo-random ids). The
greedy first token (argmax of the last position's logits) of every side is compared with npllama's.
SmolLM2's context is 8192 tokens: 8190 leaves room for llama.cpp's n_ctx and is the longest default.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import bench_smollm2  # noqa: E402

SIDES = ("npllama", "torch", "llama.cpp", "npllama-eval")
LLAMA_CPP_BATCH = 512
TOKENIZER_FILES = ("tokenizer.gguf", "tokenizer.json", "tokenizer.model")


# ---------------------------------------------------------------- inputs
def text_file(path: str, length: int) -> str:
    """A UTF-8 file of the repo's own prose (README and docs, repeated) far longer than `length` tokens."""
    sources = [os.path.join(C.ROOT, "README.md")]
    docs = os.path.join(C.ROOT, "docs")
    if os.path.isdir(docs):
        sources += [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    text = "\n\n".join(open(p, encoding="utf-8").read() for p in sources if os.path.isfile(p))
    # a token holds at most a few dozen bytes of prose; 16 characters a token is far more than any
    # tokenizer needs, and the eval side reports how many tokens it scored (checked by the parent)
    need = 16 * (length + 2)
    text = (text + "\n\n") * (need // max(len(text), 1) + 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def eval_tokenizer(hf_dir: str) -> list[str]:
    """The --tokenizer flag eval needs: none when the model dir holds one, else the embedded SmolLM2 vocabulary."""
    if any(os.path.exists(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
        return []
    return ["--tokenizer", "default"]      # the bench HF dir holds weights only; its vocabulary is SmolLM2's


def prefill_flops(cfg: dict, L: int) -> float:
    """Multiply-adds x 2 of one causal prefill of L tokens, logits of the last position only."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // nh
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    linear = 2 * (h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * inter)   # per token per layer
    attn = 2 * 2 * nh * hd * L * (L + 1) / 2                                      # QK^T and PV, causal
    return layers * (L * linear + attn) + 2 * h * vocab


def kv_cache_mb(cfg: dict, L: int, bytes_per: int = 4) -> float:
    """K and V of L tokens, every layer (npllama's cache at float32)."""
    nh = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", nh) * hd * L * bytes_per / 2**20


# ---------------------------------------------------------------- one (side, length), in its own process
def _first(logits) -> dict:
    """Greedy first token and the 5 most likely ids of one (V,) row of logits."""
    import numpy as np
    row = np.asarray(logits, dtype=np.float64)
    top = np.argsort(-row, kind="stable")[:5]
    return {"first_token": int(top[0]), "top5": [int(t) for t in top],
            "top2_margin": float(row[top[0]] - row[top[1]])}


def side(which: str, paths: dict, a: argparse.Namespace) -> dict:
    """One side at one length: load, warm-up, timed prefills; the JSON result of this child."""
    t_imp = time.perf_counter()
    import numpy as np
    L = a.length
    with open(os.path.join(paths["hf_dir"], "config.json")) as f:
        cfg = json.load(f)
    ids = bench_smollm2.token_ids(cfg["vocab_size"], L, 3)
    res: dict = {"side": which, "length": L, "pid": os.getpid()}
    if which == "npllama-eval":
        return eval_side(paths, a, res)
    last: list = []
    if which == "npllama":
        import npllama
        from npllama import blasthreads
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        model = npllama.Llama.from_pretrained(paths["hf_dir"], dtype="float32")
        res["load_s"] = time.perf_counter() - t0
        res["blas_threads"] = blasthreads.get_threads()
        res["rss_after_load_mb"] = C.rss_mb()
        res["weight_bytes"] = int(sum(p.nbytes for p in model.params.values()))
        x = np.array([ids])

        def run() -> None:
            cache = model.new_cache(1, L)          # a fresh cache each time: nothing carried over
            last.append(np.asarray(model.forward(x, cache=cache, start_pos=0, last_only=True))[0, -1])
    elif which == "torch":
        import torch
        from transformers import AutoModelForCausalLM
        res["import_s"] = time.perf_counter() - t_imp
        res["threads"] = torch.get_num_threads()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(paths["hf_dir"], dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        res["load_s"] = time.perf_counter() - t0
        res["rss_after_load_mb"] = C.rss_mb()
        res["attn_implementation"] = model.config._attn_implementation
        x = torch.tensor([ids])

        def run() -> None:
            with torch.inference_mode():      # use_cache=True: a fresh DynamicCache per call
                last.append(model(x, use_cache=True, logits_to_keep=1).logits[0, -1].float().numpy())
    else:
        import llama_cpp
        res["import_s"] = time.perf_counter() - t_imp
        res["version"] = llama_cpp.__version__
        res["threads"] = C.ncores()
        t0 = time.perf_counter()
        model = llama_cpp.Llama(paths["f32_gguf"], n_ctx=L + 16, n_batch=LLAMA_CPP_BATCH, n_ubatch=LLAMA_CPP_BATCH,
                                n_threads=C.ncores(), n_threads_batch=C.ncores(), verbose=False)
        res["load_s"] = time.perf_counter() - t0
        res["rss_after_load_mb"] = C.rss_mb()
        n_vocab = model.n_vocab()

        def run() -> None:
            model.reset()                     # eval() then drops every cached position: a full prefill
            model.eval(ids)
            last.append(llama_cpp_last_logits(llama_cpp, model, n_vocab))
    res["prefill_s"] = C.timeit(run, a.reps, a.warmup)
    res.update(_first(last[-1]))
    res["peak_rss_mb"] = C.peak_rss_mb()
    return res


def llama_cpp_last_logits(llama_cpp, model, n_vocab: int):
    """The last evaluated position's logits, read from the llama.cpp context.

    Not model.scores: with logits_all=False (the default) llama-cpp-python 0.3.x (0.3.36 read) eval() no longer
    copies any logits into scores (sampling happens inside llama.cpp), and scores has only n_batch rows,
    so scores[L - 1] is not the last position's. Each batch of eval() asks for the logits of its last
    token only, so llama_get_logits_ith(ctx, -1) (the last output row) is that token's; a build that
    does not take a negative index returns NULL, and then row 0 of llama_get_logits is the same row.
    """
    import numpy as np
    p = llama_cpp.llama_get_logits_ith(model.ctx, -1)
    if not p:
        p = llama_cpp.llama_get_logits(model.ctx)
    return np.ctypeslib.as_array(p, shape=(n_vocab,)).copy()


def eval_side(paths: dict, a: argparse.Namespace, res: dict) -> dict:
    """`run.py eval FILE --context L --max-tokens L` in this process: one window of L tokens, as a user runs it."""
    from npllama import cli
    res["rss_before_mb"] = C.rss_mb()          # the interpreter and the imports, before any model
    argv = ["eval", a.text, "--model", paths["hf_dir"], "--context", str(a.length),
            "--max-tokens", str(a.length), "--dtype", "float32"] + eval_tokenizer(paths["hf_dir"])
    res["argv"] = argv
    outs: list[str] = []

    def run() -> None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
        if rc != 0:
            raise RuntimeError(f"run.py eval exited {rc}: {err.getvalue().strip()[-300:]}")
        outs.append(out.getvalue())
    res["eval_s"] = C.timeit(run, a.reps, a.warmup)
    res["peak_rss_mb"] = C.peak_rss_mb()
    line = outs[-1].strip().splitlines()[-1]
    res["output"] = line
    m = re.search(r"perplexity ([0-9.]+).*over (\d+) tokens.*; (\d+) tok/s", line)
    if m is None:
        raise RuntimeError(f"unexpected eval output: {line!r}")
    res["perplexity"], res["tokens_scored"], res["scoring_tok_s"] = float(m[1]), int(m[2]), int(m[3])
    return res


# ---------------------------------------------------------------- the parent
def summarize(r: dict, L: int, flops: float) -> dict:
    """Medians of one (side, length) raw result."""
    if "error" in r:
        return {"error": r["error"]}
    if r["side"] == "npllama-eval":
        s = {"eval_wall_s": C.med(r["eval_s"]), "scoring_tok_s": r["scoring_tok_s"], "perplexity": r["perplexity"],
             "tokens_scored": r["tokens_scored"], "peak_rss_mb": r["peak_rss_mb"], "rss_before_mb": r["rss_before_mb"]}
    else:
        t = C.med(r["prefill_s"])
        s = {"ttft_s": t, "tok_s": L / t, "gflop_s": flops / t / 1e9, "peak_rss_mb": r["peak_rss_mb"],
             "rss_after_load_mb": r["rss_after_load_mb"], "load_s": r["load_s"], "first_token": r["first_token"],
             "threads": r.get("blas_threads", r.get("threads"))}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}


def main(argv: list[str] | None = None) -> dict:
    """Run every (side, length) in its own process and write longctx.json / longctx.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8190", help="prompt lengths in tokens (SmolLM2's context: 8192)")
    ap.add_argument("--reps", type=int, default=2, help="timed prefills per (side, length) (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed prefills first (0 keeps a long run short)")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--out", default=None, help="folder for longctx.json / longctx.md (default bench/results)")
    ap.add_argument("--no-retry", action="store_true", help="do not rerun a side that ran on a busy machine")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)        # tests: a tiny model instead of SmolLM2
    a = ap.parse_args(argv)
    if a.side:
        C.emit(side(a.side, json.loads(a.paths), a))
        return {}

    lengths = [int(x) for x in a.lengths.split(",")]
    sides = [s for s in a.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise SystemExit(f"unknown side {bad[0]!r} (choose from {', '.join(SIDES)})")
    if a.hf_dir:
        paths = {"hf_dir": a.hf_dir, "f32_gguf": None, "source": None}
    else:
        print("preparing weights (once) ...", file=sys.stderr, flush=True)
        paths = bench_smollm2.prepare(C.cache_dir())
    with open(os.path.join(paths["hf_dir"], "config.json")) as f:
        cfg = json.load(f)
    ctx = cfg.get("max_position_embeddings")
    text = text_file(os.path.join(C.cache_dir(), "longctx_text.txt"), max(lengths)) if "npllama-eval" in sides else None
    data: dict = {"workload": "SmolLM2-135M-Instruct float32, long-context prefill", "machine": C.machine_info(),
                  "settings": {"lengths": lengths, "reps": a.reps, "warmup": a.warmup, "sides": sides,
                               "llama_cpp_batch": LLAMA_CPP_BATCH},
                  "paths": paths, "load_before": C.other_load()}
    ceil, _ = C.run_child([os.path.join(C.ROOT, "bench", "_common.py"), "ceilings"])
    data["ceilings"] = ceil
    raw: dict = {}
    for L in lengths:
        raw[str(L)] = {}
        for s in sides:
            if ctx and L > ctx:
                raw[str(L)][s] = {"skipped": f"{L} tokens is longer than the model's context ({ctx})"}
                continue
            if s == "llama.cpp" and (importlib.util.find_spec("llama_cpp") is None or not paths.get("f32_gguf")):
                raw[str(L)][s] = {"skipped": "llama-cpp-python is not installed (pip install 'npllama[bench]')"}
                continue
            if s == "torch" and importlib.util.find_spec("torch") is None:
                raw[str(L)][s] = {"skipped": "torch is not installed"}
                continue
            print(f"-- {s} @ {L}", file=sys.stderr, flush=True)
            argv_s = [os.path.abspath(__file__), "--side", s, "--paths", json.dumps(paths), "--length", str(L),
                      "--reps", str(a.reps), "--warmup", str(a.warmup)] + (["--text", text] if text else [])
            raw[str(L)][s] = C.run_side(argv_s, retry_busy=not a.no_retry)
    data["raw"] = raw
    data["load_after"] = C.other_load()
    summ, agree, ratios = {}, {}, {}
    for L in lengths:
        rs = raw[str(L)]
        flops = prefill_flops(cfg, L)
        summ[str(L)] = {s: summarize(r, L, flops) for s, r in rs.items() if "skipped" not in r}
        sl = summ[str(L)]
        ref = sl.get("npllama", {}).get("first_token")
        agree[str(L)] = {s: v["first_token"] == ref for s, v in sl.items()
                         if s not in ("npllama", "npllama-eval") and ref is not None and "first_token" in v}
        n = sl.get("npllama", {"error": "not run"})
        ratios[str(L)] = {f"npllama / {p}": {k: C.ratio(n.get(k), sl[p].get(k)) for k in ("tok_s", "peak_rss_mb")}
                          for p in ("torch", "llama.cpp") if p in sl and "error" not in sl[p] and "error" not in n}
        ev = sl.get("npllama-eval", {})
        if "peak_rss_mb" in ev:
            ev["kv_cache_mb"] = round(kv_cache_mb(cfg, L), 1)
            ev["window_tokens_ok"] = ev["tokens_scored"] == L
            if "rss_after_load_mb" in sl.get("npllama", {}):
                # what one window added over a loaded model (the npllama side's RSS after load, same length)
                ev["peak_over_loaded_mb"] = round(ev["peak_rss_mb"] - sl["npllama"]["rss_after_load_mb"], 1)
    data["summary"], data["first_token_agrees_with_npllama"], data["ratios"] = summ, agree, ratios
    data["prefill_gflop"] = {str(L): round(prefill_flops(cfg, L) / 1e9, 2) for L in lengths}
    wb = next((r.get("weight_bytes") for rs in raw.values() for r in [rs.get("npllama", {})] if r.get("weight_bytes")),
              None)
    if wb:
        data["weight_mb"] = round(wb / 2**20, 1)
    md = render(data)
    C.write_outputs("longctx", data, md, a.out)
    return data


def render(d: dict) -> str:
    """The markdown report: one table per length, the eval table, ceilings, machine load."""
    ceil, m = d["ceilings"], d["machine"]
    gemm = ceil.get("gemm_GFLOPs_float32")
    out = [f"### SmolLM2-135M-Instruct, float32, long-context prefill ({m['cores']} cores, {m['cpu']})", "",
           f"Time to first token = one prefill of L tokens (median of {d['settings']['reps']} after "
           f"{d['settings']['warmup']} warm-up); every (side, length) in a process of its own.", ""]
    for L, sl in d["summary"].items():
        rows = []
        for side, v in sl.items():
            if side == "npllama-eval":
                continue
            if "error" in v:
                rows.append([side, "error: " + v["error"][:80]] + [None] * 6)
                continue
            pct = f"{round(100 * v['gflop_s'] / gemm)}%" if gemm else None
            rows.append([side, f"{v['ttft_s']:.3f}", v["tok_s"], f"{v['gflop_s']:.1f} ({pct})", v["peak_rss_mb"],
                         v["rss_after_load_mb"], v["first_token"], v.get("threads")])
        for side, r in d["raw"][L].items():
            if "skipped" in r and side != "npllama-eval":
                rows.append([side, "skipped: " + r["skipped"]] + [None] * 6)
        out += [f"#### {L} tokens ({d['prefill_gflop'][L]} GFLOP)", "",
                C.md_table(["side", "time to first token s", "tok/s", "GFLOP/s (of NumPy GEMM)", "peak RSS MiB",
                            "RSS after load MiB", "first token", "threads"], rows), ""]
        rat = d["ratios"].get(L, {})
        if rat:
            out.append("Ratios: " + "; ".join(f"{k}: tok/s {C.fmt(v['tok_s'], 2)}x, "
                                             f"peak RSS {C.fmt(v['peak_rss_mb'], 2)}x" for k, v in rat.items())
                       + " (tok/s above 1 = npllama faster, RSS below 1 = npllama smaller).")
        agree = d["first_token_agrees_with_npllama"].get(L, {})
        if agree:
            out.append("First token agrees with npllama's: " + ", ".join(f"{s} {'yes' if ok else 'NO'}"
                                                                      for s, ok in agree.items()) + ".")
        out.append("")
    erows = []
    for L, sl in d["summary"].items():
        ev = sl.get("npllama-eval")
        if ev is None:
            continue
        if "error" in ev:
            erows.append([L, "error: " + ev["error"][:80]] + [None] * 6)
            continue
        erows.append([L, f"{ev['eval_wall_s']:.2f}", ev["scoring_tok_s"], ev["perplexity"],
                      ev["tokens_scored"] if ev["window_tokens_ok"] else f"{ev['tokens_scored']} (short!)",
                      ev["peak_rss_mb"], ev.get("peak_over_loaded_mb"), ev["kv_cache_mb"]])
    if erows:
        out += ["`run.py eval FILE --context L --max-tokens L` (one window; wall time includes load and "
                f"tokenization; weights {d.get('weight_mb')} MiB):", "",
                C.md_table(["L", "wall s", "scoring tok/s", "perplexity", "tokens scored", "peak RSS MiB",
                            "peak − npllama RSS after load", "KV cache of the window MiB"], erows), ""]
    if "error" not in ceil:
        out.append(f"Ceilings measured in this run: NumPy GEMM float32 {gemm} GFLOP/s, float64 "
                   f"{ceil.get('gemm_GFLOPs_float64')} (the prefill bound); read {ceil.get('read_GBps')} GB/s.")
        out.append(C.blas_note(ceil))
    out.append(f"Machine load: before {d['load_before'].get('other_cores_busy')} other cores busy "
               f"(loadavg {d['load_before'].get('loadavg')}), after {d['load_after'].get('other_cores_busy')}; "
               + C.load_note({f"{s}@{L}": v for L, rs in d["raw"].items() for s, v in rs.items()
                              if "skipped" not in v}))
    return "\n".join(out)


if __name__ == "__main__":
    main()
