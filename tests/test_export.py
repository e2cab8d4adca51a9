"""weights/export.py: HF folders, state dicts and Meta checkpoints (written here from an HF model) -> identical logits."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO, hf_model
from npllama.backend import to_host
from npllama.model import Llama

torch = pytest.importorskip("torch")

_spec = importlib.util.spec_from_file_location("npllama_export", os.path.join(REPO, "weights", "export.py"))
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)

IDS = np.array([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]])


def hf_logits(m):
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.numpy()


def ours(path, dtype="float32"):
    return to_host(Llama.from_pretrained(path, dtype=dtype).forward(IDS))


def to_meta(m, n_shards=1):
    """What Meta's training code would have saved for this HF model: interleaved wq/wk rows, Meta names, shards."""
    c = m.config
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    hd = D // H

    def interleave(w, n):  # HF rotate-half halves -> Meta's interleaved pairs (llama.cpp's permute)
        return w.reshape(n, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, meta in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if meta == "attention.wq":
                w = interleave(w, H)
            elif meta == "attention.wk":
                w = interleave(w, KV)
            full[f"layers.{i}.{meta}.weight"] = w
    params = {"dim": D, "n_layers": c.num_hidden_layers, "n_heads": H, "n_kv_heads": KV, "vocab_size": -1,
              "multiple_of": 16, "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"]}
    if n_shards == 1:
        return [full], params
    # model parallel: column-parallel weights split on rows, row-parallel on columns, norms replicated
    axis = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "output": 0, "tok_embeddings": 1}
    shards = [{} for _ in range(n_shards)]
    for k, w in full.items():
        key = k.split(".")[-2] if k.startswith("layers.") else k.split(".")[0]
        a = axis.get(key)
        for s, part in enumerate([w] * n_shards if a is None else torch.chunk(w, n_shards, dim=a)):
            shards[s][k] = part.clone()
    return shards, params


def write_meta(tmp_path, m, n_shards=1):
    shards, params = to_meta(m, n_shards)
    d = tmp_path / f"meta{n_shards}"
    d.mkdir()
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps(params))
    return str(d)


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("cfg", [dict(num_attention_heads=4, num_key_value_heads=2),
                                 dict(num_attention_heads=4, num_key_value_heads=4,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5e5})])
def test_meta_checkpoint_gives_identical_logits(tmp_path, n_shards, cfg):
    m = hf_model(seed=1, **cfg)
    src = write_meta(tmp_path, m, n_shards)
    out = str(tmp_path / "exported")
    assert export.main([src, out, "--max-position-embeddings", "32"]) == 0
    ref = hf_logits(m)
    got = ours(out)
    assert np.abs(got - ref).max() <= 1e-4
    # bit-identical weights: exactly the logits of the same model saved by transformers itself
    hf_dir = str(tmp_path / "hf")
    m.save_pretrained(hf_dir)
    np.testing.assert_array_equal(got, ours(hf_dir))


def test_meta_without_unpermute_would_differ(tmp_path):
    # the test can fail: loading the interleaved rows as they are gives other logits
    m = hf_model(seed=2, num_attention_heads=4, num_key_value_heads=2)
    shards, params = to_meta(m)
    config, hf = export.convert_meta(shards, params, max_position_embeddings=32)
    hf["model.layers.0.self_attn.q_proj.weight"] = shards[0]["layers.0.attention.wq.weight"].numpy()
    assert np.abs(to_host(Llama(config, hf).forward(IDS)) - hf_logits(m)).max() > 1e-3


def test_hf_dir_and_state_dict(tmp_path, save_hf):
    m = hf_model(seed=3, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    src = save_hf(m)
    ref = hf_logits(m)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", None)):
        out = str(tmp_path / f"from-dir-{dtype}")
        assert export.main([src, out, "--dtype", dtype]) == 0
        got = ours(out)
        if tol:
            assert np.abs(got - ref).max() <= tol
        else:  # bf16 storage: the logits of the bf16-rounded model in torch
            mb = hf_model(seed=3, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
            mb.load_state_dict({k: v.bfloat16().float() for k, v in m.state_dict().items()})
            assert np.abs(got - hf_logits(mb)).max() <= 1e-4
            assert np.abs(got - ref).max() > 1e-6
    pt = tmp_path / "sd.pt"
    torch.save(m.state_dict(), pt)
    out = str(tmp_path / "from-sd")
    assert export.main([str(pt), out, "--config", os.path.join(src, "config.json")]) == 0
    np.testing.assert_array_equal(ours(out), ours(str(tmp_path / "from-dir-float32")))


def test_export_errors(tmp_path, capsys):
    assert export.main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export.main([str(bad), str(tmp_path / "o"), "--config", str(bad)]) == 2


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("key,value", [("n_heads", "4"), ("dim", 0), ("n_layers", None), ("norm_eps", float("nan")),
                                       ("n_kv_heads", 3)])
def test_bad_params_json_is_one_line(tmp_path, capsys, key, value):
    d = write_meta(tmp_path, hf_model(seed=4, num_attention_heads=4, num_key_value_heads=2))
    params = json.loads(open(os.path.join(d, "params.json")).read())
    params[key] = value
    with open(os.path.join(d, "params.json"), "w") as f:
        f.write(json.dumps(params))
    assert export.main([d, str(tmp_path / "o")]) == 2
    _one_line(capsys, "params.json", key if key != "n_kv_heads" else "n_kv_heads")
    assert not os.path.exists(tmp_path / "o")


def test_nonfinite_tensors_refused_unless_allowed(tmp_path, capsys, save_hf):
    m = hf_model(seed=5)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 7] = float("nan")
    src = save_hf(m)
    capsys.readouterr()   # transformers' progress bar
    assert export.main([src, str(tmp_path / "o")]) == 2
    _one_line(capsys, "model.layers.1.mlp.up_proj.weight", "--allow-nonfinite")
    assert not os.path.exists(tmp_path / "o")
    assert export.main([src, str(tmp_path / "o"), "--allow-nonfinite"]) == 0
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err


def test_torch_missing_or_too_old_is_one_line(tmp_path, capsys, monkeypatch, save_hf):
    src = save_hf(hf_model(seed=6))
    capsys.readouterr()
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    assert export.main([src, str(tmp_path / "o")]) == 2
    _one_line(capsys, "2.5.1", "torch>=2.6")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert export.main([src, str(tmp_path / "o")]) == 2
    _one_line(capsys, "PyTorch", "pip install")
