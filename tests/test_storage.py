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
                assert views[0].base.size == sum(v.size for v in views)
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


def _cfg(tied: bool) -> npllama.LlamaConfig:
    # q/k/v stack to 24 x 16 (not tall), gate/up to 80 x 16 (tall), the head is 97 x 16
    return npllama.LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, vocab_size=97, tie_word_embeddings=tied)


def _owner(p):
    return p.base if p.base is not None else p


def test_tall_matrices_are_kept_in_out_order_behind_out_in_views():
    for tied in (True, False):
        model = npllama.Llama.init(_cfg(tied), seed=0, dtype="float64")
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        for k in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", head):
            p = model.params[k]
            assert p.shape[0] >= 2 * p.shape[1] and not p.flags.c_contiguous, k      # still (out, in) to readers
            assert _owner(p).flags.c_contiguous and _owner(p).shape[0] == p.shape[1], k   # memory is (in, out)
        # wide or square matrices, and an embedding that is not the head, stay as the file has them
        for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                  "model.layers.0.self_attn.o_proj.weight") + (() if tied else ("model.embed_tokens.weight",)):
            assert model.params[k].flags.c_contiguous, k


def test_both_layouts_give_the_same_model_through_forward_training_and_saving(tmp_path, monkeypatch):
    from npllama.train.optim import AdamW
    ids = IDS % 97
    runs = {}
    for layout in ("auto", "out_in"):
        monkeypatch.setenv("NPLLAMA_WEIGHT_LAYOUT", layout)
        model = npllama.Llama.init(_cfg(True), seed=0, dtype="float64")
        contiguous = [p.flags.c_contiguous for p in model.params.values()]
        assert all(contiguous) == (layout == "out_in")
        logits = model.forward(ids)
        opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
        for _ in range(2):
            loss, grads = model.loss_and_grads(ids[:, :-1], ids[:, 1:])
            opt.step(grads)
        model.save_pretrained(str(tmp_path / layout))
        reread = npllama.Llama.from_pretrained(str(tmp_path / layout), dtype="float64")
        runs[layout] = (logits, loss, grads, {k: v.copy() for k, v in model.params.items()}, reread.forward(ids))
    (l1, loss1, g1, p1, r1), (l2, loss2, g2, p2, r2) = runs["auto"], runs["out_in"]
    np.testing.assert_allclose(l1, l2, rtol=1e-12, atol=1e-13)
    assert abs(loss1 - loss2) <= 1e-12 * abs(loss2)
    for k in g2:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-10, atol=1e-13, err_msg=k)
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-10, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(r1, r2, rtol=1e-10, atol=1e-12)       # what was saved reads back the same


def test_a_bad_layout_setting_is_named(monkeypatch):
    monkeypatch.setenv("NPLLAMA_WEIGHT_LAYOUT", "sideways")
    try:
        npllama.Llama.init(_cfg(True), seed=0)
    except npllama.NpllamaError as e:
        assert "NPLLAMA_WEIGHT_LAYOUT" in str(e) and "sideways" in str(e)
    else:
        raise AssertionError("a bad NPLLAMA_WEIGHT_LAYOUT was accepted")
