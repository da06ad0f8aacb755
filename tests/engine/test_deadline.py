import pytest

from neurond.engine.deadline import StepDeadline


def test_ceiling_before_any_observation_then_adaptive():
    d = StepDeadline(floor_s=2.0, ceiling_s=60.0, factor=20.0)
    assert d.decode() == 60.0 and d.prefill(100) == 60.0
    d.observe_decode(0.01)
    assert d.decode() == 2.0  # 20 x 10 ms = 0.2 s, raised to the floor
    d.observe_decode(0.5)
    assert d.decode() == 10.0  # the slowest recent step decides
    d.observe_decode(10.0)
    assert d.decode() == 60.0  # capped by the ceiling


def test_prefill_scales_with_prompt_tokens():
    d = StepDeadline(floor_s=1.0, ceiling_s=120.0, factor=10.0)
    d.observe_prefill(0.1, 100)  # 1 ms per token
    assert d.prefill(50) == 1.0
    assert d.prefill(5000) == 50.0
    d.reset()
    assert d.prefill(5000) == 120.0


def test_a_call_of_several_decode_steps_keeps_the_floor():
    """Found on the H200: a 4-step call multiplied the 5 s floor by 4, and a wedge took 20 s to detect."""
    d = StepDeadline(5.0, 60.0, 20.0)
    d.observe_decode(0.007)
    assert d.decode(4) == 5.0
    d.observe_decode(0.1)
    assert d.decode(4) == pytest.approx(8.0) and d.decode(100) == 60.0


def test_a_few_slow_decode_calls_do_not_set_the_deadline():
    """Found on 2xH100 (8B, TP=2): the calls that captured CUDA graphs after a repair (~36 ms a step instead of
    ~6) raised the slowest-of-window deadline of an 8-step call to 5.7 s, past the 5 s detection bound."""
    d = StepDeadline(4.0, 60.0, 20.0)
    for _ in range(30):
        d.observe_decode(0.006)
    d.observe_decode(0.036)
    d.observe_decode(0.036)
    assert d.decode(8) == 4.0
    for _ in range(10):
        d.observe_decode(0.05)  # a sustained slowdown (a big batch, a long context) still counts
    assert d.decode(8) == pytest.approx(8.0)


def test_a_short_prefill_does_not_scale_up_into_a_long_deadline():
    """Found on 2xH100: a 1-token prefill of 40 ms made a 20-token prompt's deadline 16 s (per-token rate x
    tokens), and a wedge in that prefill was found after 16 s."""
    d = StepDeadline(4.0, 600.0, 20.0)
    d.observe_prefill(0.04, 1)
    d.observe_prefill(0.05, 128)
    assert d.prefill(20) == 4.0
    assert d.prefill(12800) == pytest.approx(20 * 5.0)  # 100x the 128-token prefill's tokens
