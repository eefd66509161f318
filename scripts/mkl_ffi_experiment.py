"""Experiment: MKL's sgemm through XLA's FFI, alone and inside the jitted training step.

  python -m venv /tmp/mklv && /tmp/mklv/bin/pip install mkl     # 1.1 GB; never a dependency
  .venv/bin/python scripts/mkl_ffi_experiment.py --mkl_lib=/tmp/mklv/lib/libmkl_rt.so.3 [--rounds=3]

Compiles a C++ FFI handler (g++ and jaxlib's FFI headers, `jax.ffi.include_dir()`) that calls
`cblas_sgemm` with transpose flags, registers it for the CPU, and times, alternating with XLA
in each round:
- the 2-D GEMMs of the `small` Llama's unrolled gradient at B=8, T=128
  (`bench.llama.training_gemms`; the attention's batched dots stay in XLA), each alone;
- the training step (`lm.make_train_step`) with `ops.dense`'s matmul replaced by the FFI call
  (a custom_vjp: both gradients are FFI calls too) against the step as it is.
MKL's threading follows its environment (MKL_NUM_THREADS, MKL_THREADING_LAYER, KMP_BLOCKTIME).
Nothing here is part of paperjax: README "Training speed" says why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import pathlib
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from paperjax.bench import cli
from paperjax.bench import llama as bench_llama
from paperjax.bench.harness import time_fn
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import dense as dense_module

MKL_LIB = flags.DEFINE_string("mkl_lib", None, "Path of libmkl_rt.so.", required=True)
ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.", lower_bound=1)

HANDLER = r"""
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                            float*, int);
static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c, bool ta,
                       bool tb) {
  auto da = a.dimensions(), db = b.dimensions();
  int m = ta ? da[1] : da[0], k = ta ? da[0] : da[1], n = tb ? db[0] : db[1];
  cblas_sgemm(101, ta ? 112 : 111, tb ? 112 : 111, m, n, k, 1.f, a.typed_data(), da[1], b.typed_data(), db[1], 0.f,
              c->typed_data(), n);
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(MklGemm, Gemm, ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
    .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<bool>("ta").Attr<bool>("tb"));
"""


def _register(mkl_lib: str, build_dir: str) -> None:
  source, shared = pathlib.Path(build_dir, "gemm.cc"), pathlib.Path(build_dir, "libgemm.so")
  source.write_text(HANDLER)
  lib_dir = str(pathlib.Path(mkl_lib).parent)
  subprocess.run(
    ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", str(source),
     f"-L{lib_dir}", f"-l:{pathlib.Path(mkl_lib).name}", f"-Wl,-rpath,{lib_dir}", "-o", str(shared)],
    check=True,
  )  # fmt: skip
  handler = ctypes.cdll.LoadLibrary(str(shared)).MklGemm
  jax.ffi.register_ffi_target("mkl_gemm", jax.ffi.pycapsule(handler), platform="cpu")


def _mkl(a: jax.Array, b: jax.Array, ta: bool, tb: bool) -> jax.Array:
  """op(a) @ op(b), op a transpose where asked, by MKL."""
  m, n = a.shape[1 if ta else 0], b.shape[0 if tb else 1]
  return jax.ffi.ffi_call("mkl_gemm", jax.ShapeDtypeStruct((m, n), jnp.float32))(a, b, ta=ta, tb=tb)


def _dot_general_by_mkl(a: jax.Array, b: jax.Array, dimension_numbers) -> jax.Array:
  """A 2-D lax.dot_general by MKL: a transposed when it contracts its rows, b when its columns."""
  (a_contracted, b_contracted), _ = dimension_numbers
  return _mkl(a, b, ta=a_contracted == (0,), tb=b_contracted == (1,))


@jax.custom_vjp
def _matmul(x, w):
  return _mkl(x, w, False, False)


_matmul.defvjp(
  lambda x, w: (_matmul(x, w), (x, w)),
  lambda res, g: (_mkl(g, res[1], False, True), _mkl(res[0], g, True, False)),
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.refuse_unused(("scale", "seed", "out", "only", "repeats"), "this script")
  with tempfile.TemporaryDirectory() as build_dir:
    _register(MKL_LIB.value, build_dir)
  model = dataclasses.replace(llama.PRESETS["small"], unroll=True)
  gemms = {key: n for key, n in bench_llama.training_gemms(model, 8, 128).items() if not key[2][1][0]}
  dot = bench_llama.jitted_dot()
  mkl = jax.jit(_dot_general_by_mkl, static_argnames="dimension_numbers")
  tcfg = train.TrainConfig(batch_size=8, seq_len=128, total_steps=100, warmup_steps=10)
  windows = np.random.default_rng(0).integers(0, model.vocab_size, (8, 129), np.int32)
  batch, state = lm.packed_batch(windows, np.zeros_like(windows)), lm.init_state(jax.random.key(0), model, tcfg)
  xla_step = lm.make_train_step(model, tcfg).jitted.lower(state, batch).compile()  # type: ignore[attr-defined]
  plain_jnp = dense_module.jnp  # ops.dense calls jnp.matmul; the MKL step traces with it swapped
  dense_module.jnp = types.SimpleNamespace(  # type: ignore[assignment]
    **{**vars(jnp), "matmul": lambda x, w, preferred_element_type=None: _matmul(x, w)}
  )
  mkl_step = lm.make_train_step(model, tcfg).jitted.lower(state, batch).compile()  # type: ignore[attr-defined]
  dense_module.jnp = plain_jnp
  if "mkl_gemm" not in mkl_step.as_text():
    raise RuntimeError("the MKL step has no mkl_gemm call: ops.dense no longer calls jnp.matmul")
  (_, ours), (_, theirs) = xla_step(state, batch), mkl_step(state, batch)
  print(f"loss XLA {float(ours['loss']):.6f}, MKL {float(theirs['loss']):.6f}")
  for r in range(ROUNDS.value):
    xla_s, mkl_s = (bench_llama.time_gemms(gemms, 7, d) for d in (dot, mkl))
    steps = [time_fn(s, state, batch, repeats=7).median_s for s in (xla_step, mkl_step)]
    print(
      f"round {r + 1}: {sum(gemms.values())} 2-D GEMMs alone: XLA {xla_s * 1e3:.0f} ms, MKL {mkl_s * 1e3:.0f} ms; "
      f"the step: XLA {steps[0] * 1e3:.0f} ms, MKL {steps[1] * 1e3:.0f} ms",
      flush=True,
    )


if __name__ == "__main__":
  sys.exit(app.run(main))
