"""neurond's forward of a Llama-family decoder layer over the slot KV cache: transformers' math and weights,
about half the kernels.

A batch-1 decode step is bound by memory bandwidth only if the GPU is busy reading weights; transformers'
layer launches ~35 kernels per layer (three q/k/v GEMMs, two gate/up GEMMs, ten for the rotary embedding, a
bool-to-float mask conversion per attention call, ...), and in a CUDA graph each small kernel still costs a few
microseconds. This layer runs the same computation in fewer: q/k/v and gate/up are one GEMM each (their
weights concatenated once at load; the module's own parameters become views of the fused ones, so no memory is
added), q and k are rotated together, the additive mask is built once per step, each residual add is done
with the next norm; with `Kernels(compiled=True)` the elementwise pieces become one Triton kernel each.
Measured against transformers' layer in docs/benchmarks.md (the runner keeps both; `own_layers=False`).

The model still knows nothing about tensor parallelism: the row-wise projections (o, down) are called as
modules, so the all-reduce hooks `tp.py` put on them run as before, and each rank's q/k/v/gate/up shards are
fused locally. Modules that take other paths (DTensor parameters of transformers' own TP, partial rotary,
activations other than SiLU) are not `supported`; the runner then uses transformers' layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from neurond.worker import attention


def supported(model) -> str | None:
    """Why `model`'s layers cannot run here, or None when they can."""
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "DTensor parameters (transformers' tensor parallelism)"
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary embedding"
    layer = getattr(model, model.base_model_prefix).layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
        return "not a Llama-style layer"
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "not a Llama-style MLP"
    return None


def _fuse(*linears):
    """One weight (and bias) for several linears of the same input; theirs become views of it."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ValueError("some but not all fused projections have a bias")
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


def signed_sin(sin):
    """rotate_half(x) * sin == cat(x2, x1) * signed_sin(sin): the sign of the first half is folded in, once
    per step, so each layer's rotation is cat + mul + addcmul."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def additive_mask(mask, dtype):
    """The bool mask (True = may attend) as the float mask SDPA adds; once per step, not once per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


# The elementwise pieces of a layer. Plain torch they are 2-3 kernels each; torch.compile (Kernels(compiled=True))
# makes each one Triton kernel. They take rows [N, ...] (N = batch x tokens). Compiled kernels serve decode
# steps only (N = batch: two compiles, N == 1 and N > 1): at prefill sizes the compiled ones measured slower
# than torch's (a 512-token prefill of an 8B model took 29.8 ms with them, 16.2 ms without; benchmarks.md).

def rotate(x, cos, sin_signed):
    """x [N, H, D]; cos/sin_signed [N, 1, D]. transformers' apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin_signed)


def add_rms_norm(h, delta, weight, eps: float):
    """(h + delta, RMSNorm(h + delta)) with transformers' LlamaRMSNorm math (float32 statistics): the residual
    add of one sublayer and the norm of the next, one pass when compiled."""
    h = h + delta
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * x.to(h.dtype)


def add_rms_norm_eager(h, delta, weight, eps: float):
    """add_rms_norm uncompiled: torch's fused RMSNorm kernel (the math above is six kernels eagerly)."""
    h = h + delta
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps)


def silu_mul(gate_up, inter: int):
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


_KERNELS: dict[bool, Kernels] = {}


def kernels(compiled: bool) -> Kernels:
    """The process's one set of kernels of each kind: compiled code is cached per torch.compile wrapper, so
    the runner must use the very wrappers `prewarm` compiled."""
    if compiled not in _KERNELS:
        _KERNELS[compiled] = Kernels(compiled)
    return _KERNELS[compiled]


def prewarm(config, world_size: int, dtype, device) -> float:
    """Compile the decode kernels before the weights are there: at the shapes, dtypes and strides a decode step
    of one rank gives them (rows 1 and 2: the two compiles), on scratch tensors. A worker runs this on a
    thread while its shard loads (worker/main.py), so a replaced rank does not add its ~3 s of tracing and
    cache loads (8B, H100) to the repair. Should a guard still differ, the runner's own warm-up compiles it."""
    import time


    t0 = time.monotonic()
    k = kernels(compiled=True)
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hq, hkv = heads // world_size, (getattr(config, "num_key_value_heads", None) or heads) // world_size
    inter, hidden = config.intermediate_size // world_size, config.hidden_size
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    weight = torch.nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
    with torch.inference_mode():
        for rows in (1, 2):
            h = torch.zeros(rows, hidden, dtype=dtype, device=device)
            k.add_rms_norm(h, torch.zeros_like(h), weight, eps)
            qkv = torch.zeros(rows, (hq + 2 * hkv) * dim, dtype=dtype, device=device).view(-1, hq + 2 * hkv, dim)
            cos = torch.zeros(rows, 1, dim, dtype=dtype, device=device)
            k.rotate(qkv[:, : hq + hkv], cos, torch.zeros_like(cos))
            k.silu_mul(torch.zeros(rows, 2 * inter, dtype=dtype, device=device), inter)
    torch.cuda.synchronize(device)
    return time.monotonic() - t0


class Kernels:
    def __init__(self, compiled: bool) -> None:
        wrap = (lambda fn: torch.compile(fn, dynamic=True)) if compiled else (lambda fn: fn)
        self.compiled = compiled
        self.rotate = wrap(rotate)
        self.add_rms_norm = wrap(add_rms_norm) if compiled else add_rms_norm_eager
        self.silu_mul = wrap(silu_mul)


class DecoderLayer:
    def __init__(self, layer, head_dim: int, decode_kernels: Kernels, prefill_kernels: Kernels) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.decode_kernels = decode_kernels
        self.prefill_kernels = prefill_kernels
        self.in_norm = layer.input_layernorm
        post_norm = layer.post_attention_layernorm
        self.in_w, self.in_eps = self.in_norm.weight, attention.norm_eps(self.in_norm)
        self.post_w, self.post_eps = post_norm.weight, attention.norm_eps(post_norm)
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3: RMSNorm of each head before the rotation
        self.k_norm: Any = getattr(attn, "k_norm", None)  # a module whenever q_norm is one
        self.o_proj = attn.o_proj
        self.down_proj = mlp.down_proj
        self.scale = getattr(attn, "scaling", head_dim**-0.5)
        self.head_dim = head_dim
        self.q_heads = attn.q_proj.weight.shape[0] // head_dim  # this rank's heads
        self.kv_heads = attn.k_proj.weight.shape[0] // head_dim
        self.inter = mlp.gate_proj.weight.shape[0]
        self.qkv_w, self.qkv_b = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        self.gate_up_w, self.gate_up_b = _fuse(mlp.gate_proj, mlp.up_proj)

    def __call__(self, h, delta, cache, layer_idx: int, cos, sin_signed, mask, batch: int, tokens: int):
        """h [N, hidden] the residual stream (N = batch x tokens) and delta, the previous layer's output still to
        be added to it (None for the first layer); cos/sin_signed [N, 1, D]; mask float [B, 1, T, L] (None: the cache
        reads in place).
        Returns (h, delta) for the next layer."""
        k = self.decode_kernels if tokens == 1 else self.prefill_kernels
        hq, hkv, dim = self.q_heads, self.kv_heads, self.head_dim
        h, x = (h, self.in_norm(h)) if delta is None else k.add_rms_norm(h, delta, self.in_w, self.in_eps)
        qkv = F.linear(x, self.qkv_w, self.qkv_b).view(-1, hq + 2 * hkv, dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qkv[:, :hq]), self.k_norm(qkv[:, hq : hq + hkv])), dim=1)
        else:
            qk = qkv[:, : hq + hkv]
        qk = k.rotate(qk, cos, sin_signed)
        keys, values = cache.write(layer_idx, qk[:, hq:].view(batch, tokens, hkv, dim),
                                   qkv[:, hq + hkv :].view(batch, tokens, hkv, dim))
        q = qk[:, :hq].reshape(batch, tokens, hq, dim).transpose(1, 2)
        out = attention.attend(q, keys, values, mask, self.scale).transpose(1, 2)
        h, x = k.add_rms_norm(h, self.o_proj(out.reshape(batch * tokens, hq * dim)), self.post_w, self.post_eps)
        gate_up = F.linear(x, self.gate_up_w, self.gate_up_b)
        return h, self.down_proj(k.silu_mul(gate_up, self.inter))
