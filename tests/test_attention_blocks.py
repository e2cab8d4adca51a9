"""Attention in query blocks (fast.attention.BLOCK) against PyTorch: many small blocks, a partial last
block, blocks that start past a KV cache's earlier tokens, padding masks, and the blocked backward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import npllama
import torch_reference
from conftest import CONFIGS, hf_model, rel_err
from npllama.fast import attention


@pytest.mark.parametrize("block", [1, 5, 16])
@pytest.mark.parametrize("name", ["gqa-tied-linear", "mqa-untied-bias"])
def test_blocked_forward_matches_float64_reference(name, block, save_hf, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", block)
    m = hf_model(**CONFIGS[name])
    ids = np.random.default_rng(1).integers(0, 97, (2, 37))             # 37: the last block is partial
    ours = npllama.Llama.from_pretrained(save_hf(m), dtype="float64").forward(ids)
    ref = torch_reference.forward({k: v.double() for k, v in m.state_dict().items()}, m.config.to_dict(),
                                  torch.tensor(ids)).numpy()
    assert rel_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("block", [3, 8])
def test_blocks_after_a_cache_and_under_padding_equal_one_block(block, save_hf, monkeypatch):
    model = npllama.Llama.from_pretrained(save_hf(hf_model(**CONFIGS["bias-llama3"])), dtype="float64")
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 97, (2, 30))
    mask = np.ones((2, 30), dtype=bool)
    mask[1, :4] = False                                                 # row 1 left-padded by 4
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    def run():
        cache = model.new_cache(2, 30)
        a = model.forward(ids[:, :13], cache, 0, positions=pos[:, :13], attn_mask=mask[:, :13])
        b = model.forward(ids[:, 13:], cache, 13, positions=pos[:, 13:], attn_mask=mask)   # blocks past 13 keys
        return np.concatenate([a, b], axis=1)
    whole = run()                                                       # BLOCK = 64: one block per call
    monkeypatch.setattr(attention, "BLOCK", block)
    # padding positions see no key at all; what they hold is never read, so only real positions count
    assert rel_err(run()[mask], whole[mask]) <= 1e-12
    # and the unpadded row equals a plain full forward
    assert rel_err(whole[0], model.forward(ids[:1])[0]) <= 1e-12


def test_blocked_gradients_match_autograd(save_hf, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", 7)
    m = hf_model(**CONFIGS["gqa6-headdim-tied-theta"])
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float64")
    rng = np.random.default_rng(3)
    ids, targets = rng.integers(0, 97, (2, 30)), rng.integers(0, 97, (2, 30))
    loss, grads = model.loss_and_grads(ids, targets)
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in m.named_parameters()}
    logits = torch_reference.forward(params, m.config.to_dict(), torch.tensor(ids))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    for k, p in params.items():
        assert rel_err(grads[k], p.grad.numpy()) <= 1e-9, k
