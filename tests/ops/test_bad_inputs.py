"""Bad input never passes silently (issue 31), ops: each case is an eager call on tiny arrays that
must raise the named exception with a message naming the argument (and, where it helps, the
expectation and the value). Value checks also compile into `checks.checked` and vanish from a
plain `jax.jit` (the tests after the table)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.ops import attention, checks, dense, maxsim, mlp, norms, paged_attention, quant, rope, sampling
from paperjax.ops import linear_attention as la

KEY = jax.random.key(0)
NAN, INF = math.nan, math.inf


def _logits(*rows: list[float]) -> np.ndarray:
  return np.asarray(rows, np.float32)


def _qkv(batch=1, time=2, heads=2, groups=1, dim=4):
  q = np.zeros((batch, time, heads, dim), np.float32)
  return q, np.zeros((batch, time, groups, dim), np.float32), np.zeros((batch, time, groups, dim), np.float32)


# A pool of 4 pages of 2 slots, G=1, K=4; two rows with tables of 3 entries.
POOL = np.zeros((1, 4, 2, 4), np.float32)
Q_BHK = np.zeros((2, 2, 4), np.float32)
TABLES = np.array([[0, 1, 2], [3, 2, 1]], np.int32)
LENGTHS = np.array([3, 6], np.int32)


def _paged(tables=TABLES, lengths=LENGTHS, q=Q_BHK, impl="reference"):
  return paged_attention.paged_attention(q, POOL, POOL, tables, lengths, impl=impl)


def _write(tables=TABLES, positions=((0, 1), (4, 5)), valid=((True, True), (True, True)), new=None):
  new = np.zeros((2, 2, 1, 4), np.float32) if new is None else new
  return paged_attention.write(POOL, POOL, new, new, tables, np.asarray(positions, np.int32), np.asarray(valid))


# MaxSim: 2 queries of 3 tokens, 3 documents (or passages) of 6 tokens, K=4.
Q_QTK = np.ones((2, 3, 4), np.float32)
D_NSK = np.ones((3, 6, 4), np.float32)


def _phi(time=4):
  return (
    np.ones((1, time, 1, 3), np.float32),
    np.ones((1, time, 1, 3), np.float32),
    np.ones((1, time, 1, 2), np.float32),
  )


CASES = [
  # ---- sampling: the user's cases (token 0 from a NaN row or an all -inf row), then arguments ----
  pytest.param(
    lambda: sampling.select(KEY, _logits([1, NAN, 0], [0, 1, 2])),
    ValueError,
    r"logits_BV: expected logits that are finite or -inf, got \[nan\] at index \[\(0, 1\)\]",
    id="select-nan-row",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1, 2], [-INF, -INF, -INF])),
    ValueError,
    r"logits_BV: expected a logit above -inf in every row, got \[-inf\] at index \[1\]",
    id="select-all-neg-inf-row",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([-INF, -INF]), 0.0),
    ValueError,
    r"logits_BV: expected a logit above -inf",
    id="greedy-all-neg-inf-row",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, INF, 1])),
    ValueError,
    r"logits_BV: expected logits that are finite",
    id="select-pos-inf",
  ),
  pytest.param(
    lambda: sampling.select(KEY, np.zeros((1, 3), np.int32)),
    TypeError,
    r"logits_BV: expected a floating dtype",
    id="select-int-logits",
  ),
  pytest.param(
    lambda: sampling.select(KEY, np.zeros(3, np.float32)),
    ValueError,
    r"logits_BV: expected \[B, V\]",
    id="select-rank-1",
  ),
  pytest.param(
    lambda: sampling.select(KEY, np.zeros((1, 0), np.float32)),
    ValueError,
    r"logits_BV: expected at least one",
    id="select-empty-vocab",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), NAN),
    ValueError,
    r"temperature: expected >= 0 and finite, got nan",
    id="temperature-nan",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), -0.5), ValueError, r"temperature: expected >= 0", id="temperature-neg"
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), "hot"),
    TypeError,
    r"temperature: expected a real number",
    id="temperature-str",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), INF),
    ValueError,
    r"temperature: expected >= 0 and finite",
    id="temp-inf",
  ),
  # ---- lists where arrays go, flags and dtypes (attention, norms, mlp, quant) ----
  pytest.param(
    lambda: attention.make_mask(np.zeros((1, 2)), np.zeros((1, 2)), causal="no"),
    TypeError,
    r"causal: expected a bool, got str 'no'",
    id="make-mask-causal-str",
  ),
  pytest.param(
    lambda: attention.make_mask(
      np.zeros((1, 2)), np.zeros((1, 2)), q_segment_ids_BT=[[0, 0]], kv_segment_ids_BS=[[0, 0]]
    ),
    TypeError,
    r"q_segment_ids_BT: expected an array",
    id="make-mask-segment-list",
  ),
  pytest.param(
    lambda: attention.attention(*_qkv(), [[[True, True], [True, True]]]),
    TypeError,
    r"mask_BTS: expected an array",
    id="attention-mask-list",
  ),
  pytest.param(
    lambda: attention.sliding_window_attention(*_qkv(), 2, q_positions_BT=[[0, 1]]),
    TypeError,
    r"q_positions_BT: expected an array",
    id="swa-positions-list",
  ),
  pytest.param(
    lambda: attention.window_mask(np.zeros((1, 2)), [[0, 1]], 2),
    TypeError,
    r"k_positions_BS: expected an array",
    id="window-mask-list",
  ),
  pytest.param(
    lambda: norms.rms_norm(np.ones((2, 4), np.float32), [1.0, 1.0, 1.0, 1.0]),
    TypeError,
    r"scale_D: expected an array \[D\]",
    id="rms-norm-scale-list",
  ),
  pytest.param(
    lambda: norms.rms_norm(np.ones((2, 4), np.float32), np.ones(4, np.float32), "1e-5"),
    TypeError,
    r"eps: expected a real number, got str",
    id="rms-norm-eps-str",
  ),
  pytest.param(
    lambda: mlp.swiglu(np.ones((1, 4), np.float32), [[1.0] * 2] * 4, np.ones((4, 2)), np.ones((2, 4))),
    TypeError,
    r"w1_DE: expected an array \[D, E\]",
    id="swiglu-weight-list",
  ),
  pytest.param(
    lambda: quant.dequantize(quant.quantize(jnp.ones((2, 2)), "int8"), jnp.int32),
    TypeError,
    r"dtype: expected a float dtype",
    id="dequantize-int-dtype",
  ),
  pytest.param(
    lambda: sampling.check_args(2, jnp.array([0.5, 1.0]), None, None),
    TypeError,
    r"temperature: expected a real number",
    id="temperature-vector",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), top_k=0),
    ValueError,
    r"top_k: expected an int in \[1, 2\], got 0",
    id="top-k-zero",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), top_k=True), ValueError, r"top_k: expected an int", id="top-k-bool"
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), top_k=2.0), ValueError, r"top_k: expected an int", id="top-k-float"
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), top_p=NAN),
    ValueError,
    r"top_p: expected 0 < p <= 1, got nan",
    id="top-p-nan",
  ),
  pytest.param(
    lambda: sampling.select(KEY, _logits([0, 1]), top_p=1.5), ValueError, r"top_p: expected 0 < p <= 1", id="top-p-big"
  ),
  pytest.param(
    lambda: sampling.top_k_logits(_logits([NAN, 1]), 1),
    ValueError,
    r"logits_BV: expected logits that are finite",
    id="top-k-logits-nan",
  ),
  # ---- rope ----
  pytest.param(
    lambda: rope.RopeScaling(factor=NAN), ValueError, r"RopeScaling.factor: expected float >= 1", id="rope-nan"
  ),
  pytest.param(
    lambda: rope.RopeScaling(factor=0.5),
    ValueError,
    r"RopeScaling.factor: expected float >= 1, got float 0.5",
    id="rope-factor-below-1",
  ),
  pytest.param(
    lambda: rope.RopeScaling(original_max_position=0),
    ValueError,
    r"RopeScaling.original_max_position: expected",
    id="rope-context-0",
  ),
  pytest.param(
    lambda: rope.RopeScaling(original_max_position=8192.0),
    TypeError,
    r"RopeScaling.original_max_position: expected int",
    id="rope-context-float",
  ),
  pytest.param(
    lambda: rope.RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0),
    ValueError,
    r"low_freq_factor, high_freq_factor: expected 0 < low < high",
    id="rope-bands-swapped",
  ),
  pytest.param(
    lambda: rope.inv_frequencies(8, NAN), ValueError, r"theta: expected a float > 1, got nan", id="theta-nan"
  ),
  pytest.param(
    lambda: rope.inv_frequencies(7), ValueError, r"head_dim: expected a positive even int", id="head-dim-odd"
  ),
  pytest.param(
    lambda: rope.inv_frequencies(8, scaling={"factor": 8.0}),
    TypeError,
    r"scaling: expected a RopeScaling",
    id="rope-scaling-dict",
  ),
  pytest.param(
    lambda: rope.apply_rope(np.zeros((1, 2, 1, 4), np.float32), np.zeros((1, 2), np.float32), np.ones(2, np.float32)),
    TypeError,
    r"positions_BT: expected integer positions",
    id="rope-float-positions",
  ),
  pytest.param(
    lambda: rope.apply_rope(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32), np.ones(2, np.float32)),
    ValueError,
    r"x_BTHK: expected \[B, T, H, K\]",
    id="rope-rank-3",
  ),
  pytest.param(
    lambda: rope.apply_rope(np.zeros((1, 2, 1, 4), np.int32), np.zeros((1, 2), np.int32), np.ones(2, np.float32)),
    TypeError,
    r"x_BTHK: expected a floating dtype",
    id="rope-int-x",
  ),
  pytest.param(
    lambda: rope.rotate(
      np.zeros((1, 2, 1, 4), np.float32), np.ones((1, 3, 2), np.float32), np.ones((1, 3, 2), np.float32)
    ),
    ValueError,
    r"cos_BTA, sin_BTA: expected shape \(1, 2, 2\) for x of shape \(1, 2, 1, 4\), got \(1, 3, 2\)",
    id="rope-tables-wrong-length",
  ),
  pytest.param(
    lambda: rope.rotate(np.zeros((1, 2, 1, 4), np.float32), np.ones((1, 2, 2), np.int32), np.ones((1, 2, 2), np.int32)),
    TypeError,
    r"cos_BTA: expected a floating dtype \(rope.tables\), got int32",
    id="rope-tables-int",
  ),
  pytest.param(
    lambda: rope.apply_rope(np.zeros((1, 2, 1, 5), np.float32), np.zeros((1, 2), np.int32), np.ones(3, np.float32)),
    ValueError,
    r"x_BTHK: expected an even head dim K",
    id="rope-odd-head-dim",
  ),
  pytest.param(
    lambda: rope.tables(np.zeros((1, 2), np.int32), np.ones((2, 1), np.float32)),
    ValueError,
    r"inv_freq_A: expected \[A\]",
    id="rope-tables-inv-freq-rank",
  ),
  # ---- norms, mlp, dense ----
  pytest.param(
    lambda: norms.rms_norm(np.zeros((1, 4), np.float32), np.ones(4, np.float32), 0.0),
    ValueError,
    r"eps: expected a finite number > 0, got 0.0",
    id="rms-eps-0",
  ),
  pytest.param(
    lambda: norms.rms_norm(np.zeros((1, 4), np.float32), np.ones(4, np.float32), NAN),
    ValueError,
    r"eps: expected a finite number > 0, got nan",
    id="rms-eps-nan",
  ),
  pytest.param(
    lambda: norms.rms_norm(np.ones((1, 4), np.int32), np.ones(4, np.float32)),
    TypeError,
    r"x_BTD: expected a float",
    id="rms-int-x",
  ),
  pytest.param(
    lambda: mlp.swiglu(np.ones((1, 4), np.int32), *(np.ones(s, np.float32) for s in ((4, 8), (4, 8), (8, 4)))),
    TypeError,
    r"x_BTD: expected a float",
    id="swiglu-int-x",
  ),
  pytest.param(
    lambda: dense.dense([[1.0, 2.0]], np.ones((2, 3), np.float32)), TypeError, r"x: expected an array", id="dense-list"
  ),
  pytest.param(
    lambda: dense.dense(np.ones((1, 2), np.float32), np.ones((2, 3), np.float32), n_in=1.0),
    ValueError,
    r"n_in: expected",
    id="dense-float-n-in",
  ),
  # ---- attention ----
  pytest.param(
    lambda: attention.attention(*_qkv(), np.zeros((1, 2, 2), np.float32)),
    TypeError,
    r"mask_BTS: expected a bool mask",
    id="attention-additive-mask",
  ),
  pytest.param(lambda: attention.attention(*_qkv(), impl="flash"), ValueError, r"impl: expected", id="attention-impl"),
  pytest.param(
    lambda: attention.attention(*(x.astype(np.int32) for x in _qkv())),
    TypeError,
    r"q_BTHK: expected a floating dtype",
    id="attention-int-qkv",
  ),
  pytest.param(
    lambda: attention.attention(_qkv(batch=2)[0], *_qkv()[1:]),
    ValueError,
    r"k_BSGK: expected batch 2",
    id="attention-batch-mismatch",
  ),
  pytest.param(
    lambda: attention.attention(_qkv(heads=3, groups=2)[0], *_qkv(groups=2)[1:]),
    ValueError,
    r"q_BTHK, k_BSGK: query heads H=3 must be a multiple of kv heads G=2",
    id="attention-heads",
  ),
  pytest.param(
    lambda: attention.make_mask(np.zeros((1, 6), np.int32), np.zeros((1, 6), np.int32), kv_length_B=np.array([9])),
    ValueError,
    r"kv_length_B: expected lengths in \[0, 6\], got \[9\]",
    id="mask-length-beyond-s",
  ),
  pytest.param(
    lambda: attention.make_mask(np.zeros((1, 6), np.int32), np.zeros((1, 6), np.int32), kv_length_B=np.array([-1])),
    ValueError,
    r"kv_length_B: expected lengths in \[0, 6\], got \[-1\]",
    id="mask-length-negative",
  ),
  pytest.param(
    lambda: attention.window_mask(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32), 2.5),
    ValueError,
    r"window: expected an int >= 1, got 2.5",
    id="window-float",
  ),
  # ---- paged attention: the user's cases, then the write and shapes ----
  pytest.param(
    lambda: _paged(tables=np.array([[0, 9, 2], [3, 2, 1]], np.int32)),
    ValueError,
    r"block_tables_BP: expected page ids in \[0, 3\], got \[9\] at index \[\(0, 1\)\]",
    id="paged-block-id-9",
  ),
  pytest.param(
    lambda: _paged(tables=np.array([[-1, 1, 2], [3, 2, 1]], np.int32)),
    ValueError,
    r"block_tables_BP: expected page ids in \[0, 3\], got \[-1\]",
    id="paged-block-id-negative",
  ),
  pytest.param(
    lambda: _paged(lengths=np.array([3, 7], np.int32)),
    ValueError,
    r"lengths_B: expected lengths \(3 pages of 2\) in \[0, 6\], got \[7\] at index \[1\]",
    id="paged-length-beyond-table",
  ),
  pytest.param(
    lambda: _paged(lengths=np.array([-1, 6], np.int32)),
    ValueError,
    r"lengths_B: expected lengths",
    id="paged-length-neg",
  ),
  pytest.param(
    lambda: _paged(lengths=np.array([3.0, 6.0], np.float32)),
    TypeError,
    r"lengths_B: expected integers? \[B\], got float32",
    id="paged-float-lengths",
  ),
  pytest.param(
    lambda: _paged(impl="cuda"), ValueError, r"impl: expected 'auto', 'reference' or 'pallas'", id="paged-impl"
  ),
  pytest.param(
    lambda: paged_attention.paged_attention(
      Q_BHK.astype(np.int32), POOL.astype(np.int32), POOL.astype(np.int32), TABLES, LENGTHS
    ),
    TypeError,
    r"q, k_pages, v_pages: expected a floating dtype",
    id="paged-int-pool",
  ),
  pytest.param(
    lambda: paged_attention.paged_attention_reference(
      Q_BHK[:, None], POOL, POOL, np.array([[0, 1, 2], [3, 8, 1]], np.int32), np.array([[2], [5]], np.int32), LENGTHS
    ),
    ValueError,
    r"block_tables_BP: expected page ids in \[0, 3\], got \[8\]",
    id="paged-reference-block-id",
  ),
  pytest.param(
    lambda: paged_attention.paged_attention_reference(
      Q_BHK[:, None], POOL, POOL, TABLES, np.array([[2.0], [5.0]], np.float32), LENGTHS
    ),
    TypeError,
    r"q_positions_BT: expected integers? \[B, T\]",
    id="paged-reference-float-positions",
  ),
  pytest.param(
    lambda: _write(tables=np.array([[0, 9, 2], [3, 2, 1]], np.int32), positions=((2, 3), (0, 1))),
    ValueError,
    r"block_tables_BP: expected page ids of valid tokens' pages in \[0, 3\], got \[9, 9\]",
    id="write-block-id-9",
  ),
  pytest.param(
    lambda: _write(positions=((0, 6), (4, 5))),
    ValueError,
    r"positions_BT: expected positions of valid tokens in \[0, 5\], got \[6\] at index \[\(0, 1\)\]",
    id="write-beyond-table",
  ),
  pytest.param(
    lambda: _write(valid=((1, 1), (1, 0))), TypeError, r"valid_BT: expected a bool mask", id="write-int-valid"
  ),
  pytest.param(
    lambda: _write(new=np.zeros((2, 2, 2, 4), np.float32)),
    ValueError,
    r"k_BTGK: expected \[B, T, G=1, K=4\]",
    id="write-kv-heads",
  ),
  pytest.param(
    lambda: paged_attention.copy_pages(POOL, np.array([7], np.int32), np.array([0], np.int32)),
    ValueError,
    r"src_N: expected page ids in \[0, 3\], got \[7\]",
    id="copy-from-page-7",
  ),
  pytest.param(
    lambda: paged_attention.copy_pages(POOL, np.array([1], np.int32), np.array([-1], np.int32)),
    ValueError,
    r"dst_N: expected page ids in \[0, 3\], got \[-1\]",
    id="copy-to-negative",
  ),
  pytest.param(
    lambda: paged_attention.copy_pages(POOL, np.array([1.0]), np.array([2.0])),
    TypeError,
    r"src_N: expected integer",
    id="copy-float-ids",
  ),
  pytest.param(
    lambda: paged_attention.copy_pages(POOL, np.array([2], np.int32), np.array([0], np.int32), layers=2),
    ValueError,
    r"src_N: expected page ids in \[0, 1\], got \[2\]",
    id="copy-id-past-layer",
  ),
  # ---- maxsim: the user's cases, then masks, dtypes, dispatch ----
  pytest.param(
    lambda: maxsim.tensor_array_maxsim(Q_QTK, D_NSK, np.array([0, 7, 2], np.int32), 3, impl="reference"),
    ValueError,
    r"passage_doc_Z: expected document ids in \[0, 2\], got \[7\] at index \[1\]",
    id="passage-doc-7-of-3",
  ),
  pytest.param(
    lambda: maxsim.tensor_array_maxsim(Q_QTK, D_NSK, np.array([0, 0, 0], np.int32), 0),
    ValueError,
    r"num_docs: expected an int >= 1",
    id="passage-num-docs-0",
  ),
  pytest.param(
    lambda: maxsim.maxsim(Q_QTK, D_NSK, d_lengths_N=np.array([6, 9, 2]), impl="reference"),
    ValueError,
    r"d_lengths_N: expected lengths in \[0, 6\], got \[9\] at index \[1\]",
    id="maxsim-length-9-of-6",
  ),
  pytest.param(
    lambda: maxsim.maxsim(Q_QTK, D_NSK, d_lengths_N=np.array([6, -1, 2]), impl="reference"),
    ValueError,
    r"d_lengths_N: expected lengths in \[0, 6\], got \[-1\]",
    id="maxsim-length-negative",
  ),
  pytest.param(
    lambda: maxsim.maxsim(Q_QTK, D_NSK, d_lengths_N=np.array([6.0, 1.0, 2.0]), impl="reference"),
    TypeError,
    r"d_lengths_N: expected integer",
    id="maxsim-float-lengths",
  ),
  pytest.param(
    lambda: maxsim.maxsim(Q_QTK, D_NSK, d_mask_NS=np.zeros((3, 6), np.float32), impl="reference"),
    TypeError,
    r"d_mask_NS: expected a bool mask, got float32",
    id="maxsim-float-mask",
  ),
  pytest.param(lambda: maxsim.maxsim(Q_QTK, D_NSK, impl="cuda"), ValueError, r"impl: expected", id="maxsim-impl"),
  pytest.param(
    lambda: maxsim.maxsim(Q_QTK.astype(np.int32), D_NSK.astype(np.int32)),
    TypeError,
    r"q_QTK, d_NSK: expected one dtype",
    id="maxsim-int",
  ),
  pytest.param(
    lambda: maxsim.maxsim_binary(np.zeros((1, 2, 1), np.uint32), np.zeros((1, 2, 1), np.uint32), 0),
    ValueError,
    r"dim: expected the embedding dim, an int >= 1, got 0",
    id="binary-dim-0",
  ),
  pytest.param(
    lambda: maxsim.pack_bits(np.array([[0.5, NAN, -1.0]], np.float32)),
    ValueError,
    r"x_K: expected values that are not NaN, got \[nan\] at index \[\(0, 1\)\]",
    id="pack-bits-nan",
  ),
  pytest.param(
    lambda: maxsim.top_k(np.zeros((1, 3), np.float32), 2.0), ValueError, r"k: expected an int", id="top-k-k"
  ),
  pytest.param(
    lambda: maxsim.two_stage_rerank(Q_QTK, D_NSK, 1, 2, d_bits_NSI=np.zeros((3, 6, 2), np.uint32)),
    ValueError,
    r"d_bits_NSI: expected pack_bits\(d_NSK\) of shape \(3, 6, 1\)",
    id="two-stage-bits-shape",
  ),
  # ---- quant ----
  pytest.param(
    lambda: quant.quantize(np.array([[1.0, NAN]], np.float32), "int8"),
    ValueError,
    r"x: expected finite values, got \[nan\]",
    id="quantize-nan",
  ),
  pytest.param(
    lambda: quant.quantize(np.array([[1.0, INF]], np.float32), "fp8"),
    ValueError,
    r"x: expected finite values",
    id="quantize-inf",
  ),
  pytest.param(
    lambda: quant.quantize(np.ones((2, 2), np.float32), "int4"),
    ValueError,
    r"fmt: expected 'int8' or 'fp8'",
    id="quantize-fmt",
  ),
  pytest.param(
    lambda: quant.quantize(np.ones((2, 2), np.float32), "int8", "rows"),
    ValueError,
    r"granularity: expected 'tensor', 'row' or 'channel', got 'rows'",
    id="quantize-granularity",
  ),
  pytest.param(
    lambda: quant.quantize(np.ones((2, 2), np.float32), "fp8", scale_ub=NAN),
    ValueError,
    r"scale_ub: expected",
    id="quantize-scale-ub-nan",
  ),
  pytest.param(
    lambda: quant.quantize(np.ones((2, 2), np.int32), "int8"),
    TypeError,
    r"x: expected a float array",
    id="quantize-int",
  ),
  pytest.param(
    lambda: quant.matmul(np.ones((1, 2), np.int32), np.ones((2, 3), np.float32)),
    TypeError,
    r"x_BTD: expected a float array",
    id="matmul-int-x",
  ),
  pytest.param(
    lambda: quant.matmul(
      np.ones((1, 2), np.float32), quant.QuantizedTensor(np.ones((2, 3), np.int8), np.ones((1, 3)), activations="int4")
    ),
    ValueError,
    r"w_DE.activations: expected 'int8', 'fp8' or None, got 'int4'",
    id="matmul-activations",
  ),
  # ---- linear attention ----
  pytest.param(lambda: la.causal_chunked(*_phi(), chunk=2.5), ValueError, r"chunk: expected an int >= 1", id="chunk"),
  pytest.param(
    lambda: la.causal_chunked(*_phi(), eps=0.0),
    ValueError,
    r"eps: expected a finite number > 0, got 0.0",
    id="linear-eps-0",
  ),
  pytest.param(
    lambda: la.non_causal(*_phi(), key_mask_BT=np.ones((1, 4), np.float32)),
    TypeError,
    r"key_mask_BT: expected a bool mask \(False at padding\), got float32",
    id="linear-float-key-mask",
  ),
  pytest.param(
    lambda: la.causal_chunked(*_phi(), state=la.empty_state(1, 1, 3, 3)),
    ValueError,
    r"state: expected s \[B, H, F, K\] = \(1, 1, 3, 2\)",
    id="linear-state-shape",
  ),
  pytest.param(
    lambda: la.short_conv(
      np.zeros((1, 4, 2), np.float32), np.ones((3, 2), np.float32), np.zeros((1, 3, 2), np.float32)
    ),
    ValueError,
    r"state_BWD: expected the W - 1 inputs before x, shape \(1, 2, 2\)",
    id="conv-state-shape",
  ),
  pytest.param(
    lambda: la.short_conv(np.zeros((1, 4, 2), np.float32), np.ones((0, 2), np.float32)),
    ValueError,
    r"kernel_WD: expected \[W >= 1, D=2\]",
    id="conv-width-0",
  ),
  pytest.param(
    lambda: la.prefix_linear_attention(*_phi(), *_phi()[1:], 2.0),
    ValueError,
    r"prefix_len: expected 0 < M <= T=4",
    id="pla-float-prefix",
  ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_every_case_names_an_argument():
  # Each expected message starts with the argument(s) it names, then what was expected.
  for case in CASES:
    _, _, match = case.values
    assert re.match(r"^[\w.,\[\]' ]+: (expected|query heads|unknown)", match.replace("\\", "")), case.id


# ---- value checks under checks.checked, and none in a plain jit ----


def _jnp_paged(tables):
  return (jnp.asarray(x) for x in (Q_BHK, POOL, POOL, tables, LENGTHS))


def _has_check(jaxpr) -> bool:
  """Whether a printed jaxpr (nested jaxprs included) holds a checkify check."""
  return re.search(r"\bcheck\[", str(jaxpr)) is not None


def test_paged_attention_checks_compile_into_checked():
  fn = checks.checked(lambda *args: paged_attention.paged_attention(*args, impl="reference"))
  good = fn(*_jnp_paged(TABLES))
  np.testing.assert_allclose(good, paged_attention.paged_attention(*_jnp_paged(TABLES), impl="reference"))
  with pytest.raises(checkify.JaxRuntimeError, match=r"block_tables_BP: expected page ids in \[0, 3\], got 9"):
    fn(*_jnp_paged(np.array([[0, 9, 2], [3, 2, 1]], np.int32)))


def test_paged_attention_in_plain_jit_has_no_checks():
  # The same op under the user's jax.jit: it compiles (values are tracers, the checks cannot
  # run), gives the eager result, and its program holds no checkify check.
  raw = lambda *args: paged_attention.paged_attention(*args, impl="reference")
  args = tuple(_jnp_paged(TABLES))
  np.testing.assert_allclose(jax.jit(raw)(*args), raw(*args))

  def probe(x):
    checkify.check(x > 0, "x: expected > 0")
    return x

  assert _has_check(jax.make_jaxpr(probe)(1.0))  # the probe sees a check where there is one
  assert not _has_check(jax.make_jaxpr(jax.jit(raw))(*args))


def test_select_checks_compile_into_checked():
  fn = checks.checked(lambda key, logits: sampling.select(key, logits, 1.0))
  assert fn(KEY, jnp.asarray(_logits([0, 1, 2]))).shape == (1,)
  with pytest.raises(checkify.JaxRuntimeError, match=r"logits_BV: expected logits that are finite or -inf, got nan"):
    fn(KEY, jnp.asarray(_logits([0, 1, 2], [1, NAN, 0])))
  plain = jax.jit(lambda key, logits: sampling.select(key, logits, 1.0))
  assert plain(KEY, jnp.asarray(_logits([-INF, -INF]))).shape == (1,)  # a plain jit checks nothing (the user's call)


def test_tensor_array_checks_compile_into_checked():
  fn = checks.checked(lambda q, p, doc: maxsim.tensor_array_maxsim(q, p, doc, 3, impl="reference"), static_argnames=())
  q, p = jnp.asarray(Q_QTK), jnp.asarray(D_NSK)
  np.testing.assert_allclose(fn(q, p, jnp.array([0, 1, 2])), 4 * 3 * np.ones((2, 3)))
  with pytest.raises(checkify.JaxRuntimeError, match=r"passage_doc_Z: expected document ids in \[0, 2\], got 7"):
    fn(q, p, jnp.array([0, 7, 2]))


# ---- tiny temperatures and huge logits: the max logit is subtracted before dividing by T ----


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  "row, temperature, kwargs",
  [
    ([0.0, 1.0, 3.0, 2.0], 1e-40, {}),
    ([0.0, 3e38, 1e38], 0.5, {}),
    ([0.0, 1.0, 3.0, 2.0], 1e-40, {"top_k": 2}),
    ([0.0, 1.0, 3.0, 2.0], 1e-40, {"top_p": 0.9}),
    ([0.0, 3e38, 1e38], 0.5, {"top_k": 2, "top_p": 0.5}),
    ([0.0, 1e10, 3e10, 2e10], 1.0, {}),
  ],
)
def test_select_is_greedy_at_tiny_temperature(row, temperature, kwargs, jit):
  logits = jnp.asarray(_logits(row, row[::-1]))
  fn = lambda key, x: sampling.select(key, x, temperature, **kwargs)
  fn = jax.jit(fn) if jit else fn
  greedy = sampling.select(KEY, logits, 0.0)
  for seed in range(3):
    np.testing.assert_array_equal(fn(jax.random.key(seed), logits), greedy)


def test_check_args_takes_jax_and_numpy_scalars():
  for value in (jnp.float32(0.7), np.float32(0.7), jnp.asarray(1), np.int64(2)):
    sampling.check_args(10, value, None, None)
  sampling.check_args(10, 1.0, None, jnp.float32(0.5))
  assert sampling.select(KEY, jnp.asarray(_logits([0, 5, 1])), jnp.float32(1e-30)).tolist() == [1]
