"""`llama_export.save` and `llama_import.load` against transformers itself, in both directions.

  .venv/bin/python scripts/hf_round_trip.py --torch_python=/tmp/tv/bin/python

`--torch_python` is a Python with torch and transformers (a scratch venv: `python -m venv
/tmp/tv && /tmp/tv/bin/pip install torch transformers`; neither is a paperjax dependency).
For each shape family of the export tests (GQA with Llama 3.1's RoPE scaling, MHA with
default RoPE, tied embeddings, bfloat16 weights) at the tiny preset's size, this exports a
random model, then `scripts/torch_hf_round_trip.py` loads it in transformers, computes its
logits and re-saves it with `save_pretrained`. Printed per family:
- the largest |logit difference| between transformers on the export and paperjax on the
  params (float32 compute on both sides);
- whether `llama_import.load` of transformers' re-save gives identical params and config
  (stored as float32: transformers loaded the weights in float32);
- transformers' loading warnings (missing, unexpected or mismatched tensors: all must be
  empty) and the config.json fields transformers writes that the export does not.
Exits non-zero when a logit differs by more than 1e-4 or anything else disagrees.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

from paperjax.models.transformer import llama, llama_export, llama_import
from paperjax.ops import rope

TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with torch and transformers.", required=True)
TOLERANCE = 1e-4

BASE = dataclasses.replace(
  llama.PRESETS["tiny"], rope_scaling=rope.RopeScaling(original_max_position=64), rope_theta=10_000.0
)
FAMILIES = {
  "gqa_llama3_rope": BASE,
  "mha_default_rope": dataclasses.replace(BASE, n_kv_heads=BASE.n_heads, rope_scaling=None, rope_theta=500_000.0),
  "tied_embeddings": dataclasses.replace(BASE, tie_embeddings=True),
  "bfloat16": dataclasses.replace(BASE, param_dtype="bfloat16", dtype="bfloat16"),
}


def main(argv) -> None:
  del argv
  root = pathlib.Path(tempfile.mkdtemp(prefix="hf_round_trip."))
  ours = {}
  for i, (name, cfg) in enumerate(FAMILIES.items()):
    params = llama.init(jax.random.key(i), cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(100 + i), (2, 48), 0, cfg.vocab_size), np.int32)
    (root / name).mkdir()
    llama_export.save(root / name / "hf", params, cfg, bos_token_id=0, eos_token_id=1)
    np.save(root / name / "tokens.npy", tokens)
    compute = dataclasses.replace(cfg, dtype="float32")  # transformers computes in float32 here too
    ours[name] = (params, cfg, np.asarray(llama.forward(params, tokens, compute)[0], np.float32))
  out = subprocess.run(
    [TORCH_PYTHON.value, str(pathlib.Path(__file__).with_name("torch_hf_round_trip.py")), str(root)],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  failed = False
  for line in out.splitlines():
    report = json.loads(line)
    name = report["case"]
    params, cfg, logits = ours[name]
    diff = float(np.abs(np.load(root / name / "torch_logits.npy") - logits).max())
    back, back_cfg = llama_import.load(root / name / "resaved")
    stored = report["config"]["dtype"]  # transformers loaded float32 weights, so it re-saves float32
    same = back_cfg == dataclasses.replace(cfg, param_dtype=stored, dtype=stored) and all(
      np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
      for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params))
    )
    warnings = {k: v for k, v in report["loading_info"].items() if v}
    exported = json.loads((root / name / "hf" / "config.json").read_text())
    extra = sorted(set(report["config"]) - set(exported))
    ok = diff <= TOLERANCE and same and not warnings
    failed |= not ok
    print(
      f"{name}: transformers {report['transformers']}, max |logit diff| {diff:.2e}, "
      f"re-save imports identically: {same}, loading warnings: {warnings or 'none'}, "
      f"config fields transformers adds: {extra}{'' if ok else '  FAILED'}"
    )
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
