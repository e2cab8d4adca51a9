"""ZeRO-1: the optimizer's moments sharded over the ranks.

The gradients arrive reduce-scattered (npllama.train.distributed): of each flat bucket, rank r holds
the summed block r. Rank r copies the parameters of that block into a flat array of its own and runs
the very optimizer of npllama.train.optim on it (AdamW's arithmetic is elementwise, so a block of a
flat array updates exactly as the tensors it cuts through would); then the updated blocks are gathered
in place in the gradient buckets (free once reduce-scattered) and unpacked into model.params. Each rank
thus stores 1/N of the moments and of the parameters' flat copy. `state_dict()` gathers them into the one-process format (per parameter
name), so a checkpoint resumes under any number of ranks; `load_state_dict()` takes that format.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from npllama.backend import get_array_module, to_device, to_host
from npllama.train.distributed import Bucket, World
from npllama.train.optim import Optimizer


class ZeroOptimizer:
    """Wraps an optimizer of model.params so that each rank updates only its block of every bucket."""

    def __init__(self, base: Optimizer, world: World, buckets: list[Bucket], params: dict[str, Any]) -> None:
        self.world, self.buckets, self.params = world, buckets, params
        self.base_type = type(base)
        n = world.size
        self.blocks = [slice(world.rank * b.padded // n, (world.rank + 1) * b.padded // n) for b in buckets]
        self.shards = [b.flat[s].copy() for b, s in zip(buckets, self.blocks)]   # this rank's parameters, flat
        self._pack()
        self.inner = type(base)({f"bucket{i}": p for i, p in enumerate(self.shards)}, **base.hyperparameters())
        self.comm_wait = 0.0                  # seconds in the parameters' allgather

    # the trainer sets the learning rate per step
    @property
    def lr(self) -> float:
        return self.inner.lr

    @lr.setter
    def lr(self, v: float) -> None:
        self.inner.lr = v

    def _pieces(self, i: int) -> Any:
        """(name, slice of params[name] flattened, slice of shard i) for each parameter overlapping block i."""
        b, blk = self.buckets[i], self.blocks[i]
        for n in b.names:
            a, e, _ = b.slots[n]
            lo, hi = max(a, blk.start), min(e, blk.stop)
            if lo < hi:
                yield n, slice(lo - a, hi - a), slice(lo - blk.start, hi - blk.start)

    def _pack(self) -> None:
        for i, shard in enumerate(self.shards):
            for n, src, dst in self._pieces(i):
                shard[dst] = self.params[n].reshape(-1)[src]

    def step(self, shards: dict[str, Any]) -> None:
        """Update this rank's blocks with their reduced gradients, then gather every block into model.params."""
        self._pack()                          # params may have been set from outside (a resume)
        self.inner.step(shards)
        for b, blk, shard in zip(self.buckets, self.blocks, self.shards):
            b.flat[blk] = shard                # the gradients in b.flat are spent: it takes the parameters
            t = time.perf_counter()
            self.world.allgather_(b.flat)
            self.comm_wait += time.perf_counter() - t
            for n in b.names:
                self.params[n][...] = b.view(n)

    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        return sum(int(v.nbytes) for s in self.inner.state.values() for k, v in s.items()
                   if k != "step" and v is not None)

    def hyperparameters(self) -> dict[str, Any]:
        """The wrapped optimizer's settings."""
        return self.inner.hyperparameters()

    def state_dict(self) -> dict[str, Any]:
        """The one-process state (per parameter name), every rank's blocks gathered; a collective call."""
        state: dict[str, dict[str, Any]] = {}
        for i, b in enumerate(self.buckets):
            s = self.inner.state.get(f"bucket{i}")
            if s is None:
                continue
            per = {n: {"step": int(s["step"])} for n in b.names}
            for key, val in s.items():
                if key == "step":
                    continue
                if val is None:
                    for n in b.names:
                        per[n][key] = None
                    continue
                full = get_array_module(val).zeros(b.padded, dtype=val.dtype)
                full[self.blocks[i]] = val
                self.world.allgather_(full)
                for n in b.names:
                    per[n][key] = b.view(n, full).copy()
            state.update(per)
        return {"type": self.base_type.__name__, "hyper": self.inner.hyperparameters(), "state": state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Take the one-process state: hyperparameters, and this rank's block of every buffer."""
        if sd.get("type") != self.base_type.__name__:
            raise ValueError(f"optimizer state is for {sd.get('type')!r}, not {self.base_type.__name__}")
        for k, v in sd["hyper"].items():
            setattr(self.inner, k, tuple(v) if isinstance(v, list) else v)
        unknown = sorted(set(sd["state"]) - set(self.params))
        if unknown:
            raise KeyError(f"optimizer state for {unknown[0]!r}, which is not a parameter")
        self.inner.state = {}
        for i, b in enumerate(self.buckets):
            have = [n for n in b.names if n in sd["state"]]
            if not have:
                continue
            if len(have) != len(b.names):
                raise ValueError(f"optimizer state has {have[0]!r} but not {sorted(set(b.names) - set(have))[0]!r}")
            steps = {int(sd["state"][n]["step"]) for n in b.names}
            if len(steps) != 1:
                raise ValueError(f"optimizer state: parameters of one bucket at different steps {sorted(steps)}")
            new: dict[str, Any] = {"step": steps.pop()}
            keys = {k for n in b.names for k in sd["state"][n] if k != "step"}
            dt = self.shards[i].dtype
            for key in keys:
                vals = [sd["state"][n].get(key) for n in b.names]
                if any(v is None for v in vals):
                    new[key] = None
                    continue
                full = np.zeros(b.padded, dtype=dt)
                for n, v in zip(b.names, vals):
                    a, e, shape = b.slots[n]
                    if tuple(v.shape) != shape:
                        raise ValueError(f"optimizer state {key!r} of {n!r} has shape {tuple(v.shape)}, "
                                         f"parameter has {shape}")
                    full[a:e] = to_host(v).ravel()
                new[key] = to_device(full[self.blocks[i]], get_array_module(self.shards[i]), dt).copy()
            self.inner.state[f"bucket{i}"] = new


__all__ = ["ZeroOptimizer"]
