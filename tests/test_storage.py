"""The model's weight storage: it owns its weights, and each layer's q/k/v (and gate/up) are row blocks
of one matrix behind Hugging Face-named views, with a fallback when an entry is rebound."""
from __future__ import annotations

import numpy as np
import torch

import npllama
from conftest import CONFIGS, hf_model

IDS = np.random.default_rng(3).integers(0, 97, (2, 11))


def _logits(m):
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.double().numpy()


def test_stacked_blocks_are_views_of_one_matrix_with_the_loaded_values(save_hf):
    m = hf_model(**CONFIGS["bias-llama3"])                       # attention and mlp biases stack too
    model = npllama.Llama.from_pretrained(save_hf(m))
    named = {k: v.detach().numpy() for k, v in m.named_parameters()}
    for i in range(m.config.num_hidden_layers):
        for part, group in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            for kind in ("weight", "bias"):
                keys = [f"model.layers.{i}.{part}.{n}.{kind}" for n in group]
                views = [model.params[k] for k in keys]
                assert all(v.base is views[0].base and v.base is not None for v in views), keys
                assert views[0].base.shape[0] == sum(v.shape[0] for v in views)
                for k, v in zip(keys, views):
                    np.testing.assert_array_equal(v, named[k])
    # no weight is held twice: the distinct buffers behind params add up to the parameters' bytes
    owners = {id(p.base if p.base is not None else p): (p.base if p.base is not None else p)
              for p in model.params.values()}
    assert sum(o.nbytes for o in owners.values()) == sum(p.nbytes for p in model.params.values())
    assert not any(isinstance(o, np.memmap) for o in owners.values())   # read into the model, not mapped


def test_model_owns_a_copy_of_the_params_it_is_given():
    cfg = npllama.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=50)
    params = {k: v.copy() for k, v in npllama.Llama.init(cfg, seed=1).params.items()}
    model = npllama.Llama(cfg, params)
    before = model.forward(IDS % 50)
    for v in params.values():
        v *= 2.0                                                  # the caller's arrays, not the model's
    np.testing.assert_array_equal(model.forward(IDS % 50), before)


def test_rebound_and_in_place_updated_entries_are_what_forward_uses(save_hf):
    m = hf_model(**CONFIGS["gqa-tied-linear"])
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float64")
    rng = np.random.default_rng(0)
    q = "model.layers.1.self_attn.q_proj.weight"
    new_q = (0.2 * rng.standard_normal(model.params[q].shape)).astype(np.float32).astype(np.float64)
    model.params[q] = new_q                                      # a new array: the stacked matrix no longer applies
    model.params["model.layers.0.mlp.up_proj.weight"] *= 0.5     # in place, through the view
    with torch.no_grad():
        dict(m.named_parameters())[q].copy_(torch.tensor(new_q))
        m.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    ref = _logits(m.double())
    got = model.forward(IDS)
    # stock transformers keeps its rotary tables in float32 (~1e-7); a stale stacked weight would be off by O(1)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    # and the cached decode path agrees with the full forward under the same rebinding
    cache = model.new_cache(2, IDS.shape[1])
    steps = [model.forward(IDS[:, :6], cache, 0)] + [model.forward(IDS[:, t:t + 1], cache, t) for t in range(6, 11)]
    assert np.abs(np.concatenate(steps, axis=1) - got).max() <= 1e-12 * np.abs(got).max()
