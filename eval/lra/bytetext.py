"""Byte-level text tasks in the style of Long Range Arena, built from the Linux kernel's documentation as Debian
ships it (LRA's own IMDb and ACL Anthology data cannot be downloaded here).

    apt-get install linux-doc-6.1                  # Debian 12 (bookworm); newer Debian: linux-doc (the meta package)
    python eval/lra/bytetext.py --task text        # -> eval/data/lra/bytetext_text.npz, eval/results/lra/..._text.json
    python eval/lra/bytetext.py --task retrieval   # -> eval/data/lra/bytetext_retrieval.npz, ..._retrieval.json

Source: Debian's ``linux-doc-6.1`` (``/usr/share/doc/linux-doc-6.1/Documentation``, the kernel's reStructuredText and
plain-text sources, gzipped), GPL-2.0 as a whole (Debian's ``copyright`` file; single files carry their own SPDX
line, mostly GPL-2.0, the media books GFDL-1.1-no-invariants-or-later, a few CC-BY-4.0 or dual-licensed). Why this
corpus (issue #28, item 2): no Debian-main or PyPI package reachable here ships labelled reviews or a collection of
books by many authors; these ~2,600 documents (~21 MB of English prose by hundreds of authors) are the largest such
body found, and each has a natural label, the book (top-level directory) it belongs to.

Construction (deterministic for a seed and a package version; both, and a hash of the input, go into the config):

* documents: every ``.rst`` / ``.txt`` file below a top-level directory ("book") not in ``SKIP_BOOKS`` (translations:
  not English; devicetree, ABI, netlink, features: schema or list formats; sphinx: build scripts), except
  ``index.rst`` (navigation only); a file whose bytes repeat an earlier file's is dropped;
* cleaning, so that no markup gives the book away: the SPDX line (it tells the media books' GFDL apart), reST
  comments, anchors (``.. _networking-foo:``) and the directives that only point at files (``toctree``,
  ``kernel-doc``, ``include``, ``raw``, ...) are removed with their indented blocks, other directive lines
  (``.. code-block:: c``, ``.. note::``) leave only their inline text, and the document's title (its first heading,
  often the file or driver name) is dropped;
* chunks: the cleaned bytes are cut into consecutive pieces of ``MIN_BYTES``-``MAX_BYTES`` bytes, each target length
  drawn log-uniformly (median ~2 kB, LRA IMDb's reviews are ~1-2 kB), cut at the last paragraph break before the
  target, else the last line break, else a UTF-8 character boundary; a tail shorter than ``MIN_BYTES`` is dropped,
  so is a chunk with less than ``MIN_PROSE`` letters and spaces (register tables, hex dumps, ASCII art); at most
  ``MAX_CHUNKS_PER_FILE`` chunks per file are kept (a random subset), so a few long files (kernel-parameters.txt)
  do not dominate; exact repeats of a chunk are dropped. A chunk is plain UTF-8 without NUL bytes, so byte 0 can
  serve as padding;
* splits by source: files that copy each other (many shared long lines: ``near_duplicate_groups``) form one group;
  within each book the groups are shuffled and dealt to train / validation / test so that each holds ~80 / 10 / 10 %
  of the book's chunks; every chunk of a file lands in its group's split, so test chunks come from files never seen
  in training, nor copied from one (the same file split serves both tasks);
* ``text`` (LRA's IMDb byte-level task): label = the book, one of ``TEXT_CLASSES`` (the books with >= ~200 chunks;
  the CPU-architecture books merged into ``arch``, as the kernel's own ``arch.rst`` groups them). The label is the
  register and subject matter of a whole document: the same subsystems turn up in several books (media, power
  management and memory appear in admin-guide, driver-api and userspace-api alike) and no header is left to read;
  classes are not balanced (admin-guide is the largest), so the statistics give the majority-class rate;
* ``retrieval`` (LRA's AAN task, a two-tower model with a shared encoder): a pair of chunks of one split, label 1
  when both come from the same file, 0 otherwise; exactly half positive; positives pick a file with probability
  proportional to its chunk count, then two distinct chunks of it; negatives pair a random chunk with a chunk of
  another file, for ``HARD_NEGATIVES`` of them a file of the same book (so the book's topic alone cannot answer),
  for the rest any other file, never one of the same near-duplicate group; no pair repeats, and each pair's order
  is random. Every book outside ``SKIP_BOOKS`` takes part. ``RETRIEVAL_PAIRS`` = 30k / 3k / 3k (LRA: 147k / 18k /
  17k) uses 34-42 % of the distinct same-file pairs of each split; more would mostly repeat the long files' chunks.

Sizes (seed 0, linux-doc-6.1 6.1.192-3): text 6,084 / 773 / 727 chunks from 1,327 / 169 / 177 files, 14 classes,
majority class (admin-guide) 17.6 / 17.2 / 19.5 %; retrieval 30,000 / 3,000 / 3,000 pairs over 7,803 / 970 / 895
chunks from 1,740 / 226 / 221 files; chunk length median ~1.75 kB, mean ~1.96 kB. LRA's IMDb has 25k / 25k reviews:
this corpus is ~4x smaller. Generation on this 2-core machine (shared with training runs, nice 19): ~5 s (text),
~8 s (retrieval), ~150 MB of memory.
"""
import argparse
import gzip
import hashlib
import json
import math
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / 'data' / 'lra'
RESULTS = HERE.parent / 'results' / 'lra'
PACKAGE = 'linux-doc-6.1'
INSTALL = f'apt-get install {PACKAGE}'
DOC_GLOB = '/usr/share/doc/linux-doc-*/Documentation'
SPLITS = ('train', 'validation', 'test')
FRACTIONS = (0.8, 0.1, 0.1)
TASKS = ('text', 'retrieval')

MIN_BYTES, MAX_BYTES = 1024, 4096
MIN_PROSE = 0.6              # letters + spaces per byte; prose is ~0.8, flat tables and hex dumps ~0.3-0.5
MAX_CHUNKS_PER_FILE = 32
NEAR_DUP_LINE = 40           # lines of at least this many bytes (stripped), half of them letters, fingerprint a file
NEAR_DUP_MAX_FILES = 10      # ... unless they are boilerplate shared by more files than this
NEAR_DUP_SHARED = (3, 0.3, 20)   # files sharing >= 3 such lines and >= 30 % of the smaller file's, or >= 20: one group
HARD_NEGATIVES = 0.5         # share of retrieval negatives whose partner comes from the same book
RETRIEVAL_PAIRS = (30_000, 3_000, 3_000)

SKIP_BOOKS = frozenset({'translations', 'devicetree', 'ABI', 'netlink', 'features', 'sphinx', 'sphinx-static',
                        'images', 'output'})
ARCH_BOOKS = frozenset({'arc', 'arm', 'arm64', 'ia64', 'loongarch', 'm68k', 'mips', 'nios2', 'openrisc', 'parisc',
                        'powerpc', 'riscv', 's390', 'sh', 'sparc', 'x86', 'xtensa', 'ia32', 'um'})
TEXT_CLASSES = ('admin-guide', 'networking', 'driver-api', 'userspace-api', 'filesystems', 'arch', 'hwmon', 'trace',
                'process', 'RCU', 'sound', 'core-api', 'virt', 'scsi')

# directives whose block only points at other files or build machinery: dropped with their indented body
DROP_BLOCK = frozenset({'toctree', 'kernel-doc', 'include', 'literalinclude', 'kernel-include', 'raw', 'only',
                        'kernel-figure', 'figure', 'image', 'kernel-render', 'kernel-abi', 'kernel-feat',
                        'tabularcolumns', 'cssclass', 'class', 'contents', 'highlight', 'index', 'math',
                        'sectionauthor', 'c:namespace', 'c:namespace-push', 'c:namespace-pop', 'default-domain'})
# admonitions keep the text that follows ``::`` on their own line
ADMONITIONS = frozenset({'note', 'warning', 'attention', 'important', 'caution', 'tip', 'hint', 'danger', 'error',
                         'seealso', 'admonition'})
_DIRECTIVE = re.compile(r'^\.\.\s+([A-Za-z][\w:-]*)::(.*)$')
_FOOTNOTE = re.compile(r'^\.\.\s+\[[^\]]+\]')
_OPTION = re.compile(r'^\s+:[\w -]+:')
_RULE = re.compile(r'^([=\-~*#^+"`\':.])\1{2,}\s*$')


@dataclass
class Document:
    path: str    # relative to the Documentation folder, without .gz
    book: str    # its top-level directory
    text: bytes  # cleaned UTF-8


@dataclass
class Corpus:
    """Chunks and where they came from: ``source[i]`` indexes ``paths`` / ``books`` / ``split_of``."""
    chunks: List[bytes]
    source: np.ndarray
    paths: List[str]
    books: List[str]
    split_of: np.ndarray                 # per source: 0 train, 1 validation, 2 test
    group: np.ndarray                    # per source: its near-duplicate group (near_duplicate_groups)
    config: Dict[str, object] = field(default_factory=dict)


def find_root(root: Optional[Path] = None) -> Path:
    """The installed ``Documentation`` folder (the newest ``linux-doc-*`` if several), or a clear error."""
    if root is not None:
        if not Path(root).is_dir():
            raise FileNotFoundError(f'{root} is not a folder')
        return Path(root)
    found = sorted(Path('/').glob(DOC_GLOB.lstrip('/')), key=lambda p: [int(x) if x.isdigit() else 0
                                                                       for x in re.split(r'[.-]', p.parent.name)])
    if not found:
        raise FileNotFoundError(f'no {DOC_GLOB}: install the corpus with `{INSTALL}` (Debian main, GPL-2.0).')
    return found[-1]


def package_version(root: Path) -> str:
    """Debian version of the package that holds ``root`` (first line of its changelog), or 'unknown'."""
    log = root.parent / 'changelog.Debian.gz'
    try:
        with gzip.open(log, 'rt', errors='replace') as f:
            m = re.match(r'\S+ \(([^)]+)\)', f.readline())
        return f'{root.parent.name} {m.group(1)}' if m else root.parent.name
    except OSError:
        return 'unknown'


def clean(text: str) -> str:
    """reST source -> the prose a reader sees, minus everything that names files or licences (module docstring)."""
    lines = text.replace('\r\n', '\n').replace('\r', '\n').split('\n')
    out: List[str] = []
    drop_indented = False    # inside the indented block of a dropped directive or comment
    drop_options = False     # right after a kept directive: its ``:option:`` lines
    for line in lines:
        indented = line[:1] in (' ', '\t')
        if drop_indented:
            if indented or not line.strip():
                continue
            drop_indented = False
        if drop_options:
            if _OPTION.match(line):
                continue
            drop_options = False
        if line.startswith('..') and (line.strip() == '..' or line.startswith('.. ')):
            directive = _DIRECTIVE.match(line)
            if _FOOTNOTE.match(line):
                out.append(line)
            elif directive is None or directive.group(1) in DROP_BLOCK:
                drop_indented = True      # a comment, an anchor, a substitution, or a pointer to files
            else:
                drop_options = True
                if directive.group(1).lower() in ADMONITIONS and directive.group(2).strip():
                    out.append(directive.group(2).strip())
            continue
        out.append(line.rstrip())
    return _drop_title('\n'.join(out)).strip('\n')


def _drop_title(text: str) -> str:
    """Without the first heading (over- and underlined, or underlined only) if the text opens with one."""
    lines = text.split('\n')
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i + 2 < len(lines) and _RULE.match(lines[i]) and lines[i + 1].strip() and _RULE.match(lines[i + 2]):
        return '\n'.join(lines[i + 3:])
    if i + 1 < len(lines) and lines[i].strip() and not _RULE.match(lines[i]) and _RULE.match(lines[i + 1]):
        return '\n'.join(lines[i + 2:])
    return text


def read_documents(root: Path, books: Optional[Iterable[str]] = None) -> List[Document]:
    """Every document of the corpus in path order, cleaned; ``books`` restricts to those top-level directories."""
    wanted = None if books is None else set(books)
    docs, seen = [], set()
    for p in sorted(root.rglob('*')):
        rel = p.relative_to(root).as_posix()
        name = rel[:-3] if rel.endswith('.gz') else rel
        parts = name.split('/')
        if len(parts) < 2 or parts[0] in SKIP_BOOKS or not name.endswith(('.rst', '.txt')):
            continue
        if parts[-1] == 'index.rst' or (wanted is not None and parts[0] not in wanted) or not p.is_file():
            continue
        raw = gzip.decompress(p.read_bytes()) if rel.endswith('.gz') else p.read_bytes()
        digest = hashlib.sha256(raw).digest()
        if digest in seen:   # the same bytes under two names: one document, not two
            continue
        seen.add(digest)
        text = clean(raw.decode('utf-8', errors='replace')).replace('\x00', '')
        docs.append(Document(name, parts[0], text.encode('utf-8')))
    return docs


def prose_share(chunk: bytes) -> float:
    return sum(chunk.count(b) for b in _PROSE_BYTES) / max(len(chunk), 1)


_PROSE_BYTES = [bytes([c]) for c in b' abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ']


def chunk_document(data: bytes, rng: np.random.Generator) -> List[bytes]:
    """Consecutive chunks of ``MIN_BYTES``-``MAX_BYTES`` bytes (module docstring), before the prose filter."""
    out, pos, n = [], 0, len(data)
    lo, hi = math.log(MIN_BYTES), math.log(MAX_BYTES)
    while True:
        while pos < n and data[pos] in b'\n':
            pos += 1
        if n - pos < MIN_BYTES:
            return out
        end = pos + int(round(math.exp(rng.uniform(lo, hi))))
        if end >= n:
            cut = nxt = n
        else:
            cut = data.rfind(b'\n\n', pos + MIN_BYTES, end)
            if cut < 0:
                cut = data.rfind(b'\n', pos + MIN_BYTES, end)
            if cut < 0:
                cut = end
                while data[cut] & 0xC0 == 0x80:   # not inside a UTF-8 character
                    cut -= 1
            nxt = cut
        piece = data[pos:cut].rstrip()
        if len(piece) >= MIN_BYTES:
            out.append(piece)
        pos = nxt


def _file_rng(seed: int, path: str, stream: int) -> np.random.Generator:
    # per file and purpose: a file's chunks do not change when another file is added or removed
    return np.random.default_rng([seed, stream, zlib.crc32(path.encode())])


def build_corpus(root: Optional[Path] = None, seed: int = 0, books: Optional[Iterable[str]] = None) -> Corpus:
    """Read, clean, chunk, filter, deduplicate and split the corpus by file (module docstring)."""
    root = find_root(root)
    docs = read_documents(root, books)
    chunks: List[bytes] = []
    source: List[int] = []
    seen = set()
    fingerprint = hashlib.sha256()
    kept_docs: List[Document] = []
    for doc in docs:
        fingerprint.update(doc.path.encode() + b'\0' + doc.text + b'\0')
        pieces = [c for c in chunk_document(doc.text, _file_rng(seed, doc.path, 0)) if prose_share(c) >= MIN_PROSE]
        if len(pieces) > MAX_CHUNKS_PER_FILE:
            keep = np.sort(_file_rng(seed, doc.path, 1).choice(len(pieces), MAX_CHUNKS_PER_FILE, replace=False))
            pieces = [pieces[i] for i in keep]
        pieces = [c for c in pieces if c not in seen]
        if not pieces:
            continue
        seen.update(pieces)
        source += [len(kept_docs)] * len(pieces)
        chunks += pieces
        kept_docs.append(doc)
    source_arr = np.asarray(source, np.int32)
    counts = np.bincount(source_arr, minlength=len(kept_docs))
    group = near_duplicate_groups([d.text for d in kept_docs])
    split_of = np.zeros(len(kept_docs), np.int8)
    by_book: Dict[str, List[int]] = {}
    for g in np.unique(group):   # a group is dealt with the book of its first file
        by_book.setdefault(kept_docs[int(np.argmax(group == g))].book, []).append(int(g))
    group_size = np.bincount(group, weights=counts)
    for book, members in sorted(by_book.items()):
        order = np.random.default_rng([seed, 2, zlib.crc32(book.encode())]).permutation(members)
        dealt = _deal(group_size[order])
        for g, s in zip(order, dealt):
            split_of[group == g] = s
    config = dict(package=package_version(root), root=str(root), corpus_sha256=fingerprint.hexdigest(), seed=seed,
                  min_bytes=MIN_BYTES, max_bytes=MAX_BYTES, min_prose=MIN_PROSE,
                  max_chunks_per_file=MAX_CHUNKS_PER_FILE, fractions=FRACTIONS, documents_read=len(docs),
                  near_dup=dict(line=NEAR_DUP_LINE, max_files=NEAR_DUP_MAX_FILES, shared=NEAR_DUP_SHARED,
                                groups_merged=int(len(kept_docs) - len(np.unique(group)))),
                  books=None if books is None else sorted(books))
    return Corpus(chunks, source_arr, [d.path for d in kept_docs], [d.book for d in kept_docs], split_of, group,
                  config)


def fingerprint_lines(text: bytes) -> set:
    """The lines that identify a text: long, and mostly letters (not table rules or ASCII-art boxes)."""
    lines = (line.strip() for line in text.split(b'\n'))
    return {line for line in lines if len(line) >= NEAR_DUP_LINE and sum(c.isalpha() for c in line.decode(
        'utf-8', 'replace')) * 2 >= len(line)}


def near_duplicate_groups(texts: Sequence[bytes]) -> np.ndarray:
    """Group id per text; texts that share many long lines (``NEAR_DUP_*``) get one id, so they share a split.

    Why: some files copy each other (the Intel Ethernet drivers' support sections, ncr53c8xx / sym53c8xx_2, hwmon
    drivers of one chip family); without grouping ~3 % of test chunks had most of their long lines in training
    files, with it ~0.4 % (none above 90 %).
    """
    max_files, (least, share, enough) = NEAR_DUP_MAX_FILES, NEAR_DUP_SHARED
    lines = [fingerprint_lines(t) for t in texts]
    where: Dict[bytes, List[int]] = {}
    for i, found in enumerate(lines):
        for line in found:
            where.setdefault(line, []).append(i)
    shared: Dict[Tuple[int, int], int] = {}
    for files in where.values():
        if 2 <= len(files) <= max_files:
            for k, a in enumerate(files):
                for b in files[k + 1:]:
                    shared[a, b] = shared.get((a, b), 0) + 1
    parent = list(range(len(texts)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), k in sorted(shared.items()):
        if k >= least and (k >= share * min(len(lines[a]), len(lines[b])) or k >= enough):
            parent[root(a)] = root(b)
    roots = [root(i) for i in range(len(texts))]
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def _deal(sizes: np.ndarray) -> np.ndarray:
    """Splits for files of ``sizes`` chunks, in the given (shuffled) order: each to the split whose gap to its
    ``FRACTIONS`` share of the total shrinks most (ties: the largest gap), so a book's chunks end up close to
    80 / 10 / 10 % even when a few long files hold many of them."""
    gap = np.asarray(FRACTIONS, float) * sizes.sum()
    out = np.zeros(len(sizes), np.int8)
    for i, n in enumerate(sizes):
        gain = np.abs(gap) - np.abs(gap - n)
        s = int(np.lexsort((-gap, -gain))[0])
        out[i], gap[s] = s, gap[s] - n
    return out


def text_class(book: str) -> str:
    return 'arch' if book in ARCH_BOOKS else book


def make_text(corpus: Corpus, classes: Sequence[str] = TEXT_CLASSES) -> Dict[str, Dict[str, np.ndarray]]:
    """``{split: {data, offsets, labels, source}}``: the chunks of the files whose book is one of ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    label_of = np.array([index.get(text_class(b), -1) for b in corpus.books], np.int64)
    out = {}
    for s, name in enumerate(SPLITS):
        keep = np.nonzero((corpus.split_of[corpus.source] == s) & (label_of[corpus.source] >= 0))[0]
        out[name] = dict(_pack([corpus.chunks[i] for i in keep]), labels=label_of[corpus.source[keep]].astype(np.uint8),
                         source=corpus.source[keep])
    return out


def make_retrieval(corpus: Corpus, counts: Sequence[int] = RETRIEVAL_PAIRS, seed: int = 0,
                   hard_negatives: float = HARD_NEGATIVES) -> Dict[str, Dict[str, np.ndarray]]:
    """``{split: {data, offsets, source, pairs (n, 2) indices into the split's chunks, labels}}`` (module docstring)."""
    out = {}
    book_id = {b: i for i, b in enumerate(sorted(set(corpus.books)))}
    books = np.array([book_id[b] for b in corpus.books])
    for s, (name, n_pairs) in enumerate(zip(SPLITS, counts)):
        rng = np.random.default_rng([seed, 3, s])
        keep = np.nonzero(corpus.split_of[corpus.source] == s)[0]
        src = corpus.source[keep]
        files, local_src = np.unique(src, return_inverse=True)
        members = [np.nonzero(local_src == f)[0] for f in range(len(files))]
        sizes = np.array([len(m) for m in members])
        file_book, file_group = books[files], corpus.group[files]
        same_book = [np.nonzero(file_book == b)[0] for b in range(len(book_id))]
        n_pos = n_pairs // 2
        possible = int((sizes * (sizes - 1) // 2).sum())
        if n_pos > possible // 2:
            raise ValueError(f'{name}: {n_pos} positive pairs wanted from {possible} possible; ask for fewer.')
        seen = set()
        pairs, labels = [], []
        p_file = np.where(sizes >= 2, sizes, 0) / np.where(sizes >= 2, sizes, 0).sum()
        while len(pairs) < n_pos:
            f = rng.choice(len(files), p=p_file)
            a, b = rng.choice(members[f], 2, replace=False)
            _add_pair(a, b, 1, seen, pairs, labels, rng)
        # negatives: the first ``hard_negatives`` share pairs an anchor with another file of its book (anchors
        # from books with one file in this split cannot), the rest with any other file
        eligible = np.nonzero(np.array([len(same_book[b]) for b in file_book])[local_src] >= 2)[0]
        n_hard = n_pos + int(round(hard_negatives * (n_pairs - n_pos)))
        while len(pairs) < n_pairs:
            hard = len(pairs) < n_hard
            a = int(rng.choice(eligible) if hard else rng.integers(len(keep)))
            fa = local_src[a]
            if hard:
                pool = same_book[file_book[fa]]
                fb = rng.choice(pool[pool != fa])
            else:
                fb = rng.integers(len(files) - 1)
                fb += fb >= fa   # any file but fa
            if file_group[fb] == file_group[fa]:   # a copy of fa's file is no negative
                continue
            _add_pair(a, int(rng.choice(members[fb])), 0, seen, pairs, labels, rng)
        order = rng.permutation(n_pairs)
        out[name] = dict(_pack([corpus.chunks[i] for i in keep]), source=src,
                         pairs=np.asarray(pairs, np.int32)[order], labels=np.asarray(labels, np.uint8)[order])
    return out


def _add_pair(a: int, b: int, label: int, seen: set, pairs: list, labels: list, rng: np.random.Generator) -> None:
    key = (min(a, b), max(a, b))
    if key in seen:
        return
    seen.add(key)
    pairs.append((a, b) if rng.random() < 0.5 else (b, a))
    labels.append(label)


def _pack(chunks: List[bytes]) -> Dict[str, np.ndarray]:
    """Chunks as one uint8 array and ``offsets`` (n + 1): chunk i is ``data[offsets[i]:offsets[i + 1]]``."""
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    return dict(data=np.frombuffer(b''.join(chunks), np.uint8).copy(), offsets=offsets)


def documents(split: Dict[str, np.ndarray]) -> List[bytes]:
    """The split's chunks as bytes."""
    data, off = split['data'], split['offsets']
    return [data[off[i]:off[i + 1]].tobytes() for i in range(len(off) - 1)]


def padded(split: Dict[str, np.ndarray], max_len: int = MAX_BYTES) -> Tuple[np.ndarray, np.ndarray]:
    """``(bytes uint8 (n, max_len) padded with 0, lengths (n,))``; chunks hold no NUL byte, so 0 marks padding."""
    off = split['offsets']
    lengths = np.minimum(np.diff(off), max_len)
    out = np.zeros((len(lengths), max_len), np.uint8)
    for i, (start, n) in enumerate(zip(off[:-1], lengths)):
        out[i, :n] = split['data'][start:start + n]
    return out, lengths


def data_path(task: str) -> Path:
    return DATA / f'bytetext_{task}.npz'


def save(splits: Dict[str, Dict[str, np.ndarray]], path: Path, config: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f'{name}_{key}': a for name, split in splits.items() for key, a in split.items()}
    np.savez_compressed(path, config=np.array(json.dumps(config)), **arrays)


def load_bytetext(task: str = 'text', path: Optional[Path] = None) -> Tuple[Dict[str, Dict[str, np.ndarray]], dict]:
    """``({split: arrays as built by make_text / make_retrieval}, config)`` as saved by ``main``."""
    path = path or data_path(task)
    if not path.is_file():
        raise FileNotFoundError(f'{path} missing: run `python eval/lra/bytetext.py --task {task}` first.')
    with np.load(path) as f:
        config = json.loads(str(f['config']))
        splits: Dict[str, Dict[str, np.ndarray]] = {name: {} for name in SPLITS}
        for key in f.files:
            name, _, field_name = key.partition('_')
            if name in splits:
                splits[name][field_name] = f[key]
    return splits, config


def statistics(task: str, splits: Dict[str, Dict[str, np.ndarray]], corpus: Corpus,
               classes: Sequence[str] = TEXT_CLASSES) -> Dict[str, object]:
    """Sizes, lengths, class balance, majority-class rate, and the checks (disjoint sources, no repeated chunk)."""
    stats: Dict[str, object] = {}
    all_chunks = [c for name in SPLITS for c in documents(splits[name])]
    sources = [set(np.unique(splits[name]['source']).tolist()) for name in SPLITS]
    for name, srcs in zip(SPLITS, sources):
        split = splits[name]
        lengths = np.diff(split['offsets'])
        labels = split['labels']
        counts = np.bincount(labels, minlength=len(classes) if task == 'text' else 2)
        entry = dict(chunks=int(len(lengths)), source_files=len(srcs),
                     length_min=int(lengths.min()), length_p10=float(np.percentile(lengths, 10)),
                     length_median=float(np.median(lengths)), length_mean=float(lengths.mean()),
                     length_p90=float(np.percentile(lengths, 90)), length_max=int(lengths.max()),
                     non_ascii_bytes=float((split['data'] >= 128).mean()),
                     majority_class=(classes[int(counts.argmax())] if task == 'text' else int(counts.argmax())),
                     majority_rate=100. * float(counts.max()) / len(labels))
        if task == 'text':
            entry['label_counts'] = {c: int(k) for c, k in zip(classes, counts)}
            # a crude leak check: how often the class's directory name is in the first 64 bytes / anywhere
            docs = documents(split)
            patterns = [_leak_pattern(c) for c in classes]
            entry['class_name_in_first_64_bytes'] = float(np.mean([bool(patterns[y].search(d[:64]))
                                                                   for d, y in zip(docs, labels)]))
            entry['class_name_anywhere'] = float(np.mean([bool(patterns[y].search(d)) for d, y in zip(docs, labels)]))
        else:
            entry.update(pairs=int(len(labels)), positives=int(labels.sum()),
                         uses_per_chunk=float(2 * len(labels) / len(lengths)))
            pairs, src = split['pairs'], split['source']
            same_book = np.array([corpus.books[src[a]] == corpus.books[src[b]] for a, b in pairs])
            entry['negatives_same_book'] = float(same_book[labels == 0].mean())
            entry['label_counts'] = {'different file': int(counts[0]), 'same file': int(counts[1])}
        stats[name] = entry
    stats['checks'] = dict(
        sources_disjoint=all(not (a & b) for i, a in enumerate(sources) for b in sources[i + 1:]),
        chunks_unique=len(set(all_chunks)) == len(all_chunks),
        no_nul_bytes=all(b'\x00' not in c for c in all_chunks),
        lengths_in_range=all(MIN_BYTES <= len(c) <= MAX_BYTES for c in all_chunks))
    return stats


def _leak_pattern(cls: str) -> 're.Pattern[bytes]':
    """The class's directory name(s) as a whole word, any case (``arch``: the architectures' names)."""
    names = sorted(ARCH_BOOKS - {'sh', 'um', 'arc'}) if cls == 'arch' else [cls]
    return re.compile(rb'(?<![\w-])(' + b'|'.join(re.escape(n.encode()) for n in names) + rb')(?![\w-])', re.I)


def build(task: str, seed: int = 0, root: Optional[Path] = None,
          books: Optional[Iterable[str]] = None) -> Tuple[Dict[str, Dict[str, np.ndarray]], Corpus]:
    """One task's splits and the corpus they came from."""
    corpus = build_corpus(root, seed, books)
    if task == 'text':
        return make_text(corpus), corpus
    if task == 'retrieval':
        return make_retrieval(corpus, seed=seed), corpus
    raise ValueError(f'unknown task {task!r}; use one of {TASKS}.')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', choices=TASKS, required=True)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--root', type=Path, default=None, help=f'the Documentation folder (default: {DOC_GLOB})')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits, corpus = build(args.task, args.seed, args.root)
    seconds = time.perf_counter() - start
    config = dict(corpus.config, task=args.task, licence='GPL-2.0 (Debian copyright of linux-doc; per-file SPDX)')
    if args.task == 'text':
        config['classes'] = list(TEXT_CLASSES)
    else:
        config.update(pairs=list(RETRIEVAL_PAIRS), hard_negatives=HARD_NEGATIVES)
    config['sources'] = corpus.paths
    path = data_path(args.task)
    save(splits, path, config)
    stats = dict(task=args.task, config={k: v for k, v in config.items() if k != 'sources'},
                 **statistics(args.task, splits, corpus), seconds=round(seconds, 1),
                 path=str(path.relative_to(HERE.parent.parent)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f'bytetext_{args.task}.json'
    out.write_text(json.dumps(stats, indent=1))
    for name in SPLITS:
        s = stats[name]
        what = (f"{s['pairs']} pairs ({s['positives']} same-file, negatives {100 * s['negatives_same_book']:.0f} % "
                f"same book), {s['chunks']} chunks" if args.task == 'retrieval' else f"{s['chunks']} chunks")
        print(f"{name:10s} {what} from {s['source_files']} files; length {s['length_min']}-{s['length_max']} "
              f"(median {s['length_median']:.0f}, mean {s['length_mean']:.0f}); majority class "
              f"{s['majority_class']} = {s['majority_rate']:.1f} %")
        if args.task == 'text':
            print('           ' + ', '.join(f'{c} {k}' for c, k in s['label_counts'].items()))
    print(f"checks: {stats['checks']}; {config['package']}; {seconds:.1f} s -> {path}, {out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
