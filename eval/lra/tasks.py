"""The sequence tasks, generated here (LRA's own data cannot be downloaded): ListOps and (permuted) sequential
Fashion-MNIST.

    python eval/lra/tasks.py          # ListOps splits -> eval/data/lra/listops.pt; statistics -> eval/results/lra/tasks.json

* ``listops``: ``eval/lra/listops.py`` (LRA's generator re-implemented), depth 10, up to 10 arguments, 32-512 tokens,
  50k / 2k / 5k train / validation / test, seed 0. Token ids, 0 = padding.
* ``sfmnist``: each Fashion-MNIST image as 784 pixel steps, one feature each (LRA's Image task on our data),
  normalised with the training-pixel mean / std; train = the train split minus the 5k validation hold-out of
  ``eval/fmnist/fmnist_data.py``, test = the official 10k.
* ``psfmnist``: the same with one fixed permutation of the 784 positions (seed 0): no locality left, so only
  global mixing can solve it.
* ``pathfinder32_easy`` / ``pathfinder32_hard``: Pathfinder-32 (``eval/lra/pathfinder.py``, contour length 6 / 14)
  as 1,024 pixel steps, one feature each, normalised with the training-pixel mean / std, 2 classes (LRA's
  Pathfinder; generate with ``python eval/lra/pathfinder.py --size 32 --difficulty easy|hard --n 50000``).
* ``pathx``: the same at 128 px, contour length 14: 16,384 pixel steps (LRA's Path-X). Generated and trained on a
  lent GPU's machine by ``eval/lra/gpu_runs.sh`` (``TASK=pathx``); 2 CPU cores cannot train it.
* ``text``: byte-level classification of 1-4 kB chunks of the Linux kernel's documentation by book, 14 classes
  (``eval/lra/bytetext.py``, LRA's IMDb byte-level task on the corpus a Debian package ships; generate with
  ``apt-get install linux-doc-6.1 && python eval/lra/bytetext.py --task text``). Byte ids, 0 = padding.
* ``retrieval``: do two such chunks come from the same file (``bytetext.py --task retrieval``; LRA's AAN task), for
  a two-tower model (``models.DualEncoderClassifier``): a batch holds the first documents, then the second ones.
"""
import collections
import json
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / 'fmnist'))  # fmnist_tensors: the pixel tasks' Fashion-MNIST splits
import listops  # noqa: E402

DATA = HERE.parent / 'data' / 'lra'
RESULTS = HERE.parent / 'results' / 'lra'
LISTOPS = dict(counts=(50_000, 2_000, 5_000), seed=0, min_len=32, max_len=512, max_depth=10, max_args=10)
SPLITS = ('train', 'validation', 'test')
FMNIST_MEAN, FMNIST_STD = 0.2859, 0.3529
PERMUTATION_SEED = 0
# Path-X (LRA: Pathfinder-128 hard, 16,384 steps) trains only on a GPU here (eval/lra/gpu_runs.sh)
PATHFINDER_TASKS = {'pathfinder32_easy': (32, 'easy'), 'pathfinder32_hard': (32, 'hard'), 'pathx': (128, 'hard')}
TASKS = ('listops', 'sfmnist', 'psfmnist', *PATHFINDER_TASKS, 'text', 'retrieval')
TOKEN_TASKS = ('listops', 'text', 'retrieval')  # token ids with padding; the others are fixed-length pixel sequences


def make_listops(path: Path = DATA / 'listops.pt') -> Dict[str, object]:
    """Generate the ListOps splits (padded int16 ids + lengths + labels) and save them."""
    start = time.perf_counter()
    splits = listops.generate(**LISTOPS)
    out: Dict[str, object] = dict(config=LISTOPS, vocab=listops.VOCAB)
    for name, rows in zip(SPLITS, splits):
        lengths = torch.tensor([len(t) for t, _ in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int16)
        for i, (t, _) in enumerate(rows):
            ids[i, :len(t)] = torch.tensor(t, dtype=torch.int16)
        out[name] = dict(ids=ids, lengths=lengths, labels=torch.tensor([y for _, y in rows]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    out['seconds'] = time.perf_counter() - start
    return out


def load_listops(path: Path = DATA / 'listops.pt') -> Dict[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f'{path} missing: run `python eval/lra/tasks.py` first.')
    return torch.load(path, weights_only=False)


def text_classes() -> tuple:
    import bytetext
    return bytetext.TEXT_CLASSES


def load_text(split: str, task: str = 'text') -> Dict[str, torch.Tensor]:
    """``{'ids': uint8 (N, 4096) bytes, 0 = padding, 'lengths', 'labels'}`` of the byte-level text task; for
    ``retrieval`` the chunks, and ``pairs`` ``(P, 2)`` of chunk indices with their ``labels``."""
    import bytetext
    splits, _ = bytetext.load_bytetext(task)
    ids, lengths = bytetext.padded(splits[split])
    out = dict(ids=torch.from_numpy(ids), lengths=torch.from_numpy(lengths).long(),
               labels=torch.from_numpy(splits[split]['labels']).long())
    if task == 'retrieval':
        out['pairs'] = torch.from_numpy(splits[split]['pairs']).long()
    return out


def permutation() -> torch.Tensor:
    return torch.randperm(784, generator=torch.Generator().manual_seed(PERMUTATION_SEED))


def load_pixel_task(task: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sequences float32 (N, H*W, 1), labels (N,))`` of the pixel tasks: ``sfmnist`` / ``psfmnist`` (784 steps)
    and Pathfinder (``pathfinder32_*``: 1,024 steps; ``pathx``: 16,384)."""
    if task in PATHFINDER_TASKS:
        import pathfinder
        splits = pathfinder.load_pathfinder(*PATHFINDER_TASKS[task])
        train = torch.from_numpy(splits['train'][0]).float()
        mean, std = float(train.mean()), float(train.std())  # of the training pixels, as for Fashion-MNIST
        images, labels = splits[split]
        x = (torch.from_numpy(images).flatten(1).float() - mean) / std
        return x.unsqueeze(-1), torch.from_numpy(labels).long()
    import fmnist_tensors
    images, labels = fmnist_tensors.load_split_tensors(split)
    x = ((images.flatten(1).float() / 255.) - FMNIST_MEAN) / FMNIST_STD
    if task == 'psfmnist':
        x = x[:, permutation()]
    elif task != 'sfmnist':
        raise ValueError(f'unknown pixel task {task!r}; use one of {TASKS[1:]}.')
    return x.unsqueeze(-1), labels


def statistics(data: Dict[str, object]) -> Dict[str, object]:
    stats: Dict[str, object] = dict(config=data['config'])
    for name in SPLITS:
        split = data[name]
        counts = collections.Counter(split['labels'].tolist())
        lengths = split['lengths'].float()
        stats[name] = dict(size=len(split['labels']), majority_class=counts.most_common(1)[0][0],
                           majority_rate=100. * counts.most_common(1)[0][1] / len(split['labels']),
                           length_min=int(lengths.min()), length_median=float(lengths.median()),
                           length_max=int(lengths.max()), label_counts=dict(sorted(counts.items())))
    return stats


def main() -> int:
    data = make_listops()
    stats = dict(listops=statistics(data), seconds=data['seconds'])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'tasks.json').write_text(json.dumps(stats, indent=1))
    s = stats['listops']
    print(f"ListOps: {s['train']['size']}/{s['validation']['size']}/{s['test']['size']} sequences, "
          f"length {s['train']['length_min']}-{s['train']['length_max']} (median {s['train']['length_median']:.0f}); "
          f"majority class {s['test']['majority_class']} = {s['test']['majority_rate']:.1f} % of the test split "
          f"({data['seconds']:.0f} s) -> {DATA / 'listops.pt'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
