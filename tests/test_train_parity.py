"""50 AdamW steps (clipping, weight decay, warmup + cosine) of a small Llama: npllama's Trainer against
a PyTorch loop from the same weights and batches. float64 against the float64-throughout reference
(tests/torch_reference.py, loss by F.cross_entropy); float32 against stock transformers."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import npllama  # noqa: E402
import torch_reference  # noqa: E402
from conftest import CONFIGS, hf_model, rel_err  # noqa: E402
from npllama.train.data import Batcher  # noqa: E402
from npllama.train.trainer import TrainConfig, Trainer  # noqa: E402

STEPS = 50
CFG = dict(steps=STEPS, batch_size=3, seq_len=16, lr=3e-3, min_lr=3e-4, warmup=5, weight_decay=0.1,
           beta1=0.9, beta2=0.95, eps=1e-8, clip=0.5, eval_every=0, save_every=0, log_every=0, seed=11)


def corpus(n=4000, vocab=97, seed=0):
    """Tokens with structure (a noisy periodic walk), so the loss falls and every step matters."""
    rng = np.random.default_rng(seed)
    x = (np.arange(n) * 7 + rng.integers(0, 3, n)) % vocab
    return x.astype(np.uint16)


def run_npllama(path, dtype, tmp_path, **over):
    model = npllama.Llama.from_pretrained(path, dtype=dtype)
    cfg = TrainConfig(**{**CFG, **over})
    losses, norms = [], []
    tr = Trainer(model, corpus(), None, cfg, str(tmp_path / f"np-{dtype}"))
    tr.fit(on_step=lambda r: (losses.append(r["loss"]), norms.append(r["grad_norm"])))
    return model, losses, norms


def run_torch(params, loss_fn, accum=1):
    """The PyTorch loop: AdamW + clip_grad_norm_ + SequentialLR(LinearLR, CosineAnnealingLR)."""
    c = CFG
    opt = torch.optim.AdamW(list(params.values()), lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                            weight_decay=c["weight_decay"])
    W = c["warmup"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, 1 / (W + 1), 1.0, W),
                  torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS - W, c["min_lr"])], milestones=[W])
    batches = Batcher(corpus(), c["batch_size"], c["seq_len"], seed=c["seed"])
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        b = torch.tensor(batches.next())
        loss = loss_fn(b[:, :-1], b[:, 1:])
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), c["clip"]).item())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
            sched.step()
        losses.append(loss.item())
    return losses, norms


@pytest.mark.parametrize("name", ["gqa-tied-linear", "mha-untied-default"])
def test_50_adamw_steps_float64_match_torch(name, save_hf, tmp_path):
    m = hf_model(std=0.05, **CONFIGS[name])
    model, losses, norms = run_npllama(save_hf(m), "float64", tmp_path)
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in m.named_parameters()}
    cfgd = m.config.to_dict()

    def loss_fn(x, y):
        logits = torch_reference.forward(params, cfgd, x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    ref_losses, ref_norms = run_torch(params, loss_fn)
    assert ref_losses[-1] < ref_losses[0] - 0.5                    # the run learns: every step matters
    assert max(ref_norms) > CFG["clip"]                             # clipping was active
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-10, f"step {i + 1}: npllama {a!r} torch {b!r}"
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-9)
    for k, p in params.items():
        assert model.params[k].dtype == np.float64
        assert rel_err(model.params[k], p.detach().numpy()) <= 1e-10, k


def test_50_adamw_steps_float32_match_stock_transformers(save_hf, tmp_path):
    m = hf_model(std=0.05, **CONFIGS["gqa-tied-linear"])
    path = save_hf(m)
    model, losses, _ = run_npllama(path, "float32", tmp_path)
    m.train()

    def loss_fn(x, y):
        out = m(x).logits
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    ref_losses, _ = run_torch(dict(m.named_parameters()), loss_fn)
    assert ref_losses[-1] < ref_losses[0] - 0.5
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-4, f"step {i + 1}: npllama {a!r} torch {b!r}"
    for k, p in m.named_parameters():
        assert model.params[k].dtype == np.float32, k
        assert rel_err(model.params[k], p.detach().numpy()) <= 1e-4, k


def test_gradient_accumulation_matches_torch(save_hf, tmp_path):
    """accum=2: two micro-batches per step, against a torch loop that backpropagates loss/2 of each."""
    m = hf_model(std=0.05, **CONFIGS["gqa-tied-linear"])
    path = save_hf(m)
    model = npllama.Llama.from_pretrained(path, dtype="float64")
    cfg = TrainConfig(**{**CFG, "steps": 10, "accum": 2})
    losses = []
    Trainer(model, corpus(), None, cfg, str(tmp_path / "acc")).fit(on_step=lambda r: losses.append(r["loss"]))
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in m.named_parameters()}
    cfgd = m.config.to_dict()
    opt = torch.optim.AdamW(list(params.values()), lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batches = Batcher(corpus(), 3, 16, seed=CFG["seed"])
    from npllama.train.schedule import Schedule
    sched = Schedule(cfg.lr, cfg.steps, cfg.warmup, cfg.min_lr)
    for step in range(10):
        opt.zero_grad()
        total = 0.0
        for _ in range(2):
            b = torch.tensor(batches.next())
            logits = torch_reference.forward(params, cfgd, b[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)) / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(list(params.values()), CFG["clip"])
        opt.param_groups[0]["lr"] = sched(step)
        opt.step()
        assert abs(losses[step] - total) <= 1e-10, step
    for k, p in params.items():
        assert rel_err(model.params[k], p.detach().numpy()) <= 1e-10, k
