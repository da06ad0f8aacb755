"""Names for full KV cache blocks, so that requests sharing a prefix can share its blocks (prefix caching).

A full block of a context is named by a hash chain: the hash of (the hash of the block before it, the block's
token ids). Two contexts' i-th blocks have the same name only if the contexts agree on every token up to the
end of that block, which is what makes the cached keys/values the same (a position's keys and values depend on
the tokens up to it and on nothing else: positions are absolute, and the model is the same on every rank).
BLAKE2b of 16 bytes: a collision, which would serve one prompt another's cache, is not a practical concern.
"""

from __future__ import annotations

import array
import hashlib


def chain(tokens: list[int], block_size: int, hashes: list[bytes], full: int) -> list[bytes]:
    """`hashes` (the names of the first blocks of `tokens`, computed before) extended to the first `full`
    blocks of `tokens` (each must be whole). Returns `hashes`, extended in place."""
    if full * block_size > len(tokens):
        raise ValueError(f"{full} blocks of {block_size} need {full * block_size} tokens, not {len(tokens)}")
    for i in range(len(hashes), full):
        parent = hashes[i - 1] if i else b""
        block = array.array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        hashes.append(hashlib.blake2b(parent + block, digest_size=16).digest())
    return hashes
