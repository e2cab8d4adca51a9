"""The training loop: batches -> loss_and_grads (accumulated) -> clip -> lr schedule -> AdamW, with
periodic validation, progress lines, checkpoints and an exact resume.

It trains on either kind of data: a token array (language modelling: packed (B, T+1) windows, the targets
the inputs shifted by one) or a batcher of (inputs, targets) pairs (chat SFT, npllama.train.sft: targets
already shifted, -100 where there is nothing to learn). Only `model.trainable` is optimized: after
npllama.lora.add that is the adapter's matrices, and a checkpoint then holds only them (plus the adapter's
settings and its dropout draw count), since the frozen base weights are the --model's.

One optimizer step is:
    for each of `accum` micro-batches:  loss_i, g_i = model.loss_and_grads(x_i, y_i);  G += g_i / accum
    (SFT: G += g_i n_i / N, n_i the labelled targets of micro-batch i and N their sum: the step's loss is then
    the mean over all its labelled targets, as one big batch would give)
    norm = clip_grad_norm(G, clip);  opt.lr = schedule(step);  opt.step(G)
Everything a step depends on (parameters, optimizer buffers, step number, the data generator's
state) is in the checkpoint, so a resumed run performs the very same arithmetic as one that never
stopped. A non-finite loss or gradient norm stops the run before the update, leaving the
parameters and the last checkpoint as they were.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, TextIO

import numpy as np

from npllama import blasthreads
from npllama.io.atomic import atomic_path
from npllama.train.checkpoint import (CheckpointError, first_nonfinite, latest_checkpoint, load_checkpoint,
                                      save_checkpoint)
from npllama.train.clip import clip_grad_norm, grad_norm
from npllama.train.data import Batcher, eval_batches
from npllama.train.optim import Optimizer, make_optimizer
from npllama.train.schedule import Schedule
from npllama.errors import NpllamaError


class TrainingDiverged(NpllamaError, RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped before updating."""


class TrainConfigError(NpllamaError, ValueError):
    """A training setting out of range (not finite, negative, longer than the model's context); names the flag."""


@dataclass
class TrainConfig:
    """The settings of a training run (saved with every checkpoint)."""
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
    schedule: str = "cosine"
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0                 # 0 disables clipping
    eval_every: int = 100             # 0 disables validation
    eval_batches: int = 20
    save_every: int = 500             # 0: save only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> TrainConfigError:
            return TrainConfigError(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "seq_len", "accum"):
            if getattr(self, name) <= 0:
                raise bad(name, "positive")
        for name in ("warmup", "eval_every", "eval_batches", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        # a NaN compares false with everything, so each range is written as what it must be, not what it must not
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        for name in ("min_lr", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise bad("clip", "a finite number >= 0 (0 disables clipping)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise bad("eps", "a finite number > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring keys that are not settings."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _bar(frac: float, width: int = 20) -> str:
    n = int(round(frac * width))
    return "[" + "#" * n + "." * (width - n) + "]"


class Trainer:
    """Trains `model` on token arrays or SFT batches; `fit()` runs to cfg.steps, saving into `out_dir`."""

    def __init__(self, model: Any, train_tokens: Any, val_tokens: Any, cfg: TrainConfig,
                 out_dir: str, log: TextIO | None = None, extra_state: dict[str, Any] | None = None,
                 parallel: Any = None) -> None:
        """train_tokens: a token array, or a batcher of (inputs, targets) (npllama.train.sft.SFTBatcher);
        val_tokens: a token array, held-out conversations (npllama.train.sft.SFTEval), or None;
        parallel: npllama.train.distributed.Parallel under mpiexec, else None."""
        self.model, self.cfg, self.out_dir = model, cfg, out_dir
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.log = log or sys.stdout
        # data parallel (npllama.train.distributed.Parallel, under mpiexec): only rank 0 logs, validates and writes
        self.world = parallel.world if parallel is not None else None
        self.is_main = self.world is None or self.world.is_main
        if not self.is_main:
            self.log, val_tokens = open(os.devnull, "w"), None
        self.extra_state = extra_state or {}
        self.sft = hasattr(train_tokens, "next") and hasattr(train_tokens, "state_dict")
        self.train = train_tokens if self.sft else \
            Batcher(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed, name="train")
        self.val_set = val_tokens if hasattr(val_tokens, "batches") and len(val_tokens) else None
        self.val_tokens = val_tokens if not hasattr(val_tokens, "batches") and val_tokens is not None \
            and len(val_tokens) > cfg.seq_len else None
        if self.val_tokens is None and self.val_set is None and cfg.eval_every:
            why = "no held-out conversations" if self.sft else "no validation split long enough for --seq-len"
            print(f"note: {why}; validation is off", file=self.log)
        kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps) if cfg.optimizer == "adamw" else {}
        # only what gets gradients: after lora.add the optimizer state is the adapter's alone
        trainable = {k: p for k, p in model.params.items() if k in model.trainable}
        self.opt: Optimizer = make_optimizer(cfg.optimizer, trainable, cfg.lr, cfg.weight_decay, **kw)
        self.dp = None
        if parallel is not None and parallel.world.size > 1:
            self.dp, self.opt = parallel.attach(model, self.opt, cfg.batch_size)
        self.schedule = Schedule(cfg.lr, cfg.steps, cfg.warmup, cfg.min_lr, cfg.schedule)
        ctx = model.config.max_position_embeddings
        if cfg.seq_len > ctx:
            raise TrainConfigError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                                   f"(max_position_embeddings = {ctx})")
        self.step = 0                                       # optimizer steps done
        self.tokens_seen = 0                                # input positions computed (padding included)
        self.history: list[dict[str, Any]] = []             # one record per step (and per eval)
        self.last_checkpoint: str | None = None
        os.makedirs(out_dir, exist_ok=True)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step (accum micro-batches); returns its loss, lr and gradient norm."""
        cfg, xp = self.cfg, self.model.xp
        total_loss, G = 0.0, None
        batches = [self._next_batch() for _ in range(cfg.accum)]
        weights = None                 # LM: every micro-batch has B*T targets, so each counts 1/accum
        if self.sft and cfg.accum > 1:
            counts = [int((y != -100).sum()) for _, y in batches]
            weights = [n / sum(counts) for n in counts]
        for i, (x, y) in enumerate(batches):
            w = 1 / cfg.accum if weights is None else weights[i]
            if self.dp is not None:     # this rank's rows; the last micro-batch returns gradients summed over ranks
                loss, G = self.dp.loss_and_grads(self.model, xp.asarray(x), xp.asarray(y), w,
                                                 last=i == cfg.accum - 1)
            else:
                loss, grads = self.model.loss_and_grads(xp.asarray(x), xp.asarray(y))
            self.tokens_seen += int(x.size)      # the global batch: every rank holds it whole
            loss = float(loss)
            if not math.isfinite(loss):
                raise TrainingDiverged(self._diverged_msg(f"loss is {loss}"))
            total_loss += loss / cfg.accum if weights is None else loss * weights[i]
            if self.dp is not None:
                continue
            if cfg.accum == 1:
                G = grads
            elif G is None:                                   # average the micro-batch gradients
                G = {k: (g / cfg.accum if weights is None else g * weights[i]) for k, g in grads.items()}
            else:
                for k, g in grads.items():
                    G[k] += g / cfg.accum if weights is None else g * weights[i]
        assert G is not None
        if self.dp is not None:
            norm = self.dp.clip_grad_norm(G, cfg.clip)       # the global norm, the same on every rank
        else:
            norm = clip_grad_norm(G, cfg.clip) if cfg.clip > 0 else grad_norm(G)
        if not math.isfinite(norm):
            raise TrainingDiverged(self._diverged_msg(f"gradient norm is {norm}"))
        lr = self.schedule(self.step)
        self.opt.lr = lr
        self.opt.step(G)
        self.step += 1
        return {"step": self.step, "loss": total_loss, "lr": lr, "grad_norm": norm}

    def _next_batch(self) -> tuple[Any, Any]:
        """(inputs, targets) of the next micro-batch, on the host."""
        if self.sft:
            return self.train.next()
        batch = self.train.next()
        return batch[:, :-1], batch[:, 1:]

    def _diverged_msg(self, what: str, where: str | None = None, before: bool = True) -> str:
        good = self.last_checkpoint or "none was written in this run"
        stopped = "Stopped before updating the parameters" if before else "Not saved as a checkpoint"
        return (f"training diverged at {where or f'step {self.step + 1}'}: {what}. {stopped}. "
                f"Last good checkpoint: {good}. Try a lower --lr, a longer --warmup or --clip 1.0.")

    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation batches (SFT: over all their labelled targets)."""
        xp = self.model.xp
        if self.val_set is not None:
            total, count = 0.0, 0
            for x, y in self.val_set.batches(self.cfg.batch_size, self.cfg.eval_batches):
                n = int((y != -100).sum())
                total += float(self.model.loss(xp.asarray(x), xp.asarray(y))) * n
                count += n
            return total / count if count else float("nan")
        if self.val_tokens is None:
            return float("nan")
        losses = []
        for b in eval_batches(self.val_tokens, self.cfg.batch_size, self.cfg.seq_len, self.cfg.eval_batches):
            b = xp.asarray(b)
            losses.append(float(self.model.loss(b[:, :-1], b[:, 1:])))
        return float(np.mean(losses))

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Write a checkpoint of the current state (atomic) and return its path; refuses non-finite parameters."""
        m = self.model
        # a LoRA run saves the adapter only: the frozen base is the --model's, unchanged
        params = m.params if m.lora is None else {k: p for k, p in m.params.items() if k in m.trainable}
        bad = first_nonfinite(params)
        if bad is not None:   # such a checkpoint is never written, so `latest` and the "last good" one stay good
            raise TrainingDiverged(self._diverged_msg(f"parameter {bad!r} is not finite after the update",
                                                      where=f"step {self.step}", before=False))
        opt_state = self.opt.state_dict()       # under ZeRO-1 a collective: every rank takes part
        if not self.is_main:
            return os.path.join(self.ckpt_dir, f"step_{self.step:06d}")
        state = {"train_config": asdict(self.cfg), "data": {"train": self.train.state_dict()},
                 "tokens_seen": self.tokens_seen, "dtype": m.dtype.name, **self.extra_state}
        if m.xp is np and (n := blasthreads.get_threads(use_threadpoolctl=False)):
            state["blas_threads"] = n          # OpenBLAS's sums depend on its thread count: resume with the same
        if m.lora is not None:
            state["lora"], state["lora_draws"] = asdict(m.lora), int(m._lora_draws)
        self.last_checkpoint = save_checkpoint(self.ckpt_dir, self.step, params, opt_state,
                                               m.config, state, keep=self.cfg.keep_checkpoints)
        self._write_history()
        return self.last_checkpoint

    def resume(self, path: str | None = None) -> None:
        """Continue from a checkpoint dir (default: the `latest` one in out_dir): params, optimizer, step, data."""
        path = path or latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir} (no 'latest' pointer)")
        ck = load_checkpoint(path, dtype=self.model.dtype)
        bad = first_nonfinite(ck["params"])
        if bad is not None:
            raise CheckpointError(f"{ck['path']}: parameter {bad!r} is not finite: not a checkpoint to resume from")
        m, st = self.model, ck["state"]
        self._check_lora(st.get("lora"), ck["path"])
        need = set(m.params) if m.lora is None else set(m.trainable)
        missing = sorted(need - set(ck["params"]))
        if missing:
            raise ValueError(f"{ck['path']}: checkpoint lacks parameter {missing[0]!r} of this model")
        xp = m.xp
        for k, p in m.params.items():                    # in place, so the optimizer's references stay valid
            if k not in ck["params"]:
                continue                                 # a frozen base weight of a LoRA run
            src = ck["params"][k]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{ck['path']}: parameter {k!r} has shape {src.shape}, the model has {p.shape}")
            p[...] = xp.asarray(src)
        self.opt.load_state_dict(ck["optimizer"])
        if m.xp is np and st.get("blas_threads"):
            # the load-time thread policy may have picked another count on a busier (or quieter) machine;
            # the products then round differently and the run would not continue bit for bit
            blasthreads.set_threads(int(st["blas_threads"]), use_threadpoolctl=False)
        self.step = int(st["step"])
        self.tokens_seen = int(st.get("tokens_seen", self.tokens_per_step * self.step))
        if m.lora is not None:
            m._lora_draws = int(st.get("lora_draws", 0))     # the dropout masks continue where they were
        self.train.load_state_dict(st["data"]["train"])
        self.last_checkpoint = ck["path"]
        self.history = self._read_history()
        self.history = [h for h in self.history if h["step"] <= self.step]   # drop steps after the checkpoint

    def _check_lora(self, saved: dict[str, Any] | None, path: str) -> None:
        """The checkpoint's adapter settings must be the model's (a resumed LoRA run adds the same adapter first)."""
        m = self.model
        if saved is None and m.lora is None:
            return
        if saved is None or m.lora is None:
            what = "a LoRA adapter's checkpoint" if saved else "a checkpoint without a LoRA adapter"
            raise CheckpointError(f"{path}: {what}, but the model {'has none' if saved else 'carries one'}")
        mine = json.loads(json.dumps(asdict(m.lora)))
        for k in sorted(set(mine) | set(saved)):
            if mine.get(k) != saved.get(k):
                raise CheckpointError(f"{path}: the checkpoint's adapter has {k} = {saved.get(k)!r}, "
                                      f"the model's has {mine.get(k)!r}")

    # ------------------------------------------------------------------ the loop
    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.accum

    def fit(self, stop_at: int | None = None, on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train until cfg.steps (or `stop_at`), evaluating, logging and saving on the way; returns the last record."""
        cfg, end = self.cfg, min(stop_at or self.cfg.steps, self.cfg.steps)
        start_step, rec, elapsed = self.step, {}, 0.0     # elapsed: training time only (no evals, no saves)
        start_tokens = self.tokens_seen
        has_val = self.val_tokens is not None or self.val_set is not None
        if self.step == 0 and cfg.eval_every and has_val:
            self._record_eval()
        while self.step < end:
            t = time.perf_counter()
            rec = self.train_step()
            elapsed += time.perf_counter() - t
            self.history.append(rec)
            if on_step:
                on_step(rec)
            done = self.step - start_step
            if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == end):
                tps = (self.tokens_seen - start_tokens) / elapsed if elapsed > 0 else float("nan")
                eta = (end - self.step) * elapsed / done
                bar = _bar(self.step / cfg.steps)
                ranks = f" ({self.world.size} ranks)" if self.dp is not None else ""   # tok/s of all ranks together
                print(f"{bar} step {self.step:>6}/{cfg.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                      f"norm {rec['grad_norm']:.3f} | {tps:,.0f} tok/s{ranks} | ETA {_fmt_time(eta)}", file=self.log,
                      flush=True)
            if cfg.eval_every and has_val and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                rec = {**rec, "val_loss": self._record_eval()}
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                self.save()
        if self.is_main:
            self._write_history()
            self.plot()
        return rec

    def _record_eval(self) -> float:
        v = self.evaluate()
        self.history.append({"step": self.step, "val_loss": v})
        print(f"step {self.step:>6}/{self.cfg.steps} | val loss {v:.4f}", file=self.log, flush=True)
        return v

    # ------------------------------------------------------------------ history and plot
    def _write_history(self) -> None:
        path = os.path.join(self.out_dir, "history.jsonl")
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for h in self.history:
                f.write(json.dumps(h) + "\n")

    def _read_history(self) -> list[dict[str, Any]]:
        path = os.path.join(self.out_dir, "history.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(self) -> str | None:
        """Write out_dir/loss.png (train and validation loss) when matplotlib is installed."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        tr = [(h["step"], h["loss"]) for h in self.history if "loss" in h]
        va = [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h and math.isfinite(h["val_loss"])]
        if not tr and not va:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), lw=0.8, label="train")
        if va:
            ax.plot(*zip(*va), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(self.out_dir, "loss.png")
        try:
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        finally:
            plt.close(fig)
        return path


__all__ = ["TrainConfig", "TrainConfigError", "Trainer", "TrainingDiverged"]
