"""AdamW, SGD, clip_grad_norm and the warmup+cosine schedule against torch on the same arrays."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npllama.train.clip import clip_grad_norm, grad_norm  # noqa: E402
from npllama.train.optim import SGD, AdamW  # noqa: E402
from npllama.train.schedule import Schedule, lr_at  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 1e-6}
SHAPES = {"w": (24, 16), "b": (16,), "e": (5, 3, 4)}


def _params(dt, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dt) for k, s in SHAPES.items()}


def _grads_seq(dt, n, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return [{k: (rng.standard_normal(s) * scale).astype(dt) for k, s in SHAPES.items()} for _ in range(n)]


def _run_both(dt, make_np, make_torch, steps=25, lrs=None):
    P = _params(dt)
    tp = [torch.tensor(P[k].copy(), requires_grad=True) for k in SHAPES]
    opt, topt = make_np(P), make_torch(tp)
    for i, G in enumerate(_grads_seq(dt, steps)):
        if lrs is not None:
            opt.lr = lrs[i]
            topt.param_groups[0]["lr"] = lrs[i]
        for t, k in zip(tp, SHAPES):
            t.grad = torch.tensor(G[k].copy())
        opt.step(G)
        topt.step()
    return P, {k: t.detach().numpy() for t, k in zip(tp, SHAPES)}, opt


def _rel(a, b):
    return max(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max() for k in b)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch(dt, amsgrad, wd):
    lrs = [1e-2 * (0.9 ** i) for i in range(25)]            # a changing lr, as under a schedule
    kw = dict(betas=(0.8, 0.99), eps=1e-7, weight_decay=wd, amsgrad=amsgrad)
    P, T, _ = _run_both(dt, lambda p: AdamW(p, lr=1e-2, **kw),
                        lambda p: torch.optim.AdamW(p, lr=1e-2, **kw), lrs=lrs)
    assert all(P[k].dtype == dt for k in P)                   # no float64 leak in float32 runs
    assert _rel(P, T) < TOL[dt]
    assert _rel(P, _params(dt)) > 1e-3                        # the test can fail: parameters did move


def test_adamw_contract_and_default_hyperparameters():
    P = _params(np.float64)
    ref = {k: v for k, v in P.items()}
    P2, T, opt = _run_both(np.float64, lambda p: AdamW(p), lambda p: torch.optim.AdamW(p))
    assert _rel(P2, T) < 1e-12
    opt2 = AdamW(P, lr=1e-3)
    opt2.step({k: np.ones_like(v) for k, v in P.items()})
    assert all(P[k] is ref[k] for k in P)                     # updated in place: same array objects


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                                dict(momentum=0.5, dampening=0.3, weight_decay=0.1)])
def test_sgd_matches_torch(dt, kw):
    P, T, _ = _run_both(dt, lambda p: SGD(p, lr=0.05, **kw), lambda p: torch.optim.SGD(p, lr=0.05, **kw))
    assert all(P[k].dtype == dt for k in P)
    assert _rel(P, T) < TOL[dt]


@pytest.mark.parametrize("cls,kw", [(AdamW, dict(weight_decay=0.1, amsgrad=True)), (SGD, dict(momentum=0.9))])
def test_state_dict_roundtrip_continues_exactly(cls, kw):
    grads = _grads_seq(np.float64, 10)
    P = _params(np.float64)
    opt = cls(P, lr=1e-2, **kw)
    for G in grads:
        opt.step(G)
    Q = _params(np.float64)
    a = cls(Q, lr=1e-2, **kw)
    for G in grads[:5]:
        a.step(G)
    sd = {"type": a.state_dict()["type"], "hyper": a.state_dict()["hyper"],
          "state": {k: {kk: (vv.copy() if hasattr(vv, "copy") else vv) for kk, vv in s.items()}
                    for k, s in a.state_dict()["state"].items()}}
    R = {k: v.copy() for k, v in Q.items()}
    b = cls(R, lr=123.0)                                       # hyperparameters come from the state
    b.load_state_dict(sd)
    for G in grads[5:]:
        b.step(G)
    assert all(np.array_equal(R[k], P[k]) for k in P)


def test_optimizer_bad_input_is_named():
    P = _params(np.float64)
    with pytest.raises(KeyError, match="nope"):
        AdamW(P).step({"nope": np.zeros(3)})
    with pytest.raises(ValueError, match="'w'"):
        AdamW(P).step({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="lr"):
        AdamW(P, lr=-1)
    with pytest.raises(ValueError, match="SGD"):
        AdamW(P).load_state_dict(SGD(P).state_dict())


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(dt, max_norm):
    G = _grads_seq(dt, 1, scale=3.0)[0]
    tp = [torch.zeros(G[k].shape, dtype=torch.from_numpy(G[k]).dtype, requires_grad=True) for k in SHAPES]
    for t, k in zip(tp, SHAPES):
        t.grad = torch.tensor(G[k].copy())
    tn = torch.nn.utils.clip_grad_norm_(tp, max_norm).item()
    n = clip_grad_norm(G, max_norm)
    assert abs(n - tn) / tn < TOL[dt]
    assert all(G[k].dtype == dt for k in G)
    assert _rel(G, {k: t.grad.numpy() for t, k in zip(tp, SHAPES)}) < TOL[dt]
    after = grad_norm(G)
    assert after <= max_norm * (1 + 1e-6) if max_norm < n else abs(after - n) / n < TOL[dt]


def test_clip_reports_nonfinite():
    G = {"a": np.array([1.0, np.nan])}
    assert np.isnan(clip_grad_norm(G, 1.0))


def test_warmup_cosine_matches_torch():
    W, S, lr, lo = 10, 120, 3e-3, 3e-4
    p = torch.zeros(1, requires_grad=True)
    o = torch.optim.SGD([p], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = torch.optim.lr_scheduler.SequentialLR(
            o, [torch.optim.lr_scheduler.LinearLR(o, 1 / (W + 1), 1.0, W),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, S - W, lo)], milestones=[W])
        ours = Schedule(lr, S, W, lo)
        for i in range(S):
            assert abs(o.param_groups[0]["lr"] - ours(i)) < 1e-12 * lr
            o.step()
            sch.step()
    assert ours(S + 5) == lo and ours(W) == lr
    assert lr_at(50, lr, S, W, lo, kind="constant") == lr
    with pytest.raises(ValueError, match="schedule"):
        Schedule(lr, S, kind="linearish")
