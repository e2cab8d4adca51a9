"""Bad training input and faults (issue 16): each is a clear error that names its culprit, never a silent result.

One table row per member of a class: training data, the output folder, the `latest` pointer and the
checkpoint manifest, non-finite settings, parameters and logits, a full disk. A CLI row runs
`npllama train` in this process and checks the exit code and stderr; an API row checks the exception.
Then the behaviours a row cannot show: two concurrent trainers, the stale-temp sweep, the full disk's
intact checkpoint, the chunked id scan.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import npllama
from npllama.config import LlamaConfig
from npllama.errors import NpllamaError
from npllama.train.data import write_token_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(npllama.__file__)))   # the checkout under test
CONF = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=61, max_position_embeddings=32, rms_norm_eps=1e-5)
FLAGS = ["--batch-size", "2", "--seq-len", "8", "--warmup", "0", "--eval-every", "0", "--log-every", "0",
         "--save-every", "1"]


def tokens(n=600):
    return (np.arange(n) * 7 % 61).astype(np.uint16)


def cli(argv):
    """`npllama train ...` as the command line runs it: (exit code, stderr is read by the caller)."""
    from npllama.cli import main
    try:
        return main(["train", *argv])
    except SystemExit as e:                       # a bare SystemExit("message") exits 1 with the message
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1


class Ctx:
    """What a row builds on: a folder, a token file, a config and a finished 2-step run to copy."""

    def __init__(self, tmp, trained, monkeypatch):
        self.tmp, self.trained, self.monkeypatch = tmp, trained, monkeypatch
        self.cleanup: list = []
        self.config = str(tmp / "config.json")
        with open(self.config, "w") as f:
            json.dump(CONF, f)
        self.data = write_token_file(tokens(), str(tmp / "tok.bin"), 61).path

    def scratch(self, *argv):
        return ["--config", self.config, "--data", self.data, "--out", str(self.tmp / "run"), "--steps", "2",
                *FLAGS, *argv]

    def run_copy(self):
        """A copy of the finished run (checkpoints step_000001, step_000002; latest -> step_000002)."""
        out = self.tmp / "run"
        shutil.copytree(self.trained, out)
        return out

    def resume(self, out):
        return ["--out", str(out), "--resume", "--steps", "3", "--data", self.data]

    def outside_checkpoint(self):
        """A complete checkpoint outside the run's folder."""
        dst = self.tmp / "outside" / "step_000001"
        shutil.copytree(os.path.join(self.trained, "checkpoints", "step_000001"), dst)
        return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    with open(tmp / "config.json", "w") as f:
        json.dump(CONF, f)
    data = write_token_file(tokens(), str(tmp / "tok.bin"), 61).path
    out = str(tmp / "run")
    assert cli(["--config", str(tmp / "config.json"), "--data", data, "--out", out, "--steps", "2", *FLAGS]) == 0
    return out


# ------------------------------------------------------------------------------------------- the rows
def r_id_above_vocab(c):
    bad = write_token_file(tokens(), str(c.tmp / "bad.bin"), 61).path
    with open(bad, "r+b") as f:                    # the sidecar still says vocab 61: only the data is wrong
        f.seek(123 * 2)
        f.write(np.array([70], dtype="<u2").tobytes())
    return "cli", c.scratch("--data", bad), [bad, "token 123", "70"]


def r_bin_without_sidecar(c):
    raw = str(c.tmp / "raw.bin")
    shutil.copy(c.data, raw)
    return "cli", c.scratch("--data", raw), [raw, "sidecar"]


def r_bin_mixed_with_text(c):
    txt = c.tmp / "a.txt"
    txt.write_text("hello\n")
    return "cli", c.scratch("--data", str(txt), c.data), [c.data]


def r_sidecar_not_an_object(c):
    with open(c.data + ".json", "w") as f:
        json.dump([1, 2], f)
    return "cli", c.scratch(), [c.data + ".json"]


def r_sidecar_missing_keys(c):
    with open(c.data + ".json", "w") as f:
        json.dump({"format": "npllama-tokens-v1", "num_tokens": 600}, f)
    return "cli", c.scratch(), [c.data + ".json"]


def r_seq_len_above_context(c):
    return "cli", c.scratch("--seq-len", "33"), ["--seq-len", "32"]


def flag_row(flag, value):
    def row(c):
        return "cli", c.scratch(flag, value), [flag, value]
    row.__name__ = f"r_{flag.strip('-')}_{value}"
    return row


def r_lock_held(c):
    import fcntl
    out = c.tmp / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # another open file: conflicts as another process's would
    c.cleanup.append(lambda: os.close(fd))
    return "cli", c.scratch(), [str(out), "in use"]


def r_latest_absolute(c):
    out, far = c.run_copy(), c.outside_checkpoint()
    (out / "checkpoints" / "latest").write_text(str(far) + "\n")
    return "cli", c.resume(out), [str(out / "checkpoints" / "latest"), str(far)]


def r_latest_dotdot(c):
    out, far = c.run_copy(), c.outside_checkpoint()
    name = os.path.relpath(far, out / "checkpoints")
    assert name.startswith("..")
    (out / "checkpoints" / "latest").write_text(name + "\n")
    return "cli", c.resume(out), [str(out / "checkpoints" / "latest"), name]


def r_latest_symlink(c):
    out, far = c.run_copy(), c.outside_checkpoint()
    os.symlink(far, out / "checkpoints" / "step_000009")
    (out / "checkpoints" / "latest").write_text("step_000009\n")
    return "cli", c.resume(out), ["step_000009", "outside"]


def r_manifest_names_outside_file(c):
    out = c.run_copy()
    secret = c.tmp / "secret.txt"
    secret.write_text("not yours")
    sp = out / "checkpoints" / "step_000002" / "state.json"
    st = json.loads(sp.read_text())
    st["manifest"]["files"]["../../../secret.txt"] = secret.stat().st_size
    sp.write_text(json.dumps(st))
    return "cli", c.resume(out), [str(sp), "secret.txt"]


def r_nonfinite_checkpoint_resume(c):
    from npllama.io.safetensors import SafetensorsFile, save_file
    out = c.run_copy()
    mf = str(out / "checkpoints" / "step_000002" / "model.safetensors")
    f = SafetensorsFile(mf)
    params = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    params["model.norm.weight"][3] = np.nan
    save_file(params, mf)                           # same names, shapes and size: the manifest still agrees
    return "cli", c.resume(out), ["model.norm.weight", "not finite"]


def r_full_disk_checkpoint(c):
    from npllama.io import safetensors
    real, calls = safetensors.save_file, []

    def full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 4:                         # the second checkpoint's optimizer file
            with open(path, "wb") as fh:
                fh.write(b"\0" * 16)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # as a write() raises it: no file name
        return real(tensors, path, *a, **k)
    c.monkeypatch.setattr(safetensors, "save_file", full)
    return "cli", c.scratch(), [os.strerror(errno.ENOSPC), str(c.tmp / "run" / "checkpoints" / "step_000002")]


class CharDecoder:
    """A tokenizer stand-in for stream(): ids are characters."""
    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def _nan_model():
    m = npllama.Llama.init(LlamaConfig(**CONF), seed=0)
    m.params["model.norm.weight"][5] = np.nan
    return m


def r_nan_logits_generate(c):
    from npllama.generate import generate
    return "api", lambda: generate(_nan_model(), [1, 2, 3], max_new_tokens=3), ["not finite", "nan"]


def r_nan_logits_sampled(c):
    from npllama.generate import generate
    return "api", lambda: generate(_nan_model(), [1, 2, 3], max_new_tokens=3, temperature=0.7, seed=0), \
        ["not finite"]


def r_nan_logits_stream(c):
    from npllama.generate import stream
    return "api", lambda: list(stream(_nan_model(), CharDecoder(), [1, 2, 3], max_new_tokens=3)), ["not finite"]


def r_nonfinite_params_not_saved(c):
    from npllama.train.trainer import TrainConfig, Trainer
    m = npllama.Llama.init(LlamaConfig(**CONF), seed=0)
    tr = Trainer(m, tokens(), None, TrainConfig(steps=2, batch_size=2, seq_len=8, warmup=0, eval_every=0,
                                                 log_every=0, save_every=1), str(c.tmp / "api"))
    tr.fit()
    good = tr.last_checkpoint
    m.params["lm_head.weight"][0, 0] = np.inf

    def save():
        tr.save()
    return "api", save, ["lm_head.weight", "not finite", good]


ROWS = [r_id_above_vocab, r_bin_without_sidecar, r_bin_mixed_with_text, r_sidecar_not_an_object,
        r_sidecar_missing_keys, r_seq_len_above_context,
        flag_row("--lr", "nan"), flag_row("--lr", "inf"), flag_row("--clip", "nan"), flag_row("--clip", "inf"),
        flag_row("--min-lr", "nan"), flag_row("--weight-decay", "inf"), flag_row("--beta2", "nan"),
        r_lock_held, r_latest_absolute, r_latest_dotdot, r_latest_symlink, r_manifest_names_outside_file,
        r_nonfinite_checkpoint_resume, r_full_disk_checkpoint,
        r_nan_logits_generate, r_nan_logits_sampled, r_nan_logits_stream, r_nonfinite_params_not_saved]


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__[2:] for r in ROWS])
def test_bad_input_is_a_clear_error_naming_the_culprit(row, tmp_path, trained, monkeypatch, capsys):
    c = Ctx(tmp_path, trained, monkeypatch)
    try:
        kind, what, culprits = row(c)
        capsys.readouterr()
        if kind == "cli":
            rc = cli(what)
            msg = capsys.readouterr().err
            assert rc == 2, msg
            assert "internal error" not in msg and "Traceback" not in msg, msg
        else:
            with pytest.raises(NpllamaError) as e:
                what()
            msg = str(e.value)
    finally:
        for f in c.cleanup:
            f()
    for culprit in culprits:
        assert str(culprit) in msg, (culprit, msg)


# ------------------------------------------------------------------------------------- beyond a row
def test_full_disk_keeps_the_previous_checkpoint_and_says_one_line(tmp_path, trained, monkeypatch, capsys):
    from npllama.train.checkpoint import latest_checkpoint, load_checkpoint
    c = Ctx(tmp_path, trained, monkeypatch)
    _, argv, _ = r_full_disk_checkpoint(c)
    capsys.readouterr()
    assert cli(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "step_000002" in err[0], err
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert latest_checkpoint(ckpts).endswith("step_000001")
    assert load_checkpoint(ckpts)["state"]["step"] == 1              # complete: the manifest checks pass
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000001"]     # no temp folder, no half checkpoint


def test_stale_temp_entries_are_swept_at_start(tmp_path, trained, monkeypatch, capsys):
    c = Ctx(tmp_path, trained, monkeypatch)
    out = c.run_copy()
    stale = [out / ".tmp-history.jsonl-k1ll3d", out / "checkpoints" / ".tmp-step_000003-x9",
             out / "data" / ".tmp-tokens.bin-q2.bin"]
    (out / "data").mkdir(exist_ok=True)
    stale[0].write_text("half")
    stale[1].mkdir()
    (stale[1] / "model.safetensors").write_bytes(b"\0" * 10)
    stale[2].write_bytes(b"\0")
    (out / "notes.tmp").write_text("mine")                           # not temp entries of ours: kept
    (out / ".tmp-notes").write_text("mine too")
    assert cli(c.resume(out)) == 0
    assert not any(p.exists() for p in stale)
    assert (out / "notes.tmp").read_text() == "mine" and (out / ".tmp-notes").read_text() == "mine too"
    assert "removed" in capsys.readouterr().err
    assert not [n for d in (out / "checkpoints", out / "data") for n in os.listdir(d) if n.startswith(".tmp-")]


def test_two_concurrent_trainers_the_second_fails_at_once(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONF, f)
    data = write_token_file(tokens(), str(tmp_path / "tok.bin"), 61).path
    out, ready, go = str(tmp_path / "run"), str(tmp_path / "ready"), str(tmp_path / "go")
    argv = ["train", "--config", str(tmp_path / "config.json"), "--data", data, "--out", out, "--steps", "3", *FLAGS]
    # the first trainer holds at the start of its loop (lock taken) until the second has been refused
    first_src = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {REPO!r})
        from npllama.train import trainer
        real = trainer.Trainer.fit
        def fit(self, *a, **k):
            open({ready!r}, "w").close()
            t = time.time()
            while not os.path.exists({go!r}) and time.time() - t < 120:
                time.sleep(0.02)
            return real(self, *a, **k)
        trainer.Trainer.fit = fit
        from npllama.cli import main
        sys.exit(main({argv!r}))
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    first = subprocess.Popen([sys.executable, "-c", first_src], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=REPO)
    try:
        t = time.time()
        while not os.path.exists(ready):
            assert first.poll() is None, first.communicate()
            assert time.time() - t < 120
            time.sleep(0.02)
        t = time.time()
        second = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *argv], capture_output=True,
                                text=True, env=env, timeout=120)
        took = time.time() - t
        assert second.returncode == 2, second.stderr
        assert out in second.stderr and "in use" in second.stderr and "Traceback" not in second.stderr
        assert str(first.pid) in second.stderr                          # who holds it
        assert took < 30                                                  # refused at once, not after waiting
    finally:
        open(go, "w").close()
        so, se = first.communicate(timeout=300)
    assert first.returncode == 0, se
    assert "saved the trained model" in so
    assert json.loads(open(os.path.join(out, "checkpoints", "step_000003", "state.json")).read())["step"] == 3


def test_id_scan_reads_in_chunks_and_finds_the_first_bad_offset(tmp_path):
    from npllama.train.data import DataError, TokenFile
    ids = tokens(100)
    ids[[57, 90]] = [61, 64]                                             # two bad ids, in different chunks
    tf = write_token_file(ids, str(tmp_path / "t.bin"), 65)
    TokenFile(tf.path).check_ids(65)                                      # fine for a vocab that holds them
    with pytest.raises(DataError, match=r"token 57 \(byte offset 114\) is id 61"):
        TokenFile(tf.path).check_ids(61, chunk=8)                         # the bad one sits in the 8th chunk
    with pytest.raises(DataError, match=r"token 90 \(byte offset 180\) is id 64"):
        TokenFile(tf.path).check_ids(62, chunk=8)
