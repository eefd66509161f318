"""The LLM explainer's bigram model on the stdlib corpus.

  python -m paperjax.bench.bigram --scale=small [--only=bigram.fit]

Parts:
- fit: tokens/s of counting (paperjax's jitted scatter-add) vs numpy's bincount on the
  same tokens, side by side.
- perplexity: held-out perplexity of the bigram vs the unigram baseline, each with its
  additive smoothing chosen on a validation split; the table size on the full vocabulary,
  and the bytes of the tables the code builds over a range of compact vocabularies.
- generate: batched generation throughput and sample text.

Data: cl100k tokens of the stdlib's source files, split 80/10/10 by file; tables use the
training split's most frequent tokens plus one "other" id (a 100k-token bigram table
would take 37 GiB).

Claims (`CLAIMS`, decided by the perplexity part; each a single deterministic measurement:
the split is fixed by file names, so there are no seeds to vary): the bigram's test
perplexity is below the unigram's; the bytes of the order-k table fitted here grow as
V^(k+1) (the exponent fitted over V in `TABLE_VOCABS`, in log-log, within 0.05 of k + 1).

Shapes: N tokens in a stream, C contexts (a table row), V vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import (
  Benchmark,
  ClaimSpec,
  Context,
  Plot,
  Result,
  Rule,
  Series,
  Test,
  progress,
  time_fn,
)
from paperjax.models.data import corpus, tokenizer
from paperjax.models.ngram import bigram
from paperjax.ops import checks

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
QUALITATIVE = "LLM explainer (qualitative)"
EXPLAINER = "LLM explainer article (no arXiv id), 'LLM basics' in papers/llama3.md"
TABLE_VOCABS = {1: (256, 512, 1024, 2048), 2: (32, 64, 128)}  # compact vocabularies V per order k
RATIO = "bigram / unigram test perplexity"
EXPONENT = {k: f"order-{k} table bytes: exponent in V fitted in log-log, minus {k + 1}" for k in TABLE_VOCABS}
CLAIMS = (
  ClaimSpec(
    name="the bigram beats the unigram",
    part="perplexity",
    source=EXPLAINER,
    claim="a bigram (Markov chain) model, one next-token distribution per previous token, predicts text better "
    "than token frequencies alone (the explainer's premise, in our words)",
    rule=Rule(tests=(Test(statistic=RATIO, op="<", bound=1.0, over="mean"),)),
  ),
  ClaimSpec(
    name="the table grows as V^(k+1)",
    part="perplexity",
    source=EXPLAINER,
    claim="a context window of k tokens needs V^k rows of V entries, which is why neural networks replace the table",
    rule=Rule(tests=tuple(Test(statistic=EXPONENT[k], op="|x| <=", bound=0.05, over="mean") for k in TABLE_VOCABS)),
  ),
)


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
    records += _table_growth(ctx, train)
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
    ctx.record(RATIO, test_ppl[1] / test_ppl[0], "ratio", "< 1", QUALITATIVE),
    ctx.record("test tokens inside the compact vocabulary", float(np.mean(test_c < vocab - 1)), "fraction"),
  ]
  ctx.claim(
    CLAIMS[0],
    {RATIO: test_ppl[1] / test_ppl[0]},
    note=f"Test perplexity {test_ppl[1]:.4g} (bigram, alpha {best[1]:g}) vs {test_ppl[0]:.4g} (unigram, alpha "
    f"{best[0]:g}) on {test_c.size:,} test tokens in a {vocab}-id compact vocabulary, both scored on the same "
    "positions; one deterministic measurement on a split fixed by file names.",
  )
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


def _table_growth(ctx: Context, train: np.ndarray):
  """Bytes of the order-k table fitted on the training tokens at each compact vocabulary in
  TABLE_VOCABS, and the exponent of V fitted to them (and to the cells the data fills)."""
  records: list = []
  values: dict[str, Sequence[float] | float] = {}
  filled: dict[int, float] = {}
  frequent = corpus.compact_vocab(train, max(max(v) for v in TABLE_VOCABS.values()))  # most frequent first
  for order, vocabs in TABLE_VOCABS.items():
    sizes, cells = [], []
    for v in vocabs:
      ids = corpus.to_compact(train, frequent[: v - 1])  # = compact_vocab(train, v)
      counts = bigram.count(ids, vocab_size=v, order=order)
      sizes.append(bigram.probabilities(counts, alpha=0.0).probs_CV.nbytes)
      cells.append(int(jnp.count_nonzero(counts)))
    slope = lambda y, vocabs=vocabs: float(np.polyfit(np.log(vocabs), np.log(y), 1)[0])
    values[EXPONENT[order]] = slope(sizes) - (order + 1)
    filled[order] = slope(cells)
    records += [
      ctx.record(f"order-{order} table bytes at V={vocabs[-1]}", sizes[-1], "bytes", "V^(k+1) x 4", "LLM explainer"),
      ctx.record(f"order-{order} table bytes: fitted exponent of V over V={list(vocabs)}", slope(sizes), "exponent"),
      ctx.record(f"order-{order} cells the training data fills: fitted exponent of V", filled[order], "exponent"),
    ]
  ctx.claim(
    CLAIMS[1],
    values,
    note="The bytes of the float32 table the code builds (an exact count of a dense array: this checks that the "
    "implementation stores what the explainer describes); the cells the training data fills grow with exponents "
    + ", ".join(f"{filled[k]:.2f} (k={k})" for k in filled)
    + ", which is why most of a large table is empty.",
  )
  return records


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
  app.run(cli.main_for({"bigram": Benchmark(run, PARTS, claims=CLAIMS)}))
