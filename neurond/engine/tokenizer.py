"""The leader's tokenizer and chat template: the `tokenizers` library and jinja2, nothing that imports torch.

transformers' tokenizer classes import torch on some versions (5.17: `from transformers import
PreTrainedTokenizerFast` loads 725 modules including libtorch_cuda, measured on the GPU image), and the leader
must never load CUDA libraries. A Hugging Face checkpoint's tokenizer is fully described by tokenizer.json
(the fast tokenizer) and tokenizer_config.json (special tokens, chat template; newer exports put the
template in chat_template.jinja); this module reads exactly those and renders the template the way
transformers does (sandboxed jinja2, trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn, overload

if TYPE_CHECKING:
    from jinja2 import Template


class TemplateError(ValueError):
    """The chat template rejected the conversation (e.g. roles that do not alternate)."""


def _token_text(value: str | dict | None) -> str | None:
    if isinstance(value, dict):  # a serialised AddedToken
        return value.get("content")
    return value


class ChatTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
        self._tok = Tokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.model_max_length = config.get("model_max_length")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        if template is None:
            raise FileNotFoundError(f"{model_dir} has no chat template (tokenizer_config.json or chat_template.jinja)")
        self.template_source: str = template  # what the API reads the tool-call format from
        self._template = _compile(template)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI tool definitions ({"type": "function", "function": {...}}), as templates take them."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         tools=tools or None, documents=None)
        except TemplateError:
            raise
        except Exception as exc:  # any template failure is a rejected conversation
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None

    @overload
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = ...,
                            tokenize: Literal[True] = ..., tools: list[dict] | None = ...) -> list[int]: ...

    @overload
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = ..., tokenize: bool = ...,
                            tools: list[dict] | None = ...) -> str | list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            tools: list[dict] | None = None) -> str | list[int]:
        """The conversation as the template writes it: its token ids, or (`tokenize=False`) its text."""
        text = self.render(messages, add_generation_prompt, tools)
        if not tokenize:
            return text
        # The template writes the special tokens itself (bos, headers): no second BOS from the post-processor.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt (the completions API: no chat template) as the checkpoint's tokenizer encodes text on
        its own: its post-processor adds what the model expects before a text (Llama's BOS), as
        transformers' `tokenizer(text)` and vLLM's completions do."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (what the API's logprobs report as `bytes`): a byte-level BPE piece
        mapped back through GPT-2's byte alphabet, a byte-fallback piece (`<0x0A>`), or else its decoded text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if type(self._tok.decoder).__name__ == "ByteLevel":
            try:
                return bytes(_BYTE_OF[ch] for ch in piece)
            except KeyError:  # a character outside the byte alphabet
                pass
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """One token as text (an incomplete UTF-8 sequence shows as U+FFFD, as OpenAI's `token` does)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves, the others are
    shifted to code points from 256 on (the `bytes_to_unicode` table every byte-level tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


_BYTE_OF = _gpt2_byte_alphabet()


def _compile(source: str) -> Template:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> NoReturn:
        raise TemplateError(message)

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
