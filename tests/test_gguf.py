"""npllama.io.gguf on GGUF files written here (from a transformers model, the way llama.cpp's converter writes them)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import hf_model
from npllama.backend import to_host
from npllama.io.gguf import GGUFError, hf_name, load_gguf, unpermute_rotary
from npllama.model import Llama

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

IDS = np.array([[5, 17, 3, 88, 41, 9, 60, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
Q = gguf.GGMLQuantizationType


def llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, m, quant=None, arch="llama", skip=()):
    """Write an HF LlamaForCausalLM as llama.cpp would; returns the weights as stored (after any quantization)."""
    c = m.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = [("add_block_count", c.num_hidden_layers), ("add_context_length", c.max_position_embeddings),
            ("add_embedding_length", c.hidden_size), ("add_feed_forward_length", c.intermediate_size),
            ("add_head_count", c.num_attention_heads), ("add_head_count_kv", c.num_key_value_heads),
            ("add_layer_norm_rms_eps", c.rms_norm_eps), ("add_rope_freq_base", c.rope_parameters["rope_theta"]),
            ("add_vocab_size", c.vocab_size), ("add_eos_token_id", 2), ("add_bos_token_id", 1)]
    for fn, v in meta:
        if fn not in skip:
            getattr(w, fn)(v)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    stored = {}
    for k, t in m.state_dict().items():
        a = t.float().numpy()
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            base, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{layer[base]}.{kind}"
        else:
            name = names[k]
        perm = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(name.split(".")[-2])
        to_file = (lambda x: llamacpp_permute(x, perm)) if perm and name.startswith("blk.") else (lambda x: x)
        qt = (quant or {}).get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
        if qt is None or a.ndim == 1:
            w.add_tensor(name, to_file(a))
            stored[k] = a
        elif qt == Q.F16:
            w.add_tensor(name, to_file(a.astype(np.float16)))
            stored[k] = a.astype(np.float16).astype(np.float32)
        else:  # block quantization runs along a row, so permuting rows commutes with it
            w.add_tensor(name, gguf.quants.quantize(to_file(a), qt), raw_dtype=qt)
            stored[k] = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def hf_logits(m, weights=None):
    if weights is not None:
        m.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=False)
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.numpy()


def test_unpermute_inverts_llamacpp():
    rng = np.random.default_rng(0)
    for n_head, hd, cols in ((4, 16, 8), (3, 64, 5), (1, 8, 1)):
        w = rng.standard_normal((n_head * hd, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary(llamacpp_permute(w, n_head), n_head), w)
        assert not np.array_equal(llamacpp_permute(w, n_head), w)
        b = rng.standard_normal(n_head * hd)
        np.testing.assert_array_equal(unpermute_rotary(llamacpp_permute(b, n_head), n_head), b)


def test_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
def test_gguf_logits_match_torch(tmp_path, tied, heads):
    m = hf_model(seed=4, num_attention_heads=heads[0], num_key_value_heads=heads[1], tie_word_embeddings=tied,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, m, quant={"token_embd": Q.Q8_0, "attn_q": Q.F16, "ffn_gate": Q.Q8_0})
    config, params = load_gguf(str(path))
    assert config.tie_word_embeddings is tied and ("lm_head.weight" in params) is not tied
    assert (config.num_attention_heads, config.num_key_value_heads) == heads
    assert config.eos_token_ids == [2] and config.rope_theta == 10000.0
    for k, v in stored.items():  # HF layout back, bit for bit (after the format's own rounding)
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    got = to_host(Llama.from_pretrained(str(path)).forward(IDS))
    ref = hf_logits(m, stored)
    assert np.abs(got - ref).max() <= 1e-4


def test_gguf_errors(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        load_gguf(str(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 50)
    with pytest.raises(GGUFError, match="junk.gguf"):
        load_gguf(str(junk))
    m = hf_model(seed=5)
    write_gguf(tmp_path / "gpt.gguf", m, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture"):
        load_gguf(str(tmp_path / "gpt.gguf"))
    write_gguf(tmp_path / "nohead.gguf", m, skip=("add_head_count",))
    with pytest.raises(GGUFError, match="llama.attention.head_count"):
        load_gguf(str(tmp_path / "nohead.gguf"))
