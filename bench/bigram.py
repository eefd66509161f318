"""The LLM explainer's bigram model on the stdlib corpus.

  python -m paperjax.bench.bigram --scale=small [--only=bigram.fit]

Parts:
- fit: tokens/s of counting (paperjax's jitted scatter-add) vs numpy's bincount on the
  same tokens, side by side.
- perplexity: held-out perplexity of the bigram vs the unigram baseline, each with its
  additive smoothing chosen on a validation split; the table size on the full vocabulary.
- generate: batched generation throughput and sample text.

Data: cl100k tokens of the stdlib's source files, split 80/10/10 by file; tables use the
training split's most frequent tokens plus one "other" id (a 100k-token bigram table
would take 37 GiB).

Shapes: N tokens in a stream.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import Benchmark, Context, Plot, Result, Series, progress, time_fn
from paperjax.models.data import corpus, tokenizer
from paperjax.models.ngram import bigram
from paperjax.ops import checks

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
QUALITATIVE = "LLM explainer (qualitative)"


@checks.config
class Config:
  max_chars: int | None  # corpus budget; None = the whole stdlib
  vocab_size: int  # compact vocabulary, "other" included
  gen_batch: int
  gen_tokens: int


SMALL = Config(max_chars=None, vocab_size=4096, gen_batch=64, gen_tokens=128)
CONFIGS = {
  "ci": Config(max_chars=400_000, vocab_size=512, gen_batch=8, gen_tokens=32),
  "small": SMALL,
  "full": SMALL,  # small already runs the whole study
  "paper": Config(max_chars=None, vocab_size=8192, gen_batch=256, gen_tokens=256),
}


PARTS = ("fit", "perplexity", "generate")  # --only=bigram.<part>


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the offline fallback is expected here
    tok = tokenizer.from_name("cl100k_base")
  docs = corpus.stdlib_documents(cfg.max_chars)
  splits = corpus.split_documents(docs, (0.8, 0.1, 0.1))
  train, val, test = (corpus.tokenize(tok, part).ids_N for part in splits)
  kept = corpus.compact_vocab(train, cfg.vocab_size)
  vocab = kept.size + 1
  train_c, val_c, test_c = (corpus.to_compact(x, kept) for x in (train, val, test))

  records, plots = [], []
  notes = [
    f"Corpus: {len(docs)} stdlib files (Python {ctx.environment.python}), "
    f"{train.size:,} / {val.size:,} / {test.size:,} train / val / test tokens ({tok.name}); "
    f"compact vocabulary of {vocab} ids ({vocab - 1} most frequent training tokens + other)."
  ]

  if ctx.wants("fit"):
    records += _fit_speed(ctx, train_c, vocab)

  if ctx.wants("perplexity"):
    result = _perplexity(ctx, train_c, val_c, test_c, vocab)
    records += result[0]
    plots.append(result[1])
    full = tok.vocab_size
    for order, name in ((1, "bigram"), (2, "trigram")):
      records.append(
        ctx.record(
          f"{name} table on the full {full:,}-token vocabulary",
          bigram.table_bytes(full, order) / 2**30,
          "GiB",
          "grows as V^(k+1)",
          "LLM explainer; computed V^(k+1) x 4 bytes",
        )
      )

  if ctx.wants("generate"):
    gen_records, gen_notes = _generation(ctx, cfg, train_c, vocab, kept, tok)
    records += gen_records
    notes += gen_notes

  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


def _fit_speed(ctx: Context, train_c: np.ndarray, vocab: int):
  tokens = jnp.asarray(train_c)

  def numpy_count(x: np.ndarray) -> np.ndarray:
    return np.bincount(x[:-1].astype(np.int64) * vocab + x[1:], minlength=vocab * vocab).reshape(vocab, vocab)

  ours = time_fn(lambda: bigram.count(tokens, vocab_size=vocab), repeats=ctx.repeats)
  base = time_fn(numpy_count, train_c, repeats=ctx.repeats)
  np.testing.assert_array_equal(bigram.count(tokens, vocab_size=vocab), numpy_count(train_c))
  n = train_c.size
  return [
    ctx.record("count tokens/s, paperjax (jit scatter-add)", n / ours.median_s, "tokens/s"),
    ctx.record("count tokens/s, numpy bincount baseline", n / base.median_s, "tokens/s"),
    ctx.record("count speed-up vs numpy (same run)", base.median_s / ours.median_s, "x"),
  ]


def _perplexity(ctx: Context, train_c, val_c, test_c, vocab: int):
  counts = {order: bigram.count(train_c, vocab_size=vocab, order=order) for order in (0, 1)}
  # Both models are scored on the same positions (t >= 1) of each split.
  val_ppl: dict[int, list[float]] = {order: [] for order in counts}
  for alpha in progress(ALPHAS, "bigram: smoothing on val"):
    for order, c in counts.items():
      val_ppl[order].append(bigram.perplexity(bigram.probabilities(c, alpha=alpha), val_c, start=1))
  best = {order: ALPHAS[int(np.argmin(ppl))] for order, ppl in val_ppl.items()}
  test_ppl = {
    order: bigram.perplexity(bigram.probabilities(counts[order], alpha=best[order]), test_c, start=1)
    for order in counts
  }
  records = [
    ctx.record(f"test perplexity, unigram (alpha={best[0]:g})", test_ppl[0], "ppl"),
    ctx.record(f"test perplexity, bigram (alpha={best[1]:g})", test_ppl[1], "ppl"),
    ctx.record("bigram / unigram test perplexity", test_ppl[1] / test_ppl[0], "ratio", "< 1", QUALITATIVE),
    ctx.record("test tokens inside the compact vocabulary", float(np.mean(test_c < vocab - 1)), "fraction"),
  ]
  plot = Plot(
    "smoothing",
    "Validation perplexity vs additive smoothing",
    "alpha",
    "perplexity",
    tuple(Series(name, ALPHAS, tuple(val_ppl[order])) for order, name in ((0, "unigram"), (1, "bigram"))),
    xscale="log",
    yscale="log",
  )
  return records, plot


def _generation(ctx: Context, cfg: Config, train_c, vocab: int, kept: np.ndarray, tok):
  table = bigram.fit(train_c, vocab_size=vocab, alpha=0.0)
  eos_c = int(corpus.to_compact(np.array([tok.eos_id]), kept)[0])
  prompt_c = corpus.to_compact(np.array(tok.encode("def")), kept)[-1:]
  prompts = jnp.tile(jnp.asarray(prompt_c)[None, :], (cfg.gen_batch, 1))
  key = jax.random.key(ctx.seed)

  def gen():
    return bigram.generate(key, table, prompts, max_new_tokens=cfg.gen_tokens, temperature=1.0)

  timing = time_fn(gen, repeats=ctx.repeats)
  notes = []
  for temperature, label in ((0.0, "greedy"), (1.0, "sampled, T=1")):
    tokens, lengths = bigram.generate(key, table, prompts[:1], max_new_tokens=48, eos_id=eos_c, temperature=temperature)
    text = _decode_compact(tok, kept, np.asarray(tokens[0, : int(lengths[0])]))
    notes.append(f"Sample ({label}) after 'def': `{text!r}`")
  records = [
    ctx.record(
      f"generation tokens/s (batch {cfg.gen_batch}, {cfg.gen_tokens} steps)",
      cfg.gen_batch * cfg.gen_tokens / timing.median_s,
      "tokens/s",
    )
  ]
  return records, notes


def _decode_compact(tok: tokenizer.Tokenizer, kept: np.ndarray, ids_c: np.ndarray) -> str:
  """Text of compact ids; runs of known tokens decode together, "other" shows as <?>."""
  other = ids_c == kept.size
  pieces, start = [], 0
  for i in [*np.flatnonzero(other), ids_c.size]:
    pieces.append(tok.decode(kept[ids_c[start:i]]))
    start = i + 1
  return "<?>".join(pieces)


if __name__ == "__main__":
  app.run(cli.main_for({"bigram": Benchmark(run, PARTS)}))
