"""A small Llama in PyTorch that is float64 from end to end: the reference for float64 parity.

Stock transformers keeps RMSNorm, the rotary tables and the eager softmax in float32 even after
`.double()`, which leaves it ~1e-7 away from float64 math. This reference follows transformers'
formulas (modeling_llama.py, modeling_rope_utils.py) without those float32 islands; the parity
tests show in the same run that it differs from stock transformers by float32 noise only.
"""
from __future__ import annotations

import math

import torch


def inv_freq(cfg: dict, seq_len: int) -> torch.Tensor:
    """Rotary inverse frequencies in float64, per transformers' rope init functions."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rp = dict(cfg.get("rope_parameters") or {})
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", "default")
    base = float(theta)
    if kind == "dynamic":
        mp = cfg["max_position_embeddings"]
        L = max(seq_len, mp)
        base = base * ((rp["factor"] * L / mp) - (rp["factor"] - 1)) ** (hd / (hd - 2))
    f = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if kind == "linear":
        f = f / rp["factor"]
    elif kind == "llama3":
        factor, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wl = 2 * math.pi / f
        g = torch.where(wl > old / lo, f / factor, f)
        smooth = (old / wl - lo) / (hi - lo)
        sm = (1 - smooth) * g / factor + smooth * g
        med = ~(wl < old / hi) * ~(wl > old / lo)
        f = torch.where(med, sm, g)
    return f


def forward(params: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) in float64 from float64 params keyed by HF names."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    eps = cfg["rms_norm_eps"]
    B, T = ids.shape
    pos = torch.arange(T, dtype=torch.float64)
    ang = pos[:, None] * inv_freq(cfg, T)[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos(), emb.sin()                              # (T, hd)

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        y = x @ params[name + ".weight"].T
        b = params.get(name + ".bias")
        return y if b is None else y + b

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], dim=-1)

    x = params["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, params[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj").view(B, T, KV, hd).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj").view(B, T, KV, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        att = torch.softmax(q @ k.transpose(2, 3) * hd ** -0.5 + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + lin(o, p + "self_attn.o_proj")
        h = norm(x, params[p + "post_attention_layernorm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = norm(x, params["model.norm.weight"])
    W = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return x @ W.T
