"""The benchmark scripts still run: one tiny iteration of each one's machinery (no timing asserted).

Tiny random models, a few tokens, every side in its own process as in a real run. The PyTorch
side runs when torch is installed; the llama.cpp side needs the real SmolLM2 weights and is
skipped here (its code path is exercised by `python bench/run_all.py` where llama-cpp-python exists).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True}
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.fixture()
def bench_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLAMA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NPLLAMA_BENCH_TINY", "1")
    return tmp_path


def test_smollm2_machinery_on_a_tiny_model(bench_env):
    import bench_smollm2
    from npllama import Llama
    from npllama.config import LlamaConfig
    hf = bench_env / "tiny"
    Llama.init(LlamaConfig.from_dict(TINY), seed=0).save_pretrained(str(hf))
    sides = "npllama,npllama-1t,torch,llama.cpp" if HAVE_TORCH else "npllama,npllama-1t,llama.cpp"
    d = bench_smollm2.main(["--hf-dir", str(hf), "--reps", "1", "--load-reps", "2", "--prefill", "8",
                            "--prompt", "4", "--new-tokens", "3", "--batch", "3", "--sides", sides, "--no-retry",
                            "--out", str(bench_env / "out")])
    s = d["summary"]["npllama"]
    assert "error" not in s, s
    assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0 and s["peak_rss_mb"] > 0
    assert "skipped" in d["raw"]["llama.cpp"]                 # no F32 GGUF for a tiny model
    assert len(d["raw"]["npllama"]["tokens"]) == 3
    # the batch decode: 3 prompts of 4 tokens, 3 new tokens each, every row what its prompt gives alone
    assert s["batch_decode_tok_s"] > 0
    rows = d["raw"]["npllama"]["batch_tokens"]
    model = Llama.from_pretrained(str(hf), dtype="float32")
    want = [model.generate(bench_smollm2.token_ids(TINY["vocab_size"], 4, 10 + b), max_new_tokens=3, eos_ids=())
            for b in range(3)]
    assert rows == want and len({tuple(r) for r in want}) > 1, (rows, want)   # different prompts, different rows
    if HAVE_TORCH:
        assert "error" not in d["summary"]["torch"], d["summary"]["torch"]
        # same weights, same greedy decoding: the two sides agree on the tokens
        assert d["tokens_agree_with_npllama"]["torch"] == "first 3 of 3 identical"
        assert d["ratios"]["npllama / torch"]["decode_tok_s"] is not None
        assert d["batch_tokens_agree_with_npllama"]["torch"] == ["first 3 of 3 identical"] * 3
        assert d["summary"]["torch"]["batch_decode_tok_s"] > 0
        assert d["ratios"]["npllama / torch"]["batch_decode_tok_s"] is not None
    assert "load" in d["raw"]["npllama"] and "read_GBps" in d["ceilings"]
    out = bench_env / "out"
    assert json.loads((out / "smollm2.json").read_text())["summary"]
    md = (out / "smollm2.md").read_text()
    assert "| npllama |" in md and "batch-3 decode tok/s" in md


def test_train_step_machinery_on_a_tiny_model(bench_env):
    import bench_train_step
    sides = "npllama,torch" if HAVE_TORCH else "npllama"
    d = bench_train_step.main(["--config", json.dumps(TINY), "--batch", "2", "--seq", "8", "--steps", "1",
                               "--dtypes", "float32,float64", "--sides", sides, "--no-retry",
                               "--out", str(bench_env / "out")])
    for dt in ("float32", "float64"):
        s = d["summary"][f"npllama {dt}"]
        assert "error" not in s, s
        assert s["tok_s"] > 0
        if HAVE_TORCH:
            t = d["summary"][f"torch {dt}"]
            assert "error" not in t, t
            # same weights and batch: the first loss (before any update) agrees
            assert abs(s["first_loss"] - t["first_loss"]) < 1e-4
    assert (bench_env / "out" / "train_step.md").exists()


def test_finetune_machinery_on_a_tiny_model(bench_env):
    import bench_finetune
    from npllama import Llama
    from npllama.config import LlamaConfig
    hf = bench_env / "tiny"
    Llama.init(LlamaConfig.from_dict(TINY), seed=0).save_pretrained(str(hf))
    d = bench_finetune.main(["--hf-dir", str(hf), "--batch", "2", "--seq", "8", "--steps", "1", "--r", "2",
                             "--no-retry", "--out", str(bench_env / "out")])
    s = d["summary"]
    for k in ("lora npllama", "lora npllama-noskip", "full npllama") + (("lora peft", "full torch") if HAVE_TORCH else ()):
        assert "error" not in s[k], (k, s[k])
        assert s[k]["tok_s"] > 0
    # same weights, same batch, a fresh adapter (B = 0): every side's first loss is the base model's
    assert abs(s["lora npllama"]["first_loss"] - s["full npllama"]["first_loss"]) < 1e-5
    assert s["lora npllama"]["trainable"] == 2 * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))   # 2 layers x (q + v)
    if HAVE_TORCH:
        assert s["lora peft"]["trainable"] == s["lora npllama"]["trainable"]
        assert abs(s["lora peft"]["first_loss"] - s["lora npllama"]["first_loss"]) < 1e-4
        assert abs(s["full torch"]["first_loss"] - s["full npllama"]["first_loss"]) < 1e-4
    assert (bench_env / "out" / "finetune.md").exists()


def test_run_py_bench_runs_run_all(bench_env):
    """`run.py bench tokenizer --out DIR` is run_all's tokenizer workload: its report lands in DIR/all.md."""
    from npllama import cli
    assert cli.main(["bench", "tokenizer", "--quick", "--out", str(bench_env / "out")]) == 0
    data = json.loads((bench_env / "out" / "all.json").read_text())
    assert set(data) == {"machine", "tokenizer"} and data["tokenizer"]["returncode"] == 0, data
    assert "Tokenizer encode" in (bench_env / "out" / "all.md").read_text()


def test_run_py_bench_knows_every_workload_of_run_all():
    """`run.py bench` checks workload names itself: its list is run_all's (longctx included)."""
    import run_all
    from npllama import cli
    assert cli.BENCH_WORKLOADS == run_all.WORKLOADS and "longctx" in run_all.WORKLOADS


def test_f32_gguf_writer_keeps_metadata_and_dequantizes(tmp_path):
    """write_f32_gguf on a small made-up GGUF: metadata copied, a quantized tensor comes back as F32."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from bench_smollm2 import write_f32_gguf
    src, dst = str(tmp_path / "q.gguf"), str(tmp_path / "f32.gguf")
    w = gguf.GGUFWriter(src, "llama")
    w.add_block_count(1)
    w.add_token_list(["a", "b"])
    a = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("t.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    write_f32_gguf(src, dst)
    r = gguf.GGUFReader(dst)
    assert r.fields["llama.block_count"].contents() == 1
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    t = r.tensors[0]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(np.asarray(t.data).reshape(4, 64), a, atol=0.05)


def test_longctx_machinery_on_a_tiny_model(bench_env):
    """bench_longctx at 16 and 32 tokens: a process per (side, length), first tokens agree, eval scores one window."""
    import bench_longctx
    from tiny_cli import smol_gguf, tiny_model

    from npllama import Llama
    from npllama.cli import perplexity
    from npllama.tokenizer import Tokenizer
    hf = tiny_model(str(bench_env / "tiny"), smol_gguf())       # SmolLM2's vocabulary: eval can tokenize
    sides = "npllama,npllama-eval,torch,llama.cpp" if HAVE_TORCH else "npllama,npllama-eval,llama.cpp"
    d = bench_longctx.main(["--hf-dir", hf, "--lengths", "16,32", "--reps", "1", "--warmup", "1", "--sides", sides,
                            "--no-retry", "--out", str(bench_env / "out")])
    text = open(bench_env / "cache" / "longctx_text.txt", encoding="utf-8").read()
    ids = Tokenizer.from_pretrained(hf).encode(text)
    model = Llama.from_pretrained(hf, dtype="float32")
    pids = set()
    for L in (16, 32):
        s, raw = d["summary"][str(L)], d["raw"][str(L)]
        n = s["npllama"]
        assert "error" not in n, n
        assert n["tok_s"] > 0 and n["peak_rss_mb"] >= n["rss_after_load_mb"] > 0
        assert len(raw["npllama"]["prefill_s"]) == 1
        assert "skipped" in raw["llama.cpp"]                      # no F32 GGUF for a tiny model
        # the first token is the argmax of the last position's logits of the same ids, computed here
        x = [bench_longctx.bench_smollm2.token_ids(49152, L, 3)]
        assert n["first_token"] == int(model.forward(x)[0, -1].argmax())
        ev = s["npllama-eval"]
        assert "error" not in ev, ev
        assert ev["tokens_scored"] == L and ev["window_tokens_ok"] and ev["peak_rss_mb"] > ev["rss_before_mb"] > 0
        # the CLI's printed perplexity is that of the file's first window of L tokens
        want = perplexity(model, ids[:L + 1], L)[0]
        assert abs(ev["perplexity"] - want) <= 1e-3 * want, (ev["perplexity"], want)
        if HAVE_TORCH:
            t = s["torch"]
            assert "error" not in t, t
            assert d["first_token_agrees_with_npllama"][str(L)] == {"torch": True}
            assert d["ratios"][str(L)]["npllama / torch"]["tok_s"] is not None
        pids |= {raw[k]["pid"] for k in raw if "pid" in raw[k]}
    # every (side, length) ran in a process of its own, none in this one
    assert len(pids) == 2 * (3 if HAVE_TORCH else 2) and os.getpid() not in pids
    md = (bench_env / "out" / "longctx.md").read_text()
    assert "#### 16 tokens" in md and "#### 32 tokens" in md and "run.py eval" in md
    assert json.loads((bench_env / "out" / "longctx.json").read_text())["summary"]["32"]["npllama"]["tok_s"] > 0
