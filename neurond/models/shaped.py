"""Shaped random checkpoints for benchmarks: a real model's shapes with random weights, written fast.

    write_shaped_checkpoint(out, shaped_preset("llama3-8b"), device="cuda")

Used by `scripts/gpu-prove`, not by the daemon. Weights are random (seeded) in the preset's dtype, generated
on `device` (a GPU makes 16 GB in seconds) and written shard by shard as safetensors with an index, like a
Hugging Face checkpoint. The tokenizer is a byte-level BPE built directly (no training) so that its
vocabulary has exactly the preset's size with the last 256 ids special, as in Llama 3; every regular token
is 1 to 3 printable ASCII characters, so random token ids decode to visible text (a vocabulary padded with
special tokens would decode to nothing, and streamed output would show no tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from neurond.models.builtin import BOS, CHAT_TEMPLATE, EOS, EOT, SEED

if TYPE_CHECKING:
    import torch


def shaped_preset(name: str) -> dict:
    """Shapes of a known model. "llama3-8b": Meta-Llama-3-8B; "llama3.1-8b": Meta-Llama-3.1-8B (its 131,072-token
    window); "tiny": the same structure, small, for CPU tests."""
    if name == "llama3-8b":
        return dict(name="llama3-8b-shaped-random", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, dtype="bfloat16",
                    init_std=0.02, shard_bytes=5_000_000_000)
    if name == "llama3.1-8b":  # Meta-Llama-3.1-8B: the same shapes, a 131,072-token window (llama3 RoPE scaling)
        return dict(shaped_preset("llama3-8b"), name="llama3.1-8b-shaped-random", max_position_embeddings=131072,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
    if name == "tiny":
        return dict(name="tiny-shaped-random", vocab_size=16384, hidden_size=128, intermediate_size=448,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, dtype="bfloat16",
                    init_std=0.02, shard_bytes=1_000_000)
    raise ValueError(f"unknown preset {name!r} (llama3-8b, llama3.1-8b, tiny)")


def shaped_tensor_shapes(preset: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint with these shapes, in Hugging Face's names and order."""
    h, i, v = preset["hidden_size"], preset["intermediate_size"], preset["vocab_size"]
    head_dim = h // preset["num_attention_heads"]
    kv = preset["num_key_value_heads"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(preset["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _llama3_special_tokens(count: int) -> list[str]:
    """Llama 3's special tokens in id order (128000 + k), reserved ones filling the gaps, `count` in all."""
    fixed = {0: BOS, 1: EOS, 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: EOT}
    names, reserved = [], 0
    for k in range(count):
        if k in fixed:
            names.append(fixed[k])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def shaped_tokenizer(vocab_size: int, seed: int = SEED):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids: regular tokens first, 256 special ones last.

    Built directly rather than trained: the 256 byte symbols, every pair of printable ASCII characters, then
    seeded triples (pair + character) until the regular part is full. Merges follow the same order.
    """
    import itertools
    import random

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    n_special = min(256, vocab_size // 4)
    specials = _llama3_special_tokens(n_special)
    n_regular = vocab_size - n_special
    # GPT-2's byte -> printable-unicode map, the one ByteLevel uses.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    byte_char = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    alphabet = [byte_char[b] for b in range(256)]
    printable = [byte_char[b] for b in range(0x20, 0x7F)]
    vocab = {ch: k for k, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []

    def add(token: str, left: str, right: str) -> bool:
        if len(vocab) >= n_regular or token in vocab:
            return len(vocab) < n_regular
        vocab[token] = len(vocab)
        merges.append((left, right))
        return True

    for left, right in itertools.product(printable, repeat=2):
        if not add(left + right, left, right):
            break
    if len(vocab) < n_regular:
        rng = random.Random(seed)
        triples = [(a + b, c) for a, b, c in itertools.product(printable, repeat=3)]
        rng.shuffle(triples)
        for left, right in triples:
            if not add(left + right, left, right):
                break
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}")
    return tok


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Write (name, CPU tensor) pairs as one safetensors file without an extra copy; return the data bytes."""
    import json
    import struct

    import torch

    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
    return offset


def write_shaped_checkpoint(out: Path, preset: dict, device: str = "cpu", seed: int = SEED) -> dict:
    """Write a checkpoint directory with `preset`'s shapes and random weights; return what was written.

    Tensors are generated on `device` in the preset's dtype and copied to the host per shard; each shard is
    written by a background thread while the next one is generated.
    """
    import json
    import time

    import torch

    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_metadata(out, preset, seed)
    t_meta = time.monotonic() - t0

    dtype = getattr(torch, preset["dtype"])
    groups = _shard_groups(shaped_tensor_shapes(preset), dtype.itemsize, preset["shard_bytes"])
    weight_map, total = _write_weights(out, groups, dtype, torch.device(device), preset["init_std"], seed)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "README.md").write_text(
        f"neurond benchmark checkpoint: {preset['name']} shapes with seeded RANDOM {preset['dtype']} weights.\n"
        "Its output is random text. Written by neurond.models.shaped.write_shaped_checkpoint.\n")
    return {"dir": str(out), "files": len(groups), "bytes": total, "params": total // dtype.itemsize,
            "tokenizer_s": round(t_meta, 2), "seconds": round(time.monotonic() - t0, 2), "device": device}


def _write_metadata(out: Path, preset: dict, seed: int) -> None:
    """The tokenizer (with the chat template), config.json and generation_config.json."""
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    tok = shaped_tokenizer(preset["vocab_size"], seed)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=EOS,
                                   model_max_length=preset["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    bos, eos, eot = (fast.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT))
    config = LlamaConfig(
        vocab_size=preset["vocab_size"], hidden_size=preset["hidden_size"],
        intermediate_size=preset["intermediate_size"], num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"], num_key_value_heads=preset["num_key_value_heads"],
        max_position_embeddings=preset["max_position_embeddings"], rope_theta=preset["rope_theta"],
        rms_norm_eps=preset["rms_norm_eps"], initializer_range=preset["init_std"], tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=[eot, eos], pad_token_id=eos,
        **({"rope_scaling": preset["rope_scaling"]} if "rope_scaling" in preset else {}),
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = preset["dtype"]
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eot, eos], pad_token_id=eos).save_pretrained(out)


def _shard_groups(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int,
                  shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors in order, cut into shards of at most `shard_bytes` (a larger tensor gets a shard alone)."""
    import math

    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def _write_weights(out: Path, groups: list[list[tuple[str, tuple[int, ...]]]], dtype, dev, init_std: float,
                   seed: int) -> tuple[dict[str, str], int]:
    """Generate each shard's tensors on `dev` (norms are ones, the rest normal(0, init_std)) and write it while
    the next is generated; returns the weight map and the bytes written."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map, total = {}, 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for fname, group in zip(files, groups, strict=True):
            tensors = []
            for name, shape in group:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=dtype, device=dev)
                else:
                    t = torch.empty(shape, dtype=dtype, device=dev).normal_(0.0, init_std, generator=gen)
                tensors.append((name, t.to("cpu", non_blocking=False)))
                weight_map[name] = fname
            pending.append(pool.submit(_write_safetensors, out / fname, tensors))
            if len(pending) > 2:  # bound host memory: at most ~3 shards in flight
                total += pending.pop(0).result()
        for fut in pending:
            total += fut.result()
    return weight_map, total
