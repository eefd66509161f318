"""Post-training pipeline on a task a program can check: SFT -> reward model -> DPO/IPO/SimPO.

  python -m paperjax.bench.align --scale=small [--only=align.pipeline,align.chat]

Task (`align.tasks.SortTask`): sort 6 digits; a completion's score is the number of
positions it gets right. The SFT model learns from noisy demonstrations; preference pairs
are two demonstrations of different quality, the better one chosen by the score.
Reported: reward-model held-out accuracy, DPO implicit-reward accuracy on held-out pairs,
each policy's win rate over the SFT reference (sampled at T=1, judged by the score), and
best-of-K rejection sampling with the reward model.

Part `chat`: the same task in Llama 3's chat format (the digits a user turn, the sorted
digits the assistant's reply ending in <|eot_id|>): SFT, then DPO from the same SFT model
twice, with Llama 3's formatting-token mask (headers and <|eot_id|> out of both
log-probs) and without it; win rates over SFT and the difference.

Shapes: B prompts, T prompt width, N new tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.align import data, dpo, rejection_sampling, reward, tasks
from paperjax.align import train as align_train
from paperjax.align.data import PreferenceBatch
from paperjax.bench import cli
from paperjax.bench.harness import Benchmark, Context, Plot, Result, Series, progress
from paperjax.models.data import chat
from paperjax.models.serving import generate
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import checks

DPO_PAPER = "DPO (arXiv 2305.18290): beats the SFT model it starts from"


@checks.config
class Config:
  sft_steps: int
  rm_steps: int
  po_steps: int
  batch: int
  num_pairs: int
  eval_prompts: int
  best_of: int
  policies: tuple[str, ...] = ("DPO", "DPO+NLL", "IPO", "SimPO")  # names in POLICIES


# small: the default suite's budget (about 3 minutes); full: the longer runs of the same study.
CONFIGS = {
  "ci": Config(  # one policy with a reference model, one without: both code paths, half the compiles
    sft_steps=5,
    rm_steps=5,
    po_steps=3,
    batch=8,
    num_pairs=64,
    eval_prompts=16,
    best_of=2,
    policies=("DPO", "SimPO"),
  ),
  "small": Config(sft_steps=400, rm_steps=250, po_steps=150, batch=64, num_pairs=4096, eval_prompts=512, best_of=8),
  "full": Config(sft_steps=600, rm_steps=400, po_steps=300, batch=64, num_pairs=8192, eval_prompts=1024, best_of=8),
  "paper": Config(
    sft_steps=2000, rm_steps=1500, po_steps=1000, batch=128, num_pairs=32768, eval_prompts=4096, best_of=16
  ),
}
TASK = tasks.SortTask()
MODEL = llama.LlamaConfig(
  vocab_size=TASK.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32
)
POLICIES = {
  "DPO": dpo.PreferenceConfig(loss="sigmoid", beta=0.1),  # the DPO paper's default beta
  "DPO+NLL": dpo.PreferenceConfig(loss="sigmoid", beta=0.1, rpo_alpha=1.0),  # Llama 3's recipe (RPO)
  "IPO": dpo.PreferenceConfig(loss="ipo", beta=0.5),
  "SimPO": dpo.PreferenceConfig(loss="simpo", beta=2.5, gamma=1.375),  # the SimPO paper's recipe
}


def _train(name: str, step, state, batches, steps: int, *extra_fns):
  losses = []
  for i in progress(range(steps), f"align: {name}"):
    batch = batches(i)
    state, metrics = step(state, batch, *(f(batch) for f in extra_fns))
    losses.append(float(metrics["loss"]))
  return state, losses


def _sample(key, params, prompts, model=MODEL, stop_id=tasks.EOS):
  """T=1 samples of equal-width prompts; a chat model's stop (<|eot_id|>) reads as EOS."""
  lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  tokens, _ = generate.generate(
    key,
    params,
    model,
    jnp.asarray(prompts),
    lengths,
    max_new_tokens=TASK.completion_len,
    stop_ids=(stop_id,),
    temperature=1.0,
  )
  return np.where(np.asarray(tokens) == stop_id, tasks.EOS, np.asarray(tokens))


def _win_rate(scores: np.ndarray, ref_scores: np.ndarray) -> float:
  return float(np.mean(scores > ref_scores) + 0.5 * np.mean(scores == ref_scores))


def _tcfg(cfg: Config, steps: int, lr: float) -> train.TrainConfig:
  return train.TrainConfig(
    batch_size=cfg.batch, seq_len=16, peak_lr=lr, total_steps=steps, warmup_steps=max(1, steps // 10)
  )


PARTS = ("pipeline", "chat")  # --only=align.<part>
TIMED = False  # it times nothing: --repeats is a usage error (bench/cli.py)


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  parts = []
  if ctx.wants("pipeline"):
    parts.append(_pipeline(ctx, cfg))
  if ctx.wants("chat"):
    parts.append(_chat(ctx, cfg))
  return Result.from_parts(ctx.benchmark, parts)


def _pipeline(ctx: Context, cfg: Config) -> tuple[list, Plot, str]:
  rng = np.random.default_rng(ctx.seed)
  pick = lambda n, i: np.random.default_rng([ctx.seed, i]).integers(0, n, cfg.batch)
  records, curves = [], []

  # 1. SFT on noisy demonstrations.
  tcfg = lambda steps, lr: _tcfg(cfg, steps, lr)
  sft_prompts = TASK.prompts(rng, 8 * cfg.num_pairs)
  sft_tokens = np.concatenate([sft_prompts, TASK.demonstrations(rng, sft_prompts, 0.5)], axis=1)
  sft_mask = np.broadcast_to(np.arange(sft_tokens.shape[1]) >= TASK.prompt_len, sft_tokens.shape)
  sft_cfg = tcfg(cfg.sft_steps, 3e-3)
  state = lm.init_state(jax.random.key(ctx.seed), MODEL, sft_cfg)
  sft_step = lm.make_train_step(MODEL, sft_cfg)
  sft_batch = lambda i: align_train.sft_batch(sft_tokens[pick(len(sft_tokens), i)], sft_mask[pick(len(sft_tokens), i)])
  state, losses = _train("SFT", sft_step, state, sft_batch, cfg.sft_steps)
  sft_params = state.params
  curves.append(Series("SFT (NLL)", tuple(range(len(losses))), tuple(losses)))

  # 2. Reward model on preference pairs (trunk initialised from SFT).
  pairs = data.from_token_arrays(*TASK.preference_pairs(rng, cfg.num_pairs))
  held = data.from_token_arrays(*TASK.preference_pairs(rng, cfg.eval_prompts))
  take = lambda i: PreferenceBatch(*(x[pick(cfg.num_pairs, i)] for x in pairs))
  rm_cfg = tcfg(cfg.rm_steps, 1e-3)
  rm_params = {**reward.init(jax.random.key(ctx.seed + 1), MODEL), "model": sft_params}
  rm_state = train.start_state(rm_params, rm_cfg)
  rm_state, losses = _train("reward model", align_train.make_reward_step(MODEL, rm_cfg), rm_state, take, cfg.rm_steps)
  curves.append(Series("reward model (BT)", tuple(range(len(losses))), tuple(losses)))
  score_rows = jax.jit(lambda p, t, n: reward.rewards(p, t, n, MODEL))
  r_c = score_rows(rm_state.params, held.chosen_BT, held.chosen_lengths_B)
  r_r = score_rows(rm_state.params, held.rejected_BT, held.rejected_lengths_B)
  records.append(
    ctx.record(
      "reward model held-out pair accuracy", float(jnp.mean(r_c > r_r)), "fraction", "> 0.5", "Llama 2/3 reward models"
    )
  )

  # 3. Preference optimisation from the SFT model, reference = SFT.
  eval_prompts = TASK.prompts(np.random.default_rng([ctx.seed, 99]), cfg.eval_prompts)
  ref_tokens = _sample(jax.random.key(7), sft_params, eval_prompts)
  ref_scores = TASK.score(eval_prompts, ref_tokens)
  records.append(ctx.record("SFT mean score (of 6)", float(ref_scores.mean()), "positions"))
  reference = lambda batch: align_train.reference_logprobs(sft_params, MODEL, batch)
  for name in cfg.policies:
    pcfg = POLICIES[name]
    po_cfg = tcfg(cfg.po_steps, 5e-4)
    po_state = train.start_state(sft_params, po_cfg)
    step = align_train.make_preference_step(MODEL, po_cfg, pcfg)
    ref_fn = reference if dpo.LOSSES[pcfg.loss].reference else (lambda batch: (None, None))
    po_state, losses = _train(name, step, po_state, take, cfg.po_steps, ref_fn)
    curves.append(Series(f"{name} loss", tuple(range(len(losses))), tuple(losses)))
    scores = TASK.score(eval_prompts, _sample(jax.random.key(8), po_state.params, eval_prompts))
    win = _win_rate(scores, ref_scores)
    records.append(ctx.record(f"{name} win rate over SFT (checker, T=1)", win, "fraction", "> 0.5", DPO_PAPER))
    records.append(ctx.record(f"{name} mean score (of 6)", float(scores.mean()), "positions"))
    if name == "DPO":
      lp = dpo.PairLogProbs(*align_train.pair_logprobs(po_state.params, MODEL, held), *reference(held))
      _, metrics = dpo.preference_loss(lp, pcfg)
      records.append(
        ctx.record("DPO implicit-reward accuracy, held-out pairs", float(metrics["reward_accuracy"]), "fraction")
      )

  # 4. Rejection sampling: best of K SFT samples by the reward model.
  def rm_reward(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B):
    tokens, lengths = rejection_sampling.concat(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B)
    return score_rows(rm_state.params, tokens, lengths)

  best = rejection_sampling.best_of_k(
    jax.random.key(9),
    sft_params,
    MODEL,
    jnp.asarray(eval_prompts),
    jnp.full((len(eval_prompts),), TASK.prompt_len),
    rm_reward,
    k=cfg.best_of,
    max_new_tokens=TASK.completion_len,
    stop_ids=(tasks.EOS,),
    temperature=1.0,
  )
  best_scores = TASK.score(eval_prompts, np.asarray(best.best_BN))
  records.append(
    ctx.record(
      f"best-of-{cfg.best_of} (reward model) mean score (of 6)",
      float(best_scores.mean()),
      "positions",
      "> SFT",
      "Llama 2/3 rejection sampling",
    )
  )

  plot = Plot("training", "Post-training losses on the sorting task", "step", "loss", tuple(curves))
  note = (
    f"Sorting task: {TASK.length} digits of {TASK.num_digits}; SFT on demonstrations with 50% of positions "
    f"randomised; {cfg.num_pairs} preference pairs; {cfg.eval_prompts} held-out prompts; a "
    f"{MODEL.num_params() / 1e3:.0f}k-parameter Llama. Pairs are off-policy (demonstrations at random noise "
    "levels), where plain DPO at beta 0.1 can lower both responses' likelihoods and drift (its implicit-reward "
    "accuracy stays high while samples get worse); the NLL term on the chosen response (Llama 3) anchors it."
  )
  return records, plot, note


def _chat(ctx: Context, cfg: Config) -> tuple[list, Plot, str]:
  """DPO on chat-formatted pairs, with and without Llama 3's formatting-token mask."""
  fmt = TASK.chat_format()
  model = dataclasses.replace(MODEL, vocab_size=TASK.chat_vocab_size)
  rng = np.random.default_rng([ctx.seed, 1])
  pick = lambda n, i: np.random.default_rng([ctx.seed, 1, i]).integers(0, n, cfg.batch)
  records, curves = [], []

  prompts = TASK.prompts(rng, 8 * cfg.num_pairs)
  demos = TASK.chat_replies(TASK.demonstrations(rng, prompts, 0.5))
  rendered = [chat.render(fmt, p + d) for p, d in zip(TASK.chat_prompts(prompts), demos)]
  sft_tokens = np.stack([r.ids_T for r in rendered])
  sft_mask = np.stack([r.assistant_mask_T for r in rendered])  # the reply and its <|eot_id|>
  sft_cfg = _tcfg(cfg, cfg.sft_steps, 3e-3)
  sft_step = lm.make_train_step(model, sft_cfg)
  sft_batch = lambda i: align_train.sft_batch(sft_tokens[pick(len(sft_tokens), i)], sft_mask[pick(len(sft_tokens), i)])
  state, losses = _train(
    "chat SFT", sft_step, lm.init_state(jax.random.key(ctx.seed), model, sft_cfg), sft_batch, cfg.sft_steps
  )
  sft_params = state.params
  curves.append(Series("chat SFT (NLL)", tuple(range(len(losses))), tuple(losses)))

  def conversations(triples):
    p, c, r = triples
    return [
      {"prompt": a, "chosen": b, "rejected": d}
      for a, b, d in zip(TASK.chat_prompts(p), TASK.chat_replies(c), TASK.chat_replies(r))
    ]

  train_pairs = conversations(TASK.preference_pairs(rng, cfg.num_pairs))
  held_pairs = conversations(TASK.preference_pairs(rng, cfg.eval_prompts))
  eval_prompts = TASK.prompts(np.random.default_rng([ctx.seed, 98]), cfg.eval_prompts)
  chat_prompts = np.stack(
    [chat.render(fmt, p, add_generation_prompt=True).ids_T for p in TASK.chat_prompts(eval_prompts)]
  )
  ref_scores = TASK.score(eval_prompts, _sample(jax.random.key(7), sft_params, chat_prompts, model, fmt.eot_id))
  records.append(ctx.record("chat SFT mean score (of 6)", float(ref_scores.mean()), "positions"))
  pcfg = POLICIES["DPO"]
  wins = {}
  for masked in (True, False):
    label = "formatting masked" if masked else "formatting kept"
    pairs = data.tokenize(train_pairs, fmt, max_len=model.max_seq_len, mask_formatting=masked)
    held = data.tokenize(held_pairs, fmt, max_len=model.max_seq_len, mask_formatting=masked)
    take = lambda i, pairs=pairs: PreferenceBatch(*(x[pick(cfg.num_pairs, i)] for x in pairs))
    reference = lambda batch: align_train.reference_logprobs(sft_params, model, batch)
    po_cfg = _tcfg(cfg, cfg.po_steps, 5e-4)
    step = align_train.make_preference_step(model, po_cfg, pcfg)
    po_state, losses = _train(
      f"chat DPO, {label}", step, train.start_state(sft_params, po_cfg), take, cfg.po_steps, reference
    )
    curves.append(Series(f"chat DPO loss, {label}", tuple(range(len(losses))), tuple(losses)))
    scores = TASK.score(eval_prompts, _sample(jax.random.key(8), po_state.params, chat_prompts, model, fmt.eot_id))
    wins[masked] = _win_rate(scores, ref_scores)
    lp = dpo.PairLogProbs(*align_train.pair_logprobs(po_state.params, model, held), *reference(held))
    _, metrics = dpo.preference_loss(lp, pcfg)
    records += [
      ctx.record(f"chat DPO win rate over SFT, {label} (checker, T=1)", wins[masked], "fraction", "> 0.5", DPO_PAPER),
      ctx.record(f"chat DPO mean score (of 6), {label}", float(scores.mean()), "positions"),
      ctx.record(f"chat DPO implicit-reward accuracy, {label}", float(metrics["reward_accuracy"]), "fraction"),
    ]
  records.append(
    ctx.record(
      "chat DPO win rate, masked - kept formatting tokens",
      wins[True] - wins[False],
      "fraction",
      "masking stabilises DPO (qualitative)",
      "Llama 3 report (arXiv 2407.21783), DPO",
    )
  )
  plot = Plot("chat", "Chat-formatted sorting task: SFT and DPO losses", "step", "loss", tuple(curves))
  note = (
    "Chat part: the sorting task in Llama 3's template over the task's ids (user turn: the digits; assistant "
    "reply: the sorted digits, then <|eot_id|>). DPO (beta 0.1) from the same chat SFT model on the same pairs, "
    "once with headers and <|eot_id|> masked out of both log-probs (Llama 3) and once with them kept; here the "
    "only formatting token inside a completion is the final <|eot_id|>."
  )
  return records, plot, note


if __name__ == "__main__":
  app.run(cli.main_for({"align": Benchmark(run, PARTS, TIMED)}))
