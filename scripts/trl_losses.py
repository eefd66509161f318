"""Our preference losses against TRL 1.16's own code, side by side on random inputs.

  .venv/bin/python scripts/trl_losses.py --trl_python=/tmp/tv/bin/python [--seed=0]

`--trl_python` is a Python with torch and trl 1.16 (a scratch venv: `/tmp/tv/bin/pip install
--no-deps "trl==1.16.*"` beside torch and transformers; none is a paperjax dependency). This
process draws policy and reference logits, tokens and completion masks (prompt first, padding,
chosen and rejected of different lengths), hands them to a child process on `--trl_python`
that runs TRL's `DPOTrainer._compute_loss` (the loss code of every loss type and option; the
model is a stub returning the per-token log-probs TRL's fused LM head would) and
`CPOTrainer.cpo_loss` plus its cross-entropy NLL, then computes ours with
`logprobs.sequence_logprobs(..., per_token=True)` and `dpo.preference_loss` on the same logits
and prints both and their difference per case. Both sides compute in float32. The policy's
logits are the reference's plus noise, as after some training.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

B, T, V = 8, 14, 11

TRL_TYPES = [
  "sigmoid",
  "hinge",
  "ipo",
  "exo_pair",
  "nca_pair",
  "robust",
  "bco_pair",
  "sppo_hard",
  "aot",
  "aot_unpaired",
  "apo_zero",
  "apo_down",
  "discopop",
  "sft",
  "sigmoid_norm",
]
EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


def cases() -> list[dict[str, Any]]:
  """Each case: a name and the options, in TRL's DPOConfig names (ours are the same but `loss`)."""
  out: list[dict[str, Any]] = [{"name": t, "loss_type": [t], "label_smoothing": EPS.get(t, 0.0)} for t in TRL_TYPES]
  # TRL's sigmoid ignores label_smoothing (ours refuses it there); cDPO is our own loss, with no TRL peer.
  out.append({"name": "cdpo, label_smoothing 0.1 (not in TRL)", "loss_type": ["cdpo"], "label_smoothing": 0.1})
  out.append(
    {
      "name": "MPO sigmoid+bco_pair+sft (0.8, 0.2, 1)",
      "loss_type": ["sigmoid", "bco_pair", "sft"],
      "loss_weights": [0.8, 0.2, 1.0],
    }
  )
  # sft alone under ld_alpha is not a case: TRL ignores ld_alpha there, ours refuses it (no effect).
  for t, alpha in (("sigmoid", 0.5), ("ipo", 0.5), ("sigmoid_norm", 0.0), ("apo_down", 0.3)):
    out.append({"name": f"{t}, ld_alpha {alpha}", "loss_type": [t], "ld_alpha": alpha})
  for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
    for t in ("sigmoid", "ipo", "sigmoid_norm", "hinge", "robust", "exo_pair", "discopop"):
      out.append(
        {
          "name": f"{t}, {kind}",
          "loss_type": [t],
          "f_divergence_type": kind,
          "f_alpha_divergence_coef": 0.3,
          "label_smoothing": EPS.get(t, 0.0),
        }
      )
  out.append(
    {
      "name": "sigmoid, alpha_divergence c=1",
      "loss_type": ["sigmoid"],
      "f_divergence_type": "alpha_divergence",
      "f_alpha_divergence_coef": 1.0,
    }
  )
  for t in ("sigmoid", "ipo", "nca_pair", "discopop"):
    out.append({"name": f"{t}, use_weighting", "loss_type": [t], "use_weighting": True})
  out.append({"name": "sft, use_weighting (TRL crashes)", "loss_type": ["sft"], "use_weighting": True})
  out.append(
    {
      "name": "sigmoid_norm, ld 0.5 + js + WPO",
      "loss_type": ["sigmoid_norm"],
      "ld_alpha": 0.5,
      "f_divergence_type": "js_divergence",
      "use_weighting": True,
    }
  )
  out.append(
    {
      "name": "MPO + ld 0.5 + WPO (sigmoid, bco_pair)",
      "loss_type": ["sigmoid", "bco_pair"],
      "loss_weights": [1.0, 0.5],
      "ld_alpha": 0.5,
      "use_weighting": True,
    }
  )
  for case in out:
    case.setdefault("beta", 0.3 if "ipo" not in case["loss_type"] else 0.8)
  return out


def inputs(seed: int) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, 5, 2 * B)
  completion = rng.integers(1, T - 4, 2 * B)
  t = np.arange(T)[None]
  mask = (t >= prompt[:, None]) & (t < (prompt + completion)[:, None])
  reference = rng.normal(0, 1.5, (2 * B, T, V)).astype(np.float32)
  return {
    "tokens": rng.integers(0, V, (2 * B, T)),  # rows: B chosen, then B rejected (TRL's layout)
    "mask": mask,
    "policy_logits": (reference + rng.normal(0, 0.5, reference.shape)).astype(np.float32),  # a tuned reference
    "reference_logits": reference,
  }


# ---- TRL's side (runs on --trl_python: numpy, torch, trl; no jax) ----


def trl_side(npz: str, out: str) -> None:
  import types
  from collections import defaultdict

  import torch
  import torch.nn.functional as F
  from trl.experimental.cpo.cpo_trainer import CPOTrainer
  from trl.trainer.dpo_trainer import DPOTrainer

  d = np.load(npz)
  tokens, mask = torch.tensor(d["tokens"]), torch.tensor(d["mask"]).long()

  class StubLM(torch.nn.Module):
    """What TRL's fused LM head returns: shifted per-token log-probs (0 at labels -100) and extras."""

    def __init__(self, logits):
      super().__init__()
      self.logits = torch.tensor(logits)
      self.is_gradient_checkpointing = False

    def forward(self, labels=None, fused_lm_head=False, **kwargs):
      labels = labels[:, 1:]
      valid = labels != -100
      logp = torch.log_softmax(self.logits[:, :-1], dim=-1)
      lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(~valid, 0)
      sq = torch.logsumexp(2 * logp, dim=-1).masked_fill(~valid, 0)
      zeros = torch.zeros_like(lp)
      return types.SimpleNamespace(
        log_probs=lp, log_sum_sq_probs=sq, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
      )

  accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
  batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "completion_mask": mask}
  results: dict[str, float | str] = {}
  for case in json.loads(d["cases"].item()):
    if "not in TRL" in case["name"]:
      results[case["name"]] = "(no TRL counterpart)"
      continue
    trainer = object.__new__(DPOTrainer)
    trainer.model = StubLM(d["policy_logits"]).train()
    trainer.ref_model = StubLM(d["reference_logits"])
    trainer.accelerator = accelerator
    trainer.args = types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None)
    trainer.aux_loss_enabled, trainer.precompute_ref_logps = False, False
    trainer._metrics, trainer._total_train_tokens, trainer._tp_size = {"train": defaultdict(list)}, 0, 1
    trainer.beta, trainer.loss_types = case["beta"], case["loss_type"]
    trainer.loss_weights = case.get("loss_weights") or [1.0] * len(case["loss_type"])
    trainer.ld_alpha = case.get("ld_alpha")
    trainer.f_divergence_type = case.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = case.get("f_alpha_divergence_coef", 0.5)
    trainer.label_smoothing = case.get("label_smoothing", 0.0)
    trainer.use_weighting = case.get("use_weighting", False)
    try:
      results[case["name"]] = float(trainer._compute_loss(trainer.model, batch, return_outputs=False))
    except Exception as e:  # TRL's own failures are part of the report
      results[case["name"]] = f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"
  # CPO: CPOTrainer.cpo_loss on summed log-probs plus its CrossEntropyLoss NLL on the chosen rows.
  cpo = object.__new__(CPOTrainer)
  cpo.alpha, cpo.loss_type, cpo.beta, cpo.label_smoothing, cpo.simpo_gamma = 0.0, "sigmoid", 0.3, 0.1, 0.5
  cpo.accelerator = accelerator
  labels = tokens.masked_fill(mask == 0, -100)
  logits = torch.tensor(d["policy_logits"])
  logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
  sums = (logp * (labels[:, 1:] != -100)).sum(-1)
  losses, _, _ = cpo.cpo_loss(sums[:B], sums[B:])
  nll = F.cross_entropy(logits[:B, :-1].reshape(-1, V), labels[:B, 1:].reshape(-1), ignore_index=-100)
  results["cpo (CPOTrainer, eps 0.1, cpo_alpha 1)"] = float(losses.mean() + 1.0 * nll)
  pathlib.Path(out).write_text(json.dumps(results))


# ---- our side ----


def ours(d: dict[str, np.ndarray], case: dict) -> float:
  import jax.numpy as jnp

  from paperjax.align import dpo, logprobs

  def seq(logits, rows):
    return logprobs.sequence_logprobs(
      jnp.asarray(logits[rows]), jnp.asarray(d["tokens"][rows]), jnp.asarray(d["mask"][rows]), per_token=True
    )

  chosen, rejected = slice(0, B), slice(B, 2 * B)
  lp = dpo.PairLogProbs(
    seq(d["policy_logits"], chosen),
    seq(d["policy_logits"], rejected),
    seq(d["reference_logits"], chosen),
    seq(d["reference_logits"], rejected),
  )
  if case["name"].startswith("cpo"):
    cfg = dpo.PreferenceConfig(loss="cpo", beta=0.3, label_smoothing=0.1, cpo_alpha=1.0)
  else:
    names = tuple(case["loss_type"])
    cfg = dpo.PreferenceConfig(
      loss=names[0] if len(names) == 1 else names,
      loss_weights=tuple(case["loss_weights"]) if case.get("loss_weights") else None,
      beta=case["beta"],
      label_smoothing=case.get("label_smoothing", 0.0),
      ld_alpha=case.get("ld_alpha"),
      f_divergence_type=case.get("f_divergence_type", "reverse_kl"),
      f_alpha_divergence_coef=case.get("f_alpha_divergence_coef", 0.5),
      use_weighting=case.get("use_weighting", False),
    )
  return float(dpo.preference_loss(lp, cfg)[0])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trl_python", help="a Python with torch and trl 1.16")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--trl_side", nargs=2, metavar=("NPZ", "OUT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.trl_side:
    trl_side(*args.trl_side)
    return
  if not args.trl_python:
    parser.error("--trl_python is required")
  d = inputs(args.seed)
  all_cases = [*cases(), {"name": "cpo (CPOTrainer, eps 0.1, cpo_alpha 1)"}]
  with tempfile.TemporaryDirectory() as tmp:
    npz, out = f"{tmp}/inputs.npz", f"{tmp}/trl.json"
    np.savez(npz, cases=np.array(json.dumps(cases())), **d)
    subprocess.run([args.trl_python, __file__, "--trl_side", npz, out], check=True)
    theirs = json.loads(pathlib.Path(out).read_text())
  width = max(len(c["name"]) for c in all_cases)
  print(f"{'case':<{width}}  {'ours':>12}  {'TRL 1.16':>12}  {'|diff|':>9}  {'rel':>9}")
  for case in all_cases:
    mine, trl = ours(d, case), theirs[case["name"]]
    if isinstance(trl, str):
      print(f"{case['name']:<{width}}  {mine:12.6f}  {trl}")
    else:
      diff = abs(mine - trl)
      print(f"{case['name']:<{width}}  {mine:12.6f}  {trl:12.6f}  {diff:9.2e}  {diff / max(abs(trl), 1e-30):9.2e}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
