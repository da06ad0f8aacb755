"""Attention over the slot KV cache, registered with transformers' AttentionInterface.

transformers' attention modules compute q/k/v, apply rotary embeddings and call the cache, then hand the
attention itself to the registered function; the model code stays theirs. The mask is neurond's (built by the
runner from each row's position) and is passed through the decoder layers unchanged: True = may attend.
"""

from __future__ import annotations

NAME = "neurond_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, T, D]; key/value [B, Hkv, L, D] (views into the cache); attention_mask bool [B, 1, T, L].
    Returns ([B, T, Hq, D], None) as transformers' attention functions do."""
    import torch

    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    if tokens == 1:
        # Decode: one query per row. Grouped-query attention as two batched matmuls, reading each cached key
        # and value once (SDPA's GQA path with a mask would copy K/V per query head).
        group = q_heads // kv_heads
        q = query.view(batch, kv_heads, group, dim)
        scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
        scores = scores.masked_fill(~attention_mask.view(batch, 1, 1, -1), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value).view(batch, q_heads, 1, dim)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=q_heads != kv_heads)
    return out.transpose(1, 2).contiguous(), None


def register(model) -> None:
    """Make every attention module of `model` use slot_attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, slot_attention)
    model.config._attn_implementation = NAME
    for module in model.modules():  # sub-configs some models keep per layer
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = NAME
