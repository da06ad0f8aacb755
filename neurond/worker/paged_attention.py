"""Attention that reads the paged KV pool in place (CUDA, Triton): each row's keys and values wherever its blocks
are (kv_cache.PagedKVCache's layout), no gathered copy. `paged_decode` for one query token per row,
`paged_prefill` for a prefill step's chunks.

Split-KV ("flash decoding"): a row's context is cut into `splits` ranges, each range's partial softmax is
computed by its own program (grid rows x KV heads x splits, so a small batch still fills the GPU), and a second
kernel combines the partials. The query heads that share a KV head are computed together, so each key and value
is read once per row. Lengths are read on the device, so one launch shape serves every step of a CUDA graph.

Written here because it beat what could be had, measured on an H100 (docs/benchmarks.md, issue 20): torch's
FlexAttention over the paged pool costs +34 % against the static cache at batch 32 (this kernel +3-4 %), and
FlashInfer and FlashAttention cannot be carried to the GPU machines as wheels. `scripts/probe-paged-attention`
times it against them.

Prefill: one program per (row, KV head, tile of query tokens), its tile the tokens x that KV head's query heads,
causal by each token's position. Per call it is slower than gather + SDPA at the same shapes (+45 % at a 32k
context), and through the runner with the shapes repeated, 0-20 % slower. But it is shape-agnostic and
allocates nothing, and in the daemon, where nearly every chunk brings a context length not seen before, a
fresh 12,036-token prompt's TTFT was 0.69 s against 2.15 s with the gather on the same H100 (benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_rows(Table, b, kvh, n0, end, stride_tb, stride_kb, stride_kt, stride_kh,
             BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions n0 .. n0 + BLOCK_N of row b: which are below `end`, and each one's offset in the pool for KV head
    kvh (its block looked up in the row's table)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < end
    block = tl.load(Table + b * stride_tb + offs_n // BS, mask=nmask, other=0)
    return offs_n, nmask, block * stride_kb + (offs_n % BS) * stride_kt + kvh * stride_kh


@triton.jit
def _attend(q, m, denom, acc, K, V, row, nmask, visible, scale, D: tl.constexpr):
    """One online-softmax step: the tile's queries q against the keys and values at `row` (loaded where nmask),
    each query seeing the positions `visible` marks. Returns the running max, denominator and accumulator."""
    offs_d = tl.arange(0, D)
    k = tl.load(K + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query with nothing to see yet (prefill padding)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    v = tl.load(V + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, denom, acc


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
        _, nmask, row = _kv_rows(Table, b, kvh, n0, end, stride_tb, stride_kb, stride_kt, stride_kh, BS, BLOCK_N)
        m, denom, acc = _attend(q, m, denom, acc, K, V, row, nmask, nmask[None, :], scale, D)
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


@triton.jit
def _prefill(Q, K, V, Table, Pos, Lens, Out, scale, T,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kt, stride_kh, stride_tb, stride_pb,
             stride_ob, stride_oh, stride_ot,
             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: BLOCK_Q query tokens of row b x the GROUP query heads of KV head kvh, as one tile of
    # BLOCK_Q * GROUP_PAD rows (row r: token r // GROUP_PAD, head r % GROUP_PAD), so each key and value loaded
    # serves every head that shares it. Token t sees the positions up to its own (Pos) and below Lens[b].
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    qb = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    offs_d = tl.arange(0, D)
    t = qb * BLOCK_Q + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    rmask = (t < T) & (g < GROUP)
    heads = kvh * GROUP + g
    pos = tl.load(Pos + b * stride_pb + t, mask=rmask, other=-1)
    end = tl.minimum(tl.max(pos, 0) + 1, tl.load(Lens + b))
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, D], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        offs_n, nmask, row = _kv_rows(Table, b, kvh, n0, end, stride_tb, stride_kb, stride_kt, stride_kh, BS,
                                      BLOCK_N)
        visible = (offs_n[None, :] <= pos[:, None]) & nmask[None, :]
        m, denom, acc = _attend(q, m, denom, acc, K, V, row, nmask, visible, scale, D)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=rmask[:, None])


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


def paged_prefill(query, k_pool, v_pool, table, pos, lens, scale: float, block_q: int = 16, block_n: int = 64,
                  num_warps: int = 4, num_stages: int = 2):
    """Prefill attention in place: query [B, Hq, T, D] (any strides, last dim contiguous); k_pool/v_pool as
    paged_decode's; table [B, cols]; pos [B, T] the position of each query token (padding: any position, its
    output is garbage); lens [B] positions of each row written so far (a token sees positions <= its own and
    < lens). Returns [B, Hq, T, D] in query's dtype."""
    batch, q_heads, tokens, dim = query.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = q_heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(block_q, 16 // group_pad)  # tiles of at least 16 rows (tl.dot's least)
    # Written as [B, T, Hq, D]: the caller's transpose back to tokens-first is then free.
    out = torch.empty(batch, tokens, q_heads, dim, dtype=query.dtype, device=query.device).transpose(1, 2)
    grid = (batch, kv_heads, triton.cdiv(tokens, block_q))
    _prefill[grid](
        query, k_pool, v_pool, table, pos, lens, out, scale, tokens,
        query.stride(0), query.stride(1), query.stride(2), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        table.stride(0), pos.stride(0), out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, GROUP_PAD=group_pad, D=dim, BS=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages)
    return out
