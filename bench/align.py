"""Post-training on a task a program can check: SFT -> reward model -> offline and online alignment.

  python -m paperjax.bench.align --scale=small [--only=align.pipeline,align.chat,align.online]

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

Part `online`: from one SFT model and one budget of completions (`online_iterations` x
`online_batch`), offline methods on demonstrations (DPO, DPO+NLL, f-DPO with forward KL and
JS, KTO on unpaired demonstrations labelled by the checker, LiPO on scored lists) and online
ones that sample from the policy and see the reward model as a proxy (PPO, RLOO, iterative DPO
and iterative DPO+NLL); each policy's checker score, win rate over SFT, KL to SFT, distinct
outputs per prompt and budget completions per training second, and per rollout the proxy's
reward beside the checker's score (reward hacking: the proxy rising while the checker falls).

Claims (`CLAIMS`, decided over `Config.seeds` seeds ctx.seed, ctx.seed + 1, ...; each seed
trains its own SFT model, reward model and policies): DPO beats its SFT start and best-of-K
beats SFT (part pipeline), the formatting-token mask helps DPO (part chat), and PPO beats
DPO, iterative DPO beats offline DPO, DPO drifts from SFT more than PPO, and forward KL trades
alignment for diversity (part online). The long
table's rows are the first seed's.

Shapes: B prompts, T prompt width, N new tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.align import data, dpo, listwise, online, rejection_sampling, reward, tasks
from paperjax.align import train as align_train
from paperjax.align.data import PreferenceBatch
from paperjax.bench import cli
from paperjax.bench.harness import Benchmark, ClaimSpec, Context, Plot, Result, Rule, Series, Test, progress
from paperjax.models.data import chat
from paperjax.models.serving import generate
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import checks

DPO_PAPER = "DPO (arXiv 2305.18290): beats the SFT model it starts from"


# Part online's methods, and those its claims compare (run at every scale).
ONLINE_METHODS = (
  "DPO",
  "DPO+NLL",
  "f-DPO forward KL",
  "f-DPO JS",
  "KTO",
  "LiPO",
  "PPO",
  "PPO, KL 0.2",
  "RLOO",
  "iterative DPO",
  "iterative DPO+NLL",
)
CLAIMED_METHODS = ("DPO", "f-DPO forward KL", "PPO", "iterative DPO")


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
  # part online: each method's budget is online_iterations x online_batch completions
  online_iterations: checks.PositiveInt = 40
  online_batch: checks.PositiveInt = 64
  idpo_rounds: checks.PositiveInt = 4
  online_methods: tuple[str, ...] = ()  # names in ONLINE_METHODS; () runs them all
  seeds: checks.PositiveInt = 1  # the claims' seeds: ctx.seed, ctx.seed + 1, ...

  def __post_init__(self):
    if "DPO" not in self.policies:
      raise ValueError(f"policies: expected 'DPO' among them (its claim is decided every run), got {self.policies}")
    unknown = set(self.online_methods) - set(ONLINE_METHODS)
    missing = set(CLAIMED_METHODS) - set(self.online_methods or ONLINE_METHODS)
    if unknown or missing:
      raise ValueError(
        f"online_methods: expected names in {ONLINE_METHODS} including the claims' {CLAIMED_METHODS}, got "
        f"{self.online_methods}"
      )


# small: the default suite's budget (about 3 minutes); full: the longer runs of the same study,
# over the 3 seeds the claims are decided on.
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
    online_methods=CLAIMED_METHODS,  # the others' steps have unit tests; the smoke run decides the claims
    online_iterations=2,
    online_batch=8,
    idpo_rounds=2,
  ),
  "small": Config(sft_steps=400, rm_steps=250, po_steps=150, batch=64, num_pairs=4096, eval_prompts=512, best_of=8),
  "full": Config(
    sft_steps=600,
    rm_steps=400,
    po_steps=300,
    batch=64,
    num_pairs=8192,
    eval_prompts=1024,
    best_of=8,
    seeds=3,
    online_iterations=80,
  ),
  "paper": Config(
    sft_steps=2000, rm_steps=1500, po_steps=1000, batch=128, num_pairs=32768, eval_prompts=4096, best_of=16, seeds=3
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
  # f-DPO (arXiv 2309.16240): DPO's loss with the reverse KL replaced, TRL's f_divergence_type
  "f-DPO forward KL": dpo.PreferenceConfig(loss="sigmoid", beta=0.1, f_divergence_type="forward_kl"),
  "f-DPO JS": dpo.PreferenceConfig(loss="sigmoid", beta=0.1, f_divergence_type="js_divergence"),
}
SFT_LR, RM_LR, PO_LR = 3e-3, 1e-3, 5e-4  # peak learning rates (warm-up, then cosine)
PARTS = ("pipeline", "chat", "online")  # --only=align.<part>
TIMED = False  # it times nothing: --repeats is a usage error (bench/cli.py)

# The claims and their rules, fixed before the runs that decide them. A win rate is over the
# held-out prompts (512 at small, 1024 at full; ties count half), so one seed's win rate has a
# sampling standard error of at most 0.5 / sqrt(prompts), 0.022 at small.
CHANCE = TASK.length / TASK.num_digits  # the mean score of uniformly random digits: 0.6 of 6
DPO_BEATS_SFT = ClaimSpec(
  name="DPO beats its SFT start",
  part="pipeline",
  source="DPO (arXiv 2305.18290), Sec. 6.2 and Fig. 2 (right): TL;DR win rates, DPO above SFT at every temperature",
  claim="DPO fine-tuning matches or improves response quality in summarization and single-turn dialogue",
  rule=Rule(
    tests=(Test(statistic="DPO win rate over SFT", op=">", bound=0.5),),
    requires=(Test(statistic="SFT mean score", op=">", bound=CHANCE),),  # SFT beats random digits
  ),
)
BEST_OF_K_BEATS_SFT = ClaimSpec(
  name="rejection sampling beats SFT",
  part="pipeline",
  source="Llama 3 (arXiv 2407.21783), Sec. 4.2.2 (rejection sampling); Llama 2 (arXiv 2307.09288), Sec. 3.2.3, Fig. 7",
  claim="sample K outputs from the policy and use the reward model to select the best candidate (the max of K "
  "samples' rewards exceeds the median: the potential gain of rejection sampling)",
  rule=Rule(
    tests=(Test(statistic="best-of-K minus SFT mean score", op=">", bound=0.0),),
    requires=(
      Test(statistic="SFT mean score", op=">", bound=CHANCE),
      Test(statistic="reward model held-out accuracy", op=">", bound=0.5),  # the judge ranks pairs
    ),
  ),
)
# Ported from README's decision (set before chat seeds 1 and 2 ran): the mask helps if masked
# minus kept win rate is positive for all of seeds 0, 1, 2 and its mean exceeds its spread
# (read as the sd over the seeds, so mean - 1 sd > 0).
MASK_HELPS_DPO = ClaimSpec(
  name="formatting-token mask helps DPO",
  part="chat",
  source="Llama 3 (arXiv 2407.21783), Sec. 4.1.4, DPO: masking out formatting tokens",
  claim="we mask out special formatting tokens including header and termination tokens from both chosen and "
  "rejected responses in the loss to stabilize DPO training",
  rule=Rule(
    tests=(
      Test(statistic="chat DPO win rate, masked - kept", op=">", bound=0.0),
      Test(statistic="chat DPO win rate, masked - kept", op=">", bound=0.0, over="mean ± k sd", k=1.0),
    ),
    decided_at="full",
  ),
)
XU_2024 = "Xu et al. 2024, Is DPO Superior to PPO for LLM Alignment? (arXiv 2404.10719)"
PPO_BEATS_DPO = ClaimSpec(
  name="PPO beats offline DPO",
  part="online",
  source=f"{XU_2024}, Sec. 6 (Tables 3-5); the survey (arXiv 2407.16216) quotes PPO > iterative DPO > DPO",
  claim="PPO is able to surpass other alignment methods in all cases (with its key factors: advantage "
  "normalisation, large batches, a moving average of the reference)",
  rule=Rule(
    tests=(Test(statistic="PPO minus DPO gold score", op=">", bound=0.0),),
    requires=(Test(statistic="SFT gold score", op=">", bound=CHANCE),),
    decided_at="full",
  ),
)
ITERATIVE_BEATS_OFFLINE = ClaimSpec(
  name="iterative DPO beats offline DPO",
  part="online",
  source="Xiong et al. 2024, Iterative Preference Learning from Human Feedback (arXiv 2312.11456), Sec. 5; "
  f"{XU_2024}, Sec. 5",
  claim="online iterative DPO with on-policy samples labelled by the reward model outperforms offline DPO",
  rule=Rule(
    tests=(Test(statistic="iterative DPO minus DPO gold score", op=">", bound=0.0),),
    requires=(Test(statistic="SFT gold score", op=">", bound=CHANCE),),
    decided_at="full",
  ),
)
DPO_DRIFTS = ClaimSpec(
  name="DPO drifts out of distribution",
  part="online",
  source=f"{XU_2024}, Sec. 4 (Theorem 4.1 and the synthetic study)",
  claim="DPO may find biased solutions that exploit out-of-distribution responses, where PPO stays near the "
  "reference (here: KL to SFT on the policy's own samples, DPO above PPO at the same budget)",
  rule=Rule(tests=(Test(statistic="DPO minus PPO KL to SFT", op=">", bound=0.0),), decided_at="full"),
)
F_DPO_DIVERSITY = ClaimSpec(
  name="forward KL trades alignment for diversity",
  part="online",
  source="Wang et al. 2023, Beyond Reverse KL: f-DPO (arXiv 2309.16240), Sec. 5 (Fig. 3, Table 2)",
  claim="as the divergence moves from reverse KL to JS to forward KL, generation diversity increases while "
  "alignment performance decreases",
  rule=Rule(
    tests=(
      Test(statistic="f-DPO forward KL minus DPO distinct outputs", op=">", bound=0.0),
      Test(statistic="DPO minus f-DPO forward KL gold score", op=">", bound=0.0),
    ),
    decided_at="full",
  ),
)
CLAIMS = (
  DPO_BEATS_SFT,
  BEST_OF_K_BEATS_SFT,
  MASK_HELPS_DPO,
  PPO_BEATS_DPO,
  ITERATIVE_BEATS_OFFLINE,
  DPO_DRIFTS,
  F_DPO_DIVERSITY,
)


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
    batch_size=cfg.batch, seq_len=16, peak_lr=lr, total_steps=steps, warmup_steps=min(max(1, steps // 10), steps - 1)
  )


def _seeds(ctx: Context, cfg: Config) -> list[int]:
  return [ctx.seed + i for i in range(cfg.seeds)]


def _label(name: str, seed: int, seeds: list[int]) -> str:
  return name if len(seeds) == 1 else f"{name}, seed {seed}"


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  parts = []
  cache: dict = {}  # (cfg, seed) -> Foundation: SFT and reward model once per seed
  if ctx.wants("pipeline"):
    parts.append(_pipeline(ctx, cfg, cache))
  if ctx.wants("chat"):
    parts.append(_chat(ctx, cfg))
  if ctx.wants("online"):
    parts.append(_online(ctx, cfg, cache))
  return Result.from_parts(ctx.benchmark, parts)


def _pipeline(ctx: Context, cfg: Config, cache: dict) -> tuple[list, Plot, str]:
  seeds = _seeds(ctx, cfg)
  runs = [_pipeline_seed(cfg, seed, lambda name, s=seed: _label(name, s, seeds), cache) for seed in seeds]
  first, curves = runs[0]
  records = [
    ctx.record(
      "reward model held-out pair accuracy", first["rm accuracy"], "fraction", "> 0.5", "Llama 2/3 reward models"
    ),
    ctx.record("SFT mean score (of 6)", first["SFT score"], "positions"),
  ]
  for name in cfg.policies:
    records += [
      ctx.record(f"{name} win rate over SFT (checker, T=1)", first[f"{name} win"], "fraction", "> 0.5", DPO_PAPER),
      ctx.record(f"{name} mean score (of 6)", first[f"{name} score"], "positions"),
    ]
    if name == "DPO":
      records += [
        ctx.record("DPO implicit-reward accuracy, held-out pairs", first["DPO accuracy"], "fraction"),
        ctx.record("DPO mean log-ratio to SFT of the chosen response, held-out pairs", first["DPO rho_w"], "nats"),
        ctx.record("DPO mean log-ratio to SFT of the rejected response, held-out pairs", first["DPO rho_l"], "nats"),
      ]
  records.append(
    ctx.record(
      f"best-of-{cfg.best_of} (reward model) mean score (of 6)",
      first["best score"],
      "positions",
      "> SFT",
      "Llama 2/3 rejection sampling",
    )
  )
  column = lambda key: [r[key] for r, _ in runs]
  per_seed = lambda key: ", ".join(f"{x:.3g}" for x in column(key))
  ctx.claim(
    DPO_BEATS_SFT,
    {"DPO win rate over SFT": column("DPO win"), "SFT mean score": column("SFT score")},
    seeds=seeds,
    note=_dpo_diagnosis(cfg, column, per_seed),
  )
  ctx.claim(
    BEST_OF_K_BEATS_SFT,
    {
      "best-of-K minus SFT mean score": [b - s for b, s in zip(column("best score"), column("SFT score"))],
      "SFT mean score": column("SFT score"),
      "reward model held-out accuracy": column("rm accuracy"),
    },
    seeds=seeds,
    note=(
      f"K = {cfg.best_of} T=1 samples of the SFT model per held-out prompt, the reward model's pick scored by the "
      f"checker, against one T=1 SFT sample (scores of 6 positions: SFT {per_seed('SFT score')}, best-of-K "
      f"{per_seed('best score')}). The candidates are the SFT model's samples, off the reward model's training "
      "distribution (pairs of demonstrations)."
    ),
  )
  plot = Plot("training", "Post-training losses on the sorting task", "step", "loss", tuple(curves))
  note = (
    f"Sorting task: {TASK.length} digits of {TASK.num_digits}; SFT on demonstrations with 50% of positions "
    f"randomised; {cfg.num_pairs} preference pairs; {cfg.eval_prompts} held-out prompts; a "
    f"{MODEL.num_params() / 1e3:.0f}k-parameter Llama. Pairs are off-policy (demonstrations at random noise "
    "levels), where plain DPO at beta 0.1 can lower both responses' likelihoods and drift (its implicit-reward "
    "accuracy stays high while samples get worse); the NLL term on the chosen response (Llama 3) anchors it. "
    f"Rows: seed {seeds[0]}; the claims: seeds {seeds}."
  )
  return records, plot, note


def _dpo_diagnosis(cfg: Config, column, per_seed) -> str:
  """What the DPO claim's reader must know, from the measured numbers (not tuned: beta and lr
  stay the DPO paper's default and the suite's)."""
  rho_w, rho_l = np.array(column("DPO rho_w")), np.array(column("DPO rho_l"))
  if (rho_w < 0).all() and (rho_l < rho_w).all():
    drift = (
      "on every seed DPO separates the held-out pairs by lowering both responses' likelihoods below SFT's, the "
      "rejected more, so probability leaves both demonstrations for sequences neither of them is"
    )
  elif (rho_w < 0).any():
    drift = "the chosen response's likelihood fell below SFT's on some seeds, not all"
  else:
    drift = "the chosen response's likelihood rose above SFT's on every seed"
  others = "; ".join(f"{name} {per_seed(f'{name} win')}" for name in cfg.policies if name != "DPO")
  nll = " (DPO+NLL: this loss plus an NLL term on the chosen response, Llama 3's recipe)"
  return (
    f"Beta {POLICIES['DPO'].beta:g} (the paper's default), peak lr {PO_LR:g}, {cfg.po_steps} steps on off-policy "
    "pairs (two noisy demonstrations each, not samples of the SFT model). Per seed: implicit-reward accuracy on "
    "held-out pairs "
    f"{per_seed('DPO accuracy')}; mean log-ratio to SFT of the chosen response {per_seed('DPO rho_w')} nats, of "
    f"the rejected {per_seed('DPO rho_l')}: {drift}. The other policies' win rates on the same pairs and lr: "
    f"{others or 'none run'}{nll if 'DPO+NLL' in cfg.policies else ''}."
  )


class Foundation(NamedTuple):
  """One seed's SFT model and reward model, shared by the parts that start from them."""

  sft_params: dict
  rm_params: dict
  rm_accuracy: float
  pairs: PreferenceBatch  # the reward model's training pairs (demonstrations)
  held: PreferenceBatch
  curves: tuple[Series, ...]


def _foundation(cfg: Config, seed: int, label, cache: dict) -> Foundation:
  """SFT on noisy demonstrations, then a reward model on preference pairs (trunk from SFT);
  computed once per (scale, seed) and run, whichever parts ask."""
  if (cfg, seed) in cache:
    return cache[cfg, seed]
  rng = np.random.default_rng(seed)
  pick = lambda n, i: np.random.default_rng([seed, i]).integers(0, n, cfg.batch)
  curves = []

  # 1. SFT on noisy demonstrations.
  tcfg = lambda steps, lr: _tcfg(cfg, steps, lr)
  sft_prompts = TASK.prompts(rng, 8 * cfg.num_pairs)
  sft_tokens = np.concatenate([sft_prompts, TASK.demonstrations(rng, sft_prompts, 0.5)], axis=1)
  sft_mask = np.broadcast_to(np.arange(sft_tokens.shape[1]) >= TASK.prompt_len, sft_tokens.shape)
  sft_cfg = tcfg(cfg.sft_steps, SFT_LR)
  state = lm.init_state(jax.random.key(seed), MODEL, sft_cfg)
  sft_step = lm.make_train_step(MODEL, sft_cfg)
  sft_batch = lambda i: align_train.sft_batch(sft_tokens[pick(len(sft_tokens), i)], sft_mask[pick(len(sft_tokens), i)])
  state, losses = _train(label("SFT"), sft_step, state, sft_batch, cfg.sft_steps)
  sft_params = state.params
  curves.append(Series(label("SFT (NLL)"), tuple(range(len(losses))), tuple(losses)))

  # 2. Reward model on preference pairs (trunk initialised from SFT).
  pairs = data.from_token_arrays(*TASK.preference_pairs(rng, cfg.num_pairs))
  held = data.from_token_arrays(*TASK.preference_pairs(rng, cfg.eval_prompts))
  take = lambda i: PreferenceBatch(*(x[pick(cfg.num_pairs, i)] for x in pairs))
  rm_cfg = tcfg(cfg.rm_steps, RM_LR)
  rm_params = {**reward.init(jax.random.key(seed + 1), MODEL), "model": sft_params}
  rm_state = train.start_state(rm_params, rm_cfg)
  rm_step = align_train.make_reward_step(MODEL, rm_cfg)
  rm_state, losses = _train(label("reward model"), rm_step, rm_state, take, cfg.rm_steps)
  curves.append(Series(label("reward model (BT)"), tuple(range(len(losses))), tuple(losses)))
  r_c = _rewards(rm_state.params, held.chosen_BT, held.chosen_lengths_B)
  r_r = _rewards(rm_state.params, held.rejected_BT, held.rejected_lengths_B)
  found = Foundation(sft_params, rm_state.params, float(jnp.mean(r_c > r_r)), pairs, held, tuple(curves))
  cache[cfg, seed] = found
  return found


_rewards = jax.jit(lambda p, t, n: reward.rewards(p, t, n, MODEL))


def _pipeline_seed(cfg: Config, seed: int, label, cache: dict) -> tuple[dict[str, float], list[Series]]:
  """One seed's SFT, reward model, policies and best-of-K: its numbers and loss curves."""
  found = _foundation(cfg, seed, label, cache)
  sft_params, pairs, held = found.sft_params, found.pairs, found.held
  pick = lambda n, i: np.random.default_rng([seed, i]).integers(0, n, cfg.batch)
  tcfg = lambda steps, lr: _tcfg(cfg, steps, lr)
  take = lambda i: PreferenceBatch(*(x[pick(cfg.num_pairs, i)] for x in pairs))
  out, curves = {"rm accuracy": found.rm_accuracy}, list(found.curves)

  # 3. Preference optimisation from the SFT model, reference = SFT.
  eval_prompts = TASK.prompts(np.random.default_rng([seed, 99]), cfg.eval_prompts)
  ref_scores = TASK.score(eval_prompts, _sample(jax.random.key(7), sft_params, eval_prompts))
  out["SFT score"] = float(ref_scores.mean())
  reference = lambda batch: align_train.reference_logprobs(sft_params, MODEL, batch)
  for name in cfg.policies:
    pcfg = POLICIES[name]
    po_cfg = tcfg(cfg.po_steps, PO_LR)
    po_state = train.start_state(sft_params, po_cfg)
    step = align_train.make_preference_step(MODEL, po_cfg, pcfg)
    ref_fn = reference if pcfg.reference else (lambda batch: (None, None))
    po_state, losses = _train(label(name), step, po_state, take, cfg.po_steps, ref_fn)
    curves.append(Series(label(f"{name} loss"), tuple(range(len(losses))), tuple(losses)))
    scores = TASK.score(eval_prompts, _sample(jax.random.key(8), po_state.params, eval_prompts))
    out[f"{name} win"], out[f"{name} score"] = _win_rate(scores, ref_scores), float(scores.mean())
    if name == "DPO":
      lp = dpo.PairLogProbs(*align_train.pair_logprobs(po_state.params, MODEL, held), *reference(held))
      _, metrics = dpo.preference_loss(lp, pcfg)
      out["DPO accuracy"] = float(metrics["reward_accuracy"])
      # the implicit rewards are beta * rho: the mean log-ratios to SFT of chosen and rejected
      out["DPO rho_w"] = float(metrics["rewards_chosen"]) / pcfg.beta
      out["DPO rho_l"] = float(metrics["rewards_rejected"]) / pcfg.beta

  # 4. Rejection sampling: best of K SFT samples by the reward model.
  def rm_reward(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B):
    tokens, lengths = rejection_sampling.concat(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B)
    return _rewards(found.rm_params, tokens, lengths)

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
  out["best score"] = float(TASK.score(eval_prompts, np.asarray(best.best_BN)).mean())
  return out, curves


# --- part online: PPO, RLOO and iterative DPO beside the offline methods -------------------------

ONLINE_LR = 5e-4  # PO_LR: every method from SFT at one peak learning rate
PPO = online.PPOConfig(kl_coef=0.05, whiten_rewards=True, epochs=4, minibatches=2)
PPO_STRONG_KL = dataclasses.replace(PPO, kl_coef=0.2)
RLOO = online.RLOOConfig(kl_coef=0.05)
DIVERSITY_SAMPLES = 4  # samples per prompt for "distinct outputs per prompt"
DIVERSITY_PROMPTS = 64  # on the first 64 held-out prompts (all of them at ci)
SUPERVISION = (
  "Supervision differs by design: the offline methods' pairs, lists and labels are demonstrations labelled by the "
  "checker (the gold reward), while PPO, RLOO and iterative DPO see only the reward model (trained on other pairs, "
  "held-out accuracy about 0.92); this favours the offline methods."
)
KTO_DESIRABLE = 4  # KTO's binary label: a demonstration with at least 4 of 6 positions right
LIST_SIZE = 4  # LiPO: Y demonstrations per list
LIPO = listwise.ListwiseConfig(loss="lipo_lambda", beta=0.1)


def _rollout_cfg(samples: int) -> online.RolloutConfig:
  return online.RolloutConfig(max_new_tokens=TASK.completion_len, stop_ids=(tasks.EOS,), samples_per_prompt=samples)


def _gold(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B) -> jax.Array:
  """The checker's score: the gold reward."""
  return jnp.asarray(TASK.score(np.asarray(prompts_BT), np.asarray(completions_BN)), jnp.float32)


class Trained(NamedTuple):
  params: dict
  seconds: float  # its training time, rollouts included
  proxy: tuple[float, ...] = ()  # per iteration: mean reward-model reward of the rollout
  gold: tuple[float, ...] = ()  # per iteration: mean checker score of the same samples


def _online_seed(cfg: Config, seed: int, label, cache: dict) -> dict[str, Any]:
  """One seed: every method from the same SFT model at the same sample budget, then each
  policy's gold score, win rate over SFT, KL to SFT and diversity on held-out prompts."""
  found = _foundation(cfg, seed, label, cache)
  sft = found.sft_params
  budget = cfg.online_iterations * cfg.online_batch
  rng = np.random.default_rng([seed, 3])
  gold_log: list[float] = []

  def proxy(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B):
    """The reward model's reward (what the policy sees), logging the checker's mean beside it."""
    gold_log.append(float(_gold(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B).mean()))
    tokens, lengths = rejection_sampling.concat(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B)
    return _rewards(found.rm_params, tokens, lengths)

  def prompts(rows: int):
    def fn(i: int):
      p = TASK.prompts(np.random.default_rng([seed, 4, i]), rows)
      return p, np.full(rows, TASK.prompt_len)

    return fn

  tcfg = lambda steps, batch=cfg.batch: dataclasses.replace(_tcfg(cfg, steps, ONLINE_LR), batch_size=batch)
  offline_pairs = data.from_token_arrays(*TASK.preference_pairs(rng, budget // 2))

  def timed_offline(name: str, step, take, reference) -> Trained:
    """cfg.po_steps steps of `step` from SFT on batches take(i), each with reference(batch)."""
    start = time.perf_counter()
    state, _ = _train(label(name), step, train.start_state(sft, tcfg(cfg.po_steps)), take, cfg.po_steps, reference)
    return Trained(state.params, time.perf_counter() - start)

  def offline(name: str, pcfg: dpo.PreferenceConfig) -> Trained:
    pick = lambda i: np.random.default_rng([seed, 5, i]).integers(0, budget // 2, cfg.batch)
    take = lambda i: PreferenceBatch(*(x[pick(i)] for x in offline_pairs))
    step = align_train.make_preference_step(MODEL, tcfg(cfg.po_steps), pcfg)
    reference = lambda batch: align_train.reference_logprobs(sft, MODEL, batch)
    return timed_offline(name, step, take, reference)

  def timed_online(run_fn) -> Trained:
    gold_log.clear()
    start = time.perf_counter()
    state, history = run_fn()
    seconds = time.perf_counter() - start
    params = state.train.params
    return Trained(params.get("policy", params), seconds, tuple(h["reward"] for h in history), tuple(gold_log))

  def kto() -> Trained:
    """KTO on `budget` unpaired demonstrations, desirable when they get 2/3 of the positions right."""
    krng = np.random.default_rng([seed, 8])
    p = TASK.prompts(krng, budget)
    completions = TASK.demonstrations(krng, p, krng.uniform(0.1, 0.9, budget))
    tokens = np.concatenate([p, completions], axis=1)
    unpaired = data.UnpairedBatch(
      tokens,
      np.broadcast_to(np.arange(tokens.shape[1]) >= TASK.prompt_len, tokens.shape).copy(),
      np.full(budget, tokens.shape[1], np.int32),
      np.full(budget, TASK.prompt_len, np.int32),
      TASK.score(p, completions) >= KTO_DESIRABLE,
    )
    take = lambda i: data.UnpairedBatch(
      *(x[np.random.default_rng([seed, 6, i]).integers(0, budget, cfg.batch)] for x in unpaired)
    )
    step = align_train.make_kto_step(MODEL, tcfg(cfg.po_steps), beta=0.1)
    reference = lambda batch: align_train.kto_reference_logprobs(sft, MODEL, batch)
    return timed_offline("KTO", step, take, reference)

  def lipo() -> Trained:
    """LiPO-lambda on budget / Y lists of Y demonstrations, scored by the checker (ties allowed)."""
    y = LIST_SIZE
    lrng = np.random.default_rng([seed, 9])
    p = TASK.prompts(lrng, budget // y)
    completions = np.stack([TASK.demonstrations(lrng, p, lrng.uniform(0.1, 0.9, len(p))) for _ in range(y)], axis=1)
    scores = np.stack([TASK.score(p, completions[:, i]) for i in range(y)], axis=1).astype(np.float32)
    lists = data.listwise_from_token_arrays(p, completions, scores)
    take = lambda i: data.ListwiseBatch(
      *(x[np.random.default_rng([seed, 7, i]).integers(0, len(p), cfg.batch // y)] for x in lists)
    )
    step = listwise.make_listwise_step(MODEL, tcfg(cfg.po_steps), LIPO)
    reference = lambda batch: listwise.reference_logprobs(sft, MODEL, batch)
    return timed_offline("LiPO", step, take, reference)

  iterations, rows = cfg.online_iterations, cfg.online_batch

  def ppo(pcfg: online.PPOConfig, key: int) -> Callable[[], Trained]:
    return lambda: timed_online(
      lambda: online.train_ppo(
        jax.random.key(key),
        sft,
        found.rm_params,  # InstructGPT: the value model starts from the reward model
        MODEL,
        prompts(rows),
        proxy,
        rcfg=_rollout_cfg(1),
        pcfg=pcfg,
        tcfg=tcfg(iterations * pcfg.epochs * pcfg.minibatches, rows // pcfg.minibatches),
        iterations=iterations,
      )
    )

  methods: dict[str, Callable[[], Trained]] = {
    "DPO": lambda: offline("DPO", POLICIES["DPO"]),
    "DPO+NLL": lambda: offline("DPO+NLL", POLICIES["DPO+NLL"]),
    "f-DPO forward KL": lambda: offline("f-DPO forward KL", POLICIES["f-DPO forward KL"]),
    "f-DPO JS": lambda: offline("f-DPO JS", POLICIES["f-DPO JS"]),
    "KTO": kto,
    "LiPO": lipo,
    "PPO": ppo(PPO, seed + 10),
    # Added after the first full run (PPO over-optimised the proxy on 2 of 3 seeds): the same
    # PPO with 4x the KL coefficient, a sensitivity row; the claim stays on PPO above.
    "PPO, KL 0.2": ppo(PPO_STRONG_KL, seed + 14),
    "RLOO": lambda: timed_online(
      lambda: online.train_rloo(
        jax.random.key(seed + 11),
        sft,
        MODEL,
        prompts(rows // 2),
        proxy,
        rcfg=_rollout_cfg(2),
        lcfg=RLOO,
        tcfg=tcfg(iterations, rows),
        iterations=iterations,
      )
    ),
  }

  def iterative(loss: dpo.PreferenceConfig, key: int) -> Callable[[], Trained]:
    return lambda: timed_online(
      lambda: online.train_iterative_dpo(
        jax.random.key(key),
        sft,
        MODEL,
        prompts(budget // (2 * cfg.idpo_rounds)),
        proxy,
        rcfg=_rollout_cfg(2),
        icfg=online.IterativeDPOConfig(steps=cfg.po_steps // cfg.idpo_rounds, loss=loss),
        tcfg=tcfg(cfg.po_steps // cfg.idpo_rounds),
        rounds=cfg.idpo_rounds,
      )
    )

  # Iterative DPO with each offline loss: plain DPO (the claim's pair) and DPO+NLL (Llama 3's rounds).
  methods["iterative DPO"] = iterative(POLICIES["DPO"], seed + 12)
  methods["iterative DPO+NLL"] = iterative(POLICIES["DPO+NLL"], seed + 13)
  eval_prompts = TASK.prompts(np.random.default_rng([seed, 99]), cfg.eval_prompts)
  eval_lengths = np.full(len(eval_prompts), TASK.prompt_len)
  few = slice(0, min(DIVERSITY_PROMPTS, len(eval_prompts)))

  def evaluate(params: dict) -> dict[str, Any]:
    ro = online.rollout(jax.random.key(8), params, sft, MODEL, eval_prompts, eval_lengths, _gold, _rollout_cfg(1))
    many = online.rollout(
      jax.random.key(9),
      params,
      sft,
      MODEL,
      eval_prompts[few],
      eval_lengths[few],
      _gold,
      _rollout_cfg(DIVERSITY_SAMPLES),
    )
    completions = np.asarray(many.completions[0]).reshape(-1, DIVERSITY_SAMPLES, many.completions[0].shape[1])
    distinct = np.mean([len({row.tobytes() for row in group}) for group in completions])
    return {"scores": np.asarray(ro.rewards_B), "kl": float(ro.kl_B().mean()), "distinct": float(distinct)}

  assert tuple(methods) == ONLINE_METHODS
  out: dict[str, Any] = {"SFT": {**evaluate(sft), "samples/s": math.nan}}
  for name in cfg.online_methods or ONLINE_METHODS:
    fit = methods[name]
    trained = fit()
    out[name] = {**evaluate(trained.params), "samples/s": budget / trained.seconds}
    if trained.proxy:
      out[name] |= {"proxy curve": trained.proxy, "gold curve": trained.gold}
      out[name] |= {
        "gold peak": max(trained.gold),
        "peak at": int(np.argmax(trained.gold)) + 1,  # counted from 1
        "proxy final": trained.proxy[-1],
      }
  ref = out["SFT"]["scores"]
  for m in out.values():
    m["gold"] = float(m["scores"].mean())
    m["win"] = _win_rate(m["scores"], ref)
  return out


def _online(ctx: Context, cfg: Config, cache: dict) -> tuple[list, Plot, str]:
  seeds = _seeds(ctx, cfg)
  runs = [_online_seed(cfg, seed, lambda name, s=seed: _label(name, s, seeds), cache) for seed in seeds]
  few = min(DIVERSITY_PROMPTS, cfg.eval_prompts)
  first = runs[0]
  records = []
  for name, m in first.items():
    records += [
      ctx.record(f"online: {name} gold score (of 6)", m["gold"], "positions"),
      ctx.record(f"online: {name} win rate over SFT (checker, T=1)", m["win"], "fraction"),
      ctx.record(f"online: {name} KL to SFT (k1, per completion)", m["kl"], "nats"),
      ctx.record(f"online: {name} distinct outputs of {DIVERSITY_SAMPLES} per prompt", m["distinct"], "count"),
    ]
    if name != "SFT":
      records.append(
        ctx.record(f"online: {name} budget completions per training second", m["samples/s"], "completions/s")
      )
    if "proxy curve" in m:  # reward hacking: the proxy keeps rising after the checker's peak
      peak = int(np.argmax(m["gold curve"]))
      gold_drop = m["gold curve"][peak] - m["gold curve"][-1]
      proxy_gain = m["proxy curve"][-1] - m["proxy curve"][peak]
      records += [
        ctx.record(f"online: {name} checker score, peak minus final rollout", gold_drop, "positions"),
        ctx.record(f"online: {name} reward-model reward, final minus at the checker's peak", proxy_gain, "reward"),
      ]
  curves = []
  for name, m in first.items():
    if "proxy curve" in m:
      x = tuple(range(len(m["proxy curve"])))
      curves += [Series(f"{name}: reward model", x, m["proxy curve"]), Series(f"{name}: checker", x, m["gold curve"])]
  column = lambda method, key: [r[method][key] for r in runs]
  per_seed = lambda method, key: (
    ", ".join(f"{x:.3g}" for x in column(method, key)) if method in first else "not run at this scale"
  )
  diff = lambda a, b, key: [x - y for x, y in zip(column(a, key), column(b, key))]
  ctx.claim(
    PPO_BEATS_DPO,
    {"PPO minus DPO gold score": diff("PPO", "DPO", "gold"), "SFT gold score": column("SFT", "gold")},
    seeds=seeds,
    note=f"Gold scores per seed: PPO {per_seed('PPO', 'gold')}, DPO {per_seed('DPO', 'gold')}. PPO's rollouts "
    f"peaked at a checker score of {per_seed('PPO', 'gold peak')} (iteration {per_seed('PPO', 'peak at')} of "
    f"{cfg.online_iterations}) while the reward model's reward kept rising to {per_seed('PPO', 'proxy final')}: "
    f"over-optimisation of the proxy. PPO with KL coefficient 0.2 (a row added after the first full run): "
    f"{per_seed('PPO, KL 0.2', 'gold')}. Of the paper's key factors this PPO has advantage normalisation; its batch "
    f"is {cfg.online_batch} samples and its reference the frozen SFT model (no moving average). {SUPERVISION}",
  )
  ctx.claim(
    ITERATIVE_BEATS_OFFLINE,
    {
      "iterative DPO minus DPO gold score": diff("iterative DPO", "DPO", "gold"),
      "SFT gold score": column("SFT", "gold"),
    },
    seeds=seeds,
    note=f"Gold scores per seed: iterative DPO {per_seed('iterative DPO', 'gold')}, DPO {per_seed('DPO', 'gold')}; "
    f"with the NLL term: iterative {per_seed('iterative DPO+NLL', 'gold')}, offline {per_seed('DPO+NLL', 'gold')}. "
    f"{SUPERVISION}",
  )
  ctx.claim(
    DPO_DRIFTS,
    {"DPO minus PPO KL to SFT": diff("DPO", "PPO", "kl")},
    seeds=seeds,
    note=f"KL to SFT (nats per completion) per seed: DPO {per_seed('DPO', 'kl')}, PPO {per_seed('PPO', 'kl')}, "
    f"iterative DPO {per_seed('iterative DPO', 'kl')}, RLOO {per_seed('RLOO', 'kl')}.",
  )
  ctx.claim(
    F_DPO_DIVERSITY,
    {
      "f-DPO forward KL minus DPO distinct outputs": diff("f-DPO forward KL", "DPO", "distinct"),
      "DPO minus f-DPO forward KL gold score": diff("DPO", "f-DPO forward KL", "gold"),
    },
    seeds=seeds,
    note=f"Distinct outputs of {DIVERSITY_SAMPLES} T=1 samples per prompt ({few} held-out prompts) per seed: DPO "
    f"(reverse KL) {per_seed('DPO', 'distinct')}, JS {per_seed('f-DPO JS', 'distinct')}, forward KL "
    f"{per_seed('f-DPO forward KL', 'distinct')}; gold scores: DPO {per_seed('DPO', 'gold')}, JS "
    f"{per_seed('f-DPO JS', 'gold')}, forward KL {per_seed('f-DPO forward KL', 'gold')}. Same pairs, beta 0.1 and lr. "
    "The rule compares forward KL with reverse KL only; JS's place in the ordering is reported, not tested.",
  )
  plot = Plot(
    "online",
    "Online methods: reward-model reward and checker score of each rollout",
    "iteration",
    "mean",
    tuple(curves),
  )
  note = (
    f"Online part: every method starts from the same SFT model at the same budget of "
    f"{cfg.online_iterations * cfg.online_batch} completions (sampled, or read from demonstrations for the offline "
    f"methods) at peak lr {ONLINE_LR:g}. PPO, RLOO and iterative DPO see the reward model (the proxy); the "
    "checker is the gold reward. Evaluation: one T=1 sample per held-out prompt (gold score, win rate over SFT's "
    f"sample, KL to SFT by the k1 estimate on the policy's own samples) and {DIVERSITY_SAMPLES} samples on {few} "
    f"prompts (distinct outputs). Rows: seed {seeds[0]}; the claims: seeds {seeds}. Per seed, gold score / KL to SFT / "
    "distinct outputs: "
    + "; ".join(
      f"{name} {per_seed(name, 'gold')} / {per_seed(name, 'kl')} / {per_seed(name, 'distinct')}" for name in first
    )
    + "."
  )
  return records, plot, note


def _chat(ctx: Context, cfg: Config) -> tuple[list, Plot, str]:
  """DPO on chat-formatted pairs, with and without Llama 3's formatting-token mask."""
  seeds = _seeds(ctx, cfg)
  runs = [_chat_seed(cfg, seed, lambda name, s=seed: _label(name, s, seeds)) for seed in seeds]
  first, curves = runs[0]
  records = [ctx.record("chat SFT mean score (of 6)", first["SFT score"], "positions")]
  for masked in (True, False):
    label = "formatting masked" if masked else "formatting kept"
    records += [
      ctx.record(
        f"chat DPO win rate over SFT, {label} (checker, T=1)", first[f"win {masked}"], "fraction", "> 0.5", DPO_PAPER
      ),
      ctx.record(f"chat DPO mean score (of 6), {label}", first[f"score {masked}"], "positions"),
      ctx.record(f"chat DPO implicit-reward accuracy, {label}", first[f"accuracy {masked}"], "fraction"),
    ]
  records.append(
    ctx.record(
      "chat DPO win rate, masked - kept formatting tokens",
      first["win True"] - first["win False"],
      "fraction",
      "masking stabilises DPO (qualitative)",
      "Llama 3 report (arXiv 2407.21783), DPO",
    )
  )
  column = lambda key: [r[key] for r, _ in runs]
  per_seed = lambda key: ", ".join(f"{x:.3g}" for x in column(key))
  ctx.claim(
    MASK_HELPS_DPO,
    {"chat DPO win rate, masked - kept": [r["win True"] - r["win False"] for r, _ in runs]},
    seeds=seeds,
    note=(
      "The only formatting token inside these completions is the final <|eot_id|>, so the mask changes one token "
      f"of seven in each log-prob sum. Per seed: win rate over SFT masked {per_seed('win True')}, kept "
      f"{per_seed('win False')}; implicit-reward accuracy masked {per_seed('accuracy True')}, kept "
      f"{per_seed('accuracy False')}."
    ),
  )
  plot = Plot("chat", "Chat-formatted sorting task: SFT and DPO losses", "step", "loss", tuple(curves))
  note = (
    "Chat part: the sorting task in Llama 3's template over the task's ids (user turn: the digits; assistant "
    "reply: the sorted digits, then <|eot_id|>). DPO (beta 0.1) from the same chat SFT model on the same pairs, "
    "once with headers and <|eot_id|> masked out of both log-probs (Llama 3) and once with them kept; here the "
    f"only formatting token inside a completion is the final <|eot_id|>. Rows: seed {seeds[0]}; the claim: seeds "
    f"{seeds}."
  )
  return records, plot, note


def _chat_seed(cfg: Config, seed: int, label) -> tuple[dict[str, float], list[Series]]:
  """One seed's chat SFT and its two DPO runs (formatting masked and kept)."""
  fmt = TASK.chat_format()
  model = dataclasses.replace(MODEL, vocab_size=TASK.chat_vocab_size)
  rng = np.random.default_rng([seed, 1])
  pick = lambda n, i: np.random.default_rng([seed, 1, i]).integers(0, n, cfg.batch)
  out, curves = {}, []

  prompts = TASK.prompts(rng, 8 * cfg.num_pairs)
  demos = TASK.chat_replies(TASK.demonstrations(rng, prompts, 0.5))
  rendered = [chat.render(fmt, p + d) for p, d in zip(TASK.chat_prompts(prompts), demos)]
  sft_tokens = np.stack([r.ids_T for r in rendered])
  sft_mask = np.stack([r.assistant_mask_T for r in rendered])  # the reply and its <|eot_id|>
  sft_cfg = _tcfg(cfg, cfg.sft_steps, SFT_LR)
  sft_step = lm.make_train_step(model, sft_cfg)
  sft_batch = lambda i: align_train.sft_batch(sft_tokens[pick(len(sft_tokens), i)], sft_mask[pick(len(sft_tokens), i)])
  state, losses = _train(
    label("chat SFT"), sft_step, lm.init_state(jax.random.key(seed), model, sft_cfg), sft_batch, cfg.sft_steps
  )
  sft_params = state.params
  curves.append(Series(label("chat SFT (NLL)"), tuple(range(len(losses))), tuple(losses)))

  def conversations(triples):
    p, c, r = triples
    return [
      {"prompt": a, "chosen": b, "rejected": d}
      for a, b, d in zip(TASK.chat_prompts(p), TASK.chat_replies(c), TASK.chat_replies(r))
    ]

  train_pairs = conversations(TASK.preference_pairs(rng, cfg.num_pairs))
  held_pairs = conversations(TASK.preference_pairs(rng, cfg.eval_prompts))
  eval_prompts = TASK.prompts(np.random.default_rng([seed, 98]), cfg.eval_prompts)
  chat_prompts = np.stack(
    [chat.render(fmt, p, add_generation_prompt=True).ids_T for p in TASK.chat_prompts(eval_prompts)]
  )
  ref_scores = TASK.score(eval_prompts, _sample(jax.random.key(7), sft_params, chat_prompts, model, fmt.eot_id))
  out["SFT score"] = float(ref_scores.mean())
  pcfg = POLICIES["DPO"]
  for masked in (True, False):
    arm = "formatting masked" if masked else "formatting kept"
    pairs = data.tokenize(train_pairs, fmt, max_len=model.max_seq_len, mask_formatting=masked)
    held = data.tokenize(held_pairs, fmt, max_len=model.max_seq_len, mask_formatting=masked)
    take = lambda i, pairs=pairs: PreferenceBatch(*(x[pick(cfg.num_pairs, i)] for x in pairs))
    reference = lambda batch: align_train.reference_logprobs(sft_params, model, batch)
    po_cfg = _tcfg(cfg, cfg.po_steps, PO_LR)
    step = align_train.make_preference_step(model, po_cfg, pcfg)
    po_state, losses = _train(
      label(f"chat DPO, {arm}"), step, train.start_state(sft_params, po_cfg), take, cfg.po_steps, reference
    )
    curves.append(Series(label(f"chat DPO loss, {arm}"), tuple(range(len(losses))), tuple(losses)))
    scores = TASK.score(eval_prompts, _sample(jax.random.key(8), po_state.params, chat_prompts, model, fmt.eot_id))
    lp = dpo.PairLogProbs(*align_train.pair_logprobs(po_state.params, model, held), *reference(held))
    _, metrics = dpo.preference_loss(lp, pcfg)
    out[f"win {masked}"], out[f"score {masked}"] = _win_rate(scores, ref_scores), float(scores.mean())
    out[f"accuracy {masked}"] = float(metrics["reward_accuracy"])
  return out, curves


if __name__ == "__main__":
  app.run(cli.main_for({"align": Benchmark(run, PARTS, TIMED, CLAIMS)}))
