"""run.py finetune end to end on a tiny random model with SmolLM2's vocabulary: a LoRA run, its exact resume after
Ctrl-C, PEFT reading the adapter it writes, --full, --adapter on generate/eval, and every bad input in one line."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

import tiny_cli
from npllama import Tokenizer, lora
from npllama.cli import main
from npllama.config import LlamaConfig
from npllama.model import Llama
from npllama.train.trainer import Trainer

TARGETS = "q_proj,v_proj,down_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model folder with SmolLM2's vocabulary (its tokenizer.gguf made from the real GGUF)."""
    return tiny_cli.tiny_model(tmp_path_factory.mktemp("tiny") / "model", tiny_cli.smol_gguf())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    r = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for _ in range(14):
            a, b = (int(v) for v in r.integers(1, 50, 2))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": f"The answer is {a + b}."}]}) + "\n")
    return str(path)


def args(tiny, data, out, *more):
    return ["finetune", "--model", tiny, "--data", data, "--out", str(out), "--steps", "6", "--batch-size", "2",
            "--seq-len", "48", "--lr", "1e-2", "--lora-r", "4", "--lora-targets", TARGETS, "--lora-dropout", "0.1",
            "--save-every", "3", "--eval-every", "3", "--eval-batches", "1", "--log-every", "1", *more]


@pytest.fixture(scope="module")
def lora_run(tiny, data, tmp_path_factory):
    """One uninterrupted LoRA run: (out dir, its stdout)."""
    out = tmp_path_factory.mktemp("run") / "a"
    cap = tmp_path_factory.mktemp("log") / "stdout"
    import contextlib
    with open(cap, "w") as f, contextlib.redirect_stdout(f):
        assert main(args(tiny, data, out)) == 0
    return str(out), open(cap).read()


def test_lora_finetune_writes_a_peft_adapter(lora_run):
    out, text = lora_run
    assert "[" in text and "tok/s" in text and "val loss" in text and "14 of 14 conversations used" in text
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(os.path.join(out, "final", "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 16.0, 0.1)
    hist = [json.loads(x) for x in open(os.path.join(out, "history.jsonl"))]
    assert [h["step"] for h in hist if "loss" in h] == list(range(1, 7))
    assert [h["step"] for h in hist if "val_loss" in h] == [0, 3, 6]
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000


def test_resume_after_ctrl_c_ends_with_the_same_adapter(lora_run, tiny, data, tmp_path, monkeypatch, capsys):
    step = Trainer.train_step

    def interrupted(self):
        if self.step == 4:              # Ctrl-C during step 5: the last checkpoint is step 3's
            raise KeyboardInterrupt
        return step(self)
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    out = tmp_path / "b"
    assert main(args(tiny, data, out)) == 130
    assert not os.path.exists(out / "final")
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(["finetune", "--out", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with open(os.path.join(lora_run[0], "final", name), "rb") as a, open(out / "final" / name, "rb") as b:
            assert a.read() == b.read(), name


def test_peft_reads_the_adapter_and_gives_the_same_logits(lora_run, tiny):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM
    final = os.path.join(lora_run[0], "final")
    ids = np.random.default_rng(1).integers(0, 49152, (2, 17))
    hf = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32), final)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    model = Llama.from_pretrained(tiny, dtype="float32")
    base = model.forward(ids)
    lora.load(model, final)
    assert any(np.abs(v).max() > 0 for k, v in lora.lora_params(model).items() if ".lora_B." in k)
    assert np.abs(base - ref).max() > 1e-3                 # the adapter matters
    assert np.abs(model.forward(ids) - ref).max() <= 1e-4


def test_generate_chat_and_eval_with_the_adapter(lora_run, tiny, tmp_path, capsys, monkeypatch):
    final = os.path.join(lora_run[0], "final")
    model = Llama.from_pretrained(tiny, dtype="float32")
    lora.load(model, final)
    lora.merge(model)
    tok = Tokenizer.from_pretrained(tiny)
    prompt = "What is 3 + 4?"
    want = tok.decode(model.generate(tok.apply_chat_template([{"role": "user", "content": prompt}]),
                                     max_new_tokens=6, temperature=0.0))
    assert main(["generate", "--model", tiny, "--adapter", final, "--chat", "--prompt", prompt,
                 "--max-new-tokens", "6", "--quiet"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want
    monkeypatch.setattr("sys.stdin", io.StringIO(prompt + "\n"))
    assert main(["chat", "--model", tiny, "--adapter", final, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"> {prompt}\n{want}\n"
    text = tmp_path / "t.txt"
    text.write_text("The answer is 42. The answer is 17. " * 3)
    got = {}
    for extra in ([], ["--adapter", final]):
        assert main(["eval", str(text), "--model", tiny, "--context", "32", *extra]) == 0
        got[bool(extra)] = capsys.readouterr().out
    assert got[True].startswith("perplexity") and got[True] != got[False]


def test_full_finetune_writes_a_loadable_model(tiny, data, tmp_path, capsys):
    out = tmp_path / "full"
    argv = ["finetune", "--model", tiny, "--data", data, "--out", str(out), "--full", "--steps", "2",
            "--batch-size", "2", "--seq-len", "48", "--eval-every", "0", "--log-every", "1"]
    assert main(argv) == 0
    final = str(out / "final")
    assert {"config.json", "model.safetensors", "tokenizer.gguf"} <= set(os.listdir(final))
    new, old = Llama.from_pretrained(final), Llama.from_pretrained(tiny)
    assert set(new.params) == set(old.params)
    assert any(not np.array_equal(new.params[k], old.params[k]) for k in old.params)
    capsys.readouterr()
    assert main(["generate", "--model", final, "--prompt", "Hi", "--max-new-tokens", "3", "--quiet"]) == 0


def test_help_lists_finetune(capsys):
    assert main(["--help"]) == 0
    assert "finetune" in capsys.readouterr().out
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora-targets" in out and "--full" in out and "--resume" in out


def test_full_finetune_resumes_exactly(tiny, data, tmp_path, monkeypatch, capsys):
    argv = lambda out: ["finetune", "--model", tiny, "--data", data, "--out", str(out), "--full", "--steps", "4",  # noqa: E731
                        "--batch-size", "2", "--seq-len", "48", "--lr", "1e-3", "--save-every", "2",
                        "--eval-every", "0", "--log-every", "0"]
    assert main(argv(tmp_path / "a")) == 0
    step = Trainer.train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self)
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert main(argv(tmp_path / "b")) == 130
    monkeypatch.setattr(Trainer, "train_step", step)
    # the resumed process finds the machine busier: its load-time policy picks another BLAS thread count,
    # which rounds the products differently; the checkpoint's count is what the run must go on with
    from npllama import blasthreads
    saved = blasthreads.get_threads(use_threadpoolctl=False)
    assert saved is not None, "NumPy's OpenBLAS was not found through ctypes"
    monkeypatch.setattr(blasthreads, "apply", lambda *a, **k: blasthreads.set_threads(3 - min(saved, 2), False))
    try:
        assert main(["finetune", "--out", str(tmp_path / "b"), "--resume"]) == 0
    finally:
        blasthreads.set_threads(saved, use_threadpoolctl=False)
    assert "at step 2" in capsys.readouterr().out
    a, b = (Llama.from_pretrained(str(tmp_path / x / "final")) for x in "ab")
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k


# ---------------------------------------------------------------- bad input: one line, exit 2, the thing named
def _other_adapter(tmp_path):
    """An adapter for a model of another width: its tensors do not fit the tiny model."""
    m = Llama.init(LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=49152, max_position_embeddings=64), seed=0)
    lora.add(m, r=4, targets=["q_proj"])
    d = tmp_path / "other"
    lora.save(m, str(d))
    return str(d)


def _dora_adapter(tmp_path, lora_run):
    import shutil
    d = tmp_path / "dora"
    shutil.copytree(os.path.join(lora_run[0], "final"), d)
    cfg = json.load(open(d / "adapter_config.json"))
    cfg["use_dora"] = True
    json.dump(cfg, open(d / "adapter_config.json", "w"))
    return str(d)


def _bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                 '{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}\n')
    return str(p)


def _no_assistant(tmp_path):
    p = tmp_path / "none.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    return str(p)


BAD = {
    "unknown target": (lambda t, d, p, r: args(t, d, p / "o", "--lora-targets", "q_proj,foo_proj"), ["'foo_proj'"]),
    "r <= 0": (lambda t, d, p, r: args(t, d, p / "o", "--lora-r", "0"), ["--lora-r"]),
    "alpha <= 0": (lambda t, d, p, r: args(t, d, p / "o", "--lora-alpha", "0"), ["--lora-alpha"]),
    "dropout 1": (lambda t, d, p, r: args(t, d, p / "o", "--lora-dropout", "1"), ["--lora-dropout"]),
    "lora with full": (lambda t, d, p, r: args(t, d, p / "o", "--full"), ["--lora-r", "--full"]),
    "malformed line": (lambda t, d, p, r: args(t, _bad_jsonl(p), p / "o"), ["bad.jsonl:2", "'wizard'"]),
    "no usable conversation": (lambda t, d, p, r: args(t, _no_assistant(p), p / "o"),
                               ["none.jsonl", "no usable conversations", "no assistant turn"]),
    "no data": (lambda t, d, p, r: ["finetune", "--model", t, "--out", str(p / "o")], ["--data"]),
    "missing model": (lambda t, d, p, r: args(str(p / "nope"), d, p / "o"), ["--model", "nope"]),
    "seq-len over context": (lambda t, d, p, r: args(t, d, p / "o", "--seq-len", "100"), ["--seq-len 100"]),
    "resume nothing": (lambda t, d, p, r: ["finetune", "--out", str(p / "o"), "--resume"], ["no checkpoint"]),
    "adapter of another model": (lambda t, d, p, r: ["generate", "--model", t, "--adapter", _other_adapter(p),
                                                      "--prompt", "hi"], ["q_proj.lora_A.weight", "shape"]),
    "unsupported adapter option": (lambda t, d, p, r: ["eval", d, "--model", t, "--adapter", _dora_adapter(p, r)],
                                   ["use_dora"]),
    "adapter missing": (lambda t, d, p, r: ["generate", "--model", t, "--adapter", str(p / "nope"), "--prompt", "x"],
                        ["--adapter", "no such directory"]),
}


@pytest.mark.parametrize("row", list(BAD))
def test_bad_input_is_one_line_exit_2(row, tiny, data, lora_run, tmp_path, capsys):
    make, words = BAD[row]
    argv = make(tiny, data, tmp_path, lora_run)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not os.path.exists(tmp_path / "o" / "final")
