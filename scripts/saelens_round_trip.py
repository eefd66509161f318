"""`sae_io.load` against SAELens itself: files SAELens writes, numbers SAELens computes.

  .venv/bin/python scripts/saelens_round_trip.py --saelens_python=/tmp/tv/bin/python

`--saelens_python` is a Python with torch and sae-lens (a scratch venv: `python -m venv
/tmp/tv && /tmp/tv/bin/pip install torch sae-lens`; neither is a paperjax dependency).
`scripts/saelens_side.py` builds SAEs in SAELens with random weights and decoder row norms
in [0.25, 3]: an inference TopK with rescale_acts_by_decoder_norm=true, TopK and BatchTopK
training SAEs with SAELens' training defaults (rescale true), each saved as a training
checkpoint (`save_model`) and as an export (`save_inference_model`), and standard, gated and
JumpReLU SAEs with apply_b_dec_to_input=false. It saves them and SAELens' features and
reconstructions of the same inputs. Here `sae_io.load` reads each directory and `sae.encode`
/ `sae.decode` run on the inputs; printed per case: the largest |difference| of features and
of reconstructions. Exits non-zero when a case fails to load or differs by more than 1e-5.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from paperjax.interp import sae, sae_io

SAELENS_PYTHON = flags.DEFINE_string("saelens_python", None, "A Python with torch and sae-lens.", required=True)
TOLERANCE = 1e-5


def main(argv) -> None:
  del argv
  root = pathlib.Path(tempfile.mkdtemp(prefix="saelens_round_trip."))
  side = pathlib.Path(__file__).with_name("saelens_side.py")
  print(subprocess.run([SAELENS_PYTHON.value, str(side), str(root)], check=True, capture_output=True, text=True).stdout)
  failed = False
  for case in sorted(p for p in root.iterdir() if (p / "sae").is_dir()):
    try:
      params, cfg, config = sae_io.load(case / "sae")
    except (ValueError, TypeError) as e:
      print(f"{case.name}: does not load: {e}  FAILED")
      failed = True
      continue
    x = jnp.asarray(np.load(case / "x.npy"))
    f = np.asarray(sae.encode(params, x, cfg))
    x_hat = np.asarray(sae.decode(params, jnp.asarray(f)))
    df = float(np.abs(f - np.load(case / "f.npy")).max())
    dx = float(np.abs(x_hat - np.load(case / "x_hat.npy")).max())
    ok = df <= TOLERANCE and dx <= TOLERANCE
    failed |= not ok
    flags_ = {k: config.get(k) for k in ("architecture", "apply_b_dec_to_input", "rescale_acts_by_decoder_norm")}
    print(
      f"{case.name}: {flags_} -> ours {cfg.architecture}; max |f diff| {df:.1e}, max |x_hat diff| {dx:.1e}, "
      f"active latents {int((f > 0).sum())}{'' if ok else '  FAILED'}"
    )
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
