"""ops.dense: values against numpy, gradients against einsum's, and the 2-D form of every dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops.dense import dense


def _dots(fn, *args) -> list:
  """The dimension numbers ((lhs contracting, rhs contracting), (lhs batch, rhs batch)) of every
  dot_general in fn's jaxpr."""
  return [e.params["dimension_numbers"] for e in jax.make_jaxpr(fn)(*args).eqns if e.primitive.name == "dot_general"]


@pytest.mark.parametrize(
  "x_shape, w_shape, n_in, spec",
  [
    ((2, 3, 8), (8, 4, 5), 1, "btd,dhk->bthk"),  # a head projection, wq [D, H, K]
    ((2, 3, 4, 5), (4, 5, 8), 2, "bthk,hkd->btd"),  # wo [H, K, D]
    ((7, 8), (8, 6), 1, "nd,de->ne"),
  ],
)
def test_dense_equals_einsum_in_values_and_gradients(np_rng, x_shape, w_shape, n_in, spec):
  x = np_rng.normal(size=x_shape).astype(np.float32)
  w = np_rng.normal(size=w_shape).astype(np.float32)
  np.testing.assert_allclose(dense(jnp.asarray(x), jnp.asarray(w), n_in=n_in), np.einsum(spec, x, w), rtol=1e-5)
  y_bar = np_rng.normal(size=np.einsum(spec, x, w).shape).astype(np.float32)
  ours = jax.grad(lambda x, w: jnp.sum(dense(x, w, n_in=n_in) * y_bar), argnums=(0, 1))(x, w)
  theirs = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * y_bar), argnums=(0, 1))(x, w)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_dot_of_the_forward_and_both_gradients_is_a_plain_2d_matmul():
  x, w = jnp.ones((2, 3, 4, 5)), jnp.ones((4, 5, 8))
  loss = lambda dot: lambda x, w: jnp.sum(dot(x, w) ** 2)
  ours = _dots(jax.grad(loss(lambda x, w: dense(x, w, n_in=2)), argnums=(0, 1)), x, w)
  assert len(ours) == 3 and all(len(c[0]) == 1 and not b[0] for c, b in ours), ours
  # What it replaces: the einsum's weight gradient contracts b, t (and the input gradient h, k).
  theirs = _dots(jax.grad(loss(lambda x, w: jnp.einsum("bthk,hkd->btd", x, w)), argnums=(0, 1)), x, w)
  assert any(len(c[0]) > 1 for c, _ in theirs), theirs


def test_dense_accumulates_in_float32_and_returns_the_asked_dtype(np_rng):
  x = jnp.asarray(np_rng.normal(size=(4, 64)), jnp.bfloat16)
  w = jnp.asarray(np_rng.normal(size=(64, 3)), jnp.bfloat16)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  out = dense(x, w, out_dtype=jnp.float32)
  assert out.dtype == jnp.float32 and dense(x, w).dtype == jnp.bfloat16
  assert dense(x, w.astype(jnp.float32)).dtype == jnp.float32  # promoted, as the einsum's was
  # A bf16 model's backward pass stays in bf16: every dot of the gradient takes bf16 operands.
  grad = jax.make_jaxpr(jax.grad(lambda x, w: dense(x, w).astype(jnp.float32).sum(), argnums=(0, 1)))(x, w)
  assert {v.aval.dtype for e in grad.eqns if e.primitive.name == "dot_general" for v in e.invars} == {
    jnp.dtype(jnp.bfloat16)
  }
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-4)


def test_mismatched_axes_name_both_shapes():
  with pytest.raises(
    ValueError, match=r"x, w: x's last 2 axes \(4, 5\) must equal w's first 2, got w of shape \(5, 4, 8\)"
  ):
    dense(jnp.ones((2, 4, 5)), jnp.ones((5, 4, 8)), n_in=2)
  with pytest.raises(ValueError, match="n_in: expected 1 .. min"):
    dense(jnp.ones((2, 4)), jnp.ones((4, 3)), n_in=0)
