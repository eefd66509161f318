"""Writes benchmark results: `report.md`, `results.json` and one PNG per plot and per image.

report.md opens with the run's claims ledger (`bench.ledger`), then the records; results.json
holds `claims`, `records`, plots, notes and wall times.

Every file is written to a temporary name and renamed into place, so an interrupted run
never leaves a half-written report over a good one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Sequence

from paperjax.bench import ledger
from paperjax.bench.harness import Environment, Image, Plot, Record, Result
from paperjax.ops import files

COLUMNS = ("benchmark", "metric", "value", "unit", "paper", "paper source", "ours / paper")


def format_number(x: float | str | None) -> str:
  if x is None:
    return "—"
  if isinstance(x, str):
    return x
  if x == 0 or not math.isfinite(x):
    return str(x)
  if 1e-3 <= abs(x) < 1e6:
    return f"{x:.4g}"
  return f"{x:.3e}"


def markdown_table(records: Sequence[Record]) -> str:
  rows = [COLUMNS, ("---",) * len(COLUMNS)]
  for r in records:
    rows.append(
      (
        r.benchmark,
        r.metric,
        format_number(r.value),
        r.unit,
        format_number(r.paper_value),
        r.paper_source or "—",
        format_number(r.ratio),
      )
    )
  return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)


def wall_time_table(results: Sequence[Result]) -> str:
  """Each benchmark's wall time (compiles included) and the total, as a markdown table."""
  timed = [(r.benchmark, r.wall_s) for r in results if r.wall_s is not None]
  rows = ["| benchmark | wall time (s) |", "| --- | --- |"]
  rows += [f"| {name} | {seconds:.1f} |" for name, seconds in timed]
  rows.append(f"| total | {sum(seconds for _, seconds in timed):.1f} |")
  return "\n".join(rows)


def describe(env: Environment) -> str:
  return (
    f"backend `{env.backend}`, device `{env.device_kind}` x{env.device_count}, "
    f"jax {env.jax_version}, Python {env.python}, scale `{env.scale}`"
  )


def render_markdown(results: Sequence[Result], env: Environment, plot_files: dict[str, str]) -> str:
  """The ledger of the run's claims first (`bench.ledger`), then every record, the wall
  times, and each benchmark's notes and figures."""
  claims = [c.to_json() for result in results for c in result.claims]
  lines = ["# paperjax benchmark report", "", f"Measured on {describe(env)}.", ""]
  if claims:
    lines += ["## Claims", "", ledger.counts(claims), "", ledger.markdown(claims), "", "## Measurements", ""]
  lines += [
    markdown_table([r for result in results for r in result.records]),
    "",
    wall_time_table(results),
  ]
  for result in results:
    if not (result.notes or result.plots or result.images):
      continue
    lines += ["", f"## {result.benchmark}", ""]
    lines += [f"- {note}" for note in result.notes]
    figures: list[Plot | Image] = [*result.plots, *result.images]
    lines += [f"\n![{p.title}]({plot_files[plot_key(result, p)]})" for p in figures]
  return "\n".join(lines) + "\n"


def plot_key(result: Result, plot: Plot | Image) -> str:
  return f"{result.benchmark}_{plot.name}"


def render_png(plot: Plot, path: pathlib.Path) -> None:
  import matplotlib  # imported here: only reports with plots need it

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for s in plot.series:
    if plot.kind == "bar":
      ax.bar(s.x, s.y, width=_bar_width(s.x), label=s.label, alpha=0.8)
    else:
      ax.plot(s.x, s.y, marker="o" if len(s.x) <= 50 else None, label=s.label)
  if plot.kind == "bar":
    ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel, xscale=plot.xscale, yscale=plot.yscale)
  ax.grid(True, alpha=0.3)
  if len(plot.series) > 1:
    ax.legend()
  fig.tight_layout()
  files.atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
  plt.close(fig)


def render_image(image: Image, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import patheffects
  from matplotlib import pyplot as plt

  height, width = image.pixels.shape[:2]
  fig, ax = plt.subplots(figsize=(min(16, max(4, width / 24)), min(12, max(2, height / 24) + 0.6)), dpi=120)
  ax.imshow(image.pixels, interpolation="nearest")
  outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
  for xs, ys in image.lines:
    ax.plot(xs, ys, color="white", linewidth=1.0, path_effects=outline)
    ax.plot(xs[-1:], ys[-1:], marker="o", markersize=3, color="white", path_effects=outline)
  ax.set(title=image.title, xticks=[], yticks=[])
  fig.tight_layout()
  files.atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
  plt.close(fig)


def _bar_width(x: Sequence[float]) -> float:
  """0.8 of the smallest gap between distinct x values (0.8 for fewer than two)."""
  return 0.8 * min((b - a for a, b in itertools.pairwise(sorted(set(x)))), default=1.0)


def check_out(out: str | os.PathLike) -> pathlib.Path:
  """Checks that `out` is a folder this process can write into, or can be made as one; raises
  ValueError naming `out` otherwise. Leaves the file system as it found it: a write test is a
  temporary file in `out`, or in its nearest existing parent, removed at once.
  """
  if not os.fspath(out).strip():
    raise ValueError(f"out: expected a folder path, got {os.fspath(out)!r}")
  path = pathlib.Path(out)
  existing = next(p for p in (path, *path.absolute().parents) if p.exists())
  if not existing.is_dir():
    where = "" if existing == path else f" (its parent {os.fspath(existing)!r} is a file)"
    raise ValueError(f"out: expected a folder or a path where one can be made, got {os.fspath(out)!r}{where}")
  try:
    fd, tmp = tempfile.mkstemp(dir=existing, prefix=".paperjax-write-check.", suffix=".tmp")
  except OSError as e:
    raise ValueError(
      f"out: expected a folder this process can write in, got {os.fspath(out)!r} "
      f"(a test file in {os.fspath(existing)!r} failed: {e.strerror or e})"
    ) from None
  os.close(fd)
  os.unlink(tmp)
  return path


def write(results: Sequence[Result], env: Environment, out: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Writes report.md, results.json and the plots under `out`; returns their paths.

  `out` is checked first (`check_out`), so a path that is a file is a ValueError naming it,
  before any file is written; so are two results of one benchmark.
  """
  out = check_out(out)
  names = [result.benchmark for result in results]
  repeated = sorted(name for name in set(names) if names.count(name) > 1)
  if repeated:
    raise ValueError(f"results: expected one result per benchmark, got {repeated} repeated")
  out.mkdir(parents=True, exist_ok=True)
  plot_files: dict[str, str] = {}
  for result in results:
    figures: list[Plot | Image] = [*result.plots, *result.images]
    for figure in figures:
      key = plot_key(result, figure)
      plot_files[key] = f"{key}.png"
      if isinstance(figure, Plot):
        render_png(figure, out / plot_files[key])
      else:
        render_image(figure, out / plot_files[key])
  payload = {
    "environment": dataclasses.asdict(env),
    "claims": [c.to_json() for result in results for c in result.claims],
    "records": [r.to_json() for result in results for r in result.records],
    "plots": [
      {"benchmark": result.benchmark, "file": plot_files[plot_key(result, p)], **_json_safe(dataclasses.asdict(p))}
      for result in results
      for p in result.plots
    ],
    "images": [
      {"benchmark": result.benchmark, "file": plot_files[plot_key(result, i)], "title": i.title}
      for result in results
      for i in result.images
    ],
    "notes": {result.benchmark: list(result.notes) for result in results if result.notes},
    "wall_s": {result.benchmark: result.wall_s for result in results if result.wall_s is not None},
  }
  paths = {"markdown": out / "report.md", "json": out / "results.json"}
  files.atomic_write(paths["markdown"], lambda f: f.write(render_markdown(results, env, plot_files)))
  files.atomic_write(paths["json"], lambda f: json.dump(payload, f, indent=2, allow_nan=False))
  return {**paths, **{key: out / name for key, name in plot_files.items()}}


def _json_safe(tree):
  """`tree` with each non-finite float as the string 'nan' / 'inf' / '-inf' (as `Record.to_json` does)."""
  if isinstance(tree, float) and not math.isfinite(tree):
    return str(tree)
  if isinstance(tree, dict):
    return {k: _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_safe(v) for v in tree]
  return tree
