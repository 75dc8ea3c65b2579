"""When a live batch takes in the requests that wait (`palitorch.server.pacing.Pacer`): it holds them while the
running rows are expected to end sooner than an admission takes, and never for longer than two admissions."""

import pytest

from palitorch.server.pacing import Pacer

MS = 1e-3


def pacer(step_ms: float, admit_ms: list[float], answers: list[int]) -> Pacer:
    p = Pacer()
    p.stepped(step_ms * MS)
    for a in admit_ms:
        p.admitted(a * MS)
    for n in answers:
        p.answered(n)
    return p


def test_no_holding_before_there_is_something_to_go_by():
    p = Pacer()
    assert not p.hold([(1, 16)], waited_s=0.0)
    p.stepped(2 * MS)
    p.admitted(8 * MS)
    assert not p.hold([(1, 16)], waited_s=0.0)  # no answer length seen yet
    p.answered(3)
    assert p.hold([(1, 16)], waited_s=0.0)


def test_short_answers_let_the_running_rows_end_first_but_not_for_long():
    """Answers of ~3 tokens, 2 ms steps, 8 ms admissions: rows at 1 and 2 tokens are expected to end in 2 steps
    (4 ms), sooner than an admission, so the newcomers wait; after 16 ms (two admissions) they wait no more."""
    p = pacer(2, [8], [3, 2, 4])
    assert p.drain_steps([(1, 16), (2, 16)]) == 2
    assert p.hold([(1, 16), (2, 16)], waited_s=5 * MS)
    assert not p.hold([(1, 16), (2, 16)], waited_s=16 * MS)


def test_long_answers_are_joined_at_once():
    p = pacer(2, [8], [32, 30, 40])
    assert p.drain_steps([(5, 64)]) == 27
    assert not p.hold([(5, 64)], waited_s=0.0)


def test_a_row_past_the_typical_length_is_expected_to_need_as_much_again_within_its_budget():
    p = pacer(2, [8], [3])
    assert p.drain_steps([(10, 64)]) == 3
    assert p.drain_steps([(10, 11)]) == 1  # its budget ends it sooner
    assert p.drain_steps([]) == 0


@pytest.mark.parametrize("outlier_ms", [15_000.0, 0.01])
def test_one_odd_admission_does_not_set_the_pace(outlier_ms):
    """A first admission that compiled the step (seconds), or a freak fast one: the median of the recent ones
    rules, so the hold stays bounded by ~16 ms."""
    p = pacer(2, [outlier_ms, 8, 8], [3])
    assert p.hold([(1, 16)], waited_s=10 * MS)
    assert not p.hold([(1, 16)], waited_s=17 * MS)


def test_a_drain_that_costs_as_much_as_an_admission_does_not_hold():
    """Holding is for a drain that is cheaper than an admission: at equal cost the newcomers join at once."""
    p = pacer(2, [4], [3])  # a row at 1 token: 2 steps of 2 ms, an admission 4 ms
    assert p.drain_steps([(1, 16)]) == 2
    assert not p.hold([(1, 16)], waited_s=0.0)
    assert pacer(2, [4.5], [3]).hold([(1, 16)], waited_s=0.0)
