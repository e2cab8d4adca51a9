"""Every bad input to the CLI is one line on stderr naming the culprit, with exit code 2 (table-driven).

Rows run `npllama.cli.main(argv)` in-process on a tiny random model (fast); the few that need a real
process (Ctrl-C during the imports, a closed stdout, a missing numpy) run run.py as a subprocess.
A bug (any exception that is not an NpllamaError) is an "internal error" with exit code 1.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny_cli
from conftest import REPO
from npllama import cli
from npllama.config import LlamaConfig
from npllama.model import Llama

RUN = os.path.join(REPO, "run.py")
CTX = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the rows refer to: a tiny model with SmolLM2's vocabulary, one with NaN weights, a text, ..."""
    gguf = tiny_cli.smol_gguf()
    root = tmp_path_factory.mktemp("bad-input")
    cfg = tiny_cli.tiny_config(CTX)
    tiny = tiny_cli.tiny_model(root / "tiny", gguf, CTX)
    m = Llama.init(cfg, seed=0, std=0.5)
    m.params["model.norm.weight"][...] = np.nan
    nan = tiny_cli.tiny_model(root / "nan", gguf, CTX, model=m)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    full = root / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    plain = root / "plain.bin"
    plain.write_bytes(b"abc")
    return {"tiny": tiny, "nan": nan, "text": str(text), "full": str(full), "root": str(root),
            "plain": str(plain), "config": str(root / "config.json")}


# (argv with {placeholders} from `files`, stdin or None, words the one-line message must contain)
ROWS = [
    (["--model", "{tiny}"], None, ["--model", "subcommand"]),
    (["--prompt", "hi"], None, ["--prompt", "subcommand"]),
    (["generate", "--seed", "-1", "--prompt", "x"], None, ["--seed"]),
    (["generate", "--seed", "1.5", "--prompt", "x"], None, ["--seed"]),
    (["generate", "--max-new-tokens", "-1", "--prompt", "x"], None, ["--max-new-tokens"]),
    (["generate", "--top-k", "0", "--prompt", "x"], None, ["--top-k"]),
    (["generate", "--top-p", "nan", "--prompt", "x"], None, ["--top-p"]),
    (["generate", "--top-p", "1.5", "--prompt", "x"], None, ["--top-p"]),
    (["generate", "--min-p", "-0.1", "--prompt", "x"], None, ["--min-p"]),
    (["generate", "--temperature", "inf", "--prompt", "x"], None, ["--temperature"]),
    (["generate", "--temperature", "-1", "--prompt", "x"], None, ["--temperature"]),
    (["generate", "--repetition-penalty", "0", "--prompt", "x"], None, ["--repetition-penalty"]),
    (["chat", "--top-k", "-3"], None, ["--top-k"]),
    (["generate", "--model", "{tiny}", "--chat", ""], None, ["empty"]),
    (["generate", "--model", "{tiny}", "--prompt", "word " * 80], None, ["context"]),
    (["generate", "--model", "{tiny}", "--tokenizer", "{root}/nope", "--prompt", "x"], None, ["--tokenizer"]),
    (["generate", "--model", "{plain}", "--prompt", "x"], None, ["plain.bin"]),
    (["generate", "--model", "{nan}", "--prompt", "x", "--max-new-tokens", "2"], None, ["finite"]),
    (["eval", "{text}", "--model", "{tiny}", "--context", "0"], None, ["--context"]),
    (["eval", "{text}", "--model", "{tiny}", "--max-tokens", "-5"], None, ["--max-tokens"]),
    (["eval", "{text}", "--model", "{tiny}", "--context", "100000"], None, ["--context", str(CTX)]),
    (["eval", "{text}", "--model", "{nan}", "--context", "16"], None, ["finite"]),
    (["eval", "{root}/nope.txt", "--model", "{tiny}"], None, ["nope.txt"]),
    (["convert", "{tiny}", "{full}"], None, ["full", "--force"]),
    (["convert", "{tiny}", "{plain}/sub"], None, ["plain.bin"]),
    (["bench", "nope"], None, ["nope"]),
    (["train", "--out", "{root}/run"], None, ["--config", "--model"]),
    (["train", "--config", "{config}", "--out", "{root}/run2"], None, ["--data"]),
    (["train", "--out", "{root}/run3", "--resume"], None, ["--resume"]),
    (["train", "--config", "{config}", "--data", "{text}", "--tokenizer", "{tiny}", "--out", "{root}/run4",
      "--steps", "-1"], None, ["--steps"]),
    (["train", "--config", "{config}", "--data", "{text}", "--tokenizer", "{tiny}", "--out", "{root}/run5",
      "--batch-size", "0"], None, ["--batch-size"]),
    (["eval", "{root}", "--model", "{tiny}"], None, ["not a text file"]),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--stop", ""], None, ["stop"]),
]


def _main(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    try:
        rc = cli.main(argv)
    except SystemExit as e:   # argparse's own exit, for versions of main() that let it through
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc, err, words, code=2):
    assert rc == code, (rc, err)
    err = err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("npllama"), err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("argv,stdin,words", ROWS, ids=[" ".join(r[0])[:60] for r in ROWS])
def test_bad_input_is_one_line_exit_2(files, argv, stdin, words, capsys, monkeypatch):
    monkeypatch.chdir(files["root"])
    argv = [a.format(**files) for a in argv]
    rc, _, err = _main(argv, capsys, io.StringIO(stdin) if stdin is not None else None, monkeypatch)
    assert_one_line(rc, err, words)


@pytest.mark.parametrize("cmd", [["generate", "--model", "{tiny}"], ["chat", "--model", "{tiny}"]])
def test_closed_stdin_is_an_error_not_the_default_prompt(files, cmd, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    rc, out, err = _main([a.format(**files) for a in cmd], capsys)
    assert_one_line(rc, err, ["stdin"])
    assert out == ""


def test_closed_stdout_is_an_error(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)
    rc = cli.main(["generate", "--model", files["tiny"], "--prompt", "x"])
    assert_one_line(rc, capsys.readouterr().err, ["stdout"])


def test_stdout_closed_by_the_reader_is_one_line(files, capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    rc = cli.main(["generate", "--model", files["tiny"], "--prompt", "x", "--max-new-tokens", "3"])
    assert_one_line(rc, capsys.readouterr().err, ["stdout", "broken pipe"])


def test_convert_force_overwrites(files, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert cli.main(["convert", files["tiny"], str(out), "--force"]) == 0
    assert (out / "config.json").exists()


def test_a_bug_is_an_internal_error_exit_1(files, capsys, monkeypatch):
    def broken(args):
        raise ValueError("something inside went wrong")
    monkeypatch.setattr(cli, "cmd_generate", broken)
    rc, _, err = _main(["generate", "--prompt", "x"], capsys)
    assert_one_line(rc, err, ["internal error", "ValueError", "something inside went wrong"], code=1)
    monkeypatch.setattr(cli, "cmd_generate", lambda a: {}["missing"])
    rc, _, err = _main(["generate", "--prompt", "x"], capsys)
    assert_one_line(rc, err, ["internal error", "KeyError"], code=1)


def test_stdin_prompt_keeps_its_trailing_newline(files, capsys, monkeypatch):
    import npllama.generate as gen
    seen = []

    def fake_stream(model, tok, ids, **kw):
        seen.append(list(ids))
        return iter(())
    monkeypatch.setattr(gen, "stream", fake_stream)
    for text in ("hello\n", "hello"):
        rc, _, err = _main(["generate", "--model", files["tiny"]], capsys, io.StringIO(text), monkeypatch)
        assert rc == 0, err
    from npllama.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(files["tiny"])
    assert seen == [tok.encode("hello\n"), tok.encode("hello")] and seen[0] != seen[1]


def test_zero_new_tokens_prints_no_nan_rate(files, capsys):
    rc = cli.main(["generate", "--model", files["tiny"], "--prompt", "x", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert rc == 0 and "nan" not in err and "0 new tokens" in err, err


def test_eval_in_chunks_equals_one_forward(files):
    """perplexity() feeds each window in KV-cached chunks; the NLL equals one full forward's (float64)."""
    m = Llama.from_pretrained(files["tiny"], dtype="float64")
    ids = list(np.random.default_rng(0).integers(0, 49152, size=41))
    logits = m.forward(np.array([ids[:40]]))[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = float((logz - logits[np.arange(40), ids[1:]]).mean())
    for chunk in (7, 40, 256):
        _, nll, n = cli.perplexity(m, ids, context=40, chunk=chunk)
        assert n == 40 and abs(nll - ref) < 1e-10 * abs(ref), (chunk, nll, ref)


def test_bench_calls_run_all_with_its_flags(monkeypatch, capsys):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import run_all
    got = []
    monkeypatch.setattr(run_all, "main", lambda argv: got.append(argv) or 0)
    assert cli.main(["bench", "smollm2", "tokenizer", "--quick", "--out", "/tmp/x", "--no-retry"]) == 0
    assert cli.main(["bench"]) == 0
    assert got == [["smollm2", "tokenizer", "--quick", "--out", "/tmp/x", "--no-retry"], []]


def test_bench_outside_the_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_bench_dir", lambda: str(tmp_path / "bench"))
    rc, _, err = _main(["bench"], capsys)
    assert_one_line(rc, err, ["bench/run_all.py", "source checkout"])


# ---------------------------------------------------------------- real processes
def test_missing_numpy_says_what_to_install(tmp_path):
    code = ("import sys, runpy; sys.modules['numpy'] = None; sys.argv = ['run.py', 'generate', '--prompt', 'x']; "
            f"runpy.run_path({RUN!r}, run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert "\n" not in err and "numpy" in err and "pip install" in err, err


def test_closed_stdout_in_a_real_process(files):
    p = subprocess.run(f"{sys.executable} {RUN} generate --model {files['tiny']} --prompt x >&-", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "stdout" in p.stderr and "Traceback" not in p.stderr, p.stderr


# Ctrl-C delivered (a real SIGINT) the moment a given module starts importing, run.py's imports included
_INTERRUPT_AT = """
import builtins, os, runpy, signal, sys
target, real_import = sys.argv.pop(1), builtins.__import__
def hook(name, *a, **k):
    if name == target:
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *a, **k)
builtins.__import__ = hook
sys.argv[0] = {run!r}
runpy.run_path({run!r}, run_name="__main__")
"""


@pytest.mark.parametrize("module", ["npllama.__main__", "npllama.cli", "numpy", "npllama.model", "npllama.tokenizer"])
def test_ctrl_c_during_the_imports_exits_130(files, module):
    p = subprocess.run([sys.executable, "-c", _INTERRUPT_AT.format(run=RUN), module, "generate", "--model",
                        files["tiny"], "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and p.stdout == "", p.stderr


def test_ctrl_c_while_running_exits_130(files):
    p = subprocess.Popen([sys.executable, RUN, "chat", "--model", files["tiny"]], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)            # loaded and waiting for a message on stdin
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err, err


def test_train_final_is_a_complete_model_folder(files, tmp_path, capsys):
    """`train --tokenizer <model's tokenizer.gguf>` leaves out/final with the tokenizer: generate runs on it."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=49152,
                                          max_position_embeddings=32).to_dict()))
    out = tmp_path / "run"
    tok = os.path.join(files["tiny"], "tokenizer.gguf")
    assert cli.main(["train", "--config", str(cfg), "--data", files["text"], "--tokenizer", tok, "--out", str(out),
                     "--steps", "1", "--batch-size", "1", "--seq-len", "8", "--eval-every", "0",
                     "--val-fraction", "0.2"]) == 0
    assert (out / "final" / "tokenizer.gguf").is_file()
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out / "final"), "--prompt", "The", "--max-new-tokens", "2"]) == 0
