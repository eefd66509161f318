"""bench/align's claims: declared once, each rule reaching holds, fails and undecided on crafted seeds."""

import pytest

from paperjax.bench import align as bench_align

DPO = bench_align.DPO_BEATS_SFT
BEST = bench_align.BEST_OF_K_BEATS_SFT
MASK = bench_align.MASK_HELPS_DPO
MASK_STAT = "chat DPO win rate, masked - kept"


def test_every_scale_runs_dpo_and_the_full_decision_has_seeds():
  assert all("DPO" in cfg.policies for cfg in bench_align.CONFIGS.values())
  assert bench_align.CONFIGS["full"].seeds >= 3  # the mask claim's rule needs a spread
  with pytest.raises(ValueError, match="policies: expected 'DPO'"):
    bench_align.Config(
      sft_steps=1, rm_steps=1, po_steps=1, batch=2, num_pairs=4, eval_prompts=2, best_of=2, policies=("IPO",)
    )


def test_dpo_beats_sft_rule():
  decide = lambda win, sft=(3.0,), scale="small": DPO.rule.decide(
    {"DPO win rate over SFT": win, "SFT mean score": sft}, scale=scale, gpu=False
  )
  assert decide([0.55]) == ("holds", None)
  assert decide([0.45]) == ("fails", None)  # small's recorded seed (README: 0.4512)
  assert decide([0.2422, 0.3, 0.35], sft=(3.0, 3.1, 2.9), scale="full") == ("fails", None)
  assert decide([0.6, 0.45, 0.7], sft=(3.0, 3.1, 2.9), scale="full") == ("undecided", "margin")  # seeds disagree
  assert decide([0.5]) == ("fails", None)  # a tie does not beat SFT
  assert decide([0.7], sft=(0.5,)) == ("undecided", "reference did not learn")  # SFT below random digits' 0.6
  assert decide([0.7], scale="ci") == ("undecided", "budget")
  assert decide([float("nan")]) == ("fails", None)


def test_rejection_sampling_rule():
  def decide(gain, sft=(3.0,), rm=(0.9,), scale="small"):
    values = {"best-of-K minus SFT mean score": gain, "SFT mean score": sft, "reward model held-out accuracy": rm}
    return BEST.rule.decide(values, scale=scale, gpu=False)

  assert decide([3.984 - 2.602]) == ("holds", None)  # README's small row
  assert decide([-0.1]) == ("fails", None)
  assert decide([0.0]) == ("fails", None)
  assert decide([0.3, -0.1], sft=(3.0, 3.0), rm=(0.9, 0.9), scale="full") == ("undecided", "margin")
  assert decide([1.0], rm=(0.5,)) == ("undecided", "reference did not learn")  # the judge ranks no better than chance
  assert decide([1.0], sft=(0.6,)) == ("undecided", "reference did not learn")
  assert decide([1.0], scale="ci") == ("undecided", "budget")


def test_mask_rule_is_readmes_decision():
  decide = lambda d, scale="full": MASK.rule.decide({MASK_STAT: d}, scale=scale, gpu=False)
  # README's rule: positive on every seed and the mean above the spread (sd over the seeds).
  assert decide([0.02, 0.03, 0.025]) == ("holds", None)
  assert decide([-0.01, -0.02, -0.005]) == ("fails", None)
  # positive on every seed but the mean (0.0043) below the sd (0.0049): README's form says "does not help"
  assert decide([0.01, 0.001, 0.002]) == ("undecided", "margin")
  # README's recorded seeds 0, 1, 2 at full: mixed signs, mean -0.0007, sd 0.0074
  assert decide([0.005, -0.009, 0.002]) == ("undecided", "margin")
  assert decide([0.02], scale="small") == ("undecided", "budget")  # one seed at small: not the decision
  assert decide([0.02]) == ("undecided", "margin")  # one seed has no spread


def test_online_claims_rules():
  ppo = lambda d, sft=(3.0, 3.0, 3.0), scale="full": bench_align.PPO_BEATS_DPO.rule.decide(
    {"PPO minus DPO gold score": d, "SFT gold score": sft}, scale=scale, gpu=False
  )
  assert ppo([1.5, 0.8, 1.2]) == ("holds", None)
  assert ppo([-0.2, -0.5, -0.1]) == ("fails", None)
  assert ppo([0.5, -0.3, 0.2]) == ("undecided", "margin")
  assert ppo([1.5, 0.8, 1.2], sft=(0.4, 3.0, 3.0)) == ("undecided", "reference did not learn")
  assert ppo([1.5], scale="small") == ("undecided", "budget")
  iterative = lambda d: bench_align.ITERATIVE_BEATS_OFFLINE.rule.decide(
    {"iterative DPO minus DPO gold score": d, "SFT gold score": (3.0,) * len(d)}, scale="full", gpu=False
  )
  assert iterative([0.3, 0.1, 0.2]) == ("holds", None) and iterative([-1.0, -0.9, -1.2]) == ("fails", None)
  drift = lambda d: bench_align.DPO_DRIFTS.rule.decide({"DPO minus PPO KL to SFT": d}, scale="full", gpu=False)
  assert drift([11.8, 9.0, 10.0]) == ("holds", None) and drift([-1.0, -2.0, -0.5]) == ("fails", None)
  assert bench_align.CONFIGS["full"].seeds >= 3 and "online" in bench_align.PARTS
  f_dpo = lambda diversity, gold: bench_align.F_DPO_DIVERSITY.rule.decide(
    {"f-DPO forward KL minus DPO distinct outputs": diversity, "DPO minus f-DPO forward KL gold score": gold},
    scale="full",
    gpu=False,
  )
  assert f_dpo([0.4, 0.3, 0.5], [0.2, 0.1, 0.3]) == ("holds", None)
  assert f_dpo([0.4, 0.3, 0.5], [-0.2, -0.1, -0.3]) == ("fails", None)  # more diverse, but not less aligned
  assert f_dpo([-0.4, -0.3, -0.5], [0.2, 0.1, 0.3]) == ("fails", None)


def test_online_methods_must_include_the_claims_ones():
  base = dict(sft_steps=1, rm_steps=1, po_steps=1, batch=2, num_pairs=4, eval_prompts=2, best_of=2)
  assert set(bench_align.CONFIGS["ci"].online_methods) == set(bench_align.CLAIMED_METHODS)
  with pytest.raises(ValueError, match="online_methods: expected names"):
    bench_align.Config(**base, online_methods=("DPO", "PPO"))  # the iterative and f-DPO claims need theirs
  with pytest.raises(ValueError, match="online_methods: expected names"):
    bench_align.Config(**base, online_methods=(*bench_align.CLAIMED_METHODS, "GRPO"))
