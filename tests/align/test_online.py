"""Online alignment: GAE, PPO's rewards and clipped losses, RLOO's baseline, best-vs-worst pairs
against loops written from the papers; rollouts' per-row keys; the loops train and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import dpo, online, reward, tasks
from paperjax.models.training import train
from paperjax.models.transformer import llama

TASK = tasks.SortTask(length=3, num_digits=4)
MODEL = llama.LlamaConfig(
  vocab_size=TASK.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16
)
RCFG = online.RolloutConfig(max_new_tokens=TASK.completion_len, stop_ids=(tasks.EOS,), samples_per_prompt=2)
TCFG = train.TrainConfig(batch_size=4, peak_lr=1e-2, total_steps=10, warmup_steps=0)


def _gold(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B):
  return jnp.asarray(TASK.score(np.asarray(prompts_BT), np.asarray(completions_BN)), jnp.float32)


def _prompts(i):
  prompts = TASK.prompts(np.random.default_rng(i), 2)
  return prompts, np.full(2, TASK.prompt_len)


@pytest.fixture(scope="module")
def policy():
  return llama.init(jax.random.key(0), MODEL)


@pytest.fixture(scope="module")
def ro(policy):
  return online.rollout(jax.random.key(1), policy, policy, MODEL, *_prompts(0), _gold, RCFG)


def test_gae_against_a_loop(np_rng):
  rewards, vals = np_rng.normal(size=(3, 7)).astype(np.float32), np_rng.normal(size=(3, 7)).astype(np.float32)
  mask = np.zeros((3, 7), bool)
  for b, (start, end) in enumerate([(2, 5), (1, 7), (3, 4)]):
    mask[b, start:end] = True
  gamma, lam = 0.9, 0.8
  adv, ret = online.gae(jnp.asarray(rewards * mask), jnp.asarray(vals), jnp.asarray(mask), gamma, lam)
  for b in range(3):
    ts = np.flatnonzero(mask[b])
    a_next = 0.0
    for k in reversed(range(len(ts))):
      t = ts[k]
      v_next = vals[b, ts[k + 1]] if k + 1 < len(ts) else 0.0
      delta = rewards[b, t] + gamma * v_next - vals[b, t]
      a_next = delta + gamma * lam * a_next
      assert float(adv[b, t]) == pytest.approx(a_next, rel=1e-5, abs=1e-5)
      assert float(ret[b, t]) == pytest.approx(a_next + vals[b, t], rel=1e-5, abs=1e-5)
  assert not np.asarray(adv)[~mask].any() and not np.asarray(ret)[~mask].any()


def test_gae_with_lambda_one_and_zero_values_is_the_reward_to_go():
  r = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
  mask = jnp.asarray([[False, True, True, True]])
  adv, _ = online.gae(r, jnp.zeros_like(r), mask, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[0.0, 6.0, 5.0, 3.0]])


def test_rollout_rows_have_their_own_keys_and_masks(policy, ro):
  prompts, lengths = _prompts(0)
  other = np.concatenate([prompts[:1], TASK.prompts(np.random.default_rng(5), 1)])
  again = online.rollout(jax.random.key(1), policy, policy, MODEL, other, lengths, _gold, RCFG)
  # Rows 0 and 1 (prompt 0's two samples) are drawn with keys fold_in(key, 0) and (key, 1): the
  # other prompt changes neither.
  np.testing.assert_array_equal(np.asarray(again.tokens_BT[:2]), np.asarray(ro.tokens_BT[:2]))
  assert ro.tokens_BT.shape == (4, TASK.prompt_len + TASK.completion_len)
  np.testing.assert_array_equal(np.asarray(ro.prompt_lengths_B), TASK.prompt_len)
  mask = np.asarray(ro.mask_BT)
  n = np.asarray(ro.lengths_B - ro.prompt_lengths_B)
  assert (mask.sum(axis=1) == n).all() and not mask[:, : TASK.prompt_len].any()
  # The policy is its own reference here: every KL term is 0, and log-probs are <= 0 on the mask only.
  np.testing.assert_array_equal(np.asarray(ro.logps_BT), np.asarray(ro.ref_logps_BT))
  assert (np.asarray(ro.logps_BT)[mask] < 0).all() and not np.asarray(ro.logps_BT)[~mask].any()
  completions, n_B = ro.completions
  np.testing.assert_array_equal(np.asarray(n_B), n)
  np.testing.assert_allclose(np.asarray(ro.rewards_B), TASK.score(np.repeat(prompts, 2, 0), np.asarray(completions)))


def test_ppo_rewards_put_the_score_on_the_last_token(ro):
  shifted = ro._replace(ref_logps_BT=ro.ref_logps_BT - 0.5 * ro.mask_BT)  # log pi_old - log pi_ref = 0.5
  r = np.asarray(online.ppo_rewards(shifted, online.PPOConfig(kl_coef=0.2)))
  mask, last = np.asarray(ro.mask_BT), np.asarray(ro.lengths_B) - 1
  for b in range(r.shape[0]):
    expected = np.where(mask[b], -0.1, 0.0)
    expected[last[b]] += float(ro.rewards_B[b])
    np.testing.assert_allclose(r[b], expected, atol=1e-6)


def _ppo_batch(ro, value_params, pcfg):
  return online.ppo_batch(ro, value_params, MODEL, pcfg)


def test_ppo_loss_at_the_old_policy_and_its_clip(policy, ro):
  value_params = reward.init(jax.random.key(2), MODEL)
  pcfg = online.PPOConfig(whiten_advantages=False)
  batch = _ppo_batch(ro, value_params, pcfg)
  params = {"policy": policy, "value": value_params}
  loss, m = online.ppo_loss(params, batch, MODEL, pcfg)
  mask = np.asarray(batch.mask_BT)
  adv = np.asarray(batch.advantages_BT)
  # ratio 1 and V = V_old: L_pi = -mean A, L_V = 1/2 mean (V - G)^2 = 1/2 mean A^2
  assert float(m["policy_loss"]) == pytest.approx(-adv[mask].mean(), rel=1e-5, abs=1e-6)
  assert float(m["value_loss"]) == pytest.approx(0.5 * (adv[mask] ** 2).mean(), rel=1e-5, abs=1e-6)
  assert float(m["approx_kl"]) == pytest.approx(0.0, abs=1e-6) and float(m["clip_fraction"]) == 0.0
  assert float(loss) == pytest.approx(float(m["policy_loss"]) + pcfg.vf_coef * float(m["value_loss"]), rel=1e-6)
  # Old log-probs 1 nat lower and positive advantages: the ratio e > 1 + eps is clipped, so the
  # policy gets no gradient.
  clipped = batch._replace(logps_BT=batch.logps_BT - 1.0 * batch.mask_BT, advantages_BT=1.0 * batch.mask_BT)
  grads = jax.grad(lambda p: online.ppo_loss(p, clipped, MODEL, pcfg)[1]["policy_loss"])(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["policy"])) == 0.0
  # Unclipped (old log-probs equal): the gradient raises log pi where A > 0.
  pushed = batch._replace(advantages_BT=1.0 * batch.mask_BT)
  grads = jax.grad(lambda p: online.ppo_loss(p, pushed, MODEL, pcfg)[1]["policy_loss"])(params)
  moved = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  logp = lambda p: float(online._token_logps(p["policy"], batch.tokens_BT, batch.mask_BT, MODEL).sum())
  assert logp(moved) > logp(params)


def test_rloo_advantages_against_a_loop(ro):
  y = 2
  lcfg = online.RLOOConfig(kl_coef=0.3)
  shifted = ro._replace(ref_logps_BT=ro.ref_logps_BT - 0.25 * ro.mask_BT)
  adv = np.asarray(online.rloo_advantages(shifted, y, lcfg))
  kl = np.asarray(shifted.kl_B())
  r = np.asarray(ro.rewards_B) - 0.3 * kl
  for b in range(len(r)):
    group = range(b - b % y, b - b % y + y)
    assert adv[b] == pytest.approx(r[b] - np.mean([r[j] for j in group if j != b]), abs=1e-5)
  np.testing.assert_allclose(adv.reshape(-1, y).sum(axis=1), 0.0, atol=1e-5)  # the baseline's invariant
  with pytest.raises(ValueError, match="samples_per_prompt"):
    online.rloo_advantages(ro, 1, lcfg)


def test_best_worst_pairs_drop_ties(ro):
  rewards = jnp.asarray([1.0, 3.0, 2.0, 2.0])
  pairs, dropped = online.best_worst_pairs(ro._replace(rewards_B=rewards), 2)
  assert dropped == 1 and pairs.chosen_BT.shape[0] == 1
  np.testing.assert_array_equal(pairs.chosen_BT[0], np.asarray(ro.tokens_BT[1]))
  np.testing.assert_array_equal(pairs.rejected_BT[0], np.asarray(ro.tokens_BT[0]))


def test_rollout_refuses_bad_rewards_and_configs(policy):
  prompts, lengths = _prompts(0)
  with pytest.raises(ValueError, match="reward_fn: expected float rewards of shape"):
    online.rollout(jax.random.key(0), policy, policy, MODEL, prompts, lengths, lambda *a: jnp.zeros(3), RCFG)
  with pytest.raises(ValueError, match="reward_fn's rewards"):
    online.rollout(jax.random.key(0), policy, policy, MODEL, prompts, lengths, lambda *a: jnp.full(4, jnp.nan), RCFG)
  with pytest.raises(ValueError, match="prompts_BT"):
    online.rollout(jax.random.key(0), policy, policy, MODEL, prompts + 100, lengths, _gold, RCFG)
  with pytest.raises(ValueError, match="clip"):
    online.PPOConfig(clip=0.0)
  with pytest.raises(ValueError, match="samples_per_prompt"):
    online.train_rloo(
      jax.random.key(0),
      policy,
      MODEL,
      _prompts,
      _gold,
      rcfg=online.RolloutConfig(max_new_tokens=4),
      lcfg=online.RLOOConfig(),
      tcfg=TCFG,
      iterations=1,
    )


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_ppo_loop_trains_and_resumes(policy, tmp_path):
  pcfg = online.PPOConfig(epochs=2, minibatches=2)
  value_params = reward.init(jax.random.key(3), MODEL)
  run = lambda iterations, directory: online.train_ppo(
    jax.random.key(4),
    policy,
    value_params,
    MODEL,
    _prompts,
    _gold,
    rcfg=RCFG,
    pcfg=pcfg,
    tcfg=TCFG,
    iterations=iterations,
    checkpoint_dir=directory,
  )
  straight, history = run(2, None)
  assert len(history) == 2 and {"reward", "kl", "policy_loss", "value_loss"} <= set(history[0])
  assert _changed(straight.train.params["policy"], policy) and _changed(straight.train.params["value"], value_params)
  run(1, tmp_path)
  resumed, rest = run(2, tmp_path)  # iteration 1 only, from iteration 0's checkpoint
  assert len(rest) == 1 and int(resumed.step) == 2
  for a, b in zip(jax.tree.leaves(straight.train.params), jax.tree.leaves(resumed.train.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  # Fewer iterations than the directory already holds: refused, not the 2-iteration state returned as 1's.
  with pytest.raises(ValueError, match="iterations: expected at least the 2 iterations already saved"):
    run(1, tmp_path)


def test_ppo_and_rloo_refuse_samples_off_their_log_probs(policy):
  # A rollout's log-probs are the policy's at temperature 1; samples at another temperature would
  # make PPO's ratio and RLOO's score function off-policy without a correction.
  hot = online.RolloutConfig(
    max_new_tokens=TASK.completion_len, stop_ids=(tasks.EOS,), samples_per_prompt=2, temperature=0.7
  )
  with pytest.raises(ValueError, match="rcfg.temperature: expected 1.0"):
    online.train_rloo(
      jax.random.key(0), policy, MODEL, _prompts, _gold, rcfg=hot, lcfg=online.RLOOConfig(), tcfg=TCFG, iterations=1
    )
  value_params = reward.init(jax.random.key(3), MODEL)
  with pytest.raises(ValueError, match="rcfg.temperature: expected 1.0"):
    online.train_ppo(
      jax.random.key(0),
      policy,
      value_params,
      MODEL,
      _prompts,
      _gold,
      rcfg=hot,
      pcfg=online.PPOConfig(),
      tcfg=TCFG,
      iterations=1,
    )


def test_values_read_the_prefix_before_each_token(ro):
  # V_t scores tokens_<t, the state log pi(y_t) is drawn from: the reward model's reward of that prefix.
  value_params = reward.init(jax.random.key(2), MODEL)
  value_params["head"] = {"w": jax.random.normal(jax.random.key(7), (MODEL.dim,)), "b": jnp.float32(0.3)}
  v = np.asarray(online.values(value_params, ro.tokens_BT, MODEL))
  assert not v[:, 0].any()
  for t in range(1, ro.tokens_BT.shape[1]):
    prefix = np.asarray(reward.rewards(value_params, ro.tokens_BT, jnp.full(ro.tokens_BT.shape[0], t), MODEL))
    np.testing.assert_allclose(v[:, t], prefix, rtol=1e-5, atol=1e-5)


def test_rloo_and_iterative_dpo_loops_move_the_policy(policy):
  common = dict(rcfg=RCFG, tcfg=TCFG)
  rloo, history = online.train_rloo(
    jax.random.key(5), policy, MODEL, _prompts, _gold, lcfg=online.RLOOConfig(), iterations=1, **common
  )
  assert _changed(rloo.train.params, policy) and history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
  # Prompts whose two samples score alike are dropped; rewards with no ties make every prompt a pair.
  distinct = lambda p, n, c, m: _gold(p, n, c, m) + 0.01 * jnp.arange(c.shape[0])
  idpo, history = online.train_iterative_dpo(
    jax.random.key(6), policy, MODEL, _prompts, distinct, icfg=online.IterativeDPOConfig(steps=2), rounds=1, **common
  )
  # Step 1 starts at the reference (loss ln 2); the second step's loss on the same pairs is lower.
  assert history[0]["pairs"] == 2 and history[0]["loss"] < np.log(2) - 0.01
  assert _changed(idpo.train.params, policy)
  # TR-DPO's hard update after every step: step 2 starts with the reference equal to the policy,
  # so its loss is ln 2 again (the config key is applied, not ignored).
  synced = dpo.PreferenceConfig(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0)
  _, history = online.train_iterative_dpo(
    jax.random.key(6),
    policy,
    MODEL,
    _prompts,
    distinct,
    icfg=online.IterativeDPOConfig(steps=2, loss=synced),
    rounds=1,
    **common,
  )
  assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
