"""Checkpoints and the run's safety: exact resume, crash-safe writes, NaN stops, the CLI end to end."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

import npllama
from npllama.config import LlamaConfig
from npllama.train import checkpoint as ckpt
from npllama.train import cli
from npllama.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from npllama.train.data import write_token_file
from npllama.train.trainer import TrainConfig, Trainer, TrainingDiverged

CONF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=61, max_position_embeddings=64, rms_norm_eps=1e-5)


def tokens(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return ((np.arange(n) * 5 + rng.integers(0, 2, n)) % 61).astype(np.uint16)


def make(dtype="float32", seed=0):
    return npllama.Llama.init(LlamaConfig(**CONF), seed=seed, dtype=dtype)


def settings(**kw):
    d = dict(steps=20, batch_size=2, seq_len=12, lr=5e-3, min_lr=5e-4, warmup=3, clip=1.0, weight_decay=0.1,
             eval_every=0, save_every=5, log_every=0, seed=3)
    d.update(kw)
    return TrainConfig(**d)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_is_bit_exact(dtype, tmp_path):
    straight = make(dtype)
    Trainer(straight, tokens(), None, settings(), str(tmp_path / "a")).fit()

    first = make(dtype)
    Trainer(first, tokens(), None, settings(), str(tmp_path / "b")).fit(stop_at=10)  # "killed" after step 10
    assert latest_checkpoint(str(tmp_path / "b" / "checkpoints")).endswith("step_000010")
    resumed = make(dtype, seed=99)                          # different weights: all must come from the checkpoint
    tr = Trainer(resumed, tokens(), None, settings(), str(tmp_path / "b"))
    tr.resume()
    assert tr.step == 10
    tr.fit()
    assert tr.step == 20
    for k in straight.params:
        assert np.array_equal(straight.params[k], resumed.params[k]), k
        assert resumed.params[k].dtype == np.dtype(dtype)
    # the test can fail: one more step elsewhere would break equality
    assert not np.array_equal(first.params["model.norm.weight"], straight.params["model.norm.weight"])


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = make()
    tr = Trainer(model, tokens(), None, settings(steps=10), str(tmp_path))
    tr.fit(stop_at=5)
    good = latest_checkpoint(str(tmp_path / "checkpoints"))
    before = load_checkpoint(good)["params"]

    real, calls = ckpt._save_tensors, []

    def crash_on_optimizer(tensors, path):
        calls.append(path)
        if path.endswith("optimizer.safetensors"):       # the model file is already written: die midway
            with open(path, "wb") as f:
                f.write(b"\x00" * 10)
            raise KeyboardInterrupt("simulated kill during checkpoint write")
        real(tensors, path)
    monkeypatch.setattr(ckpt, "_save_tensors", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()                                          # steps 6..10, then the save at 10 dies
    assert len(calls) == 2
    assert latest_checkpoint(str(tmp_path / "checkpoints")) == good
    again = load_checkpoint(str(tmp_path / "checkpoints"))
    assert again["state"]["step"] == 5
    assert all(np.array_equal(again["params"][k], before[k]) for k in before)
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith(".tmp")] == []


def test_incomplete_checkpoint_is_refused(tmp_path):
    tr = Trainer(make(), tokens(), None, settings(steps=5), str(tmp_path))
    tr.fit()
    path = latest_checkpoint(str(tmp_path / "checkpoints"))
    opt_file = os.path.join(path, "optimizer.safetensors")
    with open(opt_file, "r+b") as f:
        f.truncate(os.path.getsize(opt_file) - 8)
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        load_checkpoint(path)
    os.remove(os.path.join(path, "state.json"))
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(path)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    model = make()
    tr = Trainer(model, tokens(), None, settings(steps=10, save_every=4), str(tmp_path))
    real = model.loss_and_grads

    def poisoned(ids, targets):
        loss, grads = real(ids, targets)
        return (float("nan") if tr.step == 6 else loss), grads
    model.loss_and_grads = poisoned
    snapshot = {}
    tr_fit_steps = []
    with pytest.raises(TrainingDiverged, match=r"step 7: loss is nan.*step_000004"):
        tr.fit(on_step=lambda r: (tr_fit_steps.append(r["step"]),
                                  snapshot.update({k: v.copy() for k, v in model.params.items()})))
    assert tr_fit_steps == [1, 2, 3, 4, 5, 6]
    assert all(np.array_equal(model.params[k], snapshot[k]) for k in snapshot)   # no update with a NaN
    good = load_checkpoint(str(tmp_path / "checkpoints"))
    assert good["state"]["step"] == 4


def test_cli_train_resume_and_export(tmp_path, capsys):
    tf = write_token_file(tokens(), str(tmp_path / "tok.bin"), 61)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONF, f)
    out = str(tmp_path / "run")

    def run(*argv):
        p = argparse.ArgumentParser()
        cli.add_arguments(p)
        return cli.run(p.parse_args(list(argv)))
    common = ["--data", tf.path, "--out", out, "--batch-size", "2", "--seq-len", "12", "--lr", "3e-3",
              "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--save-every", "4", "--log-every", "2"]
    assert run("--config", str(tmp_path / "config.json"), "--steps", "8", *common) == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "tok/s" in text and "ETA" in text and "lr " in text
    final = npllama.Llama.from_pretrained(os.path.join(out, "final"))
    assert final.config.hidden_size == 32
    hist = [json.loads(x) for x in open(os.path.join(out, "history.jsonl"))]
    assert [h["step"] for h in hist if "loss" in h] == list(range(1, 9))
    # resume with more steps: continues from step 8
    assert run("--out", out, "--resume", "--steps", "12", "--data", tf.path) == 0
    text = capsys.readouterr().out
    assert "resumed" in text and "step_000008" in text and "steps=12 (was 8)" in text
    assert load_checkpoint(os.path.join(out, "checkpoints"))["state"]["step"] == 12
    # bad input is named, in one line with the CLI's prefix and exit code 2
    from npllama.cli import main
    assert main(["train", "--out", str(tmp_path / "x"), "--data", tf.path]) == 2
    assert capsys.readouterr().err.startswith("npllama: error: give exactly one of --config")
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_loss_png_written_when_matplotlib_present(tmp_path):
    pytest.importorskip("matplotlib")
    Trainer(make(), tokens(), tokens(400, seed=1), settings(steps=4, eval_every=2, eval_batches=1),
            str(tmp_path)).fit()
    assert os.path.getsize(tmp_path / "loss.png") > 1000
