"""BNNM plans (sec. 4.1, docs/conventions.md §3): who is reduced, where each token goes, and what is infeasible."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import merge


@st.composite
def plan_args(draw):
    L = draw(st.integers(1, 200))
    cls = draw(st.integers(0, L - 1))
    r_left = draw(st.integers(0, max(cls - 1, 0)))
    r_right = draw(st.integers(0, max(L - 2 - cls, 0)))
    return L, cls, r_left, r_right, draw(st.sampled_from(["ends", "uniform"]))


@given(args=plan_args())
def test_plan_partitions_tokens_and_merges_toward_the_class_token(args):
    """Sec. 4.1: every reduced token merges into the nearest kept token on its side toward the class token.

    Kept and reduced partition 0..L-1; the class token is kept and its new index is its rank; r
    tokens go per side; the target lies between the token and the class token with only reduced
    tokens in between (nearest remaining); order is preserved (kept is ascending).
    """
    L, cls, rl, rr, positions = args
    p = merge.merge_plan(L, cls, rl, rr, positions)
    assert sorted(np.concatenate([p.kept, p.reduced]).tolist()) == list(range(L))
    assert cls in p.kept and p.kept[p.new_cls] == cls
    assert np.all(np.diff(p.kept) > 0)
    assert np.sum(p.reduced < cls) == rl and np.sum(p.reduced > cls) == rr
    kept = set(p.kept.tolist())
    for j, q in zip(p.reduced, p.target):
        assert q in kept
        if j < cls:
            assert j < q <= cls and q < cls, "left tokens merge rightward into a left-side token"
        else:
            assert cls < q < j, "right tokens merge leftward into a right-side token"
        between = range(min(j, q) + 1, max(j, q))
        assert all(k not in kept for k in between), "the target is the nearest kept token"


@given(args=plan_args())
def test_ends_reduces_the_outermost_tokens(args):
    """docs/conventions.md §3 `ends`: the r reduced tokens of a side are its r farthest from the class token (eq. 13)."""
    L, cls, rl, rr, _ = args
    p = merge.merge_plan(L, cls, rl, rr, "ends")
    assert p.reduced.tolist() == list(range(rl)) + list(range(L - rr, L))


@given(args=plan_args())
def test_uniform_spreads_reductions_and_keeps_the_class_tokens_neighbours(args):
    """docs/conventions.md §3 `uniform`: reduced tokens are spread over the side (gaps differ by at most one), never adjacent to cls."""
    L, cls, rl, rr, _ = args
    p = merge.merge_plan(L, cls, rl, rr, "uniform")
    for side, r in (("left", rl), ("right", rr)):
        red, _ = p.reduced_on(side)
        dist = np.sort(np.abs(red - cls))
        assert len(dist) == r and (r == 0 or dist.min() >= 2)
        if r >= 2:
            gaps = np.diff(dist)
            assert gaps.max() - gaps.min() <= 1


@pytest.mark.parametrize("L,cls,rl,rr,msg", [
    (10, 4, 4, 0, "largest feasible r_left is 3"),
    (10, 4, 0, 5, "largest feasible r_right is 4"),
    (10, 0, 1, 0, "largest feasible r_left is 0"),
    (10, 4, -1, 0, "non-negative integer"),
    (10, 4, 1.5, 0, "non-negative integer"),
    (10, 10, 0, 0, "outside the sequence"),
    (0, 0, 0, 0, "length must be >= 1"),
])
def test_infeasible_plans_name_the_bound(L, cls, rl, rr, msg):
    with pytest.raises(ValueError, match=msg):
        merge.merge_plan(L, cls, rl, rr)


def test_unknown_positions_rule_is_an_error():
    with pytest.raises(ValueError, match="positions must be"):
        merge.merge_plan(10, 4, 1, 1, positions="random")
