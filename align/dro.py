"""DRO: Direct Reward Optimisation from single-trajectory feedback (Richemond et al. 2024,
arXiv 2405.19107).

Shapes: B batch: (prompt, completion, reward) triplets; the value is one number per row's prompt.

Each row holds one completion y of a prompt x and its scalar (or binary) reward r(x, y), with
no second completion to compare against. With rho = log pi(y|x) - log pi_ref(y|x) (summed
over the completion) and a learned value V(x), DRO minimises

  L(theta, V) = 1/2 E[(r(x, y) - V(x) - tau rho)^2]

whose minimiser is the KL-regularised optimum (V the soft value tau log Z(x)). Its gradients:

  grad_V     L = -E[r - V - tau rho]
  grad_theta L = -tau E[grad log pi(y|x) (r - V) - tau/2 grad rho^2]

The paper's DRO-V (Algorithm 1) trains the two with separate losses, each holding the other's
quantity fixed: the value regresses onto r - tau sg(rho), and the policy sees sg(V) as its
baseline. Split that way the gradients are still the ones above (the stop-gradients only keep
each loss from updating the other's parameters), except that the policy gradient is divided
by tau (`rescale_policy`, the default, as in Algorithm 1; False keeps the exact gradient of L).

`dro_loss` returns L's value as the loss, with those gradients attached: its gradient with
respect to the policy's log-probs and the values is the split form's, so one
`train.make_step` over a params tree holding both the policy and the value trains DRO-V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paperjax.align.logprobs import SequenceLogProbs, check_sequence
from paperjax.ops import checks


@checks.config
class DROConfig:
  """tau: the KL-regularisation temperature (default 1.0, not a recipe from the paper);
  rescale_policy: divide the policy gradient by tau (DRO-V's Algorithm 1)."""

  tau: checks.PositiveFloat = 1.0
  rescale_policy: bool = True


def dro_loss(
  policy: SequenceLogProbs,
  reference: SequenceLogProbs,
  rewards_B: jax.Array,
  values_B: jax.Array,
  cfg: DROConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = 1/2 mean_B (r - V - tau rho)^2 with rho = policy.sum_B - reference.sum_B (module docstring),
  returned with DRO-V's gradients: d/d log pi = -(r - V) + tau rho (times tau without
  `rescale_policy`), d/dV = -(r - V - tau rho), each per row and divided by B. The reference
  log-probs get no gradient. Metrics: value_error (mean r - V - tau rho), rewards (mean r),
  values (mean V), log_ratio (mean rho).

  Value checks (finite, log-probs <= 0, counts >= 0: `logprobs.check_sequence`) run on concrete inputs, or inside
  `ops.checks.checked`."""
  if not isinstance(cfg, DROConfig):
    raise TypeError(f"cfg: expected a dro.DROConfig, got {type(cfg).__name__}")
  for name, s in (("policy", policy), ("reference", reference)):
    if not isinstance(s, SequenceLogProbs):
      raise TypeError(f"{name}: expected logprobs.SequenceLogProbs, got {type(s).__name__}")
  for name, x in (("rewards_B", rewards_B), ("values_B", values_B)):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}: expected a float array [B], got {getattr(x, 'dtype', type(x).__name__)}")
  shapes = {
    "policy.sum_B": policy.sum_B.shape,
    "reference.sum_B": reference.sum_B.shape,
    "rewards_B": rewards_B.shape,
    "values_B": values_B.shape,
  }
  if len(set(shapes.values())) != 1 or len(rewards_B.shape) != 1:
    raise ValueError(f"policy, reference, rewards_B, values_B: expected one shape [B], got {shapes}")
  for name, s in (("policy", policy), ("reference", reference)):
    check_sequence(name, s)
  checks.check_finite("rewards_B", rewards_B)
  checks.check_finite("values_B", values_B)
  sg = jax.lax.stop_gradient
  logp_B = policy.sum_B.astype(jnp.float32)
  rho_B = logp_B - sg(reference.sum_B.astype(jnp.float32))
  r_B, v_B = rewards_B.astype(jnp.float32), values_B.astype(jnp.float32)
  residual_B = r_B - v_B - cfg.tau * rho_B
  objective = 0.5 * jnp.mean(residual_B**2)
  # Policy: -[log pi sg(r - V) - tau/2 rho^2]; value: 1/2 (r - V - tau sg(rho))^2.
  policy_B = -(logp_B * sg(r_B - v_B) - 0.5 * cfg.tau * rho_B**2)
  if not cfg.rescale_policy:
    policy_B = cfg.tau * policy_B
  value_B = 0.5 * (r_B - v_B - cfg.tau * sg(rho_B)) ** 2
  surrogate = jnp.mean(policy_B + value_B)
  loss = surrogate + sg(objective - surrogate)  # L's value, the split losses' gradient
  metrics = {
    "value_error": sg(residual_B).mean(),
    "rewards": r_B.mean(),
    "values": sg(v_B).mean(),
    "log_ratio": sg(rho_B).mean(),
  }
  return loss, metrics
