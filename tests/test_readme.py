"""The README's tour is code a newcomer pastes first: every python block must run as written."""

import pathlib
import re
import warnings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md has no python tour"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    for block in blocks:  # each block stands alone: a fresh namespace, no exception
      exec(compile(block, str(README), "exec"), {})
