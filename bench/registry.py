"""The benchmarks `python -m paperjax.bench` runs, in order.

Each name is a module `paperjax.bench.<name>` exposing `run(ctx: Context) -> Result` and
runnable on its own as `python -m paperjax.bench.<name>`. Add a benchmark by writing that
module and appending its name here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from paperjax.bench.harness import Context, Result

BENCHMARKS: tuple[str, ...] = ("bigram", "llama", "maxsim", "align", "interactions", "jrt")


def load(name: str) -> Callable[[Context], Result]:
  if name not in BENCHMARKS:
    raise ValueError(f"benchmark: unknown name {name!r}; registered: {list(BENCHMARKS)}")
  return importlib.import_module(f"paperjax.bench.{name}").run
