"""The PyTorch side of `llama.train_speed`: transformers' LlamaForCausalLM with torch's AdamW.

Run with a Python that has torch and transformers (never a paperjax dependency), e.g. a
scratch venv: `python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 transformers`.

  /tmp/tv/bin/python scripts/torch_train_speed.py --vocab 4096 --dim 256 --layers 4 --heads 8 \
      --kv_heads 2 --ffn 768 --batch 8 --seq 128 --steps 10 --seed 0

Prints one JSON line: the median seconds of a forward (the loss), of a forward and backward,
and of a training step (forward, backward, clip, AdamW), each over `--steps` timed calls after
two warm-up calls, on random tokens. The model has paperjax's shapes (untied embeddings,
RoPE theta 500000, eps 1e-5) and runs eagerly in float32 with torch's default threads.

`--gemms FILE` (a JSON list of [lhs shape, rhs shape, lax dimension numbers, count], what
`bench.llama.training_gemms` traces from paperjax's gradient) adds "gemms_s": the seconds torch
takes for those GEMMs alone, each as `torch.matmul` of operand views permuted to (batch, free,
contracted) and (batch, contracted, free), as autograd's mm calls on transposed views: the
medians of `--steps` calls, times their counts, summed.
"""

import argparse
import json
import math
import statistics
import time

import torch
import transformers


def main() -> None:
  ap = argparse.ArgumentParser()
  for name in ("vocab", "dim", "layers", "heads", "kv_heads", "ffn", "batch", "seq", "steps", "seed"):
    ap.add_argument(f"--{name}", type=int, required=True)
  ap.add_argument("--gemms", help="JSON file of GEMMs to time alone (see the docstring)")
  args = ap.parse_args()
  torch.manual_seed(args.seed)
  cfg = transformers.LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.dim,
    num_hidden_layers=args.layers,
    num_attention_heads=args.heads,
    num_key_value_heads=args.kv_heads,
    intermediate_size=args.ffn,
    max_position_embeddings=max(args.seq, 256),
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attn_implementation="sdpa",
  )
  model = transformers.LlamaForCausalLM(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def loss():
    logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab).float(), labels.reshape(-1))

  def forward():
    with torch.no_grad():
      loss()

  def grad():
    model.zero_grad(set_to_none=True)
    loss().backward()

  def step():
    opt.zero_grad(set_to_none=True)
    loss().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def median_s(fn) -> float:
    fn()
    fn()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  out = {"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
  for name, fn in (("forward_s", forward), ("grad_s", grad), ("step_s", step)):
    out[name] = median_s(fn)
  if args.gemms:
    with open(args.gemms) as f:
      out["gemms_s"] = sum(count * median_s(_gemm(lhs, rhs, dims)) for lhs, rhs, dims, count in json.load(f))
  print(json.dumps(out))


def _gemm(lhs_shape, rhs_shape, dims):
  """lax.dot_general(lhs, rhs, dims) as torch.matmul of permuted views of random operands."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dims
  lhs, rhs = torch.randn(*lhs_shape), torch.randn(*rhs_shape)
  lhs_f = [d for d in range(lhs.ndim) if d not in lhs_c and d not in lhs_b]
  rhs_f = [d for d in range(rhs.ndim) if d not in rhs_c and d not in rhs_b]
  size = lambda shape, ds: math.prod(shape[d] for d in ds)
  batch = [lhs_shape[d] for d in lhs_b]
  a = lhs.permute(*lhs_b, *lhs_f, *lhs_c).reshape(*batch, size(lhs_shape, lhs_f), size(lhs_shape, lhs_c))
  b = rhs.permute(*rhs_b, *rhs_c, *rhs_f).reshape(*batch, size(rhs_shape, rhs_c), size(rhs_shape, rhs_f))
  return lambda: torch.matmul(a, b)


if __name__ == "__main__":
  main()
