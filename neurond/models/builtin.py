"""The built-in model: a small seeded Llama checkpoint neurond makes for itself.

No model hub is reachable on the machines neurond is tested and demonstrated on, so the default model is
written locally on first use: seeded random weights (the output is random text), a real byte-level BPE
tokenizer trained with the `tokenizers` library on a fixed corpus, and a real Llama-3-style chat template.
It is an ordinary Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json, ...) and
is loaded through exactly the same code path as a real model.

This module runs in the leader only for tokenizer files and config; the weights are made with torch, which
never touches CUDA here (CPU tensors only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes, so an old cached copy is never mistaken for the current one.
BUILTIN_VERSION = "v2"  # v2: the chat template takes tools
BUILTIN_NAME = "neurond-builtin-llama"

SEED = 20261124
VOCAB_SIZE = 1024
# Shapes divisible by 1, 2 and 4 so the same checkpoint serves at TP=1, 2 and 4.
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 4
CONTEXT = 2048
# Larger than the usual 0.02 so logits are well separated: greedy tokens then do not depend on the
# summation order of a tensor-parallel all-reduce.
INIT_STD = 0.25

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]

# Llama 3.1's template, shortened: the tools (JSON tool calling, `{"name": ..., "parameters": {...}}`) go into a
# system block of their own, an assistant's earlier calls are written in that format, and tool results come
# back as `ipython` messages. Real enough that clients see the usual prompt structure.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n'"
    " + 'Given the following functions, respond with a JSON for a function call with its proper arguments that'"
    " + ' best answers the given prompt. Respond in the format {\"name\": function name, \"parameters\":'"
    " + ' dictionary of argument name and its value}. Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": '"
    " + call['function']['arguments'] | tojson + '}' }}"
    "{%- if not loop.last %}{{- '; ' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_CORPUS = """\
neurond serves a chat model with tensor parallelism behind an OpenAI compatible HTTP API.
When a rank fails, the one request gets a clean error, the stuck collective is unblocked, the rank pool is
repaired and the daemon keeps serving. Every state transition is written to the journal.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Hello! How are you today? I am fine, thank you. What is the weather like? It is sunny and warm.
You are a helpful assistant. Answer the question briefly and clearly.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 2026. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % & * + = < >
system user assistant tool function model token tokens request response stream error ready health
"""  # noqa: E501 - the tokenizer's training text: a line longer than 120 stays as it is


def builtin_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{BUILTIN_NAME}-{BUILTIN_VERSION}"


def ensure_builtin_model(cache_dir: Path) -> Path:
    """Return the built-in checkpoint directory, writing it first if it does not exist yet.

    Written into a temporary sibling and renamed into place, so a crash half-way never leaves a
    directory that looks complete; concurrent first uses race harmlessly (the loser's copy is dropped).
    """
    target = builtin_dir(cache_dir)
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_checkpoint(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    # Fill the vocabulary up to exactly VOCAB_SIZE so embedding and lm_head rows split evenly across ranks
    # and every id the random model can emit is a real token.
    missing = VOCAB_SIZE - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(missing)])
    return tok


def _corpus_lines() -> list[str]:
    """The fixed corpus plus seeded pseudo-words: enough distinct pairs for about VOCAB_SIZE merges."""
    import random

    rng = random.Random(SEED)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "sh", "ng", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return _CORPUS.splitlines() * 8 + lines


def _write_checkpoint(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _train_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=EOS, model_max_length=CONTEXT
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=fast.convert_tokens_to_ids(BOS),
        eos_token_id=[fast.convert_tokens_to_ids(EOT), fast.convert_tokens_to_ids(EOS)],
        pad_token_id=fast.convert_tokens_to_ids(EOS),
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    (out / "README.md").write_text(
        "This is neurond's built-in model: seeded RANDOM weights. Its output is random text.\n"
        "It exists so neurond can be installed, tested and demonstrated with no model hub.\n"
        "Point neurond at a real Hugging Face checkpoint directory with `neurond serve --model DIR`.\n"
    )


if __name__ == "__main__":
    # `python -m neurond.models.builtin CACHE_DIR`: the leader runs this in a child so it never imports torch.
    import sys

    print(ensure_builtin_model(Path(sys.argv[1])))
