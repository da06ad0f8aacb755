"""The served model as the leader knows it: which checkpoint, its name, tokenizer, context window and stop tokens.

All of it is read in the leader without touching CUDA: the built-in model is written by a child process, the
tokenizer is the `tokenizers` library's (engine/tokenizer.py), the rest comes from the checkpoint's JSON files.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neurond.config import Config

if TYPE_CHECKING:
    from neurond.engine.tokenizer import ChatTokenizer

log = logging.getLogger("neurond")


@dataclass(slots=True)
class ServedModel:
    """What the API needs to know of the model; all of it read in the leader without touching CUDA."""

    name: str
    tokenizer: ChatTokenizer
    #: The served context window: the model's own (max_position_embeddings), capped by max_model_len where that
    #: is set. Prompt + completion must fit it; each rank's KV cache holds it per sequence.
    context_len: int
    stop_token_ids: frozenset[int]
    created: int
    #: Rows of the embedding (config.json's vocab_size): a prompt's token ids must be below it.
    vocab_size: int | None = None


def resolve_model_dir(config: Config) -> Path:
    """The configured checkpoint directory, or the built-in model (written on first use by a child process)."""
    if config.model:
        path = Path(config.model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    from neurond.models.builtin import builtin_dir

    target = builtin_dir(Path(config.cache_dir))
    if not (target / "model.safetensors").exists():
        log.info("writing the built-in model to %s (first use)", target)
        subprocess.run([sys.executable, "-m", "neurond.models.builtin", config.cache_dir], check=True)
    return target


def load_served_model(model_dir: Path, name: str, max_model_len: int = 0) -> ServedModel:
    """The model as the API serves it; `max_model_len` (0: none) caps its context window."""
    # Not transformers' tokenizer classes: on some versions importing them loads torch (and CUDA libraries),
    # and the leader must not (tests check libtorch is never mapped here).
    from neurond.engine.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    context = int(cfg.get("max_position_embeddings") or tokenizer.model_max_length or 2048)
    if max_model_len > 0:
        context = min(context, max_model_len)
    stop_ids: set[int] = set()
    for source in (cfg, _read_json(model_dir / "generation_config.json")):
        eos = source.get("eos_token_id")
        stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    vocab = cfg.get("vocab_size")
    return ServedModel(name, tokenizer, context, frozenset(stop_ids), int(time.time()),
                       int(vocab) if isinstance(vocab, int) else None)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
