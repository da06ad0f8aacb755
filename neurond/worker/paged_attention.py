"""Decode attention that reads the paged KV pool in place (CUDA, Triton): one query token per row, each row's
keys and values wherever its blocks are (kv_cache.PagedKVCache's layout), no gathered copy.

Split-KV ("flash decoding"): a row's context is cut into `splits` ranges, each range's partial softmax is
computed by its own program (grid rows x KV heads x splits, so a small batch still fills the GPU), and a second
kernel combines the partials. The query heads that share a KV head are computed together, so each key and value
is read once per row. Lengths are read on the device, so one launch shape serves every step of a CUDA graph.

Written here because it beat what could be had, measured on an H100 (docs/benchmarks.md, issue 20): torch's
FlexAttention over the paged pool costs +34 % against the static cache at batch 32 (this kernel +3-4 %), and
FlashInfer and FlashAttention cannot be carried to the GPU machines as wheels. `scripts/probe-paged-attention`
times it against them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partials(Q, K, V, Table, Lens, Acc, M, L, scale,
              stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb,
              HQ: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
              BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lens + b)
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        block = tl.load(Table + b * stride_tb + offs_n // BS, mask=nmask, other=0)
        row = block * stride_kb + (offs_n % BS) * stride_kt + kvh * stride_kh
        k = tl.load(K + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    base = (b * HQ + heads) * SPLITS + split
    tl.store(M + base, m, mask=gmask)
    tl.store(L + base, denom, mask=gmask)
    tl.store(Acc + base[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _combine(Acc, M, L, Out, D: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)  # row * HQ + head
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    m = tl.load(M + bh * SPLITS + offs_s)
    denom = tl.load(L + bh * SPLITS + offs_s)
    top = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # an empty split (m = -inf) weighs nothing
    acc = tl.load(Acc + (bh * SPLITS + offs_s)[:, None] * D + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(denom * w, 0)
    tl.store(Out + bh * D + offs_d, out.to(Out.dtype.element_ty))


def splits_for(batch: int, kv_heads: int, max_len: int, sms: int) -> int:
    """Splits per row: enough programs for about two per SM, a power of two, each split at least 256 positions."""
    want = max(1, -(-2 * sms // (batch * kv_heads)))
    cap = max(1, max_len // 256)
    splits = 1
    while splits < want and splits * 2 <= cap:
        splits *= 2
    return splits


def paged_decode(query, k_pool, v_pool, table, lens, scale: float, splits: int, block_n: int = 64):
    """query [B, Hq, D]; k_pool/v_pool [blocks, block_size, Hkv, D] (contiguous); table [B, cols] block ids;
    lens [B] positions each row attends to (>= 1). Returns [B, Hq, D] in query's dtype."""
    batch, q_heads, dim = query.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = q_heads // kv_heads
    acc = torch.empty(batch, q_heads, splits, dim, dtype=torch.float32, device=query.device)
    m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=query.device)
    denom = torch.empty_like(m)
    out = torch.empty_like(query)
    _partials[(batch, kv_heads, splits)](
        query, k_pool, v_pool, table, lens, acc, m, denom, scale,
        query.stride(0), query.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), table.stride(0),
        HQ=q_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BS=block_size,
        BLOCK_N=block_n, SPLITS=splits)
    _combine[(batch * q_heads,)](acc, m, denom, out, D=dim, SPLITS=splits)
    return out

