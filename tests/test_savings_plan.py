"""The savings formulation of the recompute plan, against hand-checked cases and brute force."""

import itertools
import random

import pytest

from sac_compiler.solvers import InfeasibleError, SolverOptions
from sac_compiler.solvers.savings_plan import (
    Candidate,
    SavingsProblem,
    check_plan,
    greedy_savings_plan,
    min_feasible_peak,
    min_peak_plan,
    savings_profile,
    solve_savings_plan,
)

EXACT = SolverOptions(mip_gap=0.0)


def _chain():
    # a (1000 B, 1 ms) read by backward at step 3; b = f(a) (2000 B, 5 ms) read at step 1.
    # Baseline: 3000 B live at steps 0..1, 1000 B at steps 2..3, on top of 500 B of base.
    candidates = (
        Candidate("a", 1000, 1.0, first_use=3),
        Candidate("b", 2000, 5.0, inputs=("a",), first_use=1),
    )
    return SavingsProblem(candidates, baseline=(3500, 3500, 1500, 1500), budget=0)


def test_hand_checked_chain():
    problem = _chain()
    # Budget 2600: at steps 0..1 900 B must go. Recomputing a (1 ms) frees 1000 B before step 3,
    # but b is kept so a is not needed before step 3: the cheap choice suffices.
    plan = solve_savings_plan(SavingsProblem(problem.candidates, problem.baseline, 2600), EXACT)
    assert plan.recompute == {"a"} and plan.recompute_ms == pytest.approx(1.0)
    # Budget 1600: 1900 B must go at steps 0..1. b frees 2000 B at step 0 only (backward reads it at
    # step 1), a frees at most 1000 B at step 1: no plan fits.
    with pytest.raises(InfeasibleError):
        solve_savings_plan(SavingsProblem(problem.candidates, problem.baseline, 1600), EXACT)


def test_a_recomputed_chain_of_six_is_rebuilt_at_its_last_values_read():
    # r0 -> r1 -> ... -> r5 (a residual stream: each made from the one before), backward reads r5
    # first (step 1) and r0 last (step 6). Recomputed whole, rebuilding r5 at step 1 needs r4, which
    # needs r3, ... back to r0: all six are rebuilt at step 1 and save their bytes at step 0 only,
    # not r0 until its own read. (A program that looks only three values down the chain counts r0
    # as saved through step 2, as if it were first rebuilt for r3's read at step 3.)
    candidates = tuple(Candidate(f"r{i}", 100 * (i + 1), 1.0, inputs=(f"r{i - 1}",) if i else (), first_use=6 - i)
                       for i in range(6))
    problem = SavingsProblem(candidates, baseline=(3000,) * 7, budget=0)
    assert savings_profile(problem, {c.name for c in candidates}) == [2100, 0, 0, 0, 0, 0, 0]
    # r0 alone (the rest kept) is rebuilt at its own read
    assert savings_profile(problem, {"r0"}) == [100] * 6 + [0]


def test_the_large_value_when_only_it_covers_the_need():
    # Independent values; 1900 B must go at step 0 only: a (1000 B) cannot, b (2000 B) can.
    candidates = (Candidate("a", 1000, 1.0, first_use=3), Candidate("b", 2000, 5.0, first_use=1))
    problem = SavingsProblem(candidates, baseline=(3500, 1500, 1500, 1500), budget=1600)
    plan = solve_savings_plan(problem, EXACT)
    assert plan.recompute == {"b"} and plan.recompute_ms == pytest.approx(5.0)


def test_recomputed_input_is_rebuilt_at_its_consumer():
    problem = _chain()
    # Recomputing both: b is read at step 1 and a is needed then to rebuild it, so both save only
    # at step 0; recomputing a alone saves its 1000 B until its own read at step 3.
    saved = savings_profile(problem, {"a", "b"})
    assert saved == [3000, 0, 0, 0]
    assert savings_profile(problem, {"a"}) == [1000, 1000, 1000, 0]


def test_inline_value_saves_through_its_last_read_and_holds_its_input():
    # a (1000 B) feeds b (2000 B, pointwise, read at steps 1..2, folded into its readers when
    # recomputed). Recomputed inline, b is never a buffer; a, which backward does not read, must
    # then be kept until b's last read (step 2, inclusive).
    candidates = (
        Candidate("a", 1000, 1.0),
        Candidate("b", 2000, 0.0, inputs=("a",), first_use=1, last_use=2, inline=True),
    )
    problem = SavingsProblem(candidates, baseline=(3000, 3000, 3000, 1000), budget=0)
    assert savings_profile(problem, {"b"}, {"a"}) == [1000, 1000, 1000, 0]
    # not inline, b would be a buffer again from its first read on
    plain = SavingsProblem((candidates[0], Candidate("b", 2000, 0.0, inputs=("a",), first_use=1, last_use=2)),
                           problem.baseline, 0)
    assert savings_profile(plain, {"b"}, {"a"}) == [1000, 0, 0, 0]
    plan = solve_savings_plan(SavingsProblem(candidates, problem.baseline, 2000), EXACT)
    assert plan.recompute == {"b"} and plan.kept_for_recompute == {"a"}


def test_keep_cost_makes_recomputing_worth_it_without_memory_pressure():
    # Keeping b costs 0.5 ms (written out in forward, read back); recomputing it costs 0.1 ms.
    candidates = (Candidate("b", 2000, 0.1, first_use=1, keep_cost_ms=0.5), Candidate("c", 500, 0.2, first_use=1))
    problem = SavingsProblem(candidates, baseline=(3000, 3000), budget=10_000)  # nothing over the budget
    plan = solve_savings_plan(problem, EXACT)
    assert plan.recompute == {"b"}


def test_check_plan_rules():
    problem = SavingsProblem(
        (
            Candidate("x", 10, 1.0, first_use=None),
            Candidate("y", 10, 1.0, inputs=("x",), first_use=2),
            Candidate("r", 10, 1.0, first_use=1, must_save=True),
            Candidate("g1", 10, 1.0, first_use=1, group="g"),
            Candidate("g2", 10, 0.0, first_use=2, group="g"),
        ),
        baseline=(50, 50, 50),
        budget=0,
    )
    check_plan(problem, {"y"}, {"x"})
    with pytest.raises(ValueError, match="needs x"):
        check_plan(problem, {"y"}, set())
    with pytest.raises(ValueError, match="must be saved"):
        check_plan(problem, {"r"}, set())
    with pytest.raises(ValueError, match="groups split"):
        check_plan(problem, {"g1"}, set())
    with pytest.raises(ValueError, match="unknown"):
        check_plan(problem, {"zz"}, set())


def _random_problem(rng: random.Random) -> SavingsProblem:
    n = rng.randint(3, 9)
    steps = rng.randint(3, 8)
    candidates = []
    for i in range(n):
        inputs = tuple(f"v{j}" for j in range(i) if rng.random() < 0.3)
        first = rng.choice([None] + list(range(1, steps)))
        inline = rng.random() < 0.25  # a fused pointwise value: its inputs live through its last read
        candidates.append(Candidate(
            f"v{i}", rng.randint(1, 8) * 100, round(rng.uniform(0.1, 5.0), 2), inputs=inputs, first_use=first,
            must_save=rng.random() < 0.1, group="g" if rng.random() < 0.15 else None, inline=inline,
            last_use=None if first is None else min(steps - 1, first + (rng.randint(0, 3) if inline else 0)),
        ))
    base = [rng.randint(0, 1000) for _ in range(steps)]
    baseline = tuple(b + sum(c.nbytes for c in candidates if c.first_use is not None and t <= c.first_use)
                     for t, b in enumerate(base))
    return SavingsProblem(tuple(candidates), baseline, budget=0)


# A graph that runs several times before its backwards (one compiled block for every block): the
# other runs hold what this one keeps at the end of forward through every step. The evaluator
# below counts that on its own, from the one-run savings and the plan's kept values.


def _step_peaks_with_runs(problem: SavingsProblem, runs: int, recompute: set[str], kept: set[str]) -> list[int]:
    one_run = SavingsProblem(problem.candidates, problem.baseline, 0)
    saved = savings_profile(one_run, recompute, kept)
    held = sum(c.nbytes for c in problem.candidates
               if (c.first_use is not None and c.name not in recompute) or c.name in kept)
    return [b - s + (runs - 1) * held for b, s in zip(problem.baseline, saved)]


def _brute_force(problem: SavingsProblem, budget: int, runs: int = 1) -> float | None:
    """The least recompute time of any valid plan whose every step (``_step_peaks_with_runs``, with
    ``runs`` runs of the graph in the step) is within ``budget``; None when no plan is."""
    names = [c.name for c in problem.candidates]
    bare = [c.name for c in problem.candidates if c.first_use is None]
    best = None
    for bits in itertools.product((0, 1), repeat=len(names)):
        recompute = {n for n, b in zip(names, bits) if b}
        for kbits in itertools.product((0, 1), repeat=len(bare)):
            kept = {n for n, b in zip(bare, kbits) if b}
            try:
                check_plan(problem, recompute, kept)
            except ValueError:
                continue
            if max(_step_peaks_with_runs(problem, runs, recompute, kept)) <= budget:
                cost = sum(c.cost_ms for c in problem.candidates if c.name in recompute)
                best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_milp_matches_brute_force(seed):
    rng = random.Random(seed)
    problem = _random_problem(rng)
    low, high = min(problem.baseline) // 2, max(problem.baseline)
    budget = rng.randint(low, high)
    _check_milp_against_brute_force(problem, budget, runs=1)


def _check_milp_against_brute_force(problem: SavingsProblem, budget: int, runs: int) -> None:
    """The program's plan for ``runs`` runs is valid, keeps every step within ``budget`` by the
    independent evaluator, and is as fast as the brute-force optimum (or both find none)."""
    expected = _brute_force(problem, budget, runs=runs)
    bounded = SavingsProblem(problem.candidates, problem.baseline, budget, other_runs=runs - 1)
    if expected is None:
        with pytest.raises(InfeasibleError):
            solve_savings_plan(bounded, EXACT)
        return
    plan = solve_savings_plan(bounded, EXACT)
    check_plan(bounded, set(plan.recompute), set(plan.kept_for_recompute))
    assert max(_step_peaks_with_runs(problem, runs, set(plan.recompute), set(plan.kept_for_recompute))) <= budget
    assert plan.recompute_ms == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_min_feasible_peak_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    problem = _random_problem(rng)
    peak = min_feasible_peak(problem, EXACT)
    # the smallest feasible peak is feasible, and nothing below it is
    assert _brute_force(problem, peak) is not None
    assert _brute_force(problem, peak - 1) is None


@pytest.mark.parametrize("seed", range(10))
def test_min_peak_plan_reaches_the_lowest_peak(seed):
    rng = random.Random(100 + seed)
    problem = _random_problem(rng)
    peak, plan = min_peak_plan(problem, EXACT)
    assert peak == min_feasible_peak(problem, EXACT)
    check_plan(problem, set(plan.recompute), set(plan.kept_for_recompute))
    saved = savings_profile(problem, plan.recompute, plan.kept_for_recompute)
    assert max(b - s for b, s in zip(problem.baseline, saved)) == pytest.approx(peak, abs=2**20 * 1e-6)


def test_greedy_plans_are_valid_and_never_beat_the_optimum():
    """The fallback when the solver fails: every plan it returns passes check_plan and covers the
    need by the same evaluator; its time is never below the brute-force optimum; it finds a plan
    on most budgets that have one."""
    feasible = planned = 0
    for seed in range(40):
        rng = random.Random(seed)
        problem = _random_problem(rng)
        budget = rng.randint(min(problem.baseline) // 2, max(problem.baseline))
        bounded = SavingsProblem(problem.candidates, problem.baseline, budget)
        expected = _brute_force(problem, budget)
        feasible += expected is not None
        try:
            plan = greedy_savings_plan(bounded)
        except InfeasibleError:
            continue
        assert expected is not None, f"seed {seed}: greedy planned a budget brute force finds no plan for"
        planned += 1
        check_plan(bounded, set(plan.recompute), set(plan.kept_for_recompute))
        saved = savings_profile(bounded, plan.recompute, plan.kept_for_recompute)
        assert all(b - s <= budget for b, s in zip(bounded.baseline, saved)), seed
        assert plan.recompute_ms >= expected - 1e-9 and plan.status == "GREEDY"
    assert planned >= feasible // 2, (planned, feasible)
    roomy = SavingsProblem(problem.candidates, problem.baseline, max(problem.baseline))
    assert greedy_savings_plan(roomy).recompute == frozenset()


def test_other_runs_hold_what_one_run_keeps_at_every_step():
    problem = _chain()
    # one run fits 2600 by recomputing a alone (test_hand_checked_chain). With two runs the other
    # holds what this one keeps: {a} leaves b held (2000 B) and peaks at 3500 - 1000 + 2000 = 4500;
    # {b} leaves a held and peaks at 3500 + 1000 at step 1; only {a, b} fits 4000 (3500 at step 1)
    two = SavingsProblem(problem.candidates, problem.baseline, 4000, other_runs=1)
    assert max(_step_peaks_with_runs(problem, 2, {"a"}, set())) == 4500
    assert max(_step_peaks_with_runs(problem, 2, {"b"}, set())) == 4500
    plan = solve_savings_plan(two, EXACT)
    assert plan.recompute == {"a", "b"} and plan.recompute_ms == pytest.approx(6.0)
    assert _brute_force(problem, 4000, runs=2) == pytest.approx(6.0)
    peaks = _step_peaks_with_runs(problem, 2, set(plan.recompute), set(plan.kept_for_recompute))
    assert peaks == [500, 3500, 1500, 1500]
    # the module's own evaluator agrees with the independent one
    assert [b + two.held_by_other_runs - s for b, s in zip(two.baseline, savings_profile(
        two, plan.recompute, plan.kept_for_recompute))] == peaks
    assert min_feasible_peak(two, EXACT) == 3500


@pytest.mark.parametrize("seed", range(25))
def test_milp_with_other_runs_matches_brute_force(seed):
    rng = random.Random(500 + seed)
    problem = _random_problem(rng)
    runs = rng.randint(2, 4)
    top = max(_step_peaks_with_runs(problem, runs, set(), set()))
    budget = rng.randint(min(problem.baseline) // 2, top)
    _check_milp_against_brute_force(problem, budget, runs=runs)


@pytest.mark.parametrize("seed", range(10))
def test_min_feasible_peak_with_other_runs_matches_brute_force(seed):
    rng = random.Random(700 + seed)
    problem = SavingsProblem(*_problem_parts(_random_problem(rng)), other_runs=2)
    peak = min_feasible_peak(problem, EXACT)
    # the program counts MiB in floats: its peak may round a byte either way
    assert _brute_force(problem, peak + 1, runs=3) is not None
    assert _brute_force(problem, peak - 2, runs=3) is None


def _problem_parts(problem: SavingsProblem) -> tuple:
    """The positional fields of a one-run problem, to make it again with other runs."""
    return problem.candidates, problem.baseline, problem.budget
