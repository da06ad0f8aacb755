"""Fixtures the API tests share: the official openai client on the session's TP=1 daemon, and the built-in
model's tokenizer (to check token ids, bytes and prompts against)."""

from __future__ import annotations

import openai
import pytest

from neurond.engine.tokenizer import ChatTokenizer


@pytest.fixture(scope="session")
def client(daemon_tp1):
    return openai.OpenAI(base_url=daemon_tp1.url("/v1"), api_key="x", max_retries=0)


@pytest.fixture(scope="session")
def tokenizer(builtin_model):
    return ChatTokenizer(builtin_model)
