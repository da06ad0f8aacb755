"""neurond's own decoder layer (decoder.py) against transformers' layers, for every supported model type:
same tokens from a batched prefill and from multi-step decode, with GQA, biases (qwen2) and q/k norms (qwen3)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from neurond.protocol import PrefillChunk, SamplingParams  # noqa: E402
from neurond.worker import decoder  # noqa: E402
from neurond.worker.runner import ModelRunner  # noqa: E402
from neurond.worker.tp import CollectiveGuard  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7)


def tiny(model_type: str, **extra):
    """A tiny random GQA model (4 query heads, 2 KV heads); `extra` overrides its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.3,
                    tie_word_embeddings=False)
    cfg = AutoConfig.for_model(model_type, **{**settings, **extra})
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norm weights start at 0 and 1; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def runner_for(model, own: bool) -> ModelRunner:
    r = ModelRunner(model, slots=4, max_len=300, device=torch.device("cpu"), guard=CollectiveGuard(),
                    world_size=1, own_layers=own)
    assert (r.own is not None) is own
    return r


def run(runner) -> list[int]:
    prompts = {0: [3, 14, 15, 92, 65, 35], 2: list(range(20, 61)), 3: [7]}
    out = runner.prefill([PrefillChunk(s, tuple(p), 0, True, SAMPLED if s == 3 else GREEDY, 0)
                          for s, p in prompts.items()])
    # 270 steps cross the 256-position kv bucket for slot 2 (41-token prompt).
    for steps in (1, 4, 265):
        out += runner.decode((0, 2, 3), steps)
    return out


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_own_layers_give_transformers_tokens(model_type):
    model = tiny(model_type)
    assert decoder.supported(model) is None
    theirs = run(runner_for(model, own=False))
    ours = run(runner_for(model, own=True))  # fuses the projections: their modules now view the fused weights
    assert len(ours) == 3 + 3 * 270
    assert ours == theirs
    assert len(set(ours)) > 10  # not a degenerate model that says one token


def test_fusion_adds_no_memory_and_keeps_the_modules_working():
    model = tiny("qwen2")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 64)
    before = attn.k_proj(x)
    params = sum(p.numel() for p in model.parameters())
    runner_for(model, own=True)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.bias is not None
    assert torch.equal(attn.k_proj(x), before)
    assert sum(p.numel() for p in model.parameters()) == params


def test_rotation_is_transformers_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)  # [B, H, T, D] as transformers holds them
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    qk = torch.cat((q, k), dim=1).transpose(1, 2)  # [B, T, H, D]
    got = decoder.rotate(qk, cos.unsqueeze(2), decoder.signed_sin(sin).unsqueeze(2)).transpose(1, 2)
    torch.testing.assert_close(got, torch.cat((q_ref, k_ref), dim=1))


def test_unsupported_activation_falls_back_to_transformers_layers():
    model = tiny("llama")
    model.config.hidden_act = "gelu"
    assert "activation" in decoder.supported(model)
    r = ModelRunner(model, slots=1, max_len=64, device=torch.device("cpu"), guard=CollectiveGuard(), world_size=1)
    assert r.own is None and r.info()["own_layers"] is False
