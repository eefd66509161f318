"""The SAELens side of `scripts/saelens_round_trip.py`: SAEs saved by SAELens, and its outputs.

Run with a Python that has torch and sae-lens (never a paperjax dependency):

  /tmp/tv/bin/python scripts/saelens_side.py DIR

Writes one case per directory DIR/<case>/sae (as SAELens saves it), with x.npy [N, d_in],
and SAELens' feature activations f.npy [N, d_sae] and reconstruction x_hat.npy [N, d_in] of
the SAE as SAELens loads it back from that directory (`load_from_disk`; a BatchTopK
training checkpoint has no inference class, so its reference is SAELens' own export of the
same SAE). Every SAE gets random weights whose decoder rows have norms in [0.25, 3], so a
decoder-norm fold that is missing or wrong changes the numbers. Prints SAELens' version.
"""

import pathlib
import sys

import numpy as np
import sae_lens
import torch
from sae_lens import (
  SAE,
  BatchTopKTrainingSAE,
  BatchTopKTrainingSAEConfig,
  GatedSAE,
  GatedSAEConfig,
  JumpReLUSAE,
  JumpReLUSAEConfig,
  StandardSAE,
  StandardSAEConfig,
  TopKSAE,
  TopKSAEConfig,
  TopKTrainingSAE,
  TopKTrainingSAEConfig,
)

D_IN, D_SAE, K, N = 16, 48, 6, 64


def _randomise(sae, gen) -> None:
  with torch.no_grad():
    for name, p in sae.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name != "threshold" else 0.05))
    norms = torch.empty(D_SAE).uniform_(0.25, 3.0, generator=gen)
    sae.W_dec.mul_((norms / sae.W_dec.norm(dim=-1))[:, None])
    if hasattr(sae, "threshold"):
      sae.threshold.abs_()
    if hasattr(sae, "topk_threshold"):
      sae.topk_threshold.fill_(0.2)


def _reference(directory: pathlib.Path, x: torch.Tensor, out: pathlib.Path) -> None:
  sae = SAE.load_from_disk(directory)
  with torch.no_grad():
    f = sae.encode(x)
    np.save(out / "f.npy", f.numpy())
    np.save(out / "x_hat.npy", sae.decode(f).numpy())


def main() -> None:
  root = pathlib.Path(sys.argv[1])
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(N, D_IN, generator=gen)
  cases = {
    "topk_rescale": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)),
    "topk_training_default": TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)),
    "batchtopk_training": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)),
    "standard_not_centred": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
    "gated_not_centred": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
    "jumprelu_not_centred": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
  }
  for name, sae in cases.items():
    _randomise(sae, gen)
    out = root / name
    out.mkdir(parents=True)
    np.save(out / "x.npy", x.numpy())
    sae.save_model(out / "sae")  # a training SAE: SAELens' training checkpoint, flags as trained
    if hasattr(sae, "save_inference_model"):
      sae.save_inference_model(root / f"{name}_export" / "sae")
      np.save(root / f"{name}_export" / "x.npy", x.numpy())
      _reference(root / f"{name}_export" / "sae", x, root / f"{name}_export")
      if name.startswith("batchtopk"):  # no inference class reads the checkpoint: the export is the reference
        for file in ("f.npy", "x_hat.npy"):
          (out / file).write_bytes((root / f"{name}_export" / file).read_bytes())
        continue
    _reference(out / "sae", x, out)
  print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
  main()
