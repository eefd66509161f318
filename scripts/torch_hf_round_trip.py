"""The transformers side of `scripts/hf_round_trip.py`: load, run and re-save checkpoints.

Run with a Python that has torch and transformers (never a paperjax dependency):

  /tmp/tv/bin/python scripts/torch_hf_round_trip.py DIR

For each DIR/<name>/ holding an exported checkpoint `hf/` and `tokens.npy` [B, T]: loads
`hf/` with `LlamaForCausalLM.from_pretrained` (float32, eager attention), writes its logits
to `torch_logits.npy` [B, T, V] and re-saves the model with `save_pretrained` into
`resaved/` (transformers' own config.json and safetensors). Prints one JSON line per
model: transformers' version, its loading warnings and the config fields it re-saved.
"""

import json
import pathlib
import sys

import numpy as np
import torch
import transformers


def main() -> None:
  root = pathlib.Path(sys.argv[1])
  for case in sorted(p for p in root.iterdir() if (p / "hf").is_dir()):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
      case / "hf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    tokens = torch.from_numpy(np.load(case / "tokens.npy")).long()
    with torch.no_grad():
      logits = model(tokens).logits
    np.save(case / "torch_logits.npy", logits.float().numpy())
    model.save_pretrained(case / "resaved")
    config = json.loads((case / "resaved" / "config.json").read_text())
    warnings = {k: sorted(map(str, v)) for k, v in info.items()}
    print(
      json.dumps(
        {"case": case.name, "transformers": transformers.__version__, "loading_info": warnings, "config": config}
      )
    )


if __name__ == "__main__":
  main()
