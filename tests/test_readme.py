"""The README's tour is code a newcomer pastes first: it must run as written."""

import pathlib
import re
import warnings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md has no python tour"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
  assert namespace["tokens_BN"].shape == (1, 12)
