"""Chunk geometry: boxes in a tensor's global index space.

A chunk is an axis-aligned box (`offsets`, `sizes`) of a global tensor. Saving
checks that the saved boxes tile each tensor exactly; loading intersects each
target box with the saved boxes through a per-tensor grid index, so finding
the overlaps costs a few bisections per dimension instead of a scan of every
saved chunk for every target chunk.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Past this many grid cells the exact tiling check enumerates too much; the
# volume check plus the pairwise check over few chunks is used instead.
MAX_TILING_CELLS = 2_000_000
# The pairwise check compares each chunk with those its sweep line crosses. A
# DTensor layout is a grid and never gets here; a layout needing more
# comparisons than this (seconds of Python) comes from a hostile metadata
# file and is refused rather than checked for minutes.
MAX_PAIR_CHECKS = 2_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Box:
    """An axis-aligned region of a tensor: `offsets[d] <= i_d < offsets[d] + sizes[d]`."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def end(self, dim: int) -> int:
        return self.offsets[dim] + self.sizes[dim]

    def intersect(self, other: Box) -> Box | None:
        """The common region, or None when the boxes do not overlap (empty boxes never do)."""
        starts = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        ends = tuple(min(self.end(d), other.end(d)) for d in range(len(self.sizes)))
        if any(e <= s for s, e in zip(starts, ends)):
            return None
        return Box(offsets=starts, sizes=tuple(e - s for s, e in zip(starts, ends)))

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of `outer` (which must contain it)."""
        return Box(offsets=tuple(a - b for a, b in zip(self.offsets, outer.offsets)), sizes=self.sizes)

    def within(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.sizes) and all(
            o >= 0 and s >= 0 and o + s <= n for o, s, n in zip(self.offsets, self.sizes, shape)
        )


def full_box(shape: Sequence[int]) -> Box:
    return Box(offsets=(0,) * len(shape), sizes=tuple(shape))


class ChunkIndex:
    """Finds the saved chunks that overlap a query box.

    Every chunk starts on a boundary of each dimension; for a query `[a, b)` in
    dimension `d` only chunks starting at boundaries in `[floor(a), b)` can
    overlap, which bisection finds. When the chunks form a grid (what any
    DTensor placement produces) the candidates are found exactly; otherwise
    the found overlap volume falls short of the query and the index falls back
    to a scan, so the answer is always complete.
    """

    def __init__(self, boxes: Sequence[Box]) -> None:
        self._boxes = list(boxes)
        ndim = len(boxes[0].sizes) if boxes else 0
        self._bounds = [sorted({b.offsets[d] for b in self._boxes}) for d in range(ndim)]
        self._by_start: dict[tuple[int, ...], list[int]] = {}
        for i, b in enumerate(self._boxes):
            self._by_start.setdefault(b.offsets, []).append(i)

    def overlaps(self, query: Box) -> list[tuple[int, Box]]:
        """(chunk index, overlap box) for every chunk that overlaps `query`, in chunk order."""
        if query.numel == 0 or not self._boxes:
            return []
        candidates = []
        for d, bounds in enumerate(self._bounds):
            lo = max(bisect.bisect_right(bounds, query.offsets[d]) - 1, 0)
            hi = bisect.bisect_left(bounds, query.end(d))
            candidates.append(bounds[lo:hi])
        found = []
        for start in itertools.product(*candidates):
            for i in self._by_start.get(start, ()):
                inter = self._boxes[i].intersect(query)
                if inter is not None and inter.numel:
                    found.append((i, inter))
        if sum(b.numel for _, b in found) != query.numel:
            found = [
                (i, x) for i, b in enumerate(self._boxes) if (x := b.intersect(query)) is not None and x.numel
            ]
        found.sort(key=lambda pair: pair[0])
        return found


def tiling_problem(shape: Sequence[int], boxes: Iterable[Box]) -> str | None:
    """Why `boxes` do not tile a tensor of `shape` exactly, or None when they do."""
    boxes = list(boxes)
    total = math.prod(shape)
    for b in boxes:
        if not b.within(shape):
            return (
                f"chunk at offsets {list(b.offsets)} sizes {list(b.sizes)} lies outside shape {list(shape)}"
            )
    if total == 0:
        return None if boxes else "no chunk was saved for this empty tensor"
    boxes = [b for b in boxes if b.numel]
    covered = sum(b.numel for b in boxes)
    if covered < total:
        return f"chunks cover {covered} of {total} elements: there is a gap"
    if covered > total:
        return f"chunks cover {covered} elements of a tensor of {total}: chunks overlap"
    return _overlap_problem(shape, boxes)


def _overlap_problem(shape: Sequence[int], boxes: list[Box]) -> str | None:
    """With the volumes equal, a gap implies an overlap; find one through grid cells."""
    bounds = [
        sorted({0, n, *(b.offsets[d] for b in boxes), *(b.end(d) for b in boxes)})
        for d, n in enumerate(shape)
    ]
    ncells = math.prod(len(x) - 1 for x in bounds)
    if ncells > MAX_TILING_CELLS:
        return _pairwise_overlap(boxes)
    seen: set[tuple[int, ...]] = set()
    for b in boxes:
        spans = [
            range(bisect.bisect_left(bounds[d], b.offsets[d]), bisect.bisect_left(bounds[d], b.end(d)))
            for d in range(len(shape))
        ]
        for cell in itertools.product(*spans):
            if cell in seen:
                return f"chunk at offsets {list(b.offsets)} sizes {list(b.sizes)} overlaps another chunk"
            seen.add(cell)
    return None


def _pairwise_overlap(boxes: list[Box]) -> str | None:
    """Sweep along the dimension that crosses the fewest boxes, comparing only boxes the sweep line crosses."""
    dim = min(range(len(boxes[0].sizes)), key=lambda d: _sweep_cost(boxes, d))
    cost = _sweep_cost(boxes, dim)
    if cost > MAX_PAIR_CHECKS:
        return f"{len(boxes)} chunks in an irregular layout need {cost} comparisons to check for overlaps; refused"
    active: list[Box] = []
    for b in sorted(boxes, key=lambda b: b.offsets[dim]):
        active = [a for a in active if a.end(dim) > b.offsets[dim]]
        for a in active:
            if all(a.offsets[d] < b.end(d) and b.offsets[d] < a.end(d) for d in range(len(b.sizes))):
                return f"chunks at offsets {list(a.offsets)} and {list(b.offsets)} overlap"
        active.append(b)
    return None


def _sweep_cost(boxes: list[Box], dim: int) -> int:
    """How many comparisons a sweep along `dim` makes: for each box, the earlier boxes still open at its start."""
    starts = sorted(b.offsets[dim] for b in boxes)
    ends = sorted(b.end(dim) for b in boxes)
    return sum(
        bisect.bisect_right(starts, b.offsets[dim]) - bisect.bisect_right(ends, b.offsets[dim]) - 1
        for b in boxes
    )


def byte_runs(chunk: Box, region: Box, itemsize: int, *, max_runs: int) -> list[tuple[int, int]]:
    """Contiguous byte runs `(start, nbytes)` of `region` inside a row-major `chunk`.

    `region` is in the chunk's own coordinates. Trailing dimensions that the
    region covers whole merge into one run, so a row range of a `Shard(0)`
    target is a single run. A region that would need more than `max_runs`
    runs is read as one bounding run instead: many tiny requests cost more
    than the extra bytes.
    """
    sizes = chunk.sizes
    ndim = len(sizes)
    if ndim == 0:
        return [(0, itemsize)]
    strides = [itemsize] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    # Find the first dim from which the region is contiguous to the end.
    split = ndim - 1
    while split > 0 and region.offsets[split] == 0 and region.sizes[split] == sizes[split]:
        split -= 1
    run_len = region.sizes[split] * strides[split]
    first = sum(o * st for o, st in zip(region.offsets, strides))
    if math.prod(region.sizes[:split]) > max_runs:
        last = sum((o + n - 1) * st for o, n, st in zip(region.offsets, region.sizes, strides)) + itemsize
        return [(first, last - first)]
    outer = [range(region.offsets[d], region.offsets[d] + region.sizes[d]) for d in range(split)]
    base = region.offsets[split] * strides[split]
    return [
        (base + sum(i * strides[d] for d, i in enumerate(idx)), run_len) for idx in itertools.product(*outer)
    ]


def coalesce(runs: Sequence[tuple[int, int]], *, max_gap: int) -> list[tuple[int, int]]:
    """Merge sorted runs whose gap is at most `max_gap` bytes (fewer, larger requests)."""
    merged: list[list[int]] = []
    for start, n in sorted(runs):
        if merged and start - (merged[-1][0] + merged[-1][1]) <= max_gap:
            merged[-1][1] = max(merged[-1][1], start + n - merged[-1][0])
        else:
            merged.append([start, n])
    return [(s, n) for s, n in merged]
