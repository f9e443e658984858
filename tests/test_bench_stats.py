"""How the benchmark orders its batches and pairs its ratios (no services needed)."""

from __future__ import annotations

from typing import Any

from benchmarks._stats import paired, spread
from benchmarks._workers import order


def test_each_pair_runs_in_both_orders() -> None:
    names = ["library", "sync", "naive"]
    orders = [order(names, number) for number in range(6)]
    assert all(sorted(each) == sorted(names) for each in orders)
    for a in names:
        for b in names:
            if a != b:
                firsts = {each.index(a) < each.index(b) for each in orders}
                assert firsts == {True, False}, (a, b)
    # Two implementations: each runs first in half the rounds.
    pairs = [order(["a", "b"], number) for number in range(4)]
    assert pairs == [["a", "b"], ["b", "a"], ["b", "a"], ["a", "b"]]
    # Every implementation takes every place.
    for place in range(len(names)):
        assert {each[place] for each in orders} == set(names)


def _sample(number: int, value: float, failed: int = 0) -> dict[str, Any]:
    return {"round": number, "cpu": value, "failed": failed}


def test_ratios_pair_batches_of_the_same_round() -> None:
    a = [_sample(0, 2.0), _sample(1, 3.0), _sample(2, 9.0, failed=1), _sample(3, 4.0)]
    b = [_sample(1, 2.0), _sample(2, 1.0), _sample(3, 2.0)]  # b's round 0 did not run
    result = paired(a, b, "cpu")
    assert result["rounds"] == [1.5, 2.0]
    assert (result["median"], result["min"], result["max"], result["n"]) == (1.75, 1.5, 2.0, 2)


def test_spread_states_quartiles() -> None:
    result = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert result is not None
    assert (result["q1"], result["median"], result["q3"]) == (2.0, 3.0, 4.0)
    assert spread([]) is None
