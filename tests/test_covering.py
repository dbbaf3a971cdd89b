"""Covering arrays (strategies.covering): every feasible t-way combination is held, the
constraint holds on every row, infeasible combinations are named rather than missed, and the
same seed gives the same rows."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.covering import Group, coverage, covering_array, requirements


def _all_valid_rows(factors, valid):
    names = list(factors)
    for levels in itertools.product(*(factors[n] for n in names)):
        row = dict(zip(names, levels, strict=True))
        if valid is None or valid(row):
            yield row


def _holds(row, combo):
    return all(k in row and type(row[k]) is type(v) and row[k] == v for k, v in combo.items())


def test_pairwise_on_four_binary_factors_is_small_and_complete():
    factors = {name: (False, True) for name in "abcd"}
    rows = covering_array(factors, [Group("all", tuple("abcd"), 2)], seed=3)
    assert len(rows) <= 6  # 2^4 = 16 rows exhaustively; pairwise needs 5 or 6
    for a, b in itertools.combinations("abcd", 2):
        for va, vb in itertools.product((False, True), repeat=2):
            assert any(r[a] == va and r[b] == vb for r in rows), (a, va, b, vb)
    report = coverage(rows, factors, [Group("all", tuple("abcd"), 2)])["all"]
    assert (report.required, report.covered, report.infeasible, report.missing) == (24, 24, 0, ())


def test_three_way_is_exhaustive_on_three_factors():
    factors = {"x": (1, 2, 3), "y": ("a", "b"), "z": (None, 0.5)}
    rows = covering_array(factors, [Group("xyz", ("x", "y", "z"), 3)], seed=0)
    assert sorted(repr(tuple(r.values())) for r in rows) == sorted(repr(t) for t in itertools.product(*factors.values()))


def test_infeasible_combinations_are_computed_and_left_out():
    # a=1 forces b=1 and b=1 forbids c=2, so (a=1, c=2) is infeasible though no rule names both.
    factors = {"a": (0, 1), "b": (0, 1), "c": (0, 1, 2)}

    def valid(row):
        if row.get("a") == 1 and row.get("b") == 0:
            return False
        return not (row.get("b") == 1 and row.get("c") == 2)

    groups = [Group("pairs", ("a", "b", "c"), 2)]
    feasible, infeasible = requirements(factors, groups, valid=valid)["pairs"]
    assert {"a": 1, "b": 0} in infeasible and {"b": 1, "c": 2} in infeasible and {"a": 1, "c": 2} in infeasible
    assert len(feasible) + len(infeasible) == 2 * 2 + 2 * 3 + 2 * 3
    rows = covering_array(factors, groups, valid=valid, seed=1)
    assert all(valid(r) for r in rows)
    report = coverage(rows, factors, groups, valid=valid)["pairs"]
    assert report.complete and report.required == len(feasible) and report.infeasible == 3


def test_coverage_names_what_is_missing():
    factors = {"a": (0, 1), "b": (0, 1)}
    report = coverage([{"a": 0, "b": 0}, {"a": 1}], factors, [Group("ab", ("a", "b"), 2)])["ab"]
    assert (report.required, report.covered) == (4, 1)
    assert list(report.missing) == [{"a": 0, "b": 1}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]


def test_true_and_one_are_different_levels():
    factors = {"a": (1, True), "b": ("x",)}
    rows = covering_array(factors, [Group("ab", ("a", "b"), 2)])
    assert sorted(repr(r["a"]) for r in rows) == ["1", "True"]
    assert coverage([{"a": True, "b": "x"}], factors, [Group("ab", ("a", "b"), 2)])["ab"].covered == 1


def test_mixed_strength_groups():
    factors = {"q": (0, 1, 2), "r": (0, 1, 2), "s": (0, 1, 2), "t": ("u", "v"), "w": ("u", "v")}
    groups = [Group("qrs", ("q", "r", "s"), 3), Group("tw", ("t", "w", "q"), 2)]
    rows = covering_array(factors, groups, seed=5)
    assert len(rows) >= 27 and all(c.complete for c in coverage(rows, factors, groups).values())


@pytest.mark.parametrize(("factors", "groups", "message"), [
    ({"a": ()}, [], "has no levels"),
    ({"a": (1, 1)}, [], "repeats a level"),
    ({"a": (1, 2)}, [Group("g", ("a", "b"), 2)], "unknown factors"),
    ({"a": (1, 2)}, [Group("g", ("a",), 2)], "strength=2 must be between 1 and its 1 factors"),
    ({"a": (1, 2)}, [Group("g", ("a", "a"), 1)], "repeats a factor"),
])
def test_bad_designs_say_what_is_wrong(factors, groups, message):
    with pytest.raises(ValueError, match=message):
        covering_array(factors, groups)


@st.composite
def designs(draw):
    """A small random design: 1-5 factors of 1-3 levels, 1-2 groups of strength 1-3, and a
    constraint made of forbidden level pairs (a partial-row constraint, as documented)."""
    n = draw(st.integers(1, 5))
    names = [f"f{i}" for i in range(n)]
    factors = {name: tuple(range(draw(st.integers(1, 3)))) for name in names}
    groups = []
    for gi in range(draw(st.integers(1, 2))):
        members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=n, unique=True))
        groups.append(Group(f"g{gi}", tuple(members), draw(st.integers(1, min(3, len(members))))))
    pairs = [(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]]
    forbidden = draw(st.lists(st.sampled_from(pairs), max_size=4, unique=True)) if pairs else []

    def valid(row):
        return not any(row.get(a) == va and row.get(b) == vb for a, va, b, vb in forbidden)

    return factors, groups, (valid if forbidden else None), draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(designs())
def test_every_feasible_combination_is_covered(design):
    factors, groups, valid, seed = design
    rows = covering_array(factors, groups, valid=valid, seed=seed)
    full = list(_all_valid_rows(factors, valid))
    assert all(set(r) == set(factors) for r in rows)
    assert all(valid is None or valid(r) for r in rows)
    assert len(rows) <= max(1, len(full))
    reqs = requirements(factors, groups, valid=valid)
    report = coverage(rows, factors, groups, valid=valid)
    for g in groups:
        feasible, infeasible = reqs[g.name]
        # Feasible exactly when some valid complete row holds it (checked by brute force).
        for combo in feasible:
            assert any(_holds(r, combo) for r in full)
            assert any(_holds(r, combo) for r in rows), (g, combo)
        for combo in infeasible:
            assert not any(_holds(r, combo) for r in full)
        assert report[g.name].complete and report[g.name].infeasible == len(infeasible)


@settings(max_examples=40, deadline=None)
@given(designs())
def test_same_seed_same_rows(design):
    factors, groups, valid, seed = design
    assert covering_array(factors, groups, valid=valid, seed=seed) == covering_array(factors, groups, valid=valid,
                                                                                      seed=seed)
