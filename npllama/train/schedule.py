"""Learning-rate schedules: linear warmup, then cosine decay to a floor (or a constant rate).

A schedule maps the 0-based index of the optimizer step about to run to its learning rate,
as a pure function, so a resumed run needs nothing but the step number. The cosine form is
nanoGPT's: warmup lr*(step+1)/(warmup+1), then min_lr + (lr-min_lr)*(1+cos(pi*t))/2 over the
remaining steps, then min_lr. It equals torch's SequentialLR(LinearLR(1/(warmup+1), 1, warmup),
CosineAnnealingLR(steps-warmup, min_lr), milestones=[warmup]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    """lr(step) for `steps` optimizer steps: `warmup` linear steps, then cosine decay to `min_lr` or constant."""
    lr: float
    steps: int
    warmup: int = 0
    min_lr: float = 0.0
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}: choose one of {', '.join(SCHEDULES)}")
        if not self.lr >= 0 or not self.min_lr >= 0:
            raise ValueError(f"learning rates must be >= 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        if self.warmup < 0 or self.steps < 0:
            raise ValueError(f"warmup={self.warmup} and steps={self.steps} must be >= 0")

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.lr, self.steps, self.warmup, self.min_lr, self.kind)


def lr_at(step: int, lr: float, steps: int, warmup: int = 0, min_lr: float = 0.0, kind: str = "cosine") -> float:
    """Learning rate of 0-based step `step` (see the module docstring for the formula)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if kind == "constant":
        return lr
    decay_steps = steps - warmup
    if decay_steps <= 0 or step >= steps:
        return min_lr
    t = (step - warmup) / decay_steps                       # 0 -> 1 over the decay phase
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
