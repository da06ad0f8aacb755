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
