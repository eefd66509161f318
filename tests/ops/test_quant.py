"""INT8 / FP8 quantization against the seed's worked example, a numpy E4M3 emulation and
rounding bounds; the quantized matmul against the dequantized float one."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import quant


def test_the_worked_example():
  x = jnp.array([1.2, -0.5, -4.3, 1.2, -3.1, 0.8, 2.4, 5.4])
  t = quant.quantize(x, "int8")
  assert float(t.scale.reshape(())) == pytest.approx(127 / 5.4) and round(float(t.scale.reshape(())), 1) == 23.5
  assert t.q.dtype == jnp.int8
  assert t.q.tolist() == [28, -12, -101, 28, -73, 19, 56, 127]


@pytest.mark.parametrize("granularity", ["tensor", "row", "channel"])
def test_int8_round_trip_is_within_half_a_step(np_rng, granularity):
  x = np_rng.standard_t(3, size=(37, 19)).astype(np.float32)  # odd shape, heavy tails
  t = quant.quantize(jnp.asarray(x), "int8", granularity)
  axis = {"tensor": None, "row": 1, "channel": 0}[granularity]
  half_step = np.abs(x).max(axis=axis, keepdims=True) / 127 / 2
  assert np.all(np.abs(np.asarray(quant.dequantize(t)) - x) <= half_step * (1 + 1e-5))
  assert t.scale.shape == {"tensor": (1, 1), "row": (37, 1), "channel": (1, 19)}[granularity]


def _e4m3_numpy(v: np.ndarray) -> np.ndarray:
  """Round to the nearest E4M3 value (ties to even), saturating at 448: 3 mantissa bits,
  exponents -6 .. 8, subnormals in steps of 2^-9."""
  v = np.clip(v.astype(np.float64), -448.0, 448.0)
  exponent = np.maximum(np.floor(np.log2(np.maximum(np.abs(v), 2.0**-30))), -6.0)
  step = 2.0 ** (exponent - 3)
  return np.clip(np.round(v / step) * step, -448.0, 448.0)  # np.round is half-to-even


def test_fp8_matches_a_numpy_e4m3_emulation_and_saturates(np_rng):
  x = np.concatenate([np_rng.normal(size=(4, 61)) * 10.0 ** np_rng.integers(-3, 3, (4, 1)), [[0.0] * 61]])
  x = x.astype(np.float32)
  x[0, :3] = [1e6, -1e6, 449.0]
  t = quant.quantize(jnp.asarray(x), "fp8", "row")
  assert t.q.dtype == jnp.float8_e4m3fn
  scale = np.asarray(t.scale)
  np.testing.assert_array_equal(np.asarray(t.q, np.float64), _e4m3_numpy(x * scale))  # float32 product, as XLA
  assert np.isfinite(np.asarray(quant.dequantize(t))).all()
  bounded = quant.quantize(jnp.asarray(x[:1]), "fp8", "row", scale_ub=1200.0)
  assert float(bounded.scale[0, 0]) == pytest.approx(448 / 1200)
  assert np.asarray(bounded.q, np.float32)[0, :2].tolist() == [448.0, -448.0]  # outliers saturate, no NaN


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_zero_rows_and_zero_tensors_give_zeros(fmt):
  x = jnp.zeros((3, 5)).at[1].set(jnp.arange(5.0))
  for granularity in ("tensor", "row", "channel"):
    out = np.asarray(quant.dequantize(quant.quantize(x, fmt, granularity)))
    assert np.isfinite(out).all() and (out[0] == 0).all() and (out[2] == 0).all()
  assert (np.asarray(quant.dequantize(quant.quantize(jnp.zeros(7), fmt))) == 0).all()
  tiny = jnp.zeros((2, 4)).at[0, 1].set(1e-38)  # a denormal max must not make the scale inf (0 * inf = NaN)
  assert np.isfinite(np.asarray(quant.dequantize(quant.quantize(tiny, fmt, "row")))).all()


@pytest.mark.parametrize("fmt, granularity", [("int8", "channel"), ("int8", "tensor"), ("fp8", "channel")])
def test_quantized_matmul_equals_the_dequantized_float_matmul(np_rng, fmt, granularity):
  x = jnp.asarray(np_rng.normal(size=(2, 5, 24)).astype(np.float32))
  w = jnp.asarray(np_rng.normal(size=(24, 11)).astype(np.float32))
  wq = dataclasses.replace(quant.quantize(w, fmt, granularity), activations=fmt)
  xq = quant.quantize(x, fmt, "row")
  expected = np.einsum("btd,de->bte", np.asarray(quant.dequantize(xq), np.float64), np.asarray(quant.dequantize(wq)))
  got = np.asarray(quant.matmul(x, wq))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # int32 accumulation is exact
  exact = np.einsum("btd,de->bte", np.asarray(x, np.float64), np.asarray(w, np.float64))
  rel = np.abs(got - exact).max() / np.abs(exact).max()
  assert rel < (0.02 if fmt == "int8" else 0.1)  # and both stay near the float product


def test_weight_only_dequantizes_then_multiplies(np_rng):
  x = jnp.asarray(np_rng.normal(size=(3, 8)).astype(np.float32))
  wq = quant.quantize(jnp.asarray(np_rng.normal(size=(8, 4)).astype(np.float32)), "int8", "row")
  np.testing.assert_allclose(quant.matmul(x, wq), np.asarray(x) @ np.asarray(quant.dequantize(wq)), rtol=1e-5)
  assert quant.matmul(x.astype(jnp.bfloat16), wq).dtype == jnp.bfloat16


def test_low_precision_dots_accumulate_exactly(np_rng):
  a = np_rng.integers(-127, 128, (16, 32))
  b = np_rng.integers(-127, 128, (32, 8))
  out = quant.dot(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8))
  assert out.dtype == jnp.int32 and (np.asarray(out) == a @ b).all()
  a8, b8 = (jnp.asarray(x / 8, jnp.float8_e4m3fn) for x in (a, b))
  expected = np.asarray(a8, np.float64) @ np.asarray(b8, np.float64)
  np.testing.assert_allclose(quant.dot(a8, b8), expected, rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="fmt: expected 'int8' or 'fp8', got 'int4'"):
    quant.quantize(jnp.ones(3), "int4")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="granularity"):
    quant.quantize(jnp.ones(3), "int8", "block")  # type: ignore[arg-type]
  with pytest.raises(TypeError, match="x: expected a float array"):
    quant.quantize(jnp.ones(3, jnp.int32), "int8")
  with pytest.raises(ValueError, match="scale_ub"):
    quant.quantize(jnp.ones(3), "fp8", scale_ub=0.0)
  row = dataclasses.replace(quant.quantize(jnp.ones((4, 2)), "int8", "row"), activations="int8")
  with pytest.raises(ValueError, match="weight scale constant along D"):
    quant.matmul(jnp.ones((1, 4)), row)
  mixed = dataclasses.replace(quant.quantize(jnp.ones((4, 2)), "int8", "channel"), activations="fp8")
  with pytest.raises(ValueError, match="fp8 activations need fp8 weights, got int8"):
    quant.matmul(jnp.ones((1, 4)), mixed)
  with pytest.raises(ValueError, match="w_DE: expected a matrix"):
    quant.matmul(jnp.ones((1, 3)), quant.quantize(jnp.ones((4, 2)), "int8"))
