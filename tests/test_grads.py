"""Whole-model gradients against torch autograd: float64 against the float64-throughout reference
(loss by torch.nn.functional.cross_entropy on float64 logits), float32 against stock transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import npllama
import torch_reference
from conftest import CONFIGS, hf_model, rel_err

CASES = ["gqa-tied-linear", "mqa-headdim-dynamic", "bias-llama3", "gqa6-headdim-tied-theta", "mha-untied-default"]


def _batch(B, T, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 97, (B, T))
    targets = rng.integers(0, 97, (B, T))
    targets[0, :3] = -100            # ignored positions must not count
    targets[-1, -1] = -100
    return ids, targets


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_float64_gradients_match_autograd(name, reference, save_hf):
    m = hf_model(**CONFIGS[name])
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float64", reference=reference)
    ids, targets = _batch(3, 40 if "dynamic" not in name else 48, seed=7)
    loss, grads = model.loss_and_grads(ids, targets)
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in m.named_parameters()}
    logits = torch_reference.forward(params, m.config.to_dict(), torch.tensor(ids))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1),
                                            ignore_index=-100)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    assert set(grads) == set(params) == set(model.params)
    for k, p in params.items():
        assert grads[k].shape == model.params[k].shape and grads[k].dtype == np.float64
        assert rel_err(grads[k], p.grad.numpy()) <= 1e-9, k


@pytest.mark.parametrize("name", CASES)
def test_float32_gradients_match_stock_transformers(name, save_hf):
    m = hf_model(**CONFIGS[name])
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float32")
    ids, targets = _batch(2, 32, seed=8)
    loss, grads = model.loss_and_grads(ids, targets)
    m.zero_grad()
    out = m(torch.tensor(ids)).logits
    ref = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.tensor(targets).reshape(-1))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5
    for k, p in m.named_parameters():
        assert grads[k].dtype == np.float32, k
        assert rel_err(grads[k], p.grad.numpy()) <= 1e-4, k


def test_tied_embedding_gradient_sums_both_uses(save_hf):
    m = hf_model(**CONFIGS["gqa-tied-linear"])
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float64")
    assert "lm_head.weight" not in model.params
    ids, targets = _batch(2, 16, seed=9)
    _, grads = model.loss_and_grads(ids, targets)
    # untie by hand: the same weights, lm_head as its own matrix; the two gradients must add up
    cfg = npllama.LlamaConfig(**{**model.config.__dict__, "tie_word_embeddings": False})
    params = dict(model.params, **{"lm_head.weight": model.params["model.embed_tokens.weight"].copy()})
    _, g2 = npllama.Llama(cfg, params, dtype="float64").loss_and_grads(ids, targets)
    np.testing.assert_allclose(grads["model.embed_tokens.weight"],
                               g2["model.embed_tokens.weight"] + g2["lm_head.weight"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reference", [False, True])
def test_all_targets_ignored_gives_nan_like_torch(reference, save_hf):
    model = npllama.Llama.from_pretrained(save_hf(hf_model()), dtype="float64", reference=reference)
    ids = np.zeros((1, 4), dtype=np.int64)
    ref = torch.nn.functional.cross_entropy(torch.zeros(4, 97), torch.full((4,), -100))
    assert np.isnan(ref.item()) and np.isnan(model.loss(ids, np.full((1, 4), -100)))


def test_bad_targets_are_named(save_hf):
    model = npllama.Llama.from_pretrained(save_hf(hf_model()))
    ids = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="target id 97"):
        model.loss_and_grads(ids, np.array([[1, 2, 3, 97]]))
    with pytest.raises(ValueError, match="targets shape"):
        model.loss_and_grads(ids, np.zeros((1, 3), dtype=np.int64))
