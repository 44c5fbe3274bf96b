"""A fast subset of the accuracy suite (``benchmarks/accuracy.py``), and the suite's own bookkeeping.

The cases run exactly as in the suite (same steps and seeds), so a verdict here is the suite's verdict.
Cases that fail today are marked ``xfail(strict=True)``: when gradwatch is fixed they pass, the strict
mark turns that into a failure, and the mark is to be removed.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from benchmarks.accuracy import CASES, Case, Outcome, Setup, run_case, score
from gradwatch import Finding, FindingKind

BY_NAME = {c.name: c for c in CASES}

FAST = {
    "batchnorm-mlp": None,
    "deep-sigmoid-mlp": None,
    "l2-normalised-embeddings": None,
    "finetune-zero-head": None,
    "nan-log-of-negative": None,
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=why)) if why else n
    for n, why in FAST.items()])
def test_fast_case(name):
    out = run_case(BY_NAME[name])
    if out.error:
        pytest.fail(f"{name} did not run: {out.error}")  # not an AssertionError: never hidden by xfail
    shown = "; ".join(f"{f.kind.value} @ {f.layer} (step {f.step}): {f.message}" for f in out.findings)
    assert out.verdict == "pass", f"{name}: {out.verdict}: {shown or 'no finding'}"


def test_suite_covers_what_it_promises():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    healthy = [c for c in CASES if c.healthy]
    planted = [c for c in CASES if not c.healthy and not c.missing_kinds()]
    assert len(healthy) >= 15 and len(planted) >= 15
    assert len({c.family for c in healthy}) >= 8
    families = {k: {c.family for c in planted if any(FindingKind(e[0]) is k for e in c.expect)} for k in FindingKind}
    # Issue 11's five kinds: each planted in at least two architectures; a kind added later: at least once.
    first_five = {"vanishing", "exploding", "dead_units", "saturation", "non_finite"}
    assert all(len(f) >= (2 if k.value in first_five else 1) for k, f in families.items()), families


def _finding(kind, layer):
    return Finding(kind, layer, 0, math.nan, 0.0, "", "")


def _case(name, expect=()):
    return Case(name, "test", "", lambda: Setup(torch.nn.Identity(), lambda i: 0.0), expect=expect)


def test_scoring_counts_case_kind_pairs():
    V, S = FindingKind.VANISHING, FindingKind.SATURATION
    outs = [
        Outcome(_case("healthy-quiet")),
        Outcome(_case("healthy-noisy"), findings=[_finding(S, "a"), _finding(S, "b")]),  # one FP for S
        Outcome(_case("named", ((V, "fc1"),)), findings=[_finding(V, "fc1"), _finding(S, "act1")]),
        Outcome(_case("misnamed", ((V, "fc1"),)), findings=[_finding(V, "fc9")]),
        Outcome(_case("call-site", ((S, "block.relu*"),)), findings=[_finding(S, "block.relu#2")]),
    ]
    verdicts = [o.verdict for o in outs]
    assert verdicts == ["pass", "false alarm", "pass + extra findings", "misnamed", "pass"]
    table = score(outs)
    assert table[V] == {"tp": 1, "fp": 1, "fn": 1}
    assert table[S] == {"tp": 1, "fp": 2, "fn": 0}
    assert Counter(o.ok for o in outs) == Counter({True: 2, False: 3})


def test_a_warning_that_must_come_first_fails_the_case_when_it_comes_late():
    H, N = FindingKind.FP16_OVERFLOW, FindingKind.NON_FINITE
    case = Case("ahead", "test", "", lambda: Setup(torch.nn.Identity(), lambda i: 0.0),
                expect=((H, "fc2"), (N, "fc2")), ahead=((H, N),))

    def at(kind, step):
        return Finding(kind, "fc2", step, math.nan, 0.0, "", "")

    assert Outcome(case, findings=[at(H, 95), at(N, 112)]).verdict == "pass"
    assert Outcome(case, findings=[at(N, 112), at(H, 112)]).verdict == "named too late"  # the same step is too late
    assert Outcome(case, findings=[at(N, 10), at(H, 95), at(N, 112)]).late() == [(H, N)]
    assert Outcome(case, findings=[at(H, 95)]).verdict == "missed"  # no NaN came: its expectation is missed


def test_cases_of_kinds_to_come_are_skipped():
    out = run_case(_case("future", (("no_such_kind", "*"),)))
    assert out.skipped and out.verdict == "skipped" and out.ok
