"""The closed-form theory of phase 2 (Ren et al., arXiv 2407.19198).

Shapes: n variables, M = 2^n subsets (bitmask indices as in `interp.interactions`), O = n + 1 orders.

The output is modelled as f(x_S) = sum_T w_T J_T(x_S) with triggering functions
J_T(x_S) = 1(T subset S) (J: the M x M 0/1 matrix, J[S, T]). Parameter noise makes noise
on J_T with variance 2^{|T|} sigma^2; minimising the expected squared error to y = J w*
gives (Theorem 3)

  w_hat = (J^T J + M diag(c))^{-1} J^T y,   c_T = 2^{|T|} sigma^2,

so w_hat = M_hat w* with M_hat = (J^T J + M diag(c))^{-1} J^T J. Rows of M_hat of one order
have equal norms; r(k) = ||m_hat_T|| / ||m_hat_T'|| (|T| = k, |T'| = k + 1) exceeds 1 and
falls to 1 as sigma^2 -> 0: training, modelled as sigma^2 decreasing, learns higher orders
later. Computed in float64 with numpy (M is at most a few thousand here).
"""

from __future__ import annotations

import numpy as np

from paperjax.interp.interactions import subset_orders

MAX_THEORY_VARIABLES = 12  # M x M float64 matrices: 16M entries at n = 12
SIGMA2_GRID = np.logspace(-8, 2, 101)  # fit_sigma2's default grid; a fit on either end is only a bound


def triggering_matrix(n: int) -> np.ndarray:
  """J[S, T] = 1 if T is a subset of S, float64 [M, M]."""
  _check(n)
  idx = np.arange(2**n)
  return ((idx[:, None] & idx[None, :]) == idx[None, :]).astype(np.float64)


def _system(n: int, sigma2: float) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(sigma2, (bool, np.bool_)) or not isinstance(sigma2, (int, float, np.integer, np.floating)):
    raise TypeError(f"sigma2: expected a float >= 0, got {type(sigma2).__name__} {sigma2!r}")
  if not 0 <= sigma2 < np.inf:
    raise ValueError(f"sigma2: expected a finite float >= 0, got {sigma2}")
  j = triggering_matrix(n)
  c = 2.0 ** subset_orders(n) * sigma2
  return j, j.T @ j + 2**n * np.diag(c)


def closed_form_weights(w_star: np.ndarray, n: int, sigma2: float) -> np.ndarray:
  """w_hat = M_hat w* (the optimum for the target y = J w*); w_star [M] or a batch [X, M]."""
  _check(n)
  w_star = np.asarray(w_star, np.float64)
  if w_star.shape[-1:] != (2**n,) or w_star.ndim > 2:
    raise ValueError(f"w_star: expected shape ({2**n},) or [X, {2**n}] for n={n}, got {w_star.shape}")
  if not np.isfinite(w_star).all():
    raise ValueError(f"w_star: expected finite interactions, got {int((~np.isfinite(w_star)).sum())} NaN or inf")
  return w_star @ m_hat(n, sigma2).T


def m_hat(n: int, sigma2: float) -> np.ndarray:
  """M_hat = (J^T J + 2^n diag(c))^{-1} J^T J, float64 [M, M]."""
  j, a = _system(n, sigma2)
  return np.linalg.solve(a, j.T @ j)


def order_ratios(n: int, sigma2: float) -> np.ndarray:
  """r(k) = ||m_hat_T|| / ||m_hat_T'|| for |T| = k, |T'| = k + 1, k = 1 .. n - 1."""
  norms = np.linalg.norm(m_hat(n, sigma2), axis=1)
  orders = subset_orders(n)
  per_order = np.array([norms[orders == k].mean() for k in range(n + 1)])
  return per_order[1:-1] / per_order[2:]


def order_distribution(w: np.ndarray, n: int, tau: float = 0.0) -> np.ndarray:
  """Strength per order, sum over |T| = k of |w_T| >= tau (averaged over rows of a batch
  [X, M]), normalised to mean 1 over k = 1 .. n; shape [n + 1], entry 0 is 0."""
  orders = subset_orders(n)  # checks n
  w = np.asarray(w, np.float64)
  if w.shape[-1:] != (2**n,) or w.ndim > 2:
    raise ValueError(f"w: expected shape ({2**n},) or [X, {2**n}] for n={n}, got {w.shape}")
  if not 0 <= tau < np.inf:
    raise ValueError(f"tau: expected a finite salience threshold >= 0, got {tau}")
  w = np.abs(w).reshape(-1, 2**n)
  kept = np.where(w >= tau, w, 0.0).mean(axis=0)
  strength = np.bincount(orders, weights=kept, minlength=n + 1)
  strength[0] = 0.0
  return strength / max(strength[1:].mean(), 1e-300)


def fit_sigma2(
  measured: np.ndarray, w_star: np.ndarray, n: int, *, tau: float = 0.0, grid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The sigma^2 on a log grid whose predicted order distribution is closest (L2) to `measured`.

  measured: order distributions [n + 1] or one per checkpoint [E, n + 1] (as `order_distribution`).
  w_star: the target interactions, [M] or a batch [X, M] (predictions averaged over rows).
  tau: salience threshold applied to the predicted w_hat, as to the measurement.
  Returns (sigma2, predicted distribution at it), per checkpoint when measured is 2-D. A
  sigma2 on the grid's first or last point is a bound (the best fit may lie beyond it).
  """
  _check(n)
  measured = np.asarray(measured, np.float64)
  if measured.shape[-1:] != (n + 1,) or measured.ndim > 2:
    raise ValueError(f"measured: expected order distributions of shape [..., {n + 1}], got {measured.shape}")
  if not np.isfinite(measured).all():
    raise ValueError(f"measured: expected finite order distributions, got {measured.tolist()}")
  grid = SIGMA2_GRID if grid is None else np.asarray(grid, np.float64)
  if grid.ndim != 1 or grid.size < 1 or not (np.isfinite(grid) & (grid >= 0)).all():
    raise ValueError(f"grid: expected a 1-D grid of finite sigma^2 >= 0, got {grid.tolist()}")
  predictions = np.stack([order_distribution(closed_form_weights(w_star, n, s2), n, tau) for s2 in grid])
  errors = ((predictions[None, :, 1:] - np.atleast_2d(measured)[:, None, 1:]) ** 2).sum(axis=-1)
  best = np.argmin(errors, axis=1)
  if measured.ndim == 1:
    return grid[best[0]], predictions[best[0]]
  return grid[best], predictions[best]


def relative_residual(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
  """||predicted - measured|| / ||measured|| over orders 1 .. n (the last axis), per distribution."""
  if np.shape(predicted) != np.shape(measured) or np.ndim(measured) < 1:
    raise ValueError(f"predicted: expected the shape of measured {np.shape(measured)}, got {np.shape(predicted)}")
  measured, predicted = np.asarray(measured, np.float64)[..., 1:], np.asarray(predicted, np.float64)[..., 1:]
  return np.linalg.norm(predicted - measured, axis=-1) / np.maximum(np.linalg.norm(measured, axis=-1), 1e-300)


def _check(n: int) -> None:
  if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THEORY_VARIABLES:
    raise ValueError(f"n: expected 1 <= n <= {MAX_THEORY_VARIABLES} (the theory builds 2^n x 2^n matrices), got {n}")
