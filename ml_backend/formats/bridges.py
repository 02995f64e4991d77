"""Where each hole of a mask's polygons is cut in: its nearest vertex pair with the rings before it, all holes at once.

The rule (:mod:`ml_backend.formats.polygon`): the rings of one component are its outer contour
(rank 0) and its holes (rank 1, 2, ... in OpenCV's order). Hole k joins the ring of lower rank,
same component, that holds the vertex nearest to one of its own vertices; ties go to the lowest
(squared distance, ring, vertex, hole vertex), so the answer is unique. Each hole joins a ring
before it, so the bridges form a tree and the outline stays one loop.

Hand-written with numpy (OpenCV has no nearest-neighbour query restricted to earlier rings and
scipy is not a dependency), without a Python step per hole, since masks can have thousands:

1. every vertex goes into an index sorted by (component, band of rows, x), so the vertices of a
   component inside a box are one ``searchsorted`` range per band;
2. each hole's vertices are cut into runs of up to 16 (a small hole is one run), and every pair
   (run vertex, earlier-ring vertex) within the hole's reach of the run's box is compared, for
   all holes at once; a vertex farther than that from the box cannot be that near;
3. a hole whose nearest pair found lies within its reach is done (every nearer pair was seen);
   one whose nearest lies beyond it searches once more with that distance as its reach; one with
   none doubles its reach (16 pixels at first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_BAND = 32  # rows per band of the vertex index
_FIRST_REACH = 16  # pixels: every hole's first reach
_CHUNK = 16  # consecutive hole vertices searched as one box
_PAIR_BLOCK = 1 << 20  # vertex pairs compared at a time


def nearest_joints(rings: Sequence[np.ndarray], component: np.ndarray,
                   rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every hole (``rank > 0``): (hole, joined ring, vertex in that ring, vertex in the hole), as arrays.

    ``rings``: (n, 2) integer x, y vertices; ``component`` and ``rank``: per ring. Every component
    must have its outer contour (rank 0). Holes come back in ascending ring order.
    """
    index = _VertexIndex(rings, component, rank)
    holes = np.flatnonzero(index.rank > 0)
    chunks = _Chunks(index, holes)
    joint = np.zeros((len(holes), 3), np.int64)  # ring, vertex in it, hole vertex
    reach = np.full(len(holes), _FIRST_REACH, np.int64)
    pending, limit = np.arange(len(holes)), max(index.width, index.bands * _BAND)
    while pending.size:
        best, owner, u, v = chunks.pairs_within(pending, reach)
        exact = best[pending] <= reach[pending] ** 2  # every pair that near was seen: the nearest is among them
        tied = exact[np.searchsorted(pending, owner)]
        owner, u, v = owner[tied], u[tied], v[tied]
        first = np.lexsort((index.local[u], index.local[v], index.ring_of[v], owner))
        first = first[np.r_[True, owner[first][1:] != owner[first][:-1]]] if first.size else first
        joint[owner[first]] = np.stack((index.ring_of[v[first]], index.local[v[first]], index.local[u[first]]), 1)
        pending = pending[~exact]
        found = best[pending] < _NONE
        # Found a pair farther than the reach: that distance bounds the nearest, one more round finds it.
        reach[pending] = np.where(found, np.ceil(np.sqrt(best[pending].astype(np.float64))).astype(np.int64) + 1,
                                  np.minimum(reach[pending] * 2, 2 * limit))
    return holes, joint[:, 0], joint[:, 1], joint[:, 2]


_NONE = np.iinfo(np.int64).max


class _Chunks:
    """The holes' vertices in runs of up to ``_CHUNK`` consecutive ones (near each other along the outline),
    each with its box: the unit of the search, so a small hole is one query and a long one several local ones."""

    def __init__(self, index: "_VertexIndex", holes: np.ndarray) -> None:
        self.index, self.holes = index, holes
        sizes = index.sizes[holes]
        per_hole = -(-sizes // _CHUNK)
        self.owner = np.repeat(np.arange(len(holes)), per_hole)  # per chunk: which of ``holes``
        offset = _ramp(per_hole) * _CHUNK
        self.start = index.starts[holes][self.owner] + offset  # first vertex (global)
        self.size = np.minimum(sizes[self.owner] - offset, _CHUNK)
        vertices = np.repeat(self.start, self.size) + _ramp(self.size)
        bounds = np.concatenate(([0], np.cumsum(self.size)[:-1]))
        self.low = np.minimum.reduceat(index.points[vertices], bounds) if len(vertices) else np.zeros((0, 2), np.int64)
        self.high = np.maximum.reduceat(index.points[vertices], bounds) if len(vertices) else self.low
        self.first_chunk = np.concatenate(([0], np.cumsum(per_hole)[:-1]))
        self.per_hole = per_hole

    def pairs_within(self, pending: np.ndarray,
                     reach: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For the holes ``pending`` (ascending indices into ``holes``), every (hole vertex u, earlier-ring
        vertex v) within the hole's ``reach`` on each axis: (least squared distance per hole (all holes;
        ``_NONE`` when none), and owner, u, v of the pairs at that least distance)."""
        index = self.index
        chunk = np.repeat(self.first_chunk[pending], self.per_hole[pending]) + _ramp(self.per_hole[pending])
        owner = self.owner[chunk]
        r = reach[owner][:, None]
        best = np.full(len(self.holes), _NONE)
        kept = []
        for query, v in index.in_boxes(self.holes[owner], self.low[chunk] - r, self.high[chunk] + r,
                                       _PAIR_BLOCK // _CHUNK):
            c = chunk[query]
            pair_owner, x, y = self.owner[c], index.x[v], index.y[v]
            # Nearer to a vertex of the chunk than its reach (and than the hole's best pair so far) only if
            # that near to the chunk's box.
            gap_x = np.maximum(np.maximum(self.low[c, 0] - x, x - self.high[c, 0]), 0)
            gap_y = np.maximum(np.maximum(self.low[c, 1] - y, y - self.high[c, 1]), 0)
            gap = gap_x * gap_x + gap_y * gap_y
            near = gap <= np.minimum(reach[pair_owner] ** 2, best[pair_owner])
            c, v, gap, pair_owner = c[near], v[near], gap[near], pair_owner[near]
            # First one pair per candidate (with the chunk's middle vertex): a distance that is reached, so a
            # candidate farther than it from the chunk's box cannot be nearest; only the others are paired in full.
            middle = self.start[c] + self.size[c] // 2
            dx, dy = index.x[middle] - index.x[v], index.y[middle] - index.y[v]
            _lower(best, pair_owner, dx * dx + dy * dy)
            near = gap <= best[pair_owner]
            c, v = c[near], v[near]
            size = self.size[c]
            pair_owner, v = np.repeat(self.owner[c], size), np.repeat(v, size)
            u = np.repeat(self.start[c], size) + _ramp(size)
            dx, dy = index.x[u] - index.x[v], index.y[u] - index.y[v]
            distance = dx * dx + dy * dy
            _lower(best, pair_owner, distance)
            near = distance <= best[pair_owner]
            kept.append((pair_owner[near], u[near], v[near], distance[near]))
        if not kept:
            empty = np.zeros(0, np.int64)
            return best, empty, empty, empty
        pair_owner, u, v, distance = (np.concatenate(column) for column in zip(*kept))
        nearest = distance == best[pair_owner]  # an earlier block's pair may have been beaten since
        return best, pair_owner[nearest], u[nearest], v[nearest]


class _VertexIndex:
    """Every ring's vertices (shifted by one pixel, so none is negative), sorted by (component, band, x)."""

    def __init__(self, rings: Sequence[np.ndarray], component: np.ndarray, rank: np.ndarray) -> None:
        sizes = np.array([len(ring) for ring in rings], np.int64)
        self.starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        self.sizes = sizes
        self.points = np.concatenate(rings).reshape(-1, 2).astype(np.int64) + 1  # >= 0: contours may touch -1
        self.x, self.y = self.points[:, 0].copy(), self.points[:, 1].copy()
        self.ring_of = np.repeat(np.arange(len(rings)), sizes)
        self.local = np.arange(len(self.points)) - np.repeat(self.starts, sizes)
        self.component = np.asarray(component, np.int64)
        self.rank = np.asarray(rank, np.int64)
        self.vertex_rank = self.rank[self.ring_of]
        self.width = int(self.points[:, 0].max()) + 1
        self.bands = int(self.points[:, 1].max()) // _BAND + 1
        keys = self._key(self.component[self.ring_of], self.points[:, 1] // _BAND, self.points[:, 0])
        self.order = np.argsort(keys)  # ties in any order: the nearest pair is chosen by its full key
        self.keys = keys[self.order]

    def _key(self, component: np.ndarray, band: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (component * self.bands + band) * self.width + x

    def in_boxes(self, holes: np.ndarray, low: np.ndarray, high: np.ndarray,
                 block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks of (query, vertex): every vertex of a ring before hole ``holes[query]`` in its component,
        inside the box ``low[query]``..``high[query]`` (x, y; shifted coordinates, inclusive)."""
        low = np.maximum(low, 0)
        high = np.minimum(high, [self.width - 1, self.bands * _BAND - 1])
        first_band, last_band = low[:, 1] // _BAND, high[:, 1] // _BAND
        rows = np.maximum(last_band - first_band + 1, 0)
        query = np.repeat(np.arange(len(holes)), rows)
        band = first_band[query] + _ramp(rows)
        component = self.component[holes][query]
        begin = np.searchsorted(self.keys, self._key(component, band, low[query, 0]), "left")
        counts = np.maximum(np.searchsorted(self.keys, self._key(component, band, high[query, 0]), "right") - begin, 0)
        for part in _blocks(counts, block):
            vertex_query = np.repeat(query[part], counts[part])
            vertex = self.order[np.repeat(begin[part], counts[part]) + _ramp(counts[part])]
            y = self.y[vertex]
            keep = ((y >= low[vertex_query, 1]) & (y <= high[vertex_query, 1])
                    & (self.vertex_rank[vertex] < self.rank[holes][vertex_query]))
            yield vertex_query[keep], vertex[keep]


def _lower(best: np.ndarray, owner: np.ndarray, distance: np.ndarray) -> None:
    """``best[o] = min(best[o], distances of o)`` for ``owner`` in ascending order (queries come in order):
    one ``minimum.reduceat`` over the runs, faster than ``np.minimum.at``."""
    if distance.size:
        runs = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        best[owner[runs]] = np.minimum(best[owner[runs]], np.minimum.reduceat(distance, runs))


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0]-1, 0, 1, ..., counts[1]-1, ...: positions inside repeated runs."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


def _blocks(sizes: np.ndarray, limit: int) -> list[slice]:
    """Consecutive slices of ``sizes`` whose sums stay within ``limit`` (an item larger than it alone)."""
    ends = np.cumsum(sizes)
    blocks, start = [], 0
    while start < len(sizes):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + limit, "right")), start + 1)
        blocks.append(slice(start, stop))
        start = stop
    return blocks
