"""LoRA against PEFT + transformers computed in the same run, against torch autograd and finite differences
in float64, and the adapter round trip both ways (PEFT -> npllama -> PEFT)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import npllama
import torch_reference
from conftest import hf_model, rel_err
from npllama import lora
from npllama.layers import lora as lora_layer
from test_layers_fd import check

import peft  # noqa: E402  (the test extra installs it: LoRA is tested against PEFT itself)

CFG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
rng = np.random.default_rng(0)


def _ids(B=2, T=11, seed=3):
    r = np.random.default_rng(seed)
    ids, targets = r.integers(0, 97, (B, T)), r.integers(0, 97, (B, T))
    targets[0, :2] = -100
    return ids, targets


def _randomize_b(model, seed=1, std=0.2):
    """A fresh adapter is a no-op (B = 0); give B values so the adapter matters."""
    r = np.random.default_rng(seed)
    for k, v in model.params.items():
        if ".lora_B." in k:
            v[...] = r.standard_normal(v.shape) * std


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_layer_against_finite_differences(frozen, dropout):
    x, W, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    keep = None if dropout == 0 else (rng.random((2, 3, 6)) >= dropout) / (1 - dropout)
    R = rng.standard_normal((2, 3, 5))
    f = lambda: float((lora_layer.forward(x, W, b, A, B, 1.7, keep, frozen)[0] * R).sum())
    dx, dW, db, dA, dB = lora_layer.backward(R, lora_layer.forward(x, W, b, A, B, 1.7, keep, frozen)[1])
    for analytic, arr in ((dx, x), (dA, A), (dB, B)):
        check(analytic, f, arr)
    if frozen:
        assert dW is None and db is None          # the frozen weight's product is never computed
    else:
        check(dW, f, W)
        check(db, f, b)


def test_lora_layer_against_autograd_with_the_same_dropout_mask():
    x, W = rng.standard_normal((4, 7)), rng.standard_normal((3, 7))
    A, B = rng.standard_normal((2, 7)), rng.standard_normal((3, 2))
    keep = (rng.random((4, 7)) >= 0.25) / 0.75
    dy = rng.standard_normal((4, 3))
    y, cache = lora_layer.forward(x, W, None, A, B, 0.5, keep)
    dx, _, _, dA, dB = lora_layer.backward(dy, cache)
    tx, tA, tB = (torch.tensor(a, requires_grad=True) for a in (x, A, B))
    ty = tx @ torch.tensor(W).T + 0.5 * ((tx * torch.tensor(keep)) @ tA.T) @ tB.T
    (ty * torch.tensor(dy)).sum().backward()
    assert rel_err(y, ty.detach().numpy()) <= 1e-14
    for ours, theirs in ((dx, tx), (dA, tA), (dB, tB)):
        assert rel_err(ours, theirs.grad.numpy()) <= 1e-13


# ---------------------------------------------------------------- the model, float64
def _torch_lora_logits(m, model, ids, params_extra=None):
    """float64-throughout reference logits with the adapter of `model` applied (W + s B A), as torch leaves."""
    cfg = model.lora
    params = {k: v.detach().double().clone() for k, v in m.named_parameters()}
    leaves = {k: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
              for k, v in lora.lora_params(model).items()}
    for mod in cfg.modules:
        params[mod + ".weight"] = params[mod + ".weight"] + cfg.scale * leaves[mod + ".lora_B.weight"] @ \
            leaves[mod + ".lora_A.weight"]
    return torch_reference.forward(params, m.config.to_dict(), torch.tensor(ids)), leaves


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_float64_logits_and_lora_gradients_match_autograd(reference, rslora, save_hf):
    m = hf_model(**CFG)
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float64", reference=reference)
    lora.add(model, r=3, alpha=5, targets=ALL, rslora=rslora, seed=4)
    _randomize_b(model)
    ids, targets = _ids()
    logits, leaves = _torch_lora_logits(m, model, ids)
    assert rel_err(model.forward(ids), logits.detach().numpy()) <= 1e-10
    loss, grads = model.loss_and_grads(ids, targets)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), torch.tensor(targets).reshape(-1))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    assert set(grads) == set(leaves) == model.trainable            # exactly the LoRA matrices
    for k, t in leaves.items():
        assert rel_err(grads[k], t.grad.numpy()) <= 1e-9, k


def test_fast_equals_reference_with_an_adapter(save_hf):
    m = hf_model(**CFG)
    d = save_hf(m)
    fast, ref = (npllama.Llama.from_pretrained(d, dtype="float64", reference=r) for r in (False, True))
    for model in (fast, ref):
        lora.add(model, r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"], seed=2)
        _randomize_b(model)
    ids, targets = _ids(3, 13)
    assert rel_err(fast.forward(ids), ref.forward(ids)) <= 1e-12
    (lf, gf), (lr, gr) = fast.loss_and_grads(ids, targets), ref.loss_and_grads(ids, targets)
    assert abs(lf - lr) <= 1e-12 * abs(lr)
    for k in gr:
        assert rel_err(gf[k], gr[k]) <= 1e-12, k


def test_a_fresh_adapter_leaves_the_logits_unchanged(save_hf):
    d = save_hf(hf_model(**CFG))
    model = npllama.Llama.from_pretrained(d, dtype="float64", reference=True)
    ids, _ = _ids()
    before = model.forward(ids)
    lora.add(model, r=8, alpha=16, targets=ALL)
    assert np.array_equal(model.forward(ids), before)
    A = model.params["model.layers.0.self_attn.q_proj.lora_A.weight"]
    bound = 1 / np.sqrt(64)                      # PEFT's kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert A.shape == (8, 64) and np.abs(A).max() <= bound and np.abs(A).max() > 0.9 * bound
    assert not model.params["model.layers.0.self_attn.q_proj.lora_B.weight"].any()


def test_20_adamw_steps_match_torch_in_float64(save_hf):
    m = hf_model(**CFG)
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float64")
    lora.add(model, r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "down_proj"], seed=5)
    _randomize_b(model, std=0.05)
    opt = npllama.AdamW({k: model.params[k] for k in model.trainable}, lr=3e-3, weight_decay=0.01)
    _, leaves = _torch_lora_logits(m, model, np.zeros((1, 1), dtype=np.int64))
    topt = torch.optim.AdamW(list(leaves.values()), lr=3e-3, weight_decay=0.01)
    base = {k: v.detach().double() for k, v in m.named_parameters()}
    cfg = model.lora
    for step in range(20):
        ids, targets = _ids(2, 9, seed=100 + step)
        loss, grads = model.loss_and_grads(ids, targets)
        opt.step(grads)
        params = dict(base)
        for mod in cfg.modules:
            params[mod + ".weight"] = base[mod + ".weight"] + cfg.scale * leaves[mod + ".lora_B.weight"] @ \
                leaves[mod + ".lora_A.weight"]
        logits = torch_reference.forward(params, m.config.to_dict(), torch.tensor(ids))
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), torch.tensor(targets).reshape(-1))
        topt.zero_grad()
        ref.backward()
        topt.step()
        assert abs(loss - ref.item()) <= 1e-10, step
    for k, t in leaves.items():
        assert rel_err(model.params[k], t.detach().numpy()) <= 1e-9, k


def test_frozen_weights_get_no_gradient_and_no_product(save_hf, monkeypatch):
    model = npllama.Llama.from_pretrained(save_hf(hf_model(**CFG)), dtype="float64")
    lora.add(model, r=2, alpha=4)
    calls = []
    from npllama.layers import linear
    real = linear.backward
    monkeypatch.setattr(linear, "backward", lambda dy, c: calls.append(c.frozen) or real(dy, c))
    _, grads = model.loss_and_grads(*_ids())
    assert calls and all(calls)                  # every base linear ran frozen: no dW was computed
    assert set(grads) == model.trainable and len(grads) == 2 * 2 * 2


def test_dropout_is_seeded_and_inverted(save_hf):
    d = save_hf(hf_model(**CFG))
    runs = []
    for _ in range(2):
        model = npllama.Llama.from_pretrained(d, dtype="float64")
        lora.add(model, r=4, alpha=8, dropout=0.5, seed=9)
        _randomize_b(model)
        ids, targets = _ids()
        runs.append([model.loss_and_grads(ids, targets)[0] for _ in range(3)])
        logits = model.forward(ids)                   # inference: no dropout, same every call
        assert np.array_equal(logits, model.forward(ids))
    assert runs[0] == runs[1]                         # the same seed draws the same masks
    assert len(set(runs[0])) == 3                     # each training call draws new ones
    s = lora_layer.Settings(1.0, 0.25, np.random.default_rng(0))
    keep = lora_layer.keep_mask(s, (400, 500), np.float64, np)
    assert set(np.unique(keep)) == {0.0, 1 / 0.75} and abs(keep.mean() - 1.0) < 0.01


# ---------------------------------------------------------------- PEFT, both ways
def _peft_model(m, adapter_dir):
    import copy
    return peft.PeftModel.from_pretrained(copy.deepcopy(m), adapter_dir).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_npllama_adapter_is_read_by_peft(rslora, save_hf, tmp_path):
    m = hf_model(**CFG)
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float32")
    lora.add(model, r=4, alpha=12, targets=["q_proj", "k_proj", "gate_proj", "down_proj"], rslora=rslora)
    _randomize_b(model)
    lora.save(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is rslora and cfg["r"] == 4
    pm = _peft_model(m, str(tmp_path / "adapter"))
    ids, _ = _ids()
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.numpy()
        plain = m(torch.tensor(ids)).logits.numpy()
    assert np.abs(model.forward(ids) - theirs).max() <= 1e-4
    assert np.abs(plain - theirs).max() > 1e-2                  # the adapter is really applied


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.layers\.1\..*(o_proj|up_proj)"])
def test_peft_adapter_is_read_by_npllama_and_written_back(targets, save_hf, tmp_path):
    m = hf_model(**CFG)
    d = save_hf(m)
    torch.manual_seed(0)
    pm = peft.get_peft_model(__import__("copy").deepcopy(m),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                                             init_lora_weights=False)).eval()   # random A and B
    pm.save_pretrained(str(tmp_path / "peft"))
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-4)):
        model = npllama.Llama.from_pretrained(d, dtype=dtype)
        cfg = lora.load(model, tmp_path / "peft")
        assert cfg.dropout == 0.1 and cfg.r == 4
        ids, _ = _ids()
        with torch.no_grad():
            theirs = pm(torch.tensor(ids)).logits.numpy()
        assert np.abs(model.forward(ids) - theirs).max() <= tol
    if isinstance(targets, str):                                   # only layer 1's o_proj and up_proj
        assert cfg.modules == ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj")
    lora.save(model, tmp_path / "again")                           # and back: PEFT reads what we wrote
    with torch.no_grad():
        again = _peft_model(m, str(tmp_path / "again"))(torch.tensor(ids)).logits.numpy()
    assert np.abs(again - theirs).max() <= 1e-4


def test_merge_then_transformers_reads_the_plain_model(save_hf, tmp_path):
    from transformers import LlamaForCausalLM
    m = hf_model(**CFG)
    model = npllama.Llama.from_pretrained(save_hf(m), dtype="float32")
    lora.add(model, r=4, alpha=8, targets=ALL)
    _randomize_b(model)
    ids, _ = _ids()
    adapted = model.forward(ids)
    lora.save(model, tmp_path / "adapter")
    with pytest.raises(npllama.NpllamaError, match="merge"):
        model.save_pretrained(tmp_path / "refused")
    lora.merge(model)
    assert model.lora is None and model.trainable == set(model.params)
    assert not any("lora" in k for k in model.params)
    assert np.abs(model.forward(ids) - adapted).max() <= 1e-5
    model.save_pretrained(tmp_path / "merged")
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        merged = hf(torch.tensor(ids)).logits.numpy()
        theirs = _peft_model(m, str(tmp_path / "adapter"))(torch.tensor(ids)).logits.numpy()
    assert np.abs(merged - theirs).max() <= 1e-4


# ---------------------------------------------------------------- the real model
def test_smollm2_with_an_adapter_matches_peft(tmp_path):
    from npllama.io.defaults import default_gguf
    from transformers import AutoModelForCausalLM
    path = default_gguf()
    model = npllama.Llama.from_pretrained(path)
    lora.add(model, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=1)
    _randomize_b(model, std=0.02)
    lora.save(model, tmp_path / "adapter")
    d, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = np.random.default_rng(0).integers(0, 49152, (1, 24))
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.numpy()
    ours = model.forward(ids)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() == 1.0


# ---------------------------------------------------------------- bad input
def _unchanged(model, before):
    assert model.lora is None and list(model.params) == before and model.trainable == set(before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(alpha=float("nan")), "lora_alpha"),
    (dict(dropout=1.0), "lora_dropout"),
    (dict(targets=["q_proj", "lm_head"]), "'lm_head'"),
    (dict(targets=[]), "target_modules"),
    (dict(targets="nothing.*here"), "matches none"),
    (dict(targets="(["), "not a valid regular expression"),
])
def test_bad_add_arguments_are_named_and_change_nothing(kwargs, match, save_hf):
    model = npllama.Llama.from_pretrained(save_hf(hf_model(**CFG)))
    before = list(model.params)
    with pytest.raises(lora.LoraError, match=match):
        lora.add(model, **kwargs)
    _unchanged(model, before)


def _peft_dir(tmp_path, m, **kw):
    pm = peft.get_peft_model(__import__("copy").deepcopy(m), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **kw}))
    pm.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(use_dora=True), "'use_dora'"),
    (lambda c: c.update(bias="all"), "bias 'all'"),
    (lambda c: c.update(modules_to_save=["lm_head"]), "'modules_to_save'"),
    (lambda c: c.update(layers_to_transform=[0]), "'layers_to_transform'"),
    (lambda c: c.update(rank_pattern={"q_proj": 2}), "'rank_pattern'"),
    (lambda c: c.update(peft_type="IA3"), "peft_type 'IA3'"),
    (lambda c: c.update(r=0), "r must be a positive integer"),
    (lambda c: c.update(target_modules=["q_proj", "wq"]), "'wq'"),
    (lambda c: c.pop("lora_alpha"), "missing 'lora_alpha'"),
])
def test_unsupported_or_bad_adapter_options_are_refused_by_name(edit, match, save_hf, tmp_path):
    m = hf_model(**CFG)
    model = npllama.Llama.from_pretrained(save_hf(m))
    d = _peft_dir(tmp_path, m, target_modules=["q_proj"])
    cfg = json.loads((d / "adapter_config.json").read_text())
    edit(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    before = list(model.params)
    with pytest.raises(lora.LoraError, match=match) as e:
        lora.load(model, d)
    assert "adapter_config.json" in str(e.value)
    _unchanged(model, before)


def test_an_adapter_for_another_model_names_the_tensor(save_hf, tmp_path):
    other = hf_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=2)
    d = _peft_dir(tmp_path, other, target_modules=["q_proj", "v_proj"])
    model = npllama.Llama.from_pretrained(save_hf(hf_model(**CFG)))
    before = list(model.params)
    with pytest.raises(lora.LoraError, match=r"q_proj\.lora_A\.weight' has shape \[4, 32\], this model needs \[4, 64\]"):
        lora.load(model, d)
    _unchanged(model, before)


def test_missing_files_and_second_adapters_are_refused(save_hf, tmp_path):
    m = hf_model(**CFG)
    model = npllama.Llama.from_pretrained(save_hf(m))
    with pytest.raises(lora.LoraError, match="no adapter_config.json"):
        lora.load(model, tmp_path)
    d = _peft_dir(tmp_path, m, target_modules=["q_proj"])
    os.rename(d / "adapter_model.safetensors", d / "adapter_model.bin")
    with pytest.raises(lora.LoraError, match="pickle"):
        lora.load(model, d)
    with pytest.raises(lora.LoraError, match="no LoRA adapter"):
        lora.merge(model)
    lora.add(model)
    with pytest.raises(lora.LoraError, match="already carries"):
        lora.add(model)
    model.trainable = {"no.such.weight"}
    with pytest.raises(npllama.NpllamaError, match="no.such.weight"):
        model.loss_and_grads(*_ids())
