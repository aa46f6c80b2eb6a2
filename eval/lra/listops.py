"""ListOps (Nangia & Bowman 2018) as Long Range Arena generates it, written here from the published algorithm.

A sequence is a nested prefix expression over the digits 0-9 with the operators MIN, MAX, MED (median) and SM (sum
modulo 10); the label is its value (10 classes). Generation (LRA's ``listops`` generator, re-implemented):

* a node below ``max_depth`` is an operator with probability 0.25 (``VALUE_P``: a uniform draw above 0.25 makes it a
  digit), a node at ``max_depth`` is always a digit;
* an operator takes ``randint(2, max_args)`` arguments, each a sub-tree one level deeper, and its operator is drawn
  uniformly from the four;
* the token string is ``[OP a b ... ]``: the closing bracket is kept (an early LRA release stripped it, which made
  the task unsolvable: the extent of every operator became ambiguous);
* sequences are drawn until enough distinct ones fall inside ``[min_len, max_len]`` tokens (duplicates dropped across
  all splits), with one seeded ``random.Random``.

LRA: depth 10, 10 arguments, length 500-2000, 96k / 2k / 2k. Sized to a 2-core CPU here (``eval/lra/README.md``).
"""
import random
import statistics
from typing import Dict, List, Sequence, Tuple, Union

OPERATORS = ('[MIN', '[MAX', '[MED', '[SM')
END = ']'
VALUE_P = 0.25
PAD = 0
# token id 0 is padding; digits 1-10, operators 11-14, the closing bracket 15
VOCAB: Tuple[str, ...] = ('<pad>',) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_ID: Dict[str, int] = {t: i for i, t in enumerate(VOCAB)}

Tree = Union[int, Tuple[str, List['Tree']]]


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> Tree:
    r = rng.random() if depth < max_depth else 1.
    if r > VALUE_P:
        return rng.randrange(10)
    num_args = rng.randint(2, max_args)
    args = [generate_tree(rng, depth + 1, max_depth, max_args) for _ in range(num_args)]
    return rng.choice(OPERATORS), args


def evaluate(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == '[MIN':
        return min(values)
    if op == '[MAX':
        return max(values)
    if op == '[MED':
        return int(statistics.median(values))  # as LRA: the mean of the two middle values, truncated
    return sum(values) % 10


def tokens(tree: Tree) -> List[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    out = [op]
    for a in args:
        out += tokens(a)
    return out + [END]


def generate(counts: Sequence[int], seed: int = 0, min_len: int = 32, max_len: int = 512, max_depth: int = 10,
             max_args: int = 10, max_draws: int = 50_000_000) -> List[List[Tuple[List[int], int]]]:
    """``len(counts)`` disjoint splits of ``(token ids, label)`` with ``min_len <= len <= max_len`` tokens."""
    rng = random.Random(seed)
    seen = set()
    total = sum(counts)
    out: List[Tuple[List[int], int]] = []
    draws = 0
    while len(out) < total:
        draws += 1
        if draws > max_draws:
            raise RuntimeError(f'ListOps: only {len(out)} of {total} sequences in [{min_len}, {max_len}] tokens after '
                               f'{max_draws} draws: widen the length window.')
        tree = generate_tree(rng, 1, max_depth, max_args)
        toks = tokens(tree)
        if not min_len <= len(toks) <= max_len:
            continue
        key = ' '.join(toks)
        if key in seen:
            continue
        seen.add(key)
        out.append(([TOKEN_ID[t] for t in toks], evaluate(tree)))
    splits, start = [], 0
    for n in counts:
        splits.append(out[start:start + n])
        start += n
    return splits
