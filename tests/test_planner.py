"""Pure planning, in one process: dedup, balance, coverage, key checks, big plans, overlaps."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planners.boxes import Box, ChunkIndex, byte_runs, coalesce, full_box
from planners.errors import InvalidStateDictError, PlanCoverageError
from planners.save_plan import LocalPlan, WriteItem, plan_global


def _item(
    fqn: str,
    shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    *,
    dtype: str = "float32",
) -> WriteItem:
    return WriteItem(
        fqn=fqn,
        dtype=dtype,
        global_shape=shape,
        box=Box(offsets=offsets, sizes=sizes),
        nbytes=4 * math.prod(sizes),
    )


def _plan(rank: int, items: list[WriteItem]) -> LocalPlan:
    return LocalPlan(rank=rank, items=tuple(items), keys=tuple(sorted({i.fqn for i in items})))


def test_replicated_chunks_are_written_once_and_balanced():
    shapes = {f"r{i}": (100 * (i + 1),) for i in range(8)}
    plans = [_plan(rank, [_item(k, s, (0,), s) for k, s in shapes.items()]) for rank in range(4)]
    g = plan_global(plans, max_file_bytes=1 << 30)
    written = [item for rp in g.rank_plans for f in rp.files for item in f.items]
    assert sorted(i.fqn for i in written) == sorted(shapes)
    per_rank = [sum(f.nbytes for f in rp.files) for rp in g.rank_plans]
    assert sum(per_rank) == 4 * sum(s[0] for s in shapes.values())
    assert max(per_rank) - min(per_rank) <= 4 * 800  # greedy: within one largest chunk


def test_sharded_chunks_stay_with_their_rank_and_2d_replicas_split():
    # 2x2 mesh, Shard(0) over dim 0 of the mesh, replicated over dim 1: ranks (0,1) and (2,3) hold the same rows
    plans = [_plan(r, [_item("w", (8, 4), ((r // 2) * 4, 0), (4, 4))]) for r in range(4)]
    g = plan_global(plans, max_file_bytes=1 << 30)
    writers = {item.box.offsets: rp.rank for rp in g.rank_plans for f in rp.files for item in f.items}
    assert writers == {(0, 0): 0, (4, 0): 2}


def test_gaps_and_overlaps_are_refused_before_writing():
    gap = [_plan(0, [_item("w", (10,), (0,), (4,))]), _plan(1, [_item("w", (10,), (5,), (5,))])]
    with pytest.raises(PlanCoverageError, match=r"'w'.*cover 9 of 10 elements: there is a gap"):
        plan_global(gap, max_file_bytes=1 << 30)
    overlap = [_plan(0, [_item("w", (4, 4), (0, 0), (3, 4))]), _plan(1, [_item("w", (4, 4), (2, 0), (2, 4))])]
    with pytest.raises(PlanCoverageError, match=r"'w'.*overlap"):
        plan_global(overlap, max_file_bytes=1 << 30)
    swapped = [_plan(0, [_item("w", (2, 2), (0, 0), (2, 1))]), _plan(1, [_item("w", (2, 2), (0, 0), (1, 2))])]
    with pytest.raises(PlanCoverageError, match=r"'w'"):  # same volume, overlapping, with a gap
        plan_global(swapped, max_file_bytes=1 << 30)


def test_ranks_must_agree_on_keys_dtypes_and_shapes():
    a = _plan(0, [_item("w", (2,), (0,), (2,)), _item("only0", (1,), (0,), (1,))])
    b = _plan(1, [_item("w", (2,), (0,), (2,)), _item("only1", (1,), (0,), (1,))])
    with pytest.raises(
        InvalidStateDictError, match=r"rank 1 has keys rank 0 lacks: 'only1'; lacks keys rank 0 has: 'only0'"
    ):
        plan_global([a, b], max_file_bytes=1 << 30)
    c = _plan(1, [_item("w", (2,), (0,), (2,), dtype="bfloat16")])
    with pytest.raises(
        InvalidStateDictError, match=r"'w': rank 0 has dtype float32.*rank 1 has dtype bfloat16"
    ):
        plan_global([_plan(0, [_item("w", (2,), (0,), (2,))]), c], max_file_bytes=1 << 30)


def test_files_are_bounded_by_max_file_bytes():
    items = [_item(f"t{i}", (250,), (0,), (250,)) for i in range(7)]  # 1000 bytes each
    g = plan_global([_plan(0, items)], max_file_bytes=2500)
    assert [len(f.items) for f in g.rank_plans[0].files] == [2, 2, 2, 1]
    assert all(f.nbytes <= 2500 for f in g.rank_plans[0].files)


def test_4096_rank_plan_in_one_process():
    world = 4096
    rows = 4096 * 2
    plans = [
        _plan(r, [_item("emb", (rows, 64), (2 * r, 0), (2, 64)), _item("norm", (64,), (0,), (64,))])
        for r in range(world)
    ]
    start = time.perf_counter()
    g = plan_global(plans, max_file_bytes=1 << 30)
    elapsed = time.perf_counter() - start
    assert sum(1 for rp in g.rank_plans for f in rp.files for i in f.items if i.fqn == "norm") == 1
    assert sum(1 for rp in g.rank_plans for f in rp.files for i in f.items if i.fqn == "emb") == world
    assert elapsed < 60  # generous bound: catches quadratic blow-ups, not noise


# ---- overlaps: the index agrees with brute force on random grids --------------------------------


@st.composite
def grid(draw, shape: tuple[int, ...]) -> list[Box]:
    """A random tiling of `shape`: per dim, random cut points (a DTensor-style grid, uneven allowed)."""
    cuts = []
    for n in shape:
        inner = draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=4, unique=True)) if n > 1 else []
        cuts.append(sorted({0, n, *[c for c in inner if 0 < c < n]}))
    boxes = []
    for starts in itertools.product(*[list(zip(c[:-1], c[1:])) for c in cuts]):
        boxes.append(Box(offsets=tuple(a for a, _ in starts), sizes=tuple(b - a for a, b in starts)))
    return boxes


@st.composite
def shape_and_grids(draw):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    return shape, draw(grid(shape)), draw(grid(shape))


@settings(max_examples=200, deadline=None)
@given(shape_and_grids())
def test_index_overlaps_equal_brute_force(case):
    shape, saved, targets = case
    index = ChunkIndex(saved)
    for target in targets:
        got = index.overlaps(target)
        expected = [(i, x) for i, b in enumerate(saved) if (x := b.intersect(target)) is not None and x.numel]
        assert got == expected
        assert sum(x.numel for _, x in got) == target.numel


@settings(max_examples=200, deadline=None)
@given(shape_and_grids(), st.sampled_from([1, 2, 4, 8]))
def test_byte_runs_select_exactly_the_region(case, itemsize):
    shape, saved, targets = case
    chunk = saved[0]
    for target in targets:
        inter = chunk.intersect(target)
        if inter is None:
            continue
        region = inter.relative_to(chunk)
        runs = byte_runs(chunk, region, itemsize, max_runs=10_000)
        selected = {b for s, n in runs for b in range(s, s + n)}
        # bytes of every element of the region, by row-major position inside the chunk
        strides = [itemsize * math.prod(chunk.sizes[d + 1 :]) for d in range(len(chunk.sizes))]
        expected = set()
        for idx in itertools.product(*[range(o, o + n) for o, n in zip(region.offsets, region.sizes)]):
            start = sum(i * s for i, s in zip(idx, strides))
            expected.update(range(start, start + itemsize))
        assert selected == expected
        bounded = byte_runs(chunk, region, itemsize, max_runs=0)
        assert len(bounded) == 1 and expected <= set(range(bounded[0][0], sum(bounded[0])))


def test_coalesce_merges_close_runs_only():
    assert coalesce([(0, 10), (12, 5), (100, 4)], max_gap=2) == [(0, 17), (100, 4)]
    assert coalesce([(5, 5), (0, 5)], max_gap=0) == [(0, 10)]
    assert full_box((2, 3)) == Box(offsets=(0, 0), sizes=(2, 3))
