"""The model as the API serves it (neurond/served_model.py): its context window is resolved here, once."""

from __future__ import annotations

import json

from neurond.served_model import load_served_model


def test_the_window_is_the_models_own_capped_by_max_model_len(builtin_model):
    own = json.loads((builtin_model / "config.json").read_text())["max_position_embeddings"]
    assert load_served_model(builtin_model, "m").context_len == own  # 0: the model's window
    assert load_served_model(builtin_model, "m", max_model_len=own // 2).context_len == own // 2
    assert load_served_model(builtin_model, "m", max_model_len=own * 4).context_len == own  # a cap, never more
