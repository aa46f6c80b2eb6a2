"""The byte-level text tasks (``eval/lra/bytetext.py``) keep their promises.

* cleaning drops what names files or licences (SPDX lines, comments, anchors, toctrees, kernel-doc) and the title,
  and keeps prose and admonition text (runs without the corpus);
* chunks are 1-4 kB of UTF-8 prose without NUL bytes, none repeats, the same seed gives the same corpus and another
  seed another;
* every file's chunks sit in one split, so splits share no source, files that copy each other share a split,
  and each book is dealt ~80 / 10 / 10;
* text: labels are the chunk's book, every class is in every split in about the same proportions;
* retrieval: exactly half the pairs share a file, the others never do (nor a near-duplicate group), no pair repeats,
  about half the negatives come from the same book;
* splits survive a save / load round trip, and ``padded`` pads with 0.

The corpus tests skip cleanly where the Debian package is not installed.
"""
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'eval' / 'lra'))
sys.path.insert(0, str(ROOT / 'eval'))  # builder.py: the one model builder
import bytetext  # noqa: E402

BOOKS = ('RCU', 'sound', 'virt', 'scsi', 'process', 'trace', 'core-api')   # ~1/8 of the corpus: ~0.5 s a build
CLASSES = BOOKS


def _corpus(seed: int) -> bytetext.Corpus:
    try:
        return bytetext.build_corpus(seed=seed, books=BOOKS)
    except FileNotFoundError:
        pytest.skip(f'needs the Debian package {bytetext.PACKAGE}: {bytetext.INSTALL}')


@pytest.fixture(scope='module')
def corpus():
    return _corpus(0)


@pytest.fixture(scope='module')
def retrieval(corpus):
    return bytetext.make_retrieval(corpus, counts=(1000, 100, 100), seed=0)


def test_clean_drops_markup_and_title():
    src = '\n'.join([
        '.. SPDX-License-Identifier: GFDL-1.1-no-invariants-or-later',
        '.. _netdev-foo:', '',
        '==========', 'Foo driver', '==========', '',
        'The foo driver moves packets.', '',
        '.. toctree::', '   :maxdepth: 1', '', '   networking/bar', '',
        '.. kernel-doc:: include/linux/foo.h', '   :internal:', '',
        '.. note:: Keep the lock.', '',
        '.. code-block:: c', '   :linenos:', '', '   foo_init();', '',
        '.. a comment naming', '   Documentation/networking', '',
        'Another paragraph.', '.. [1] A footnote.'])
    out = bytetext.clean(src)
    for gone in ('SPDX', 'netdev-foo', 'Foo driver', 'toctree', 'maxdepth', 'networking/bar', 'kernel-doc',
                 'internal', 'code-block', 'linenos', 'comment', 'Documentation/'):
        assert gone not in out, gone
    for kept in ('The foo driver moves packets.', 'Keep the lock.', 'foo_init();', 'Another paragraph.',
                 '.. [1] A footnote.'):
        assert kept in out, kept
    assert out.startswith('The foo driver')


class _FixedTarget:
    """A stand-in for the generator: every target length is ``n`` bytes."""

    def __init__(self, n: int):
        self.n = n

    def uniform(self, lo: float, hi: float) -> float:
        return math.log(self.n)


def test_chunking_cuts_at_breaks():
    para = b'word ' * 60 + b'end.'
    data = b'\n\n'.join([para] * 40)
    chunks = bytetext.chunk_document(data, _FixedTarget(3000))
    assert len(chunks) >= 3 and all(bytetext.MIN_BYTES <= len(c) <= 3000 for c in chunks)
    assert all(c.startswith(b'word') and c.endswith(b'end.') for c in chunks)   # whole paragraphs
    # no break at all: cut inside the line, never inside a UTF-8 character
    blob = ('\u00e9t\u00e9 ' * 3000).encode()
    chunks = bytetext.chunk_document(blob, np.random.default_rng(0))
    assert chunks and all(bytetext.MIN_BYTES <= len(c) <= bytetext.MAX_BYTES for c in chunks)
    for c in chunks:
        c.decode('utf-8')


def test_near_duplicates_grouped():
    shared = [f'shared line number {i} that is long enough to count as a fingerprint'.encode() for i in range(5)]
    own = [[f'file {f} own line {i} that is long enough to count as a fingerprint'.encode() for i in range(5)]
           for f in range(4)]
    boiler = b'boilerplate licence line shared by every file in the corpus, far too common'
    texts = [b'\n'.join(shared + own[0]), b'\n'.join(own[1] + shared[:4]), b'\n'.join(own[2] + [boiler]),
             b'\n'.join(own[3] + [boiler] + shared[:1])]
    texts += [b'\n'.join([boiler, f'filler {i} '.encode() * 8]) for i in range(bytetext.NEAR_DUP_MAX_FILES)]
    group = bytetext.near_duplicate_groups(texts)
    assert group[0] == group[1]                       # 4-5 long lines in common
    assert len(set(group[2:].tolist())) == len(texts) - 2   # one shared line, or boilerplate only: apart


def test_chunks_in_range_unique_and_clean(corpus):
    chunks = corpus.chunks
    assert len(chunks) > 500
    assert all(bytetext.MIN_BYTES <= len(c) <= bytetext.MAX_BYTES for c in chunks)
    assert all(b'\x00' not in c for c in chunks)
    assert len(set(chunks)) == len(chunks)
    assert min(bytetext.prose_share(c) for c in chunks) >= bytetext.MIN_PROSE
    markup = re.compile(rb'(?m)^\.\. (SPDX-License|_[\w-]+:|toctree::|kernel-doc::|include::)')
    for c in chunks:
        c.decode('utf-8')   # whole characters only
        assert not markup.search(c), c[:200]
    assert set(corpus.books) == set(BOOKS)
    assert np.bincount(corpus.source).max() <= bytetext.MAX_CHUNKS_PER_FILE


def test_deterministic_per_seed(corpus):
    again, other = _corpus(0), _corpus(1)
    assert again.chunks == corpus.chunks and np.array_equal(again.split_of, corpus.split_of)
    assert again.config['corpus_sha256'] == corpus.config['corpus_sha256'] == other.config['corpus_sha256']
    assert other.chunks != corpus.chunks


def test_splits_by_source(corpus):
    splits = bytetext.make_text(corpus, CLASSES)
    sources = [set(splits[s]['source'].tolist()) for s in bytetext.SPLITS]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    for s, name in enumerate(bytetext.SPLITS):
        assert (corpus.split_of[splits[name]['source']] == s).all()
    for g in np.unique(corpus.group):
        assert len(set(corpus.split_of[corpus.group == g].tolist())) == 1   # copies share a split
    # and so no held-out chunk is a copy: at most half of its fingerprint lines occur in training
    lines = [bytetext.fingerprint_lines(c) for c in corpus.chunks]
    split = corpus.split_of[corpus.source]
    train = {line for i in np.nonzero(split == 0)[0] for line in lines[i]}
    copied = [np.mean([line in train for line in lines[i]]) for i in np.nonzero(split > 0)[0] if lines[i]]
    assert max(copied) <= 0.5, max(copied)
    for book in BOOKS:
        n = np.array([(np.array(corpus.books)[splits[name]['source']] == book).sum() for name in bytetext.SPLITS])
        assert 0.65 < n[0] / n.sum() < 0.92 and n[1] > 0 and n[2] > 0, (book, n)


def test_text_labels_are_books_and_stratified(corpus):
    splits = bytetext.make_text(corpus, CLASSES)
    shares = []
    for name in bytetext.SPLITS:
        split = splits[name]
        books = [corpus.books[i] for i in split['source']]
        assert [CLASSES[y] for y in split['labels']] == books
        assert len(bytetext.documents(split)) == len(split['labels'])
        shares.append(np.bincount(split['labels'], minlength=len(CLASSES)) / len(split['labels']))
    assert (shares[1] > 0).all() and (shares[2] > 0).all()
    assert np.abs(shares[0] - shares[2]).max() < 0.12


def test_retrieval_pairs(corpus, retrieval):
    for name, n in zip(bytetext.SPLITS, (1000, 100, 100)):
        split = retrieval[name]
        pairs, labels, src = split['pairs'], split['labels'], split['source']
        assert pairs.shape == (n, 2) and labels.sum() * 2 == n
        assert pairs.min() >= 0 and pairs.max() < len(src) and (pairs[:, 0] != pairs[:, 1]).all()
        same = src[pairs[:, 0]] == src[pairs[:, 1]]
        assert np.array_equal(same, labels.astype(bool))
        groups = corpus.group[src]
        assert (groups[pairs[labels == 0, 0]] != groups[pairs[labels == 0, 1]]).all()   # no copies as negatives
        assert len({tuple(sorted(p)) for p in pairs.tolist()}) == n
        books = np.array(corpus.books)[src]
        hard = (books[pairs[:, 0]] == books[pairs[:, 1]])[labels == 0].mean()
        assert 0.35 < hard < 0.8, hard


def test_round_trip_and_padding(tmp_path, retrieval):
    path = tmp_path / 'r.npz'
    bytetext.save(retrieval, path, dict(task='retrieval'))
    loaded, config = bytetext.load_bytetext(path=path)
    assert config == dict(task='retrieval')
    for name in bytetext.SPLITS:
        for key, value in retrieval[name].items():
            assert np.array_equal(loaded[name][key], value), (name, key)
    x, lengths = bytetext.padded(loaded['test'])
    assert x.dtype == np.uint8 and x.shape == (len(lengths), bytetext.MAX_BYTES)
    docs = bytetext.documents(loaded['test'])
    assert [x[i, :n].tobytes() for i, n in enumerate(lengths)] == docs
    assert all((x[i, n:] == 0).all() and (x[i, :n] > 0).all() for i, n in enumerate(lengths))


def test_sequence_benchmark_reads_text_as_padded_bytes(tmp_path, monkeypatch, corpus):
    """``train_lra.py --task text``: byte ids as saved, 0 only as padding (the mask marks exactly it), labels the
    chunks' books, and a model of 256 byte ids and max_len 4096 built for it."""
    import torch
    import train_lra
    splits = bytetext.make_text(corpus, classes=CLASSES)
    bytetext.save(splits, tmp_path / 'bytetext_text.npz', {})
    monkeypatch.setattr(bytetext, 'DATA', tmp_path)
    val = train_lra.TaskData('text', 'validation')
    x, mask, y = val.batch(torch.arange(len(val)))
    docs = bytetext.documents(splits['validation'])
    assert x.shape[0] == len(docs) and x.shape[1] == max(len(d) for d in docs)
    for row, m, doc in zip(x, mask, docs):
        assert bytes(row[~m].to(torch.uint8).tolist()) == doc and int(m.sum()) == x.shape[1] - len(doc)
    assert y.tolist() == splits['validation']['labels'].tolist()
    kw = val.model_kwargs()
    assert kw['vocab_size'] == 256 and kw['max_len'] == bytetext.MAX_BYTES


def test_retrieval_batches_pairs_for_a_two_tower_model(tmp_path, monkeypatch, retrieval):
    """``train_lra.py --task retrieval``: a batch of B pairs is (2B, L), the first documents then the second ones,
    each row its chunk's bytes; the shared-encoder model gives each pair the same logits whatever else shares its
    batch (padding changes nothing), and refuses a batch that cannot hold pairs."""
    import torch
    import models
    import train_lra
    from builder import build_model
    bytetext.save(retrieval, tmp_path / 'bytetext_retrieval.npz', {})
    monkeypatch.setattr(bytetext, 'DATA', tmp_path)
    val = train_lra.TaskData('retrieval', 'validation')
    assert len(val) == len(retrieval['validation']['labels'])
    idx = val.by_length[[0, -1]]  # the shortest and the longest pair: the first pads a lot
    x, mask, y = val.batch(idx)
    docs = bytetext.documents(retrieval['validation'])
    pairs = retrieval['validation']['pairs'][idx.numpy()]
    for row, m, doc in zip(x, mask, [docs[a] for a in pairs[:, 0]] + [docs[b] for b in pairs[:, 1]]):
        assert bytes(row[~m].to(torch.uint8).tolist()) == doc
    assert y.tolist() == retrieval['validation']['labels'][idx.numpy()].tolist()
    kw = dict(val.model_kwargs(), embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    model = models.DualEncoderClassifier(build_model('ldn', sequence=True, **dict(kw, num_classes=0)), 16).eval()
    with torch.no_grad():
        both = model(x, mask)
        alone_x, alone_mask, _ = val.batch(idx[:1])
        torch.testing.assert_close(model(alone_x, alone_mask), both[:1], rtol=1e-4, atol=1e-5)
    assert both.shape == (2, 2)
    with pytest.raises(ValueError, match='2B rows'):
        model(x[:3], mask[:3])
