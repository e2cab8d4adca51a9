"""run.py explain: the numbers (against transformers on the embedded SmolLM2, and against npllama's own fast
forward and generate), the CLI's bad inputs, and the page in a real browser (Debian's chromium-headless-shell:
its scripts run without a console error, the DOM holds what the model computed, the screenshot is not blank).
"""
from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from tiny_cli import one_line_error
from npllama.explain import MAX_TOKENS, PromptTooLong, explain
from npllama.explain_html import QUANT, read_page_data, render, unpack_attention

RUN = os.path.join(REPO, "run.py")
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find"   # 19 tokens
BROWSER = "chromium-headless-shell"


# ---------------------------------------------------------------- the embedded SmolLM2 and transformers on it
@pytest.fixture(scope="module")
def smol():
    from npllama import Llama, Tokenizer
    from npllama.io.defaults import DefaultModelMissing, default_model_path
    try:
        path = default_model_path()
    except DefaultModelMissing as e:
        pytest.fail(str(e))
    return path, Llama.from_pretrained(path), Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def result(smol):
    _, model, tok = smol
    return explain(model, tok, PROMPT)


@pytest.fixture(scope="module")
def hf_out(smol, result):
    """transformers (eager attention) on the same weights: the cached HF-layout copy of the embedded model."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(smol[0], dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = m(torch.tensor([result["ids"]]), output_attentions=True, output_hidden_states=True)
        # the logit lens on transformers' side: each layer's residual stream through the final norm and lm_head
        lens = [torch.softmax(m.lm_head(m.model.norm(h)).double(), -1)[0].numpy() for h in out.hidden_states[1:-1]]
    return [a[0].numpy() for a in out.attentions], lens


def test_attention_matches_transformers(result, hf_out):
    att, ref = np.asarray(result["attention"]), np.stack(hf_out[0])        # (L, H, T, T)
    assert att.shape == ref.shape == (30, 9, 19, 19)
    err = np.abs(att - ref).max()
    assert err <= 2e-5, err          # float32 through 30 layers; measured 3e-6


def test_attention_rows_sum_to_one_and_see_no_future(result):
    att = np.asarray(result["attention"])
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    T = att.shape[-1]
    assert not att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].any()


def _same_top(lens_row, probs, gap=1e-3):
    """lens_row's tokens are probs' most likely ones, in order, wherever the order is clear; probs agree."""
    order = np.argsort(-probs, kind="stable")[:len(lens_row["ids"])]
    np.testing.assert_allclose(lens_row["probs"], probs[order], rtol=2e-3, atol=1e-4)
    for k, (got, want) in enumerate(zip(lens_row["ids"], order)):
        if got != want:   # allowed only for a near tie
            assert abs(probs[got] - probs[want]) < gap, (k, got, want, probs[got], probs[want])


def test_logit_lens_matches_transformers_hidden_states(result, hf_out):
    lens = hf_out[1]
    assert len(lens) == 29 and len(result["lens"]) == 30
    for layer, ref in enumerate(lens):                                     # (T, V) each
        for t, row in enumerate(result["lens"][layer]):
            _same_top(row, ref[t])


def test_last_lens_row_and_next_token_are_the_models_own_output(smol, result):
    _, model, _ = smol
    logits = np.asarray(model.forward(np.array([result["ids"]])), dtype=np.float64)[0]   # the fast path
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for t, row in enumerate(result["lens"][-1]):
        _same_top(row, probs[t])
    _same_top(result["next"], probs[-1])
    assert len(result["next"]["ids"]) == 10


def test_greedy_next_token_is_generates(smol, result):
    _, model, tok = smol
    assert model.generate(result["ids"], max_new_tokens=1, temperature=0.0) == [result["next"]["ids"][0]]
    assert tok.decode(result["next"]["ids"][:1]) == " a"           # a real model says something sensible


def test_tokens_are_the_prompts(smol, result):
    _, _, tok = smol
    assert result["ids"] == tok.encode(PROMPT) and len(result["ids"]) == 19
    assert "".join(result["tokens"]) == PROMPT
    assert result["tokens"] == [tok.decode([i]) for i in result["ids"]]


def test_page_carries_the_numbers_and_stays_small(smol, result):
    page = render(result, "SmolLM2")
    data = read_page_data(page)
    for layer in range(30):
        got = unpack_attention(data["attention"][layer], 9, 19)
        assert np.abs(got - np.asarray(result["attention"][layer])).max() <= 0.5 / QUANT + 1e-9
    assert data["lens"] == result["lens"] and data["next"] == result["next"] and data["tokens"] == result["tokens"]
    assert len(page.encode()) < 250_000            # ~0.18 MB at 19 tokens
    assert "http:" not in page and "https:" not in page and " src=" not in page and " href=" not in page


def test_64_tokens_fit_in_5_mb_and_65_are_refused(smol):
    _, model, tok = smol
    ids = tok.encode(" word" * 64)
    assert len(ids) == 64
    page = render(explain(model, tok, ids), "SmolLM2")
    assert len(page.encode()) < 5_000_000
    with pytest.raises(PromptTooLong, match=r"65 tokens.* at most 64"):
        explain(model, tok, ids + ids[:1])
    assert MAX_TOKENS == 64


# ---------------------------------------------------------------- the CLI (a tiny model with SmolLM2's vocabulary)
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from npllama.config import LlamaConfig
    from npllama.io.defaults import default_gguf
    from npllama.io.gguf import write_tokenizer_gguf
    from npllama.model import Llama
    d = tmp_path_factory.mktemp("tiny") / "model"
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=128, eos_token_id=2,
                      tie_word_embeddings=True)
    Llama.init(cfg, seed=0, std=0.5).save_pretrained(str(d))
    write_tokenizer_gguf(default_gguf(), str(d / "tokenizer.gguf"))
    return str(d)


def run(*args):
    return subprocess.run([sys.executable, RUN, "explain", *args], capture_output=True, text=True, timeout=600)


class Ran:
    """What an in-process run of the CLI gave: returncode, stdout, stderr."""

    def __init__(self, capsys, *args):
        from npllama import cli
        self.returncode = cli.main(["explain", *args])
        self.stdout, self.stderr = capsys.readouterr()


def test_cli_help_lists_explain():
    top = subprocess.run([sys.executable, RUN, "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "explain" in top.stdout
    p = run("--help")
    assert p.returncode == 0 and "--out" in p.stdout and "--png" in p.stdout and "--adapter" in p.stdout


def test_cli_refuses_a_long_prompt_naming_count_and_limit(tiny, tmp_path, capsys):
    p = Ran(capsys, " word" * 70, "--model", tiny, "--out", str(tmp_path / "p.html"))
    one_line_error(p, "70 tokens", "at most 64")
    assert not os.listdir(tmp_path)


def test_cli_bad_outputs_and_flags(tiny, tmp_path, capsys):
    def hi(*args):
        return Ran(capsys, "hi", "--model", tiny, *args)
    html_, png = str(tmp_path / "p.html"), str(tmp_path / "p.png")
    one_line_error(hi("--out", str(tmp_path / "no" / "p.html")), "--out", "does not exist")
    one_line_error(hi("--png", str(tmp_path / "no" / "p.png")), "--png", "does not exist")
    one_line_error(hi("--out", str(tmp_path)), "is a directory")
    one_line_error(hi(), "--out")
    one_line_error(hi("--out", html_, "--layer", "1"), "--png")
    one_line_error(hi("--png", png, "--layer", "2"), "--layer 2", "0..1")
    one_line_error(hi("--png", png, "--head", "x"), "--head")
    one_line_error(hi("--png", png, "--head", "4"), "--head 4", "0..3")
    one_line_error(Ran(capsys, "  ", "--model", tiny, "--out", html_), "empty")
    assert not os.listdir(tmp_path)


def test_cli_bad_adapter(tiny, tmp_path, capsys):
    out = str(tmp_path / "p.html")
    one_line_error(Ran(capsys, "hi", "--model", tiny, "--out", out, "--adapter", str(tmp_path / "none")),
                   "--adapter", "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(Ran(capsys, "hi", "--model", tiny, "--out", out, "--adapter", str(empty)), "adapter_config.json")
    (empty / "adapter_config.json").write_text("{not json")
    one_line_error(Ran(capsys, "hi", "--model", tiny, "--out", out, "--adapter", str(empty)), "adapter_config.json")
    assert not os.path.exists(out)


def test_cli_page_png_and_adapter(tiny, tmp_path):
    from npllama import Llama, Tokenizer, lora
    from PIL import Image
    model, tok = Llama.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    lora.add(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    rng = np.random.default_rng(0)
    for k, v in model.params.items():
        if ".lora_B." in k:
            v[...] = rng.standard_normal(v.shape) * 0.5
    lora.save(model, str(tmp_path / "adapter"))
    # the adapted model, merged by hand: W + (alpha / r) B A
    merged = Llama.from_pretrained(tiny)
    for k in list(merged.params):
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            pre = k[:-len("weight")]
            merged.params[k] += 2.0 * model.params[pre + "lora_B.weight"] @ model.params[pre + "lora_A.weight"]
    want = explain(merged, tok, "Hello there, friend")
    base = explain(Llama.from_pretrained(tiny), tok, "Hello there, friend")

    p = run("Hello there, friend", "--model", tiny, "--out", str(tmp_path / "a.html"), "--adapter",
            str(tmp_path / "adapter"), "--png", str(tmp_path / "a.png"), "--head", "all")
    assert p.returncode == 0, p.stderr
    got = read_page_data((tmp_path / "a.html").read_text())
    assert got["next"]["ids"] == want["next"]["ids"] and got["lens"] == want["lens"]
    np.testing.assert_allclose(got["next"]["probs"], want["next"]["probs"], rtol=1e-3)
    assert got["lens"] != base["lens"]               # the adapter changed what the model reads
    with Image.open(tmp_path / "a.png") as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert im.format == "PNG" and px.shape[0] > 200 and px.std() > 20
    assert sorted(os.listdir(tmp_path)) == ["a.html", "a.png", "adapter"]    # no temp file left


# ---------------------------------------------------------------- the page in a real browser
def browser() -> str:
    path = shutil.which(BROWSER) or f"/usr/bin/{BROWSER}"
    if not os.path.isfile(path):
        pytest.fail(f"{BROWSER} is not installed: apt-get install -y {BROWSER} (.ci/run installs it)")
    return path


def chromium(page: str, tmp, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    p = subprocess.run([browser(), *flags, *args, "file://" + os.path.abspath(page)], capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def open_page(page: str, tmp) -> tuple[list[dict[str, str]], list[str]]:
    """(every element as {tag, attributes...} after the page's scripts ran, the console messages)."""
    p = chromium(page, tmp, "--dump-dom")

    class Elements(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: list[dict[str, str]] = []

        def handle_starttag(self, tag, attrs):
            self.found.append({"tag": tag, **{k: v or "" for k, v in attrs}})
    parser = Elements()
    parser.feed(p.stdout)
    # chromium logs every console message (console.error, uncaught exceptions, blocked loads) as ":CONSOLE"
    return parser.found, [line for line in p.stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page: str, tmp) -> np.ndarray:
    from PIL import Image
    shot = tmp / "shot.png"
    chromium(page, tmp, f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars")
    with Image.open(shot) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def test_explain_page_in_a_browser(smol, tmp_path):
    path, model, tok = smol
    page = str(tmp_path / "page.html")
    p = subprocess.run([sys.executable, RUN, "explain", PROMPT, "--out", page], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    found, console = open_page(page, tmp_path)
    assert console == []
    ids = tok.encode(PROMPT)
    tokens = [e for e in found if "data-token" in e]
    assert [int(e["data-id"]) for e in tokens] == ids
    assert [e["data-text"] for e in tokens] == [tok.decode([i]) for i in ids]
    greedy = model.generate(ids, max_new_tokens=1, temperature=0.0)[0]
    first = [e for e in found if e.get("data-rank") == "1"]
    assert len(first) == 1 and int(first[0]["data-id"]) == greedy and first[0]["data-text"] == tok.decode([greedy])
    assert len([e for e in found if "data-rank" in e]) == 10
    maps = {(int(e["data-layer"]), int(e["data-head"])) for e in found if "data-layer" in e and "data-head" in e}
    assert maps == {(layer, h) for layer in range(30) for h in range(9)}
    assert len([e for e in found if "data-layer" in e]) == 270
    rows = [e for e in found if "data-lens-layer" in e]
    assert [int(e["data-lens-layer"]) for e in rows] == list(range(30)) and {e["tag"] for e in rows} == {"tr"}
    cells = [e for e in found if e["tag"] == "td" and "data-id" in e]
    assert len(cells) == 30 * len(ids)               # one lens cell per layer and position
    px = screenshot(page, tmp_path)
    assert px.shape == (900, 1200, 3)
    # not blank: many colours, real contrast, and a blue share from the attention maps
    assert px.std() > 20 and len(np.unique(px.reshape(-1, 3), axis=0)) > 200
    assert ((px[..., 2] - px[..., 0]) > 60).mean() > 0.01


def _fake_result(tokens: list[str]) -> dict:
    """An explain result for 2 layers x 2 heads with the given token texts (uniform causal attention)."""
    T = len(tokens)
    row = [[1.0 / (t + 1) if s <= t else 0.0 for s in range(T)] for t in range(T)]
    return {"prompt": "".join(tokens), "ids": list(range(T)), "tokens": tokens, "num_layers": 2, "num_heads": 2,
            "num_kv_heads": 1, "attention": [[row, row], [row, row]],
            "lens": [[{"ids": [t], "probs": [0.5]} for t in range(T)] for _ in range(2)],
            "next": {"ids": [0, 1], "probs": [0.6, 0.4]}, "pieces": {str(i): s for i, s in enumerate(tokens)}}


def test_hostile_token_text_stays_text(tmp_path):
    tokens = ["</script><script>console.error('injected')</script>", "<b>&amp;", '"quote\'', "line\nbreak",
              "\\xe2\\x80", "<!--", " tab\t"]
    page = tmp_path / "p.html"
    page.write_text(render(_fake_result(tokens), "a </title> model"))
    found, console = open_page(str(page), tmp_path)
    assert console == []
    assert [e["data-text"] for e in found if "data-token" in e] == tokens
    assert [e["tag"] for e in found].count("script") == 2 and not [e for e in found if e["tag"] == "b"]
    assert len([e for e in found if "data-layer" in e]) == 4 and len([e for e in found if "data-lens-layer" in e]) == 2


@pytest.mark.parametrize("breakage", ["a script error", "a network load"])
def test_the_browser_check_catches_a_broken_page(tmp_path, breakage):
    good = render(_fake_result(["a", "b"]), "m")
    if breakage == "a script error":
        bad = good.replace("const grid = ", "undefinedFunction();\nconst grid = ")
    else:   # the page's policy blocks it, and the block is a console error
        bad = good.replace("</body>", '<img src="https://example.invalid/x.png"></body>')
    assert bad != good
    (tmp_path / "good.html").write_text(good)
    (tmp_path / "bad.html").write_text(bad)
    assert open_page(str(tmp_path / "good.html"), tmp_path)[1] == []
    found, console = open_page(str(tmp_path / "bad.html"), tmp_path)
    assert console, "the broken page's console error was not seen"
    if breakage == "a script error":
        assert "undefinedFunction" in console[0]
        assert not [e for e in found if "data-layer" in e]     # the script stopped before the maps
