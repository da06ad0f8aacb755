"""The model as the API serves it (neurond/served_model.py): its context window is resolved here, once, and a
checkpoint that cannot be served is refused here, naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neurond.served_model import MODEL_TYPES, ModelError, check_weights, load_served_model


def test_the_window_is_the_models_own_capped_by_max_model_len(builtin_model):
    own = json.loads((builtin_model / "config.json").read_text())["max_position_embeddings"]
    assert load_served_model(builtin_model, "m").context_len == own  # 0: the model's window
    assert load_served_model(builtin_model, "m", max_model_len=own // 2).context_len == own // 2
    assert load_served_model(builtin_model, "m", max_model_len=own * 4).context_len == own  # a cap, never more


# ---------------------------------------------------------------------------------------------- checked at start
# Whole daemons refusing a broken checkpoint: tests/test_startup_errors.py. Here, the finer checks, in-process.
@pytest.fixture
def copy(builtin_model, tmp_path) -> Path:
    """The built-in model as symlinks: a test replaces what it breaks."""
    out = tmp_path / "model"
    out.mkdir()
    for f in builtin_model.iterdir():
        (out / f.name).symlink_to(f)
    return out


def refused(model_dir: Path) -> ModelError:
    with pytest.raises(ModelError) as info:
        load_served_model(model_dir, "m")
    return info.value


def rewrite(path: Path, content: bytes | str) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def test_the_leader_checks_the_model_types_the_ranks_run():
    from neurond.worker.runner import SUPPORTED

    assert MODEL_TYPES == SUPPORTED


def test_an_unsupported_model_type_is_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    rewrite(copy / "config.json", json.dumps(cfg | {"model_type": "gpt2"}))
    e = refused(copy)
    assert (e.cause, e.path) == ("model_config", str(copy / "config.json")) and "'gpt2' is not supported" in e.problem
    rewrite(copy / "config.json", json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    assert "no model_type" in refused(copy).problem


def test_a_config_that_is_not_an_object_or_has_a_bad_window_is_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    rewrite(copy / "config.json", "[1, 2]")
    assert refused(copy).problem == "not a JSON object (a list)"
    rewrite(copy / "config.json", json.dumps(cfg | {"max_position_embeddings": "4k"}))
    assert refused(copy).problem == "max_position_embeddings must be a positive integer, got '4k'"


def test_a_malformed_generation_config_is_refused(copy):
    rewrite(copy / "generation_config.json", "{eos_token_id: 1}")
    e = refused(copy)
    assert (e.cause, e.path) == ("model_config", str(copy / "generation_config.json")) and "not valid JSON" in e.problem


def safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_weights_headers_are_read_without_torch(copy, tmp_path):
    weights = copy / "model.safetensors"
    rewrite(weights, b"\x01\x00")
    assert "truncated: 2 bytes" in refused(copy).problem
    rewrite(weights, (7).to_bytes(8, "little") + b"[1, 2]\n")
    assert refused(copy).problem == "not a safetensors file: its header is not a JSON object"
    rewrite(weights, (4).to_bytes(8, "little") + b"\xff\xfe{}")
    assert "its header is not JSON" in refused(copy).problem
    rewrite(weights, safetensors({"w": {"dtype": "F32", "shape": [2, 2]}}, bytes(16)))
    assert "tensor 'w': malformed header entry" in refused(copy).problem
    rewrite(weights, safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(12)))
    assert refused(copy).problem == "tensor 'w': 12 bytes for shape [2, 2] of F32"
    fine = safetensors({"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2],
                                                              "data_offsets": [0, 16]}}, bytes(16))
    (tmp_path / "fine").mkdir()
    (tmp_path / "fine" / "w.safetensors").write_bytes(fine)
    check_weights(tmp_path / "fine")  # a well-formed file passes


def test_the_files_an_index_names_must_be_there(copy):
    (copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    e = refused(copy)
    assert (e.cause, e.path) == ("weights", str(copy / "model-00002-of-00002.safetensors"))
    assert e.problem == "missing, but model.safetensors.index.json names it"
    (copy / "model.safetensors.index.json").write_text("{}")
    assert refused(copy).problem == "no weight_map"


def test_no_weights_at_all_is_refused(copy):
    (copy / "model.safetensors").unlink()
    e = refused(copy)
    assert (e.cause, e.path, e.problem) == ("weights", str(copy), "no *.safetensors file")


def test_a_tokenizer_that_cannot_be_loaded_is_refused(copy):
    rewrite(copy / "tokenizer.json", "{}")
    e = refused(copy)
    assert (e.cause, e.path) == ("tokenizer", str(copy / "tokenizer.json")) and "cannot be loaded" in e.problem


def test_a_missing_or_broken_chat_template_is_refused(copy):
    (copy / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((copy / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config  # the built-in model keeps it in chat_template.jinja
    e = refused(copy)
    assert (e.cause, e.path) == ("tokenizer", str(copy / "tokenizer_config.json")) and "no chat template" in e.problem
    rewrite(copy / "chat_template.jinja", "{% for m in messages %}")
    e = refused(copy)
    assert (e.cause, e.path) == ("tokenizer", str(copy / "chat_template.jinja")) and "does not compile" in e.problem
    rewrite(copy / "tokenizer_config.json", "{'bos_token': 1}")
    e = refused(copy)
    assert (e.cause, e.path) == ("tokenizer", str(copy / "tokenizer_config.json")) and "not valid JSON" in e.problem
