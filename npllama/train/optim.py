"""Optimizers: AdamW and SGD, the same arithmetic as torch.optim, updating `model.params` in place.

An optimizer holds a dict name -> array (the model's own arrays) and, per name, its state
(step count, moment buffers). `step(grads)` takes a dict of gradients under the same names.
The update order follows torch's `_single_tensor_adam` / `_single_tensor_sgd` operation by
operation, so float64 runs agree with PyTorch to rounding (~1e-16 relative per step).
Scalars stay Python floats: NumPy/CuPy then compute in the arrays' own dtype (float32 stays float32).
"""
from __future__ import annotations

from typing import Any

from npllama.backend import get_array_module, to_device

Params = dict[str, Any]


def _lerp_(a: Any, b: Any, w: float) -> None:
    """a <- lerp(a, b, w) in place, with torch's two-sided formula (exact at w = 0 and w = 1)."""
    if abs(w) < 0.5:
        a += w * (b - a)
    else:
        a[...] = b - (b - a) * (1.0 - w)


class Optimizer:
    """Base class: a dict of parameter arrays, per-parameter state, state_dict round trips."""

    def __init__(self, params: Params, lr: float) -> None:
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict name -> array (model.params), got {type(params).__name__}")
        if not params:
            raise ValueError("params is empty: nothing to optimize")
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate lr={lr!r}: must be >= 0")
        self.params = params
        self.lr = float(lr)
        self.state: dict[str, dict[str, Any]] = {}

    def _check_grads(self, grads: dict[str, Any]) -> None:
        for k, g in grads.items():
            if k not in self.params:
                raise KeyError(f"gradient {k!r} has no parameter of that name")
            if tuple(g.shape) != tuple(self.params[k].shape):
                raise ValueError(f"gradient {k!r} has shape {tuple(g.shape)}, parameter has {tuple(self.params[k].shape)}")

    def step(self, grads: dict[str, Any]) -> None:
        """Apply one update; parameters missing from `grads` are left alone (like torch's grad=None)."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define the update (saved with the state)."""
        return {"lr": self.lr}

    def state_dict(self) -> dict[str, Any]:
        """{'type', 'hyper', 'state': {name: {'step': int, buffer: array, ...}}}; arrays are the live buffers."""
        return {"type": type(self).__name__, "hyper": self.hyperparameters(),
                "state": {k: dict(s) for k, s in self.state.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore hyperparameters and state (buffers are copied onto the parameters' backend and dtype)."""
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {sd.get('type')!r}, not {type(self).__name__}")
        for k, v in sd["hyper"].items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.state = {}
        for name, s in sd["state"].items():
            if name not in self.params:
                raise KeyError(f"optimizer state for {name!r}, which is not a parameter")
            p = self.params[name]
            xp = get_array_module(p)
            new: dict[str, Any] = {}
            for key, val in s.items():
                if key == "step":
                    new["step"] = int(val)
                    continue
                if val is None:
                    new[key] = None
                    continue
                if tuple(val.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {key!r} of {name!r} has shape {tuple(val.shape)}, "
                                     f"parameter has {tuple(p.shape)}")
                new[key] = to_device(val, xp, p.dtype).copy()
            self.state[name] = new


class AdamW(Optimizer):
    """torch.optim.AdamW: Adam with decoupled weight decay (p *= 1 - lr*wd), bias correction, optional AMSGrad."""

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params, lr)
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas={betas!r}: each must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps={eps!r}: must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay={weight_decay!r}: must be >= 0")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.amsgrad = bool(amsgrad)

    def hyperparameters(self) -> dict[str, Any]:
        """lr, betas, eps, weight_decay, amsgrad."""
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "amsgrad": self.amsgrad}

    def step(self, grads: dict[str, Any]) -> None:
        """One AdamW update of every parameter that has a gradient, in place."""
        self._check_grads(grads)
        lr, (b1, b2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            xp = get_array_module(p)
            s = self.state.get(name)
            if s is None:
                s = self.state[name] = {"step": 0, "exp_avg": xp.zeros_like(p), "exp_avg_sq": xp.zeros_like(p),
                                        "max_exp_avg_sq": xp.zeros_like(p) if self.amsgrad else None}
            s["step"] += 1
            t = s["step"]
            m, v = s["exp_avg"], s["exp_avg_sq"]
            if wd != 0:
                p *= 1 - lr * wd                              # decoupled: decay the weight, not the gradient
            _lerp_(m, g, 1 - b1)                              # m = b1*m + (1-b1)*g
            v *= b2
            v += ((1 - b2) * g) * g                           # v = b2*v + (1-b2)*g^2  (torch addcmul order)
            bc1 = 1 - b1 ** t
            bc2_sqrt = (1 - b2 ** t) ** 0.5
            step_size = lr / bc1
            if self.amsgrad:
                vmax = s["max_exp_avg_sq"]
                if vmax is None:
                    raise ValueError(f"amsgrad=True but the loaded state of {name!r} has no max_exp_avg_sq")
                xp.maximum(vmax, v, out=vmax)                 # normalize by the largest v seen so far
                denom = xp.sqrt(vmax)
            else:
                denom = xp.sqrt(v)
            denom /= bc2_sqrt
            denom += eps
            p += ((-step_size) * m) / denom                   # torch addcdiv: p + value * m / denom

    def state_dict(self) -> dict[str, Any]:
        """See Optimizer.state_dict; 'max_exp_avg_sq' only with amsgrad."""
        sd = super().state_dict()
        if not self.amsgrad:
            for s in sd["state"].values():
                s.pop("max_exp_avg_sq", None)
        return sd


class SGD(Optimizer):
    """torch.optim.SGD: optional momentum (with dampening or Nesterov) and L2 weight decay added to the gradient."""

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, lr)
        if not momentum >= 0.0:
            raise ValueError(f"invalid momentum={momentum!r}: must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay={weight_decay!r}: must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

    def hyperparameters(self) -> dict[str, Any]:
        """lr, momentum, dampening, weight_decay, nesterov."""
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def step(self, grads: dict[str, Any]) -> None:
        """One SGD update of every parameter that has a gradient, in place."""
        self._check_grads(grads)
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            s = self.state.setdefault(name, {"step": 0, "momentum_buffer": None})
            s["step"] += 1
            if wd != 0:
                g = g + wd * p                                # L2 (coupled) decay, as torch.optim.SGD
            if mu != 0:
                buf = s["momentum_buffer"]
                if buf is None:
                    buf = s["momentum_buffer"] = g.copy()     # first step: the buffer is the gradient
                else:
                    buf *= mu
                    buf += (1 - self.dampening) * g
                g = g + mu * buf if self.nesterov else buf
            p += (-lr) * g

    def state_dict(self) -> dict[str, Any]:
        """See Optimizer.state_dict; without momentum there is no buffer."""
        sd = super().state_dict()
        for s in sd["state"].values():
            if s.get("momentum_buffer") is None:
                s.pop("momentum_buffer", None)
        return sd


def make_optimizer(name: str, params: Params, lr: float, weight_decay: float = 0.0, **kw: Any) -> Optimizer:
    """'adamw' or 'sgd' by name (used by the trainer's --optimizer flag)."""
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    if name == "sgd":
        return SGD(params, lr=lr, weight_decay=weight_decay, **kw)
    raise ValueError(f"unknown optimizer {name!r}: choose 'adamw' or 'sgd'")


__all__ = ["Optimizer", "AdamW", "SGD", "make_optimizer"]
