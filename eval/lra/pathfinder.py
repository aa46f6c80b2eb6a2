"""Pathfinder (Linsley et al. 2018) as Long Range Arena generates it, written here from the published algorithm.

    python eval/lra/pathfinder.py --size 32 --difficulty hard --n 50000   # -> eval/data/lra/pathfinder32_hard.npz
    python eval/lra/pathfinder.py --size 128 --difficulty hard --n 20000 --workers 16   # Path-X, many cores

An image holds dashed contours ("snakes": chains of short line segments, "paddles", with a gap between neighbours)
and two small discs. Label 1: the discs sit on the two ends of the same contour; label 0: on one end of each of the
two target contours. Generation (``snakes2.py`` of drewlinsley/pathfinder, the generator LRA used, re-implemented):

* two target snakes start near the centre, their origin tips ``seed_distance`` apart (the first origin at least
  ``2 * seed_distance`` from the border), and grow in lockstep, one paddle each per step, to ``contour_length``
  paddles; a snake that cannot grow kills the image (drawn again);
* a step: the next pivot lies ``margin`` beyond the last paddle's end, the next paddle runs from ``margin`` to
  ``margin + paddle_length`` past the pivot at a turn ``d`` from the last direction, drawn with weight
  ``cos(min(continuity * d, pi / 2)) ** 2`` among the turns whose paddle stays clear of everything drawn except
  its own predecessor (``continuity`` 1 allows up to 90 degrees, 1.8 up to 50);
* then ``distractor_budget // (contour_length // 3)`` distractor snakes of ``contour_length // 3`` paddles, seeded
  anywhere free, each tried 5 times and dropped if it never fits (optional single-paddle fillers likewise);
* the markers: the origin tip of a random target and the far tip of the same target (positive) or of the other one
  (negative), so in both classes one marker sits next to the other target's origin;
* paddles (width ``thickness``) and discs are rendered supersampled, paddles scaled by ``contrast``, and the image
  scaled so its maximum is 255 (``scipy.misc.imsave``'s byte scaling).

Differences, each for a reason: the original draws the label per image (here exactly half, for balanced splits);
it checks collisions on antialiased masks, here an occupancy grid (``cell`` px) does: paddles of different contours
keep their centre lines ``2 * margin + thickness`` apart (the along-contour gap plus the width), and the second
target's seed paddle must clear the first's; it lets a distractor end beside a marker, here a distractor within
``marker_radius + thickness / 2 + 1`` px of any target tip is dropped and an image whose targets come that close is
drawn again (a touching blob would join the wrong contour to a marker); LRA's formula for the distractor count is
applied per difficulty (snakes2's launcher computes it once, from the easy length), so every difficulty spends
about the same ``distractor_budget`` paddles on distractors.

LRA (``lra_benchmarks/data/pathfinder.py``, ``image/task_registry.py``): easy / intermediate / hard = contour
length 6 / 9 / 14 (``curv_baseline``, ``curv_contour_length_9``, ``curv_contour_length_14``); Pathfinder = 32 px
hard, Path-X = 128 px hard; 200k images split 80 / 10 / 10 (here the same split, each part exactly balanced).

Rate, one process on this 2-core machine shared with training runs (load ~3.5), 200 images incl. rendering:
32 px easy ~380 / s, intermediate ~230 / s, hard ~160 / s (2000 hard: ~280 / s, so 50k in ~3 min: most target pairs
die at the border and are redrawn); 128 px easy ~170 / s, hard ~27 / s.
"""
import argparse
import functools
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / 'data' / 'lra'
DIFFICULTY = {'easy': 6, 'intermediate': 9, 'hard': 14}
SPLITS = ('train', 'validation', 'test')
FRACTIONS = (0.8, 0.1, 0.1)
FREE, BORDER = -1, np.iinfo(np.int16).max
SUB, ANGLES = 4, 64   # capsule patterns (_capsule_offsets): sub-cell positions per axis, orientations
SEED_TRIES = 16       # candidate seed paddles per image and attempt
DISTRACTOR_TRIES = 5  # snakes2: max_distractor_contour_retrial = 4 retries


@dataclass(frozen=True)
class Geometry:
    """One resolution's snakes2 settings (LRA's ``Pathfinder{32,64,128}`` docstrings; lengths in pixels)."""
    paddle_length: float
    thickness: float
    margins: Tuple[int, ...]   # one drawn per image
    padding: float             # border kept empty
    seed_distance: float       # between the two targets' origin tips
    marker_radius: float
    continuity: float
    distractor_budget: int     # distractor paddles in all: count = budget // distractor length
    contrast: float            # snake_contrast * paddle_contrast
    supersample: int = 4       # rendering (snakes2: antialias_scale 2, lanczos)
    cell: float = 0.5          # occupancy-grid cell, px


GEOMETRY: Dict[int, Geometry] = {
    32: Geometry(2, 0.5, (1,), 1, 7, 1.5, 1.0, 20, 2 * 0.75),
    64: Geometry(5, 1.0, (1,), 1, 12, 2.5, 1.8, 22, 0.8),    # paddle_length not overridden: snakes2's default 5
    128: Geometry(5, 1.5, (2, 3), 1, 20, 3.0, 1.8, 35, 0.9, cell=1.0),
}


def _unit(theta: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(theta), np.cos(theta)], -1)  # (y, x), as snakes2's translate_coord


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p`` to segments ``a``-``b`` (all ``(..., 2)``, broadcast)."""
    ab, ap = b - a, p - a
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0., 1.)
    return np.linalg.norm(ap - t[..., None] * ab, axis=-1)


@functools.lru_cache(maxsize=None)
def _capsule_offsets(length: float, radius: float, cell: float) -> np.ndarray:
    """Cells (dy, dx) whose centre lies within ``radius`` of a segment of ``length``, per pattern (patterns, width, 2).

    A pattern is (position of the segment's centre inside its cell in ``SUB`` x ``SUB`` bins, orientation modulo pi
    in ``ANGLES`` bins): the shape shifts by at most ``cell / 8`` per axis and turns by at most ``pi / 128`` from the
    exact one, and drawing becomes a gather (keep-out zones on the occupancy grid and antialiased rendering alike).
    Offsets are relative to the centre's cell; rows are padded by repeating their first offset (a repeated write is
    harmless).
    """
    half = int(np.ceil((length / 2 + radius) / cell)) + 1
    oy, ox = np.mgrid[-half:half + 1, -half:half + 1]
    box = np.stack([oy.ravel(), ox.ravel()], -1)                                   # (Q, 2)
    sub = (np.arange(SUB) + .5) / SUB
    qy, qx, qa = np.meshgrid(sub, sub, (np.arange(ANGLES) + .5) * np.pi / ANGLES, indexing='ij')
    centre = np.stack([qy.ravel(), qx.ravel()], -1)                                # cell units
    arm = length / 2 / cell * _unit(qa.ravel())
    hit = _segment_distance(box[None] + .5, (centre - arm)[:, None], (centre + arm)[:, None]) < radius / cell
    width = hit.sum(1).max()
    order = np.argsort(~hit, axis=1, kind='stable')[:, :width]                    # hits first
    order = np.where(np.take_along_axis(hit, order, 1), order, order[:, :1])
    return box[order]


def _capsule_pattern(a: np.ndarray, b: np.ndarray, cell: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(cell of the centre (..., 2), pattern (...,))`` of segments ``a``-``b`` for ``_capsule_offsets``."""
    c = (a + b) / 2 / cell
    base = np.floor(c)
    q = np.minimum(((c - base) * SUB).astype(np.int64), SUB - 1)
    d = b - a
    angle = np.mod(np.arctan2(d[..., 0], d[..., 1]), np.pi)
    qa = np.minimum((angle / np.pi * ANGLES).astype(np.int64), ANGLES - 1)
    return base.astype(np.int64), (q[..., 0] * SUB + q[..., 1]) * ANGLES + qa


class _Canvas:
    """A batch of images under construction: paddles, their contour, and an occupancy grid of keep-out zones.

    The grid holds, per cell, the slot id of the paddle whose zone (centre line + ``clearance``) covers it; a zone
    is only written into free cells, so a cell keeps its oldest owner and un-stamping a dropped snake restores
    exactly the grid before it. A new paddle may enter its predecessor's zone (the gap between them is narrower
    than the clearance) and nothing else. The grid is padded with ``BORDER`` cells so stamps and look-ups near the
    edge need no bounds checks.
    """

    def __init__(self, rng: np.random.Generator, batch: int, size: int, geo: Geometry, slots: int):
        self.size, self.geo = size, geo
        self.pick = rng.integers(0, len(geo.margins), batch)   # snakes2 draws the margin per image
        self.margin = np.asarray(geo.margins, float)[self.pick]
        self.seg = np.zeros((batch, slots, 2, 2))          # paddle (start, end), (y, x) px
        self.valid = np.zeros((batch, slots), bool)
        self.alive = np.ones(batch, bool)
        tables = [_capsule_offsets(geo.paddle_length, 2 * m + geo.thickness, geo.cell) for m in geo.margins]
        self.pad = max(int(np.abs(t).max()) for t in tables) + 1
        n = int(round(size / geo.cell))
        side = n + 2 * self.pad
        width = max(t.shape[1] for t in tables)
        zones = np.stack([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), mode='edge') for t in tables])
        self.zones = zones[..., 0] * side + zones[..., 1]   # (margins, patterns, width) flat offsets
        centres = (np.arange(n) + .5) * geo.cell
        inner = np.minimum(centres, size - centres) >= geo.padding
        self.grid = np.full((batch, side, side), BORDER, np.int16)
        rows = np.arange(n)[inner] + self.pad
        self.grid[:, rows[0]:rows[-1] + 1, rows[0]:rows[-1] + 1] = FREE
        self.flat = self.grid.reshape(batch, side * side)   # a view: writes through to the grid

    def cells(self, p: np.ndarray) -> np.ndarray:
        """Flat grid index of the cell holding points ``p`` (..., 2); far-away points land in the border."""
        side = self.grid.shape[1]
        idx = np.clip(np.floor(p / self.geo.cell).astype(np.int64) + self.pad, 0, side - 1)
        return idx[..., 0] * side + idx[..., 1]

    def free(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Whether candidate paddles ``a``-``b`` (rows, K, 2) touch only free cells or paddle ``own`` (rows,)."""
        # a cell apart: every zone is over 2 * clearance > 4 cells wide, so no sample can skip across one
        steps = int(np.ceil(self.geo.paddle_length / self.geo.cell)) + 1
        t = np.linspace(0., 1., steps)[:, None]
        ids = self.flat[rows[:, None, None], self.cells(a[..., None, :] + t * (b - a)[..., None, :])]
        return ((ids == FREE) | (ids == own[:, None, None])).all(-1)

    def stamp(self, rows: np.ndarray, slot: int, a: np.ndarray, b: np.ndarray) -> None:
        """Record paddle ``slot`` = ``a``-``b`` (rows, 2) and write its keep-out zone into free cells."""
        self.seg[rows, slot, 0], self.seg[rows, slot, 1] = a, b
        self.valid[rows, slot] = True
        base, pattern = _capsule_pattern(a, b, self.geo.cell)
        side = self.grid.shape[1]
        idx = ((base[:, 0] + self.pad) * side + base[:, 1] + self.pad)[:, None] + self.zones[self.pick[rows], pattern]
        row = np.broadcast_to(rows[:, None], idx.shape)
        keep = self.flat[row, idx] == FREE
        self.flat[row[keep], idx[keep]] = slot

    def select(self, rows: np.ndarray) -> None:
        """Keep only images ``rows`` (the target phase's survivors: the distractor phase then runs on full rows)."""
        for name in ('margin', 'seg', 'valid', 'alive', 'pick', 'grid'):
            setattr(self, name, getattr(self, name)[rows])
        self.flat = self.grid.reshape(len(self.grid), self.grid.shape[1] * self.grid.shape[2])

    def unstamp(self, rows: np.ndarray, first: int, last: int) -> None:
        """Remove paddles ``first..last`` (one snake's slots) from ``rows``."""
        sub = self.grid[rows]
        sub[(sub >= first) & (sub <= last)] = FREE
        self.grid[rows] = sub
        self.valid[rows, first:last + 1] = False


def _seed(cv: _Canvas, rows: np.ndarray, slot: int, tails: np.ndarray, angles: np.ndarray):
    """Place a snake's first paddle (tail -> tail + length) at the first free of ``T`` candidates (rows, T)."""
    b = tails + cv.geo.paddle_length * _unit(angles)
    ok = cv.free(rows, tails, b, np.full(len(rows), -2))   # -2: no predecessor to enter
    found, pick = ok.any(1), ok.argmax(1)
    r = np.arange(len(rows))
    cv.stamp(rows[found], slot, tails[r, pick][found], b[r, pick][found])
    return found, b[r, pick], angles[r, pick]


def _extend(cv: _Canvas, rng: np.random.Generator, rows: np.ndarray, slot: int, end: np.ndarray,
            theta: np.ndarray):
    """One growth step of the snakes ending at ``end`` in direction ``theta`` (rows): paddle ``slot`` or failure."""
    g = cv.geo
    m = cv.margin[rows, None]
    pivot = end + m * _unit(theta)
    half = min(np.pi / (2 * g.continuity), np.pi)   # beyond it snakes2's weight is cos(pi / 2) ** 2 = 0
    # snakes2 weighs the pixels on a circle of radius paddle_length + margin around the pivot: as many turns here,
    # stratified over the window and jittered, so angles stay continuous
    turns = int(np.ceil(2 * half * (g.paddle_length + max(g.margins))))
    edges = np.linspace(-half, half, turns + 1)
    turn = edges[:-1] + rng.random((len(rows), turns)) * (edges[1] - edges[0])
    phi = theta[:, None] + turn
    u = _unit(phi)
    a = pivot[:, None] + m[..., None] * u
    b = a + g.paddle_length * u
    w = np.cos(g.continuity * turn) ** 2 * cv.free(rows, a, b, np.full(len(rows), slot - 1))
    total = w.sum(1)
    ok = total > 0
    # inverse-CDF draw; (1 - U) in (0, 1] so a zero-weight first turn is never picked
    pick = np.minimum((np.cumsum(w, 1) < (1 - rng.random(len(rows)))[:, None] * total[:, None]).sum(1), turns - 1)
    r = np.arange(len(rows))
    cv.stamp(rows[ok], slot, a[r, pick][ok], b[r, pick][ok])
    return ok, b[r, pick], phi[r, pick]


def _grow_targets(cv: _Canvas, rng: np.random.Generator, length: int) -> None:
    """The two target snakes (slots ``0..length-1`` and ``length..2*length-1``); images where they fail die."""
    g, batch = cv.geo, len(cv.alive)
    lo, hi = 2 * g.seed_distance, cv.size - 2 * g.seed_distance
    lo, hi = (lo, hi) if lo < hi else (cv.size / 2, cv.size / 2)
    rows = np.arange(batch)
    tail_a = rng.uniform(lo, hi, (batch, 1, 2))
    ok_a, end_a, th_a = _seed(cv, rows, 0, tail_a, rng.uniform(-np.pi, np.pi, (batch, 1)))
    tail_b = tail_a + g.seed_distance * _unit(rng.uniform(-np.pi, np.pi, (batch, SEED_TRIES)))
    ok_b, end_b, th_b = _seed(cv, rows, length, tail_b, rng.uniform(-np.pi, np.pi, (batch, SEED_TRIES)))
    cv.alive &= ok_a & ok_b
    end, theta = np.stack([end_a, end_b], 1), np.stack([th_a, th_b], 1)
    for step in range(1, length):
        for k in (0, 1):   # lockstep, as snakes2's two_snakes: neither target gets first pick of the space
            rows = np.nonzero(cv.alive)[0]
            ok, e, th = _extend(cv, rng, rows, k * length + step, end[rows, k], theta[rows, k])
            end[rows, k], theta[rows, k] = e, th
            cv.alive[rows[~ok]] = False


def _add_snake(cv: _Canvas, rng: np.random.Generator, first: int, length: int) -> None:
    """One distractor (slots ``first..first+length-1``) seeded anywhere free; dropped where it never fits."""
    g = cv.geo
    need = cv.alive.copy()
    for _ in range(DISTRACTOR_TRIES):
        rows = np.nonzero(need)[0]
        if not len(rows):
            return
        tails = rng.uniform(g.padding, cv.size - g.padding, (len(rows), SEED_TRIES, 2))
        ok, end, theta = _seed(cv, rows, first, tails, rng.uniform(-np.pi, np.pi, (len(rows), SEED_TRIES)))
        rows, end, theta = rows[ok], end[ok], theta[ok]
        for step in range(1, length):
            grown, end, theta = _extend(cv, rng, rows, first + step, end, theta)
            cv.unstamp(rows[~grown], first, first + length - 1)   # a half snake would be a shorter distractor
            rows, end, theta = rows[grown], end[grown], theta[grown]
        need[rows] = False


def _clear_tips(cv: _Canvas, lengths: Sequence[int]) -> None:
    """Keep every target tip ``marker_radius + thickness / 2 + 1`` px from other contours (see the docstring)."""
    g, length = cv.geo, lengths[0]
    contour = np.repeat(np.arange(len(lengths)), lengths)
    tips = cv.seg[:, [0, length - 1, length, 2 * length - 1], [0, 1, 0, 1]]       # (batch, 4, 2)
    dist = _segment_distance(tips[:, :, None], cv.seg[:, None, :, 0], cv.seg[:, None, :, 1])
    near = (dist < g.marker_radius + g.thickness / 2 + 1) & cv.valid[:, None]
    near &= contour[None, None, :] != np.array([0, 0, 1, 1])[None, :, None]
    near = near.any(1)                                                              # (batch, slots)
    cv.alive &= ~near[:, contour < 2].any(1)
    starts = np.cumsum([0] + list(lengths[:-1]))
    dropped = np.logical_or.reduceat(near, starts, axis=1)[:, contour]
    cv.valid &= ~(dropped & (contour >= 2))


def _draw_batch(rng: np.random.Generator, batch: int, size: int, geo: Geometry, lengths: Sequence[int],
                keep: int) -> _Canvas:
    """``batch`` attempts at the targets; up to ``keep`` survivors (often a small fraction) get distractors."""
    cv = _Canvas(rng, batch, size, geo, sum(lengths))
    _grow_targets(cv, rng, lengths[0])
    cv.select(np.nonzero(cv.alive)[0][:keep])
    first = 2 * lengths[0]
    for length in lengths[2:]:
        _add_snake(cv, rng, first, length)
        first += length
    _clear_tips(cv, lengths)
    return cv


def _coverage(batch: int, which: np.ndarray, a: np.ndarray, b: np.ndarray, length: float, radius: float,
              size: int, s: int) -> np.ndarray:
    """Antialiased coverage (batch, size, size) of capsules ``a``-``b`` (all of ``length``) in images ``which``."""
    offsets = _capsule_offsets(length, radius, 1. / s)
    pad = int(np.abs(offsets).max()) + 1
    hi = np.zeros((batch, size * s + 2 * pad, size * s + 2 * pad), bool)
    base, pattern = _capsule_pattern(a, b, 1. / s)
    cells = base[:, None] + offsets[pattern] + pad                                   # (capsules, width, 2)
    hi[which[:, None], cells[..., 0], cells[..., 1]] = True
    hi = hi[:, pad:pad + size * s, pad:pad + size * s]
    return hi.reshape(batch, size, s, size, s).sum((2, 4), dtype=np.float32) / s ** 2


def _render(seg: np.ndarray, valid: np.ndarray, markers: np.ndarray, geo: Geometry, size: int) -> np.ndarray:
    """uint8 images: paddles (width ``thickness``, times ``contrast``) and marker discs, maximum scaled to 255."""
    batch, s = len(seg), geo.supersample
    img, slot = np.nonzero(valid)
    lines = _coverage(batch, img, seg[img, slot, 0], seg[img, slot, 1], geo.paddle_length, geo.thickness / 2, size, s)
    pts = markers.reshape(-1, 2)
    discs = _coverage(batch, np.repeat(np.arange(batch), 2), pts, pts, 0., geo.marker_radius, size, s)
    out = np.maximum(geo.contrast * lines, discs)
    out *= 255. / out.max((1, 2), keepdims=True)
    return np.round(out).astype(np.uint8)


def _markers(seg: np.ndarray, label: np.ndarray, origin: np.ndarray, length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Marker points (n, 2, 2): the origin tip of target ``origin`` and the far tip of the same target if positive,
    of the other one if negative; and that second target (n,)."""
    far = np.where(label == 1, origin, 1 - origin)
    r = np.arange(len(seg))
    return np.stack([seg[r, origin * length, 0], seg[r, far * length + length - 1, 1]], 1), far


def make_pathfinder(n: int, size: int = 32, contour_length: int = 14, seed: int = 0, *,
                    geometry: Optional[Geometry] = None, distractors: Optional[int] = None, fillers: int = 0,
                    batch: Optional[int] = None, return_paths: bool = False):
    """``(images uint8 (n, size, size), labels uint8 (n,))``, ``n // 2`` positives, no two images alike.

    ``distractors`` defaults to LRA's ``distractor_budget // (contour_length // 3)``; ``fillers`` adds single-paddle
    snakes (snakes2's ``use_single_paddles``, off in LRA's launcher). Deterministic for ``(n, size, ..., seed)``.
    With ``return_paths`` a third item holds the bookkeeping: ``paddles`` (n, slots, 2, 2) float32 (start, end) in
    (y, x) px, ``contour`` (n, slots) int8 (0 and 1 the targets, -1 an empty slot), ``markers`` (n, 2, 2) and
    ``marked`` (n, 2) int8, the contours whose origin / far tip carry the markers.
    """
    geo = geometry or GEOMETRY[size]
    batch = batch or (2048 if size <= 32 else 256)
    length = max(1, contour_length // 3)
    count = geo.distractor_budget // length if distractors is None else distractors
    lengths = [contour_length] * 2 + [length] * count + [1] * fillers
    contour = np.repeat(np.arange(len(lengths)), lengths).astype(np.int8)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.uint8)
    images = np.zeros((n, size, size), np.uint8)
    paths = dict(paddles=np.zeros((n, len(contour), 2, 2), np.float32), contour=np.zeros((n, len(contour)), np.int8),
                 markers=np.zeros((n, 2, 2), np.float32), marked=np.zeros((n, 2), np.int8))
    seen, done, barren = set(), 0, 0
    while done < n:
        cv = _draw_batch(rng, batch, size, geo, lengths, keep=n - done)
        rows = np.nonzero(cv.alive)[0][:n - done]
        barren = 0 if len(rows) else barren + 1
        if barren > 20:
            raise RuntimeError(f'Pathfinder: 20 batches without one image ({size} px, contour {contour_length}): '
                               'the contours do not fit; shorten them or lower the distractor count.')
        origin = rng.integers(0, 2, len(rows))               # which target's origin tip is marked
        markers, far = _markers(cv.seg[rows], labels[done:done + len(rows)], origin, contour_length)
        rendered = _render(cv.seg[rows], cv.valid[rows], markers, geo, size)
        for j in range(len(rows)):
            key = hashlib.blake2b(rendered[j].tobytes(), digest_size=16).digest()
            if key in seen:
                break   # the labels were dealt in order: drop the rest of the batch rather than shift them
            seen.add(key)
            images[done] = rendered[j]
            paths['paddles'][done] = cv.seg[rows[j]]
            paths['contour'][done] = np.where(cv.valid[rows[j]], contour, -1)
            paths['markers'][done], paths['marked'][done] = markers[j], (origin[j], far[j])
            done += 1
    return (images, labels, paths) if return_paths else (images, labels)


def _make_part(args: Tuple[int, int, int, Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
    n, size, contour_length, seed = args
    return make_pathfinder(n, size, contour_length, seed)


def make_pathfinder_parallel(n: int, size: int, contour_length: int, seed: int,
                             workers: int) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`make_pathfinder` in ``workers`` processes (Path-X: ~30 images/s per core): part ``k`` is generated from
    seed ``(seed, k)``, each part balanced. Deterministic for ``(n, ..., seed, workers)``; ``workers=1`` is exactly
    :func:`make_pathfinder`. An image repeated across parts (never seen: 128 px images have ~1e4 bits of freedom)
    raises rather than being kept or silently dropped."""
    if workers <= 1:
        return make_pathfinder(n, size, contour_length, seed)
    from concurrent.futures import ProcessPoolExecutor
    sizes = [2 * (n // 2 // workers + (k < n // 2 % workers)) for k in range(workers)]
    sizes[-1] += n % 2
    jobs = [(m, size, contour_length, (seed, k)) for k, m in enumerate(sizes) if m]
    with ProcessPoolExecutor(len(jobs)) as pool:
        parts = list(pool.map(_make_part, jobs))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len({hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images}) != n:
        raise RuntimeError(f'Pathfinder: an image repeats across the {workers} worker parts; generate again with '
                           'another --seed or --workers.')
    return images, labels


def build_splits(size: int = 32, difficulty: str = 'hard', n: int = 50_000, seed: int = 0,
                 workers: int = 1) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Train / validation / test (80 / 10 / 10), each exactly balanced; one generation, so no image repeats."""
    images, labels = make_pathfinder_parallel(n, size, DIFFICULTY[difficulty], seed, workers)
    rng = np.random.default_rng([seed, 1])
    by_class = [np.nonzero(labels == c)[0] for c in (0, 1)]   # already in random order
    cuts = [np.round(np.cumsum((0.,) + FRACTIONS) * len(idx)).astype(int) for idx in by_class]
    splits = {}
    for i, name in enumerate(SPLITS):
        idx = rng.permutation(np.concatenate([p[c[i]:c[i + 1]] for p, c in zip(by_class, cuts)]))
        splits[name] = (images[idx], labels[idx])
    return splits


def data_path(size: int, difficulty: str) -> Path:
    return DATA / f'pathfinder{size}_{difficulty}.npz'


def save_splits(splits: Dict[str, Tuple[np.ndarray, np.ndarray]], path: Path,
                config: Optional[dict] = None) -> None:
    """``{split}_images`` / ``{split}_labels`` arrays, and ``config`` (how they were made) as a JSON string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f'{name}_{kind}': a for name, pair in splits.items() for kind, a in zip(('images', 'labels'), pair)}
    np.savez_compressed(path, config=np.array(json.dumps(config or {})), **arrays)


def load_pathfinder(size: int = 32, difficulty: str = 'hard',
                    path: Optional[Path] = None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 (N, size, size), labels uint8 (N,))}`` as saved by ``main``."""
    path = path or data_path(size, difficulty)
    if not path.is_file():
        raise FileNotFoundError(f'{path} missing: run `python eval/lra/pathfinder.py --size {size} '
                                f'--difficulty {difficulty}` first.')
    with np.load(path) as f:
        return {name: (f[f'{name}_images'], f[f'{name}_labels']) for name in SPLITS}


def draw_examples(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 8) -> None:
    """A grid picture: ``per_class`` positives (top rows) and negatives (bottom rows)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = 4
    rows_per_class = -(-per_class // cols)
    fig, axes = plt.subplots(2 * rows_per_class, cols, figsize=(2.2 * cols, 2.3 * 2 * rows_per_class))
    for c, label in enumerate((1, 0)):
        idx = np.nonzero(labels == label)[0][:per_class]
        for k in range(rows_per_class * cols):
            ax = axes[c * rows_per_class + k // cols, k % cols]
            ax.axis('off')
            if k < len(idx):
                ax.imshow(images[idx[k]], cmap='gray', vmin=0, vmax=255, interpolation='nearest')
                ax.set_title(f"{'positive' if label else 'negative'} #{idx[k]}", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=32, choices=sorted(GEOMETRY))
    parser.add_argument('--difficulty', default='hard', choices=list(DIFFICULTY))
    parser.add_argument('--n', type=int, default=50_000, help='images in all splits together')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--grid', type=Path, default=None, help='also draw 8 + 8 test examples to this PNG')
    parser.add_argument('--workers', type=int, default=1,
                        help='processes (Path-X on a many-core machine); another count gives other images')
    parser.add_argument('--out', type=Path, default=None, help='default: eval/data/lra/pathfinder<size>_<difficulty>.npz')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = build_splits(args.size, args.difficulty, args.n, args.seed, args.workers)
    seconds = time.perf_counter() - start
    path = args.out or data_path(args.size, args.difficulty)
    config = dict(size=args.size, difficulty=args.difficulty, contour_length=DIFFICULTY[args.difficulty], n=args.n,
                  seed=args.seed, workers=args.workers, geometry=asdict(GEOMETRY[args.size]))
    save_splits(splits, path, config)
    sizes = ' / '.join(f'{len(splits[s][1])}' for s in SPLITS)
    print(f'Pathfinder {args.size} px {args.difficulty} (contour length {DIFFICULTY[args.difficulty]}): '
          f'{sizes} train / validation / test, {args.n / seconds:.0f} images/s ({seconds:.1f} s) -> {path}')
    if args.grid:
        draw_examples(*splits['test'], args.grid)
    return 0


if __name__ == '__main__':
    sys.exit(main())
