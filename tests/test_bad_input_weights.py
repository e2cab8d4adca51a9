"""Bad model folders, safetensors headers, configs and GGUF metadata: each a clear npllama error naming the culprit.

One row per member of each class of bad input (issue 16): the test writes the malformed file itself
and checks the exception type and that the message names the file, tensor or key. A hypothesis test
then mutates valid headers and configs at random and checks that only npllama's own errors come out,
with no large allocation on the way. No torch here: the tiny models are npllama's own.
"""
from __future__ import annotations

import importlib
import importlib.util
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npllama
from npllama.config import ConfigError, LlamaConfig
from npllama.errors import NpllamaError
from npllama.io.safetensors import SafetensorsFile, WeightsError
from npllama.model import Llama
from npllama.tokenizer.errors import TokenizerError


def _optional(module: str, name: str) -> type:
    # the class may not exist on an older checkout; a class nothing raises then makes those rows fail
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return type(name, (Exception,), {})


OutsideFolderError = _optional("npllama.io.paths", "OutsideFolderError")
GGUFError = _optional("npllama.io.gguf", "GGUFError")

TINY = dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=16, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
ST = "model.safetensors"


# ---------------------------------------------------------------- building and breaking files
@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A tiny valid model folder (config.json + model.safetensors), written by npllama."""
    d = str(tmp_path_factory.mktemp("valid") / "model")
    Llama.init(LlamaConfig(**TINY), seed=1).save_pretrained(d)
    return d


def read_st(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        return header, f.read()


def write_st(path, header, data, raw_header=None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)


def edit_header(fn):
    """A breaker that applies fn(header, data) -> (header, data) to model.safetensors."""
    def apply(d):
        p = os.path.join(d, ST)
        header, data = read_st(p)
        out = fn(header, data)
        write_st(p, *(out if out is not None else (header, data)))
    return apply


def edit_entry(name, fn):
    """A breaker that applies fn(entry) to one tensor's header entry."""
    def g(h, data):
        fn(h[name])
    return edit_header(g)


def edit_config(fn):
    def apply(d):
        p = os.path.join(d, "config.json")
        with open(p) as f:
            c = json.load(f)
        fn(c)
        with open(p, "w") as f:
            json.dump(c, f)
    return apply


def set_config(**kw):
    """Set config keys; setting the older rope keys drops `rope_parameters`, which would take precedence."""
    def fn(c):
        if "rope_theta" in kw or "rope_scaling" in kw:
            c.pop("rope_parameters", None)
        c.update(kw)
    return edit_config(fn)


def raw_config(text):
    def apply(d):
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(text)
    return apply


def shard(index_fn):
    """Turn the folder into a sharded one (shard file + index) and let index_fn(index) break the index."""
    def apply(d):
        os.rename(os.path.join(d, ST), os.path.join(d, "model-00001-of-00001.safetensors"))
        header, _ = read_st(os.path.join(d, "model-00001-of-00001.safetensors"))
        index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                                for k in header if k != "__metadata__"}}
        index = index_fn(index) or index
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            f.write(index if isinstance(index, str) else json.dumps(index))
    return apply


def outside_file(d, name="secret.safetensors"):
    """A valid safetensors file outside the model folder (a copy of the model's own)."""
    p = os.path.join(os.path.dirname(d), name)
    shutil.copy(os.path.join(d, ST) if os.path.exists(os.path.join(d, ST)) else
                os.path.join(d, "model-00001-of-00001.safetensors"), p)
    return p


def symlink_out(name):
    def apply(d):
        target = outside_file(d) if name != "config.json" else shutil.copy(os.path.join(d, "config.json"),
                                                                           os.path.join(os.path.dirname(d), "c.json"))
        os.remove(os.path.join(d, name))
        os.symlink(target, os.path.join(d, name))
    return apply


def replace_with_fifo(name):
    def apply(d):
        os.remove(os.path.join(d, name))
        os.mkfifo(os.path.join(d, name))
    return apply


def sparse_header_length(n):
    def apply(d):
        p = os.path.join(d, ST)
        with open(p, "r+b") as f:
            f.write(struct.pack("<Q", n))
            f.truncate(n + 64)  # sparse: the file really is that long, and nothing should read it
    return apply


def _poke(d, raw, at=0):
    with open(os.path.join(d, ST), "r+b") as f:
        f.seek(at)
        f.write(raw)


def swap(h, a, b, key="data_offsets"):
    h[a][key], h[b][key] = h[b][key], h[a][key]


EMB, NORM, Q0 = "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"
L1 = "model.layers.1.input_layernorm.weight"


def _dup_offsets(h, data):
    h[L1]["data_offsets"] = list(h[NORM]["data_offsets"])


def _overlap(h, data):
    a, b = h[NORM]["data_offsets"]
    h[NORM]["data_offsets"] = [a - 4, b - 4]


def _gap(h, data):
    # move the last tensor one element further and grow the data: a 4-byte hole before it
    last = max(h, key=lambda k: h[k]["data_offsets"][1] if k != "__metadata__" else -1)
    a, b = h[last]["data_offsets"]
    h[last]["data_offsets"] = [a + 4, b + 4]
    return h, data[:a] + b"\0" * 4 + data[a:]


# (id, breaker, exception, pattern the message must match: the culprit file/tensor/key)
ROWS = [
    # ---- files stay in their folder
    ("index-absolute-path", shard(lambda i: i["weight_map"].__setitem__(NORM, "/etc/passwd")),
     OutsideFolderError, r"weight_map\['model.norm.weight'\].*'/etc/passwd' is an absolute path"),
    ("index-dotdot", shard(lambda i: i["weight_map"].__setitem__(NORM, "../secret.safetensors")),
     OutsideFolderError, r"index.json: weight_map\['model.norm.weight'\].*'\.\./secret.safetensors'"),
    ("index-dotdot-inner", shard(lambda i: i["weight_map"].__setitem__(NORM, "sub/../../secret.safetensors")),
     OutsideFolderError, r"weight_map\['model.norm.weight'\].*climbs out"),
    ("index-value-not-string", shard(lambda i: i["weight_map"].__setitem__(NORM, 7)),
     OutsideFolderError, r"weight_map\['model.norm.weight'\].*must be a string, got int"),
    ("index-value-list", shard(lambda i: i["weight_map"].__setitem__(NORM, ["a.safetensors"])),
     OutsideFolderError, r"weight_map\['model.norm.weight'\].*must be a string, got list"),
    ("index-weight-map-list", shard(lambda i: i.__setitem__("weight_map", [["x", "y"]])),
     WeightsError, r"model.safetensors.index.json: .*'weight_map' must be an object"),
    ("index-no-weight-map", shard(lambda i: i.pop("weight_map")),
     WeightsError, r"model.safetensors.index.json: .*'weight_map'"),
    ("index-not-object", shard(lambda i: "[1, 2]"),
     WeightsError, r"model.safetensors.index.json: .*'weight_map'"),
    ("index-deep-nesting", shard(lambda i: "[" * 100_000 + "]" * 100_000),
     WeightsError, r"model.safetensors.index.json: .*nested 100000 levels"),
    ("index-not-json", shard(lambda i: "{weight_map: "),
     WeightsError, r"model.safetensors.index.json: .*not valid JSON"),
    ("index-shard-symlink-out",
     lambda d: (shard(lambda i: None)(d), symlink_out("model-00001-of-00001.safetensors")(d)),
     OutsideFolderError, r"weight_map\[.*'model-00001-of-00001.safetensors' resolves to .*secret.safetensors, outside"),
    ("index-tensor-not-in-shard", shard(lambda i: i["weight_map"].__setitem__("model.extra.weight",
                                                                            "model-00001-of-00001.safetensors")),
     WeightsError, r"model-00001-of-00001.safetensors: tensor 'model.extra.weight' listed in the index"),
    ("index-is-fifo", lambda d: (shard(lambda i: None)(d), replace_with_fifo("model.safetensors.index.json")(d)),
     WeightsError, r"model.safetensors.index.json: .*not a regular file"),
    ("weights-symlink-out", symlink_out(ST), OutsideFolderError, r"'model.safetensors' resolves to .*outside"),
    ("config-symlink-out", symlink_out("config.json"), OutsideFolderError, r"'config.json' resolves to .*outside"),
    ("weights-is-fifo", replace_with_fifo(ST), WeightsError, r"model.safetensors: not a regular file"),
    ("config-is-fifo", replace_with_fifo("config.json"), ConfigError, r"config.json: not a regular file"),
    # ---- safetensors headers
    ("header-length-past-file", lambda d: _poke(d, struct.pack("<Q", 10 ** 12)), WeightsError,
     r"model.safetensors: corrupt or truncated header \(says 1000000000000 bytes"),
    ("header-length-over-limit", sparse_header_length(100_000_001), WeightsError,
     r"model.safetensors: corrupt header: 100000001 bytes, more than"),
    ("header-deep-nesting", lambda d: write_st(os.path.join(d, ST), None, b"", b"[" * 200_000 + b"]" * 200_000),
     WeightsError, r"model.safetensors: corrupt safetensors header \(JSON nested 200000 levels"),
    ("header-not-object", lambda d: write_st(os.path.join(d, ST), [1, 2], b""),
     WeightsError, r"model.safetensors: .*not a JSON object"),
    ("header-not-utf8", lambda d: write_st(os.path.join(d, ST), None, b"", b'{"\xff": 1}'),
     WeightsError, r"model.safetensors: corrupt safetensors header"),
    ("metadata-not-str", edit_header(lambda h, d: h.__setitem__("__metadata__", {"format": 1})),
     WeightsError, r"model.safetensors: __metadata__ must map strings to strings"),
    ("metadata-list", edit_header(lambda h, d: h.__setitem__("__metadata__", ["pt"])),
     WeightsError, r"model.safetensors: __metadata__"),
    ("entry-not-object", edit_header(lambda h, d: h.__setitem__(NORM, [1, 2])),
     WeightsError, r"model.safetensors: tensor 'model.norm.weight': header entry is list"),
    ("entry-no-dtype", edit_entry(NORM, lambda e: e.pop("dtype")),
     WeightsError, r"tensor 'model.norm.weight': header entry has no 'dtype'"),
    ("entry-no-offsets", edit_entry(NORM, lambda e: e.pop("data_offsets")),
     WeightsError, r"tensor 'model.norm.weight': header entry has no 'data_offsets'"),
    ("dtype-unknown", edit_entry(NORM, lambda e: e.__setitem__("dtype", "F99")),
     WeightsError, r"tensor 'model.norm.weight': unknown dtype 'F99'"),
    ("dtype-not-string", edit_entry(NORM, lambda e: e.__setitem__("dtype", ["F32"])),
     WeightsError, r"tensor 'model.norm.weight': unknown dtype \['F32'\]"),
    ("dtype-not-float", edit_entry(NORM, lambda e: e.__setitem__("dtype", "I32")),
     WeightsError, r"tensor 'model.norm.weight' has dtype I32, expected a float"),
    ("dtype-unreadable-f8", edit_entry(NORM, lambda e: (e.__setitem__("dtype", "F8_E4M3"),
                                                        e.__setitem__("shape", [32]))),
     WeightsError, r"tensor 'model.norm.weight'"),
    ("shape-not-list", edit_entry(NORM, lambda e: e.__setitem__("shape", "8")),
     WeightsError, r"tensor 'model.norm.weight': shape '8' is not a list of non-negative integers"),
    ("shape-negative", edit_entry(Q0, lambda e: e.__setitem__("shape", [-8, -8])),
     WeightsError, r"tensor 'model.layers.0.self_attn.q_proj.weight': shape \[-8, -8\] is not"),
    ("shape-bool", edit_entry(NORM, lambda e: e.__setitem__("shape", [True, 8])),
     WeightsError, r"tensor 'model.norm.weight': shape \[True, 8\] is not"),
    ("shape-float", edit_entry(NORM, lambda e: e.__setitem__("shape", [8.0])),
     WeightsError, r"tensor 'model.norm.weight': shape \[8.0\] is not"),
    ("shape-string-int", edit_entry(NORM, lambda e: e.__setitem__("shape", ["8"])),
     WeightsError, r"tensor 'model.norm.weight': shape \['8'\] is not"),
    ("shape-huge", edit_entry(NORM, lambda e: e.__setitem__("shape", [10 ** 30])),
     WeightsError, r"tensor 'model.norm.weight' has 32 bytes for shape \[1000000000000000000000000000000\]"),
    ("shape-disagrees-with-bytes", edit_entry(NORM, lambda e: e.__setitem__("shape", [4])),
     WeightsError, r"tensor 'model.norm.weight' has 32 bytes for shape \[4\] F32"),
    ("offsets-bool", edit_entry(NORM, lambda e: e.__setitem__("data_offsets", [False, True])),
     WeightsError, r"tensor 'model.norm.weight': data_offsets \[False, True\] is not a pair of integers"),
    ("offsets-strings", edit_entry(NORM, lambda e: e.__setitem__("data_offsets", ["0", "32"])),
     WeightsError, r"tensor 'model.norm.weight': data_offsets \['0', '32'\]"),
    ("offsets-three", edit_entry(NORM, lambda e: e.__setitem__("data_offsets", [0, 16, 32])),
     WeightsError, r"tensor 'model.norm.weight': data_offsets \[0, 16, 32\]"),
    ("offsets-float", edit_entry(NORM, lambda e: e.__setitem__("data_offsets", [0.0, 32.0])),
     WeightsError, r"tensor 'model.norm.weight': data_offsets \[0.0, 32.0\]"),
    ("offsets-negative", edit_entry(NORM, lambda e: e.__setitem__("data_offsets", [-32, 0])),
     WeightsError, r"tensor 'model.norm.weight': data_offsets \[-32, 0\] are not 0 <= begin <= end"),
    ("offsets-reversed", edit_entry(NORM, lambda e: e.__setitem__("data_offsets", e["data_offsets"][::-1])),
     WeightsError, r"tensor 'model.norm.weight': data_offsets \[\d+, \d+\] are not 0 <= begin"),
    ("offsets-past-data", edit_entry(NORM, lambda e: e.__setitem__("data_offsets",
                                                                   [e["data_offsets"][0] + 10 ** 6,
                                                                    e["data_offsets"][1] + 10 ** 6])),
     WeightsError, r"model.safetensors: truncated file: tensor 'model.norm.weight' ends at byte"),
    ("offsets-duplicate", edit_header(_dup_offsets), WeightsError,
     r"model.safetensors: corrupt header: tensor '(model.norm.weight|model.layers.1.input_layernorm.weight)'"
     r" .*has the same data_offsets as tensor"),
    ("offsets-overlap", edit_header(_overlap), WeightsError, r"corrupt header: tensor '.*' .*overlaps tensor"),
    ("offsets-gap", edit_header(_gap), WeightsError, r"corrupt header: tensor '.*' .*leaves a gap of 4 bytes"),
    ("trailing-bytes", edit_header(lambda h, d: (h, d + b"junk" * 4)), WeightsError,
     r"model.safetensors: corrupt file: 16 bytes after the last tensor"),
    ("offsets-swapped-sizes", edit_header(lambda h, d: swap(h, NORM, EMB)), WeightsError,
     r"tensor '(model.norm.weight|model.embed_tokens.weight)' has \d+ bytes for shape"),
    # ---- configs: types and values, named by key and file
    ("cfg-bool-as-string", set_config(tie_word_embeddings="false"), ConfigError,
     r"config.json: config key 'tie_word_embeddings' must be true or false, got 'false'"),
    ("cfg-bias-as-string", set_config(attention_bias="true"), ConfigError, r"config.json: .*'attention_bias'"),
    ("cfg-mlp-bias-int", set_config(mlp_bias=1), ConfigError, r"config.json: .*'mlp_bias'"),
    ("cfg-size-float", set_config(hidden_size=8.0), ConfigError,
     r"config.json: config key 'hidden_size' must be a positive integer, got 8.0 \(a float\)"),
    ("cfg-size-bool", set_config(num_hidden_layers=True), ConfigError, r"config.json: .*'num_hidden_layers'.*True"),
    ("cfg-size-string", set_config(vocab_size="16"), ConfigError, r"config.json: .*'vocab_size'.*'16'"),
    ("cfg-size-null", set_config(intermediate_size=None), ConfigError, r"config.json: .*'intermediate_size'.*None"),
    ("cfg-size-zero", set_config(num_attention_heads=0), ConfigError, r"config.json: .*'num_attention_heads'.*0"),
    ("cfg-size-negative", set_config(num_hidden_layers=-2), ConfigError, r"config.json: .*'num_hidden_layers'.*-2"),
    ("cfg-kv-heads-zero", set_config(num_key_value_heads=0), ConfigError, r"config.json: .*'num_key_value_heads'"),
    ("cfg-head-dim-float", set_config(head_dim=4.0), ConfigError, r"config.json: .*'head_dim'.*4.0"),
    ("cfg-head-dim-odd", set_config(head_dim=3), ConfigError, r"config.json: head_dim=3 must be even"),
    ("cfg-max-pos-zero", set_config(max_position_embeddings=0), ConfigError,
     r"config.json: .*'max_position_embeddings'"),
    ("cfg-heads-not-dividing-hidden", set_config(num_attention_heads=3, num_key_value_heads=3, head_dim=None),
     ConfigError,
     r"config.json: hidden_size=8 is not a multiple of num_attention_heads=3"),
    ("cfg-kv-not-dividing-heads", set_config(num_attention_heads=4, num_key_value_heads=3), ConfigError,
     r"config.json: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("cfg-eps-nan", raw_config(json.dumps({**TINY, "rms_norm_eps": "@"}).replace('"@"', "NaN")), ConfigError,
     r"config.json: config key 'rms_norm_eps' must be a finite positive number, got nan"),
    ("cfg-eps-zero", set_config(rms_norm_eps=0), ConfigError, r"config.json: .*'rms_norm_eps'.*0"),
    ("cfg-eps-string", set_config(rms_norm_eps="1e-5"), ConfigError, r"config.json: .*'rms_norm_eps'"),
    ("cfg-theta-infinite", raw_config(json.dumps({**TINY, "rope_theta": "@"}).replace('"@"', "Infinity")),
     ConfigError, r"config.json: config key 'rope_theta' must be a finite positive number, got inf"),
    ("cfg-theta-negative", set_config(rope_theta=-1.0), ConfigError, r"config.json: .*'rope_theta'.*-1.0"),
    ("cfg-theta-in-parameters-string", set_config(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
     ConfigError, r"config.json: .*'rope_theta'.*'1e4'"),
    ("cfg-rope-parameters-list", set_config(rope_parameters=[1]), ConfigError,
     r"config.json: config key 'rope_parameters' must be an object"),
    ("cfg-rope-scaling-list", set_config(rope_theta=1e4, rope_scaling=["linear", 2.0]), ConfigError,
     r"config.json: config key 'rope_scaling' must be an object"),
    ("cfg-rope-type-unknown", set_config(rope_theta=1e4, rope_scaling={"rope_type": "yarn-ish", "factor": 2.0}),
     ConfigError, r"config.json: unknown rope type 'yarn-ish'"),
    ("cfg-rope-type-not-string", set_config(rope_theta=1e4, rope_scaling={"rope_type": ["linear"], "factor": 2.0}),
     ConfigError, r"config.json: unknown rope type \['linear'\]"),
    ("cfg-rope-factor-missing", set_config(rope_theta=1e4, rope_scaling={"rope_type": "linear"}),
     ConfigError, r"config.json: rope_scaling of type 'linear' is missing key 'factor'"),
    ("cfg-rope-factor-string", set_config(rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": "2"}),
     ConfigError, r"config.json: config key 'rope_scaling.factor' must be a finite positive number"),
    ("cfg-rope-factor-negative", set_config(rope_theta=1e4, rope_scaling={"rope_type": "dynamic", "factor": -2.0}),
     ConfigError, r"config.json: config key 'rope_scaling.factor'.*-2.0"),
    ("cfg-rope-factor-bool", set_config(rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": True}),
     ConfigError, r"config.json: config key 'rope_scaling.factor'.*True"),
    ("cfg-llama3-high-equals-low", set_config(rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
        "original_max_position_embeddings": 16}),
     ConfigError, r"config.json: rope_scaling.high_freq_factor=2.0 must exceed low_freq_factor=2.0"),
    ("cfg-llama3-ctx-string", set_config(rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": "16"}),
     ConfigError, r"config.json: config key 'rope_scaling.original_max_position_embeddings'"),
    ("cfg-eos-string", set_config(eos_token_id="</s>"), ConfigError, r"config.json: config key 'eos_token_id'"),
    ("cfg-eos-list-mixed", set_config(eos_token_id=[2, "x"]), ConfigError, r"config.json: config key 'eos_token_id'"),
    ("cfg-bos-float", set_config(bos_token_id=1.0), ConfigError, r"config.json: config key 'bos_token_id'"),
    ("cfg-act-unknown", set_config(hidden_act="gelu"), ConfigError, r"config.json: hidden_act='gelu'"),
    ("cfg-act-list", set_config(hidden_act=["silu"]), ConfigError, r"config.json: hidden_act=\['silu'\]"),
    ("cfg-missing-key", edit_config(lambda c: c.pop("vocab_size")), ConfigError,
     r"config.json: missing required key 'vocab_size'"),
    ("cfg-not-object", raw_config("[1, 2, 3]"), ConfigError, r"config.json: expected a JSON object"),
    ("cfg-not-json", raw_config("{hidden_size: 8"), ConfigError, r"config.json: not valid JSON"),
    ("cfg-deep-nesting", raw_config('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"), ConfigError,
     r"config.json: JSON nested 100001 levels deep"),
    ("cfg-huge-digits", raw_config(json.dumps(TINY)[:-1] + ', "vocab_size": ' + "9" * 5000 + "}"), ConfigError,
     r"config.json: not valid JSON .*digits"),
    ("cfg-model-type", set_config(model_type="mistral"), ConfigError, r"config.json: model_type 'mistral'"),
    # ---- the config against the file headers, before anything is allocated
    ("cfg-huge-layers", set_config(num_hidden_layers=10 ** 9), WeightsError,
     r"config.json: num_hidden_layers=1000000000, but .* holds 2 layer\(s\) \(no tensor 'model.layers.2.\*'\)"),
    ("cfg-huge-vocab", set_config(vocab_size=10 ** 12), WeightsError,
     r"model.safetensors: tensor 'model.embed_tokens.weight' has shape \[16, 8\], expected \[1000000000000, 8\] "
     r"\(config: vocab_size=1000000000000 in .*config.json\)"),
    ("cfg-huge-intermediate", set_config(intermediate_size=10 ** 10), WeightsError,
     r"tensor 'model.layers.0.mlp.gate_proj.weight' .*intermediate_size=10000000000"),
    ("cfg-huge-hidden-with-head-dim", set_config(hidden_size=2 ** 30, head_dim=4), WeightsError,
     r"tensor 'model.embed_tokens.weight' .*hidden_size=1073741824"),
    ("cfg-fewer-layers", set_config(num_hidden_layers=1), WeightsError,
     r"model.safetensors: unexpected tensor 'model.layers.1\."),
    ("cfg-kv-heads-mismatch", set_config(num_key_value_heads=2), WeightsError,
     r"tensor 'model.layers.0.self_attn.k_proj.weight' .*num_key_value_heads=2 x head_dim=4"),
    ("cfg-head-dim-mismatch", set_config(head_dim=8), WeightsError,
     r"tensor 'model.layers.0.self_attn.q_proj.weight' .*num_attention_heads=2 x head_dim=8"),
    ("cfg-bias-but-file-without", set_config(attention_bias=True), WeightsError,
     r"missing tensor 'model.layers.0.self_attn.q_proj.bias'"),
    ("cfg-untied-without-lm-head", lambda d: _drop_tensor(d, "lm_head.weight"), WeightsError,
     r"missing tensor 'lm_head.weight'"),
    ("tensor-wrong-rank", edit_entry(NORM, lambda e: e.__setitem__("shape", [2, 4])), WeightsError,
     r"tensor 'model.norm.weight' has shape \[2, 4\], expected \[8\]"),
    ("tensor-layer-index-huge", edit_header(lambda h, d: h.__setitem__(
        "model.layers." + "9" * 5000 + ".mlp.up_proj.weight", h.pop("model.layers.1.mlp.up_proj.weight"))),
     WeightsError, r"num_hidden_layers=2, but .* holds 1 layer|unexpected tensor 'model.layers.9999"),
]


def _drop_tensor(d, name):
    """Remove a tensor from model.safetensors, keeping the rest tiled."""
    from safetensors.numpy import load_file, save_file
    t = load_file(os.path.join(d, ST))
    t.pop(name)
    save_file(t, os.path.join(d, ST))


@contextlib.contextmanager
def _deadline(seconds=10):
    """Fail instead of hanging (opening a FIFO blocks) or grinding through a huge allocation."""
    def timeout(signum, frame):
        raise TimeoutError(f"no error within {seconds} s")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name,breaker,exc,pattern", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(tmp_path, valid, name, breaker, exc, pattern):
    d = str(tmp_path / "model")
    shutil.copytree(valid, d)
    breaker(d)
    tracemalloc.start()
    try:
        with _deadline(), pytest.raises(exc) as info:
            npllama.Llama.from_pretrained(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, NpllamaError)
    assert re.search(pattern, str(info.value)), f"{name}: message {str(info.value)!r} does not match {pattern!r}"
    assert "\n" not in str(info.value)
    assert peak < 64 * 2 ** 20, f"{name}: {peak} bytes allocated before the error"


# ---------------------------------------------------------------- GGUF metadata and tensor infos
gguf = importlib.import_module("gguf") if importlib.util.find_spec("gguf") else None


def write_tiny_gguf(path, meta=None, drop=(), extra_tensors=()):
    """A GGUF of the tiny model (values random: only names, shapes and metadata matter here)."""
    c = LlamaConfig(**TINY)
    params = Llama.init(c, seed=2).params
    w = gguf.GGUFWriter(str(path), "llama")
    vt = gguf.GGUFValueType
    fields = {"llama.block_count": (c.num_hidden_layers, vt.UINT32),
              "llama.context_length": (c.max_position_embeddings, vt.UINT32),
              "llama.embedding_length": (c.hidden_size, vt.UINT32),
              "llama.feed_forward_length": (c.intermediate_size, vt.UINT32),
              "llama.attention.head_count": (c.num_attention_heads, vt.UINT32),
              "llama.attention.head_count_kv": (c.num_key_value_heads, vt.UINT32),
              "llama.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, vt.FLOAT32),
              "llama.rope.freq_base": (10000.0, vt.FLOAT32),
              "tokenizer.ggml.eos_token_id": (2, vt.UINT32)}
    fields.update(meta or {})
    for k, v in fields.items():
        if k not in drop:
            w.add_key_value(k, *v)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, a in params.items():
        if k in top:
            name = top[k]
        else:
            i, rest = k[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{layer[rest.rsplit('.', 1)[0]]}.weight"
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    for name, a in extra_tensors:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _vt(name):
    return getattr(gguf.GGUFValueType, name) if gguf else None


GGUF_ROWS = [
    ("gguf-huge-block-count", dict(meta={"llama.block_count": (10 ** 9, _vt("UINT32"))}),
     r"tiny.gguf: num_hidden_layers=1000000000, but .*tiny.gguf holds 2 layer"),
    ("gguf-huge-vocab", dict(meta={"llama.vocab_size": (2 ** 31, _vt("UINT32"))}),
     r"tensor 'model.embed_tokens.weight' has shape \[16, 8\], expected \[2147483648, 8\] .*vocab_size=2147483648"),
    ("gguf-hidden-mismatch", dict(meta={"llama.embedding_length": (16, _vt("UINT32"))}),
     r"tiny.gguf \(GGUF tensor 'token_embd.weight'\): tensor 'model.embed_tokens.weight' .*hidden_size=16"),
    ("gguf-ffn-mismatch", dict(meta={"llama.feed_forward_length": (10 ** 9, _vt("UINT32"))}),
     r"GGUF tensor 'blk.0.ffn_gate.weight'.*intermediate_size=1000000000"),
    ("gguf-heads-string", dict(meta={"llama.attention.head_count": ("2", _vt("STRING"))}),
     r"tiny.gguf: metadata key 'llama.attention.head_count' must be int, got '2'"),
    ("gguf-heads-float", dict(meta={"llama.attention.head_count": (2.0, _vt("FLOAT32"))}),
     r"tiny.gguf: metadata key 'llama.attention.head_count' must be int, got 2.0"),
    ("gguf-heads-zero", dict(meta={"llama.attention.head_count": (0, _vt("UINT32"))}),
     r"tiny.gguf: config key 'num_attention_heads' must be a positive integer, got 0"),
    ("gguf-heads-not-dividing", dict(meta={"llama.attention.head_count": (3, _vt("UINT32")),
                                           "llama.attention.head_count_kv": (3, _vt("UINT32"))}),
     r"tiny.gguf: hidden_size=8 is not a multiple of num_attention_heads=3"),
    ("gguf-kv-not-dividing", dict(meta={"llama.attention.head_count_kv": (3, _vt("UINT32"))}),
     r"tiny.gguf: num_attention_heads=2 is not a multiple of num_key_value_heads=3"),
    ("gguf-eps-nan", dict(meta={"llama.attention.layer_norm_rms_epsilon": (float("nan"), _vt("FLOAT32"))}),
     r"tiny.gguf: config key 'rms_norm_eps' must be a finite positive number, got nan"),
    ("gguf-theta-negative", dict(meta={"llama.rope.freq_base": (-1.0, _vt("FLOAT32"))}),
     r"tiny.gguf: config key 'rope_theta'.*-1.0"),
    ("gguf-theta-bool", dict(meta={"llama.rope.freq_base": (True, _vt("BOOL"))}),
     r"tiny.gguf: metadata key 'llama.rope.freq_base' must be float, got True"),
    ("gguf-rope-factor-inf", dict(meta={"llama.rope.scaling.type": ("linear", _vt("STRING")),
                                        "llama.rope.scaling.factor": (float("inf"), _vt("FLOAT32"))}),
     r"tiny.gguf: config key 'rope_scaling.factor' must be a finite positive number, got inf"),
    ("gguf-rope-type-int", dict(meta={"llama.rope.scaling.type": (1, _vt("UINT32"))}),
     r"tiny.gguf: metadata key 'llama.rope.scaling.type' must be str, got 1"),
    ("gguf-eos-negative", dict(meta={"tokenizer.ggml.eos_token_id": (-1, _vt("INT32"))}),
     r"tiny.gguf: metadata key 'tokenizer.ggml.eos_token_id' must be a token id, got -1"),
    ("gguf-eos-string", dict(meta={"tokenizer.ggml.eos_token_id": ("</s>", _vt("STRING"))}),
     r"tiny.gguf: metadata key 'tokenizer.ggml.eos_token_id' must be a token id"),
    ("gguf-context-zero", dict(meta={"llama.context_length": (0, _vt("UINT32"))}),
     r"tiny.gguf: config key 'max_position_embeddings'"),
    ("gguf-missing-key", dict(drop=("llama.embedding_length",)), r"tiny.gguf: missing metadata key "
                                                                 r"'llama.embedding_length'"),
    ("gguf-missing-tensor", dict(drop=("blk.1.ffn_up.weight",)),
     r"tiny.gguf: missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("gguf-unknown-tensor", dict(extra_tensors=[("blk.0.mystery.weight", np.zeros(4, np.float32))]),
     r"tiny.gguf: tensor 'blk.0.mystery.weight' has no counterpart"),
    ("gguf-wrong-shape-tensor", dict(drop=("output_norm.weight",),
                                     extra_tensors=[("output_norm.weight", np.zeros(5, np.float32))]),
     r"GGUF tensor 'output_norm.weight'\): tensor 'model.norm.weight' has shape \[5\], expected \[8\]"),
]


@pytest.mark.skipif(not gguf, reason="needs the gguf package")
@pytest.mark.parametrize("name,kw,pattern", GGUF_ROWS, ids=[r[0] for r in GGUF_ROWS])
def test_bad_gguf(tmp_path, name, kw, pattern):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, **kw)
    tracemalloc.start()
    try:
        with _deadline(), pytest.raises(GGUFError) as info:
            npllama.Llama.from_pretrained(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, NpllamaError)
    assert re.search(pattern, str(info.value)), f"{name}: message {str(info.value)!r} does not match {pattern!r}"
    assert peak < 64 * 2 ** 20


def test_valid_inputs_still_load(tmp_path, valid):
    """The breakers above start from files that load; the same holds for a sharded copy and the GGUF."""
    m = npllama.Llama.from_pretrained(valid)
    d = str(tmp_path / "sharded")
    shutil.copytree(valid, d)
    shard(lambda i: None)(d)
    m2 = npllama.Llama.from_pretrained(d)
    for k in m.params:
        np.testing.assert_array_equal(m.params[k], m2.params[k])
    if gguf:
        write_tiny_gguf(tmp_path / "ok.gguf")
        npllama.Llama.from_pretrained(str(tmp_path / "ok.gguf"))


def test_hf_cache_snapshot_symlinks_are_allowed(tmp_path, valid):
    """The Hugging Face hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that is not an escape."""
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(("config.json", ST)):
        shutil.copy(os.path.join(valid, f), repo / "blobs" / f"hash{i}")
        os.symlink(f"../../blobs/hash{i}", snap / f)
    npllama.Llama.from_pretrained(str(snap))
    shutil.copy(os.path.join(valid, ST), tmp_path / "elsewhere.safetensors")
    os.remove(snap / ST)
    os.symlink("../../../elsewhere.safetensors", snap / ST)  # out of the repo's cache folder: refused
    with pytest.raises(OutsideFolderError, match="resolves to .*elsewhere.safetensors, outside"):
        npllama.Llama.from_pretrained(str(snap))


# ---------------------------------------------------------------- random mutations
JSON = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 1, 2, 3, 4, 8, 16, -1, -8, 10 ** 9, 10 ** 12, 2 ** 64, 0.5, 8.0])
    | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6) | st.sampled_from(["F32", "F16", "BF16", "I64", "F99", "linear", "llama3", "true", "8"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6)


def _nest(v, depth):
    for _ in range(depth):
        v = [v]
    return v


MUTATION = st.tuples(
    st.sampled_from(["set", "delete", "nest", "set_item", "add"]),
    st.integers(0, 10 ** 6),       # which key (index into the sorted keys)
    st.integers(0, 10 ** 6),       # which field / item
    JSON,
    st.integers(1, 120),           # nesting depth for "nest"
)


def _mutate(obj: dict, m, fields=()):
    """Apply one mutation to a dict (a header or a config); `fields` are the sub-keys worth targeting."""
    kind, ki, fi, value, depth = m
    keys = sorted(obj, key=str)
    if kind == "add" or not keys:
        obj[f"model.layers.{fi % 4}.x.weight" if fi % 2 else str(value)[:12]] = value
        return
    key = keys[ki % len(keys)]
    target = obj[key]
    if kind == "delete":
        if isinstance(target, dict) and target and fi % 2:
            target.pop(sorted(target, key=str)[fi % len(target)])
        else:
            obj.pop(key)
    elif kind == "nest":
        obj[key] = _nest(target, depth)
    elif kind == "set_item" and isinstance(target, dict) and target:
        sub = sorted(target, key=str)[fi % len(target)] if not fields else fields[fi % len(fields)]
        if isinstance(target.get(sub), list) and target[sub] and fi % 3 == 0:
            target[sub][fi % len(target[sub])] = value
        else:
            target[sub] = value
    else:
        obj[key] = value


def _assert_only_npllama_errors(fn):
    tracemalloc.start()
    try:
        try:
            fn()
        except NpllamaError as e:
            assert str(e) and "\n" not in str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2 ** 20, f"{peak} bytes allocated"


FAST = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FAST
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), data_delta=st.integers(-40, 40))
def test_random_header_mutations_give_only_npllama_errors(tmp_path_factory, valid, mutations, data_delta):
    d = str(tmp_path_factory.mktemp("h") / "model")
    shutil.copytree(valid, d)
    header, data = read_st(os.path.join(d, ST))
    for m in mutations:
        _mutate(header, m, fields=("dtype", "shape", "data_offsets"))
    data = data[:len(data) + data_delta] if data_delta < 0 else data + b"\0" * data_delta
    try:
        head = json.dumps(header).encode()
    except (TypeError, ValueError):
        return
    write_st(os.path.join(d, ST), None, data, head)
    _assert_only_npllama_errors(lambda: SafetensorsFile(os.path.join(d, ST)))
    _assert_only_npllama_errors(lambda: npllama.Llama.from_pretrained(d))


@FAST
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_random_config_mutations_give_only_npllama_errors(tmp_path_factory, valid, mutations):
    d = str(tmp_path_factory.mktemp("c") / "model")
    shutil.copytree(valid, d)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    for m in mutations:
        _mutate(config, m, fields=("rope_type", "factor", "rope_theta", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    _assert_only_npllama_errors(lambda: LlamaConfig.from_json(os.path.join(d, "config.json")))
    _assert_only_npllama_errors(lambda: npllama.Llama.from_pretrained(d))


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "model.gguf"])
def test_tokenizer_folder_files_stay_inside(tmp_path, name):
    """A tokenizer folder whose files link out of it is refused before anything is read."""
    d = tmp_path / "tok"
    d.mkdir()
    (tmp_path / "outside").write_text("{}")
    if name == "tokenizer_config.json":
        (d / "tokenizer.json").write_text("{}")
    os.symlink(tmp_path / "outside", d / name)
    with pytest.raises(TokenizerError, match=rf"'{re.escape(name)}' resolves to .*outside, outside"):
        npllama.Tokenizer.from_pretrained(str(d))
