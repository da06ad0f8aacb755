"""The served model as the leader knows it: which checkpoint, its name, tokenizer, context window and stop tokens.

All of it is read in the leader without touching CUDA: the built-in model is written by a child process, the
tokenizer is the `tokenizers` library's (engine/tokenizer.py), the rest comes from the checkpoint's JSON files.

Everything the ranks will need is checked here first, so that a checkpoint that cannot be served stops the
daemon at once with a `ModelError` naming the file and the problem (exit code 2, not restarted by systemd),
instead of failing every rank's load until the crash-loop breaker gives up: config.json (JSON, a supported
model_type, the architecture's sizes), every *.safetensors file (readable, and its header: the 8-byte length,
the JSON, every tensor's bytes inside the file; read without torch, which the leader never imports), the files
an index names, tokenizer.json, tokenizer_config.json and the chat template.
"""

from __future__ import annotations

import json
import logging
import math
import os
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

#: The model types the ranks run (worker/runner.py SUPPORTED; the leader cannot import it: it imports torch).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: What config.json must give as positive integers: the ranks build the model from them, the API bounds token
#: ids by vocab_size.
CONFIG_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
#: safetensors refuses headers larger than this (its own limit).
MAX_HEADER_BYTES = 100_000_000
#: Bytes per element of safetensors' dtype names: a tensor's byte range must fit its shape.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelError(Exception):
    """The model cannot be served: `cause` (model_dir, model_config, weights, tokenizer, builtin_model), the file
    or directory at fault and what is wrong with it. `neurond serve` exits with code 2 and a startup_failed entry."""

    def __init__(self, cause: str, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.cause = cause
        self.path = str(path)
        self.problem = problem


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
        if not path.is_dir():
            raise ModelError("model_dir", path, "no such directory" if not path.exists() else "not a directory")
        if not (path / "config.json").exists():
            raise ModelError("model_dir", path, "not a Hugging Face checkpoint directory (no config.json)")
        return path
    from neurond.models.builtin import builtin_dir

    target = builtin_dir(Path(config.cache_dir))
    if not (target / "model.safetensors").exists():
        log.info("writing the built-in model to %s (first use)", target)
        done = subprocess.run([sys.executable, "-m", "neurond.models.builtin", config.cache_dir],
                              stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError("builtin_model", config.cache_dir,
                             f"writing the built-in model failed (exit {done.returncode}): {last}")
    return target


def load_served_model(model_dir: Path, name: str, max_model_len: int = 0) -> ServedModel:
    """The model as the API serves it; `max_model_len` (0: none) caps its context window. ModelError: the
    checkpoint cannot be served (which file, what is wrong)."""
    cfg = read_model_config(model_dir)
    check_weights(model_dir)
    generation = _read_json(model_dir / "generation_config.json", "model_config")
    tokenizer = _load_tokenizer(model_dir)
    context = int(cfg.get("max_position_embeddings") or tokenizer.model_max_length or 2048)
    if max_model_len > 0:
        context = min(context, max_model_len)
    stop_ids: set[int] = set()
    for source in (cfg, generation):
        eos = source.get("eos_token_id")
        stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    vocab = cfg.get("vocab_size")
    return ServedModel(name, tokenizer, context, frozenset(stop_ids), int(time.time()),
                       int(vocab) if isinstance(vocab, int) else None)


def read_model_config(model_dir: Path) -> dict:
    """config.json, checked for what the ranks and the API need of it."""
    path = model_dir / "config.json"
    cfg = _read_json(path, "model_config", required=True)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise ModelError("model_config", path, f"no model_type (one of {', '.join(MODEL_TYPES)} is served)")
    if model_type not in MODEL_TYPES:
        raise ModelError("model_config", path,
                         f"model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
    for key in CONFIG_SIZES + ("max_position_embeddings",):
        value = cfg.get(key)
        if (value is not None or key in CONFIG_SIZES) and not _positive_int(value):
            raise ModelError("model_config", path, f"{key} must be a positive integer, got {value!r}")
    return cfg


def check_weights(model_dir: Path) -> None:
    """Every *.safetensors file the ranks will read: it opens, and its header parses and fits the file. The
    files a *.safetensors.index.json names must all be there (a partly copied checkpoint)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError("weights", model_dir, "no *.safetensors file")
    for index in sorted(model_dir.glob("*.safetensors.index.json")):
        weight_map = _read_json(index, "weights").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError("weights", index, "no weight_map")
        for name in sorted({str(v) for v in weight_map.values()}):
            if not (model_dir / name).is_file():
                raise ModelError("weights", model_dir / name, f"missing, but {index.name} names it")
    for file in files:
        check_safetensors(file)


def check_safetensors(path: Path) -> None:
    """One safetensors file, without torch: an 8-byte little-endian header length, that many bytes of JSON
    ({name: {dtype, shape, data_offsets}}, maybe __metadata__), then the tensors' bytes, each range in the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelError("weights", path, f"truncated: {size} bytes, not even a safetensors header")
            length = int.from_bytes(head, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ModelError("weights", path, f"not a safetensors file or truncated: its header would be "
                                                  f"{length} bytes, the file has {size - 8} after the length")
            raw = f.read(length)
    except OSError as exc:  # missing (a dangling symlink), a directory, no permission, an I/O error
        raise ModelError("weights", path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ModelError("weights", path, f"not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError("weights", path, "not a safetensors file: its header is not a JSON object")
    data = size - 8 - length
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = tensor["data_offsets"]
            shape, dtype = tensor["shape"], tensor["dtype"]
            count = math.prod(shape)
        except (TypeError, KeyError, ValueError):
            raise ModelError("weights", path, f"tensor {name!r}: malformed header entry {tensor!r}") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data):
            raise ModelError("weights", path, f"tensor {name!r}: bytes {begin}..{end} are not within the file's "
                                              f"{data} bytes of data (truncated?)")
        if dtype in DTYPE_BYTES and end - begin != count * DTYPE_BYTES[dtype]:
            raise ModelError("weights", path, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")


def _load_tokenizer(model_dir: Path) -> ChatTokenizer:
    # Not transformers' tokenizer classes: on some versions importing them loads torch (and CUDA libraries),
    # and the leader must not (tests check libtorch is never mapped here).
    from jinja2 import TemplateError

    from neurond.engine.tokenizer import ChatTokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise ModelError("tokenizer", path, "missing (a fast tokenizer is required)")
    config = model_dir / "tokenizer_config.json"
    has_template = "chat_template" in _read_json(config, "tokenizer")
    try:
        return ChatTokenizer(model_dir)
    except FileNotFoundError:  # the only file it may still miss: the chat template
        raise ModelError("tokenizer", config, "no chat template (neither chat_template here nor a "
                                              "chat_template.jinja beside it)") from None
    except TemplateError as exc:
        where = config if has_template else model_dir / "chat_template.jinja"
        raise ModelError("tokenizer", where, f"the chat template does not compile: {exc}") from None
    except OSError as exc:
        raise ModelError("tokenizer", exc.filename or path, f"cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # the tokenizers library raises plain Exceptions for a bad file
        raise ModelError("tokenizer", path, f"cannot be loaded: {exc}") from None


def _read_json(path: Path, cause: str, required: bool = False) -> dict:
    """A JSON object from `path`; {} where it does not exist and is not required."""
    if not required and not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(cause, path, f"cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ModelError(cause, path, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelError(cause, path, f"not a JSON object (a {type(value).__name__})")
    return value


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
