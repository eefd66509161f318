"""The stdlib corpus: deterministic, split by a stable hash, tokenized with boundaries."""

import collections
import warnings

import numpy as np
import pytest

from paperjax.models.data import corpus, tokenizer


def test_documents_are_deterministic_and_budgeted():
  docs = corpus.stdlib_documents(max_chars=50_000)
  assert docs == corpus.stdlib_documents(max_chars=50_000)
  assert sum(len(d.text) for d in docs) == 50_000
  names = [d.name for d in docs]
  assert names == sorted(names) and all(n.endswith(".py") for n in names)
  assert not any(part in {"test", "tests", "site-packages"} for n in names for part in n.split("/"))


def test_split_is_stable_disjoint_and_complete():
  small = corpus.stdlib_documents(max_chars=200_000)
  large = corpus.stdlib_documents(max_chars=800_000)
  parts_small = corpus.split_documents(small, (0.8, 0.1, 0.1))
  parts_large = corpus.split_documents(large, (0.8, 0.1, 0.1))
  assert sum(map(len, parts_small)) == len(small)
  for part_s, part_l in zip(parts_small, parts_large):
    # A full document never changes part when the corpus grows.
    full = {d.name for d in part_s} - {small[-1].name}
    assert full <= {d.name for d in part_l}
  assert len(parts_large[0]) > len(parts_large[1]) > 0
  with pytest.raises(ValueError, match="fractions"):
    corpus.split_documents(small, (0.5, 0.4))


@pytest.fixture(scope="module")
def cl100k():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return tokenizer.from_name("cl100k_base")


def test_tokenize_separates_documents_with_eos(cl100k):
  docs = [corpus.Document("a.py", "x = 1\n"), corpus.Document("b.py", "print('hi')")]
  stream = corpus.tokenize(cl100k, docs)
  expected = cl100k.encode(docs[0].text, eos=True) + cl100k.encode(docs[1].text, eos=True)
  assert stream.ids_N.tolist() == expected
  n0 = len(cl100k.encode(docs[0].text)) + 1
  assert stream.segment_ids_N.tolist() == [0] * n0 + [1] * (len(expected) - n0)


def test_windows():
  x = np.arange(10)
  np.testing.assert_array_equal(corpus.windows(x, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
  np.testing.assert_array_equal(corpus.windows(x, 4, stride=3), [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
  with pytest.raises(ValueError, match="shorter than one window"):
    corpus.windows(x, 11)
  with pytest.raises(ValueError, match="1-D"):
    corpus.windows(x.reshape(2, 5), 2)
  with pytest.raises(ValueError, match=r"length, stride: expected positive ints, got 2\.5"):
    corpus.windows(x, 2.5)


def test_compact_vocab_matches_counter(np_rng):
  ids = np_rng.zipf(1.5, 5000) % 1000
  kept = corpus.compact_vocab(ids, 50)
  compact = corpus.to_compact(ids, kept)
  ranked = sorted(collections.Counter(ids.tolist()).items(), key=lambda kv: (-kv[1], kv[0]))
  assert kept.tolist() == [k for k, _ in ranked[:49]]
  lookup = {k: i for i, k in enumerate(kept.tolist())}
  assert compact.tolist() == [lookup.get(i, 49) for i in ids.tolist()]
  with pytest.raises(ValueError, match="size"):
    corpus.compact_vocab(ids, 1)
  with pytest.raises(TypeError, match="ids: expected integer token ids, got dtype float64"):
    corpus.compact_vocab(ids.astype(float), 50)
