"""Bad checkpoints and configs give errors that name the culprit; a failed load builds nothing."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import npllama
from npllama.errors import NpllamaError
from conftest import hf_model
from npllama.config import ConfigError, LlamaConfig
from npllama.io.safetensors import WeightsError


@pytest.fixture
def export(save_hf):
    return save_hf(hf_model(num_key_value_heads=2))


def _rewrite(d, fn):
    path = os.path.join(d, "model.safetensors")
    t = load_file(path)
    fn(t)
    save_file(t, path)


def test_missing_tensor_is_named(export):
    _rewrite(export, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        npllama.Llama.from_pretrained(export)


def test_unexpected_tensor_is_named(export):
    _rewrite(export, lambda t: t.__setitem__("model.layers.7.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model.layers.7.extra.weight'"):
        npllama.Llama.from_pretrained(export)


def test_wrong_shape_names_expected_and_found(export):
    _rewrite(export, lambda t: t.__setitem__("model.norm.weight", np.ones(63, np.float32)))
    with pytest.raises(WeightsError, match=r"'model.norm.weight' has shape \[63\], expected \[64\]"):
        npllama.Llama.from_pretrained(export)


def test_truncated_file(export):
    path = os.path.join(export, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(WeightsError, match=r"model.safetensors: truncated file: tensor '.*' ends at byte"):
        npllama.Llama.from_pretrained(export)


def test_corrupt_header(export):
    path = os.path.join(export, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(WeightsError, match=r"model.safetensors: corrupt safetensors header"):
        npllama.Llama.from_pretrained(export)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10 ** 12))
    with pytest.raises(WeightsError, match=r"corrupt or truncated header"):
        npllama.Llama.from_pretrained(export)


def test_unsupported_dtype_is_named(export):
    _rewrite(export, lambda t: t.__setitem__("model.norm.weight", np.ones(64, np.int32)))
    with pytest.raises(WeightsError, match=r"'model.norm.weight' has dtype I32, expected a float tensor"):
        npllama.Llama.from_pretrained(export)


def test_missing_files_and_dirs(tmp_path, export):
    with pytest.raises(WeightsError, match="no-such-dir"):
        npllama.Llama.from_pretrained(str(tmp_path / "no-such-dir"))
    os.remove(os.path.join(export, "model.safetensors"))
    with pytest.raises(WeightsError, match="no model.safetensors"):
        npllama.Llama.from_pretrained(export)


def test_config_errors_name_the_key(tmp_path, export):
    cfg_path = os.path.join(export, "config.json")
    d = json.load(open(cfg_path))
    bad = dict(d)
    del bad["num_hidden_layers"]
    json.dump(bad, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="missing required key 'num_hidden_layers'"):
        npllama.Llama.from_pretrained(export)
    bad = dict(d, rope_parameters={"rope_type": "yarn-ish", "rope_theta": 10000.0, "factor": 2.0})
    json.dump(bad, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="unknown rope type 'yarn-ish'"):
        npllama.Llama.from_pretrained(export)
    bad = dict(d, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0})
    json.dump(bad, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="missing key 'low_freq_factor'"):
        npllama.Llama.from_pretrained(export)
    open(cfg_path, "w").write("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        npllama.Llama.from_pretrained(export)


def test_both_config_dialects_give_the_same_theta():
    base = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5)
    old = LlamaConfig.from_dict(dict(base, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}))
    new = LlamaConfig.from_dict(dict(base, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}))
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ConfigError, match="rope_parameters has no 'rope_theta'"):
        LlamaConfig.from_dict(dict(base, rope_parameters={"rope_type": "default"}))


def test_transformers_reads_our_config_back(tmp_path):
    from transformers import LlamaConfig as HFConfig
    cfg = LlamaConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=5, rope_theta=123.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg.save(tmp_path / "config.json")
    hf = HFConfig.from_pretrained(str(tmp_path))
    assert hf.rope_parameters["rope_theta"] == 123.0 and hf.rope_parameters["rope_type"] == "llama3"
    assert hf.head_dim == 16 and hf.num_key_value_heads == 2
    assert LlamaConfig.from_json(tmp_path / "config.json") == cfg


def test_bad_arguments_are_named(export):
    with pytest.raises(NpllamaError, match="unsupported dtype 'float16'"):
        npllama.Llama.from_pretrained(export, dtype="float16")
    with pytest.raises(NpllamaError, match="unknown backend 'tpu'"):
        npllama.Llama.from_pretrained(export, backend="tpu")
    model = npllama.Llama.from_pretrained(export)
    with pytest.raises(NpllamaError, match="token id 97 is out of range"):
        model.forward(np.array([[1, 97]]))
    with pytest.raises(NpllamaError, match="2-D"):
        model.forward(np.array([1, 2]))
    with pytest.raises(NpllamaError, match="ids must be integers"):
        model.forward(np.array([[1.0, 2.0]]))
    with pytest.raises(NpllamaError, match="targets shape"):
        model.loss_and_grads(np.array([[1, 2]]), np.array([[1]]))
    with pytest.raises(NpllamaError, match="does not fit the KV cache"):
        model.forward(np.array([[1, 2, 3]]), cache=model.new_cache(1, 2))


def test_failed_load_leaves_the_old_model_and_params_untouched(export):
    model = npllama.Llama.from_pretrained(export)
    before = {k: v.copy() for k, v in model.params.items()}
    _rewrite(export, lambda t: t.__setitem__("model.norm.weight", np.ones(3, np.float32)))
    with pytest.raises(WeightsError):
        model = npllama.Llama.from_pretrained(export)
    for k, v in before.items():  # the name still refers to the complete, earlier model
        np.testing.assert_array_equal(model.params[k], v)


def test_in_place_updates_never_write_back_to_the_file(export):
    model = npllama.Llama.from_pretrained(export)
    model.params["model.norm.weight"] += 1.0
    again = npllama.Llama.from_pretrained(export)
    assert not np.array_equal(again.params["model.norm.weight"], model.params["model.norm.weight"])


def test_save_pretrained_failure_keeps_the_previous_export(export, monkeypatch):
    model = npllama.Llama.from_pretrained(export)
    before = open(os.path.join(export, "model.safetensors"), "rb").read()
    import npllama.io.safetensors as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(export)
    assert open(os.path.join(export, "model.safetensors"), "rb").read() == before
    assert not [f for f in os.listdir(os.path.dirname(export)) if f.startswith(".tmp-")]
