"""The PyTorch side of `llama.train_speed`: transformers' LlamaForCausalLM with torch's AdamW.

Run with a Python that has torch and transformers (never a paperjax dependency), e.g. a
scratch venv: `python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 transformers`.

  /tmp/tv/bin/python scripts/torch_train_speed.py --vocab 4096 --dim 256 --layers 4 --heads 8 \
      --kv_heads 2 --ffn 768 --batch 8 --seq 128 --steps 10 --seed 0

Prints one JSON line: the median seconds of a forward (the loss), of a forward and backward,
and of a training step (forward, backward, clip, AdamW), each over `--steps` timed calls after
two warm-up calls, on random tokens. The model has paperjax's shapes (untied embeddings,
RoPE theta 500000, eps 1e-5) and runs eagerly in float32 with torch's default threads.
"""

import argparse
import json
import statistics
import time

import torch
import transformers


def main() -> None:
  ap = argparse.ArgumentParser()
  for name in ("vocab", "dim", "layers", "heads", "kv_heads", "ffn", "batch", "seq", "steps", "seed"):
    ap.add_argument(f"--{name}", type=int, required=True)
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

  out = {"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
  for name, fn in (("forward_s", forward), ("grad_s", grad), ("step_s", step)):
    fn()
    fn()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    out[name] = statistics.median(times)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
