"""chain_sum: disjoint splits, worked solutions, and a verifier that checks every step."""

from __future__ import annotations

import pytest

from natix.bench.tasks import chain_terms, get_task, split_of, worked_solution


@pytest.fixture(scope="module")
def task():
    return get_task("chain_sum")


def test_splits_are_disjoint_by_construction(task) -> None:
    ev = task.items("eval", 60, seed=0)
    tr = task.items("train", 600, seed=3)
    assert len({i.meta["expression"] for i in ev}) == 60
    assert not {i.meta["expression"] for i in ev} & {i.meta["expression"] for i in tr}
    assert all(split_of(i.meta["expression"]) == "eval" for i in ev)
    assert task.items("eval", 10, seed=0) == ev[:10]  # deterministic


def test_worked_solution_is_right_and_verified(task) -> None:
    for it in task.items("eval", 30):
        sol = worked_solution(it.meta["expression"])
        assert sol.endswith(f"The answer is {it.gold}.")
        assert sum(chain_terms(it.meta["expression"])) == int(it.gold)
        assert task.verify(it, sol) == 1.0
        assert task.is_correct(task.extract(sol), it)


def test_verifier_catches_each_kind_of_mistake(task) -> None:
    it = next(i for i in task.items("eval", 50) if len(chain_terms(i.meta["expression"])) >= 4)
    good = worked_solution(it.meta["expression"])
    steps = good.split(". ")
    # wrong arithmetic in one step
    a, rest = steps[0].split(" = ")
    bad_math = ". ".join([f"{a} = {int(rest) + 1}"] + steps[1:])
    assert task.verify(it, bad_math) < 1.0
    # skipped a step (chain no longer follows the question)
    assert task.verify(it, ". ".join(steps[:1] + steps[2:])) < 1.0
    # stated answer differs from the chain's result
    assert task.verify(it, good.replace(f"The answer is {it.gold}", f"The answer is {int(it.gold) + 5}")) < 1.0
    # no steps at all, even with the right answer
    assert task.verify(it, f"The answer is {it.gold}.") == 0.0
    assert task.verify(it, "") == 0.0


def test_unknown_task_and_split(task) -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'.*chain_sum"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        task.items("test", 3)
