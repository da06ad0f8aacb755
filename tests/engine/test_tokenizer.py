"""The leader's tokenizer must give exactly what transformers gives (tokens and chat template), without it."""

import subprocess
import sys

import pytest

from neurond.engine.tokenizer import ChatTokenizer, TemplateError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there, how are you? 42 ünïcödé"},
    {"role": "assistant", "content": "Fine."},
    {"role": "user", "content": "And now?"},
]


def test_same_ids_and_text_as_transformers(builtin_model):
    from transformers import AutoTokenizer

    ours = ChatTokenizer(builtin_model)
    theirs = AutoTokenizer.from_pretrained(builtin_model)
    expected = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours.apply_chat_template(MESSAGES) == list(expected)
    assert ours.render(MESSAGES) == theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = list(range(5, 400, 7))
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == theirs.eos_token_id


def test_template_errors_are_template_errors(tmp_path, builtin_model):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(builtin_model, d)
    (d / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatTokenizer(d).apply_chat_template(MESSAGES)


def test_the_leader_imports_neither_torch_nor_transformers(builtin_model):
    """transformers 5.17 (the GPU image) loads torch and CUDA libraries on `import PreTrainedTokenizerFast`."""
    code = (f"import sys; from neurond.served_model import load_served_model; from pathlib import Path; "
            f"load_served_model(Path({str(builtin_model)!r}), 'x'); "
            f"print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
