"""Token files and batches: dtype choice, sidecar checks, seeded determinism, split, memmap streaming, state."""
from __future__ import annotations

import os

import numpy as np
import pytest

from npllama.train import data
from npllama.train.data import (Batcher, DataError, TokenFile, build_token_file, eval_batches, token_dtype,
                                write_token_file)


class CharTok:
    """A stand-in tokenizer (one id per byte) with the surface data.py uses."""
    def __init__(self, vocab_size=256, eos_id=None):
        self.vocab_size, self.eos_id = vocab_size, eos_id

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_token_dtype_by_vocab_size():
    assert token_dtype(50) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32
    with pytest.raises(DataError):
        token_dtype(0)


@pytest.mark.parametrize("vocab", [300, 70000])
def test_write_and_read_token_file(vocab, tmp_path):
    ids = np.random.default_rng(0).integers(0, vocab, 1000)
    tf = write_token_file(ids, str(tmp_path / "t.bin"), vocab)
    assert os.path.getsize(tf.path) == 1000 * (2 if vocab <= 65536 else 4)
    assert tf.dtype.itemsize == (2 if vocab <= 65536 else 4)
    assert isinstance(tf.tokens, np.memmap)
    assert np.array_equal(np.asarray(tf.tokens), ids)
    with pytest.raises(DataError, match="ids must be in"):
        write_token_file([vocab], str(tmp_path / "bad.bin"), vocab)


def test_build_from_text_files_and_dir(tmp_path, monkeypatch):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("hello\nworld\n")
    (d / "sub" / "b.txt").write_text("xyz")
    monkeypatch.setattr(data, "CHUNK_CHARS", 4)              # force chunked reading of big files
    tf = build_token_file(str(d), CharTok(eos_id=255), str(tmp_path / "out" / "tok.bin"))
    want = list(b"hello\nworld\n") + [255] + list(b"xyz") + [255]
    assert np.asarray(tf.tokens).tolist() == want
    assert tf.meta["sources"] == [str(d / "a.txt"), str(d / "sub" / "b.txt")]
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp")]
    with pytest.raises(DataError, match="nope"):
        build_token_file(str(tmp_path / "nope"), CharTok(), str(tmp_path / "x.bin"))
    with pytest.raises(DataError, match="vocab_size"):
        build_token_file(str(d), CharTok(vocab_size=100), str(tmp_path / "y.bin"))


def test_truncated_token_file_is_refused(tmp_path):
    tf = write_token_file(np.arange(100), str(tmp_path / "t.bin"), 100)
    with open(tf.path, "r+b") as f:
        f.truncate(150)
    with pytest.raises(DataError, match="truncated"):
        TokenFile(tf.path)
    with pytest.raises(DataError, match="sidecar"):
        TokenFile(str(tmp_path / "missing.bin"))


def test_batches_deterministic_from_seed_and_packed():
    toks = np.arange(10_000, dtype=np.uint16)
    a, b, c = Batcher(toks, 4, 32, seed=5), Batcher(toks, 4, 32, seed=5), Batcher(toks, 4, 32, seed=6)
    xa, xb, xc = a.next(), b.next(), c.next()
    assert xa.shape == (4, 33) and xa.dtype == np.int64
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    assert (np.diff(xa, axis=1) == 1).all()                  # each row is one contiguous window
    seen = np.concatenate([a.next()[:, 0] for _ in range(200)])
    assert seen.max() > 9000 and seen.min() < 1000           # offsets cover the whole file


def test_batcher_state_roundtrip():
    toks = np.arange(5000, dtype=np.uint16)
    a = Batcher(toks, 2, 8, seed=1)
    for _ in range(3):
        a.next()
    sd = a.state_dict()
    import json
    sd = json.loads(json.dumps(sd))                            # it lives in a JSON file
    b = Batcher(toks, 2, 8, seed=123)
    b.load_state_dict(sd)
    assert b.batches == 3
    for _ in range(3):
        assert np.array_equal(a.next(), b.next())


def test_split_and_eval_batches(tmp_path):
    tf = write_token_file(np.arange(1000) % 50, str(tmp_path / "t.bin"), 50)
    train, val = tf.split(0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), np.asarray(tf.tokens))
    ev = list(eval_batches(val, 2, 10, n=3))
    assert len(ev) == 3 and ev[0].shape == (2, 11)
    assert np.array_equal(ev[0][0], np.asarray(val[:11], dtype=np.int64))
    assert all(np.array_equal(x, y) for x, y in zip(ev, eval_batches(val, 2, 10, n=3)))   # same every time
    with pytest.raises(DataError, match="val_fraction"):
        tf.split(1.5)
    with pytest.raises(DataError, match="seq_len"):
        Batcher(val, 2, 200, name="validation")


def test_streams_from_memmap_without_loading(tmp_path, monkeypatch):
    """A batch reads only its windows: the memmap is never converted to an in-memory array as a whole."""
    n = 2_000_000
    tf = write_token_file(np.arange(n) % 60000, str(tmp_path / "big.bin"), 60000)
    b = Batcher(tf.tokens, 2, 16, seed=0)
    calls = []
    real = np.asarray

    def spy(a, *args, **kw):
        if getattr(a, "shape", (0,))[0] == n:
            calls.append("whole")
        return real(a, *args, **kw)
    monkeypatch.setattr(np, "asarray", spy)
    x = b.next()
    assert calls == [] and x.shape == (2, 17)
    assert isinstance(b.tokens, np.memmap)


def test_cli_tokenizes_text_once_and_reuses_it(tmp_path, monkeypatch, capsys):
    import argparse
    import json

    from npllama.train import cli
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("abcdefghij" * 300)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=256, max_position_embeddings=32), f)
    loads = []
    monkeypatch.setattr(cli, "_load_tokenizer", lambda path: loads.append(path) or CharTok())

    def run(*extra):
        p = argparse.ArgumentParser()
        cli.add_arguments(p)
        return cli.run(p.parse_args(["--config", str(tmp_path / "config.json"), "--data", str(d), "--out",
                                     str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "8",
                                     "--eval-every", "0", "--log-every", "1", *extra]))
    assert run("--tokenizer", "tok") == 0
    assert loads == ["tok"]
    tf = TokenFile(str(tmp_path / "run" / "data" / "tokens.bin"))
    assert len(tf) == 3000 and tf.dtype == np.uint16
    assert run("--tokenizer", "tok") == 0
    assert loads == ["tok"]                                      # second run reuses the token file
    assert "reusing" in capsys.readouterr().out
    assert run() == 0                                            # no tokenizer needed once tokenized


def test_training_stack_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, numpy as np, tempfile\n"
            "import npllama, npllama.train, npllama.train.cli\n"
            "from npllama.config import LlamaConfig\n"
            "m = npllama.Llama.init(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, vocab_size=50))\n"
            "t = npllama.train.Trainer(m, np.arange(500) % 50, None, npllama.train.TrainConfig(steps=2, batch_size=2, "
            "seq_len=8, eval_every=0, log_every=0), tempfile.mkdtemp())\n"
            "t.fit()\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
