"""The Pathfinder generator (``eval/lra/pathfinder.py``) keeps its promises.

* arrays: uint8 images (n, size, size) scaled to a maximum of 255, uint8 labels, exactly half positive;
* the same seed gives the same images, another seed others; no image repeats; splits are 80 / 10 / 10, each
  balanced, disjoint, and survive a save / load round trip;
* labels are right: in the generator's bookkeeping the markers sit on the first tip and the last tip of the marked
  contours (the same one iff positive), and on an *undashed* drawing of every contour (each gap bridged) the two
  markers are connected iff the label is positive, so no contour touches another;
* markers are drawn at full brightness.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'eval' / 'lra'))
import pathfinder  # noqa: E402


@pytest.fixture(scope='module')
def hard32():
    return pathfinder.make_pathfinder(40, 32, pathfinder.DIFFICULTY['hard'], seed=0, return_paths=True)


@pytest.fixture(scope='module')
def hard128():
    return pathfinder.make_pathfinder(4, 128, pathfinder.DIFFICULTY['hard'], seed=0, return_paths=True)


def test_arrays_and_balance(hard32, hard128):
    for (images, labels, _), size in ((hard32, 32), (hard128, 128)):
        n = len(labels)
        assert images.shape == (n, size, size) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0, 1} and labels.sum() == n // 2
        assert (images.reshape(n, -1).max(1) == 255).all()
        assert (images > 0).mean() > 0.05   # contours, not just two discs


@pytest.mark.parametrize('difficulty', ['easy', 'intermediate'])
def test_deterministic_per_seed(difficulty):
    length = pathfinder.DIFFICULTY[difficulty]
    a, la = pathfinder.make_pathfinder(12, 32, length, seed=5, batch=256)
    b, lb = pathfinder.make_pathfinder(12, 32, length, seed=5, batch=256)
    c, _ = pathfinder.make_pathfinder(12, 32, length, seed=6, batch=256)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_no_duplicates(hard32):
    images = hard32[0]
    assert len({im.tobytes() for im in images}) == len(images)


def test_bookkeeping_marks_the_right_tips(hard32, hard128):
    for images, labels, paths in (hard32, hard128):
        length = pathfinder.DIFFICULTY['hard']
        for i, label in enumerate(labels):
            origin, far = paths['marked'][i]
            assert (origin == far) == bool(label)
            slots = [np.nonzero(paths['contour'][i] == c)[0] for c in (origin, far)]
            assert len(slots[0]) == len(slots[1]) == length   # targets are never shortened
            assert np.allclose(paths['markers'][i, 0], paths['paddles'][i, slots[0][0], 0])
            assert np.allclose(paths['markers'][i, 1], paths['paddles'][i, slots[1][-1], 1])


def _undashed(paths, i: int, size: int, scale: int) -> np.ndarray:
    """Every contour drawn as a 1-cell polyline through its paddles *and* its gaps, at ``scale`` cells per px."""
    canvas = np.zeros((size * scale, size * scale), bool)
    contour, paddles = paths['contour'][i], paths['paddles'][i]
    for c in np.unique(contour[contour >= 0]):
        chain = paddles[contour == c].reshape(-1, 2)          # start0, end0, start1, end1, ...
        for p, q in zip(chain[:-1], chain[1:]):
            t = np.linspace(0, 1, int(np.linalg.norm(q - p) * scale * 4) + 2)[:, None]
            cells = np.clip(np.floor((p + t * (q - p)) * scale).astype(int), 0, size * scale - 1)
            canvas[cells[:, 0], cells[:, 1]] = True
    return canvas


def _connected(fg: np.ndarray, a, b) -> bool:
    """Whether cells ``a`` and ``b`` of ``fg`` are 8-connected (flood fill by repeated dilation)."""
    reach = np.zeros_like(fg)
    reach[a] = True
    while True:
        grown = np.pad(reach, 1)
        grown = np.logical_or.reduce([grown[1 + dy:grown.shape[0] - 1 + dy, 1 + dx:grown.shape[1] - 1 + dx]
                                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]) & fg
        if (grown == reach).all():
            return bool(reach[b])
        reach = grown


def test_undashed_contours_connect_markers_iff_positive(hard32, hard128):
    for (images, labels, paths), size, scale in ((hard32, 32, 4), (hard128, 128, 1)):
        for i in range(min(len(labels), 16)):
            fg = _undashed(paths, i, size, scale)
            ends = [tuple(np.floor(m * scale).astype(int)) for m in paths['markers'][i]]
            assert fg[ends[0]] and fg[ends[1]]
            assert _connected(fg, *ends) == bool(labels[i]), f'{size} px image {i}'


def test_markers_drawn_bright(hard32, hard128):
    for images, _, paths in (hard32, hard128):
        for i in range(len(images)):
            for y, x in np.floor(paths['markers'][i]).astype(int):
                assert images[i, y, x] >= 250


def test_splits_and_round_trip(tmp_path):
    splits = pathfinder.build_splits(32, 'easy', n=40, seed=1)
    assert [len(splits[s][1]) for s in pathfinder.SPLITS] == [32, 4, 4]
    for images, labels in splits.values():
        assert labels.sum() * 2 == len(labels)
    keys = [im.tobytes() for s in pathfinder.SPLITS for im in splits[s][0]]
    assert len(set(keys)) == len(keys)
    path = tmp_path / 'pf.npz'
    pathfinder.save_splits(splits, path)
    loaded = pathfinder.load_pathfinder(path=path)
    for s in pathfinder.SPLITS:
        assert all(np.array_equal(x, y) for x, y in zip(loaded[s], splits[s]))


def test_grid_picture(tmp_path, hard32):
    out = tmp_path / 'grid.png'
    pathfinder.draw_examples(hard32[0], hard32[1], out)
    assert out.stat().st_size > 1000


def test_sequence_benchmark_reads_pathfinder_as_1024_pixel_steps(tmp_path, monkeypatch):
    """``train_lra.py --task pathfinder32_easy``: images in row-major order as (N, 1024, 1) steps, normalised by the
    training pixels' mean / std, labels 0 / 1 unchanged, and a 2-class model of max_len 1024 built for it."""
    import torch
    import tasks
    import train_lra
    splits = pathfinder.build_splits(32, 'easy', n=40, seed=1)
    pathfinder.save_splits(splits, tmp_path / 'pathfinder32_easy.npz')
    monkeypatch.setattr(pathfinder, 'DATA', tmp_path)
    val = train_lra.TaskData('pathfinder32_easy', 'validation')
    x, mask, y = val.batch(torch.arange(len(val)))
    images, labels = splits['validation']
    train = splits['train'][0].astype(np.float64)
    expected = (images.reshape(len(images), -1) - train.mean()) / train.std(ddof=1)
    assert x.shape == (4, 1024, 1) and mask is None
    np.testing.assert_allclose(x[..., 0].numpy(), expected, rtol=1e-4, atol=1e-4)
    assert y.tolist() == labels.tolist()
    assert val.model_kwargs() == dict(num_classes=2, in_features=1, max_len=1024)
    assert 'pathfinder32_hard' in tasks.TASKS


def test_parallel_generation_is_deterministic_balanced_and_one_worker_is_the_serial_generator():
    length = pathfinder.DIFFICULTY['easy']
    a, la = pathfinder.make_pathfinder_parallel(41, 32, length, seed=3, workers=2)
    b, lb = pathfinder.make_pathfinder_parallel(41, 32, length, seed=3, workers=2)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.shape == (41, 32, 32) and abs(int(la.sum()) - 20) <= 1
    assert len({im.tobytes() for im in a}) == 41
    serial = pathfinder.make_pathfinder(12, 32, length, seed=3)
    one = pathfinder.make_pathfinder_parallel(12, 32, length, seed=3, workers=1)
    assert all(np.array_equal(x, y) for x, y in zip(serial, one))
