"""The claims ledger: every paper's claims with their rules and verdicts, merged over runs.

  python -m paperjax.bench.ledger results results_full results_gpu [--out=ledger]

Each directory holds a `results.json` written by the suite, a benchmark binary or
`gpu_check`; its `claims` list holds one entry per decided claim (`harness.Claim.to_json`).
The merge keeps one row per claim key (`benchmark/name`), from the strongest run: a verdict
from a GPU beats "undecided: needs a GPU" from any scale, and otherwise the larger scale
(ci < small < full < paper) supersedes the smaller. Rows keep their scale and command, and
list the other runs' verdicts. The ledger is printed as markdown; `--out` also writes
`ledger.md` and `ledger.json` there (each written whole, then renamed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from paperjax.bench.harness import REASONS, SCALES, verdict_text
from paperjax.ops import files

COLUMNS = ("paper", "claim", "rule", "measured", "verdict", "scale", "reproduce")


def _strength(claim: dict[str, Any]) -> tuple[bool, int]:
  return claim.get("reason") != "needs a GPU", SCALES.index(claim["scale"])


def merge(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
  """One claim per key, the strongest (module docstring), with "others": the other runs'
  "<scale>: <verdict>" in the order given; sorted by benchmark, paper and name."""
  by_key: dict[str, list[dict[str, Any]]] = {}
  for claims in runs:
    for claim in claims:
      by_key.setdefault(claim["key"], []).append(claim)
  merged = []
  for rows in by_key.values():
    best = max(rows, key=_strength)  # max keeps the first of equals: the earlier run
    others = [f"{row['scale']}: {verdict_text(row['verdict'], row.get('reason'))}" for row in rows if row is not best]
    merged.append({**best, "others": others})
  return sorted(merged, key=lambda c: (c["benchmark"], paper(c["source"]), c["name"]))


def paper(source: str) -> str:
  """The paper a source names: its arXiv id when it gives one, else the text before the first comma."""
  found = re.search(r"arXiv:? ?(\d{4}\.\d{4,5})", source)
  return found.group(1) if found else source.split(",")[0].strip()


def counts(claims: Sequence[dict[str, Any]]) -> str:
  """'N claims from P papers: H hold, F fail, U undecided'."""
  verdicts = [c["verdict"] for c in claims]
  papers = {paper(c["source"]) for c in claims}
  return (
    f"{len(claims)} claims from {len(papers)} papers: {verdicts.count('holds')} hold, "
    f"{verdicts.count('fails')} fail, {verdicts.count('undecided')} undecided"
  )


def markdown(claims: Sequence[dict[str, Any]]) -> str:
  """The ledger as a markdown table, one row per claim."""
  rows = [COLUMNS, ("---",) * len(COLUMNS)]
  for c in claims:
    verdict = f"**{verdict_text(c['verdict'], c.get('reason'))}**"
    if c.get("others"):
      verdict += f" (also {'; '.join(c['others'])})"
    claim = c["claim"] + (f" — {c['note']}" if c.get("note") else "")
    rows.append((c["source"], claim, c["rule"], c["measured"], verdict, c["scale"], f"`{c['command']}`"))
  return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows)


def read(directory: str | pathlib.Path) -> list[dict[str, Any]]:
  """The claims of `directory`/results.json; an error names the file and what is wrong."""
  path = pathlib.Path(directory) / "results.json"
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: no results.json (a folder the suite or a benchmark wrote with --out)")
  try:
    payload = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a valid JSON file ({e})") from None
  claims = payload.get("claims") if isinstance(payload, dict) else None
  if not isinstance(claims, list):
    raise ValueError(f"{path}: expected a 'claims' list (written by a run from before the ledger?)")
  need = {"key", "benchmark", "name", "source", "claim", "rule", "measured", "verdict", "reason", "scale", "command"}
  for i, claim in enumerate(claims):
    missing = sorted(need - set(claim)) if isinstance(claim, dict) else sorted(need)
    if missing:
      raise ValueError(f"{path}: claims[{i}] lacks {missing}")
    if claim["scale"] not in SCALES or claim["verdict"] not in ("holds", "fails", "undecided"):
      raise ValueError(f"{path}: claims[{i}] ({claim['key']}): scale {claim['scale']!r}, verdict {claim['verdict']!r}")
    if (claim["verdict"] == "undecided") != (claim["reason"] in REASONS):
      raise ValueError(f"{path}: claims[{i}] ({claim['key']}): reason {claim['reason']!r} with {claim['verdict']}")
  return claims


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m paperjax.bench.ledger", description=__doc__.split("\n")[0])
  parser.add_argument("directories", nargs="+", help="results folders, e.g. results results_full results_gpu")
  parser.add_argument("--out", help="also write ledger.md and ledger.json into this folder")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out) if args.out is not None else None
  if out is not None and out.exists() and not out.is_dir():
    parser.error(f"--out: expected a folder, got the file {args.out!r}")
  try:
    claims = merge([read(d) for d in args.directories])
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  text = f"{counts(claims)}\n\n{markdown(claims)}\n"
  print(text)
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out / "ledger.md", lambda f: f.write(text))
    files.atomic_write(out / "ledger.json", lambda f: json.dump(claims, f, indent=2))
    print(f"wrote {out / 'ledger.md'} and {out / 'ledger.json'}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
