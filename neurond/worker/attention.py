"""Attention over the slot KV cache (`attend`), for neurond's own decoder layers (decoder.py) and, registered
with transformers' AttentionInterface, for transformers' layers.

transformers' attention modules compute q/k/v, apply rotary embeddings and call the cache, then hand the
attention itself to the registered function; the model code stays theirs. The mask is neurond's (built by the
runner from each row's position) and is passed through the decoder layers unchanged: True (or 0.0 in an
additive float mask) = may attend.
"""

from __future__ import annotations

import torch

from neurond.worker.kv_cache import PagedRead

NAME = "neurond_slots"


def attend(query, key, value, mask, scale: float):
    """query [B, Hq, T, D]; key/value [B, Hkv, L, D] (views into the cache); mask [B, 1, T, L], bool or
    additive. Returns [B, Hq, T, D]. Or key = value = a paged cache's PagedRead (T = 1): its kernel reads the
    pool in place, each row up to its own length (the mask says no more than that)."""
    if isinstance(key, PagedRead):
        return key.attend(query, scale)
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    if tokens == 1:
        # Decode: one query per row. The query heads that share a KV head become that head's "query positions"
        # (all with the row's mask), so one fused SDPA kernel reads each cached key and value once: no copy of
        # K/V per query head, and one kernel where softmax-by-hand took eight (kernel count is what a
        # graph-replayed decode step of a small batch pays for).
        group = q_heads // kv_heads
        q = query.view(batch, kv_heads, group, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, key, value, attn_mask=mask.view(batch, 1, 1, -1), scale=scale)
        return out.reshape(batch, q_heads, 1, dim)
    group = q_heads // kv_heads
    if group > 1 and query.is_cuda:
        # As for decode, a KV head's query heads become its query positions, each with its token's mask row:
        # SDPA then needs no grouped-heads support. The static cache's prefill (and the paged cache's with
        # in_place=False) takes this path on CUDA. Measured on an H100 (docs/benchmarks.md): per call it is
        # 16-33 % slower than `enable_gqa` with the same mask once warm; through the daemon a fresh 12k prompt
        # took 1.88 s folded and 2.15 s with `enable_gqa` (different machines), and the static capacity run
        # was measured with it. Which backend each picks, and why `enable_gqa` pays on first shapes, is open.
        q = query.reshape(batch, kv_heads, group * tokens, dim)
        folded = mask.view(batch, 1, 1, tokens, -1).expand(batch, 1, group, tokens, mask.shape[-1])
        out = torch.nn.functional.scaled_dot_product_attention(
            q, key, value, attn_mask=folded.reshape(batch, 1, group * tokens, -1), scale=scale)
        # reshape, not view: the output's layout is the backend's (on an H200, torch 2.11, not contiguous for the
        # own layers' compiled prefill, and view raised: tests/gpu/test_runner_cuda.py, session 15).
        return out.reshape(batch, q_heads, tokens, dim)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=group > 1)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`attend` as transformers' attention functions are called. Returns ([B, T, Hq, D], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(query, key, value, attention_mask, scale).transpose(1, 2).contiguous(), None


def register(model) -> None:
    """Make every attention module of `model` use slot_attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, slot_attention)
    model.config._attn_implementation = NAME
    for module in model.modules():  # sub-configs some models keep per layer
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = NAME


def norm_eps(module) -> float:
    """An RMSNorm module's epsilon (Llama-style modules call it variance_epsilon, others eps)."""
    eps = getattr(module, "variance_epsilon", None)
    return float(eps if eps else getattr(module, "eps", 1e-6))


def fused_rms_norm(module, hidden_states):
    """RMSNorm in one call (torch's fused kernel on CUDA) instead of the seven elementwise kernels of
    transformers' module; same math, computed in float32."""
    return torch.nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), module.weight, norm_eps(module))


def use_fused_norms(model) -> int:
    """Route every Llama-style RMSNorm (weight * x / rms(x)) of `model` through fused_rms_norm."""
    import functools

    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and not name.startswith("Gemma") and getattr(module, "weight", None) is not None:
            module.forward = functools.partial(fused_rms_norm, module)
            count += 1
    return count
