"""Shape suffixes (`q_BTHK`) use letters from WORKSPACE.md's table, and each module's header
lists every letter its names use."""

import ast
import io
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("models", "ops", "align", "interp", "compress", "bench")
SUFFIX = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z]{1,6})$")
LISTED = re.compile(r"(?:^|[\s,(])([A-Z])(?: = [^,.]+)? (?=[a-z(])")


def _glossary_rows() -> list[tuple[str, str]]:
  text = (ROOT / "WORKSPACE.md").read_text()
  table = text[text.index("## Shape letters") :]
  return re.findall(r"^\| ([A-Z]) \| (.+?) \|$", table, flags=re.M)


def _glossary() -> dict[str, str]:
  return dict(_glossary_rows())


def _modules() -> list:
  paths = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))
  return [pytest.param(path, id=str(path.relative_to(ROOT))) for path in paths]


def test_glossary_gives_each_letter_one_meaning():
  letters = [letter for letter, _ in _glossary_rows()]
  assert len(letters) == len(set(letters)), (
    f"letters with two rows: {sorted({x for x in letters if letters.count(x) > 1})}"
  )
  assert {"B", "T", "S", "D", "H", "G", "K", "V", "L"} <= set(letters)


@pytest.mark.parametrize("path", _modules())
def test_module_header_lists_the_letters_it_uses(path):
  source = path.read_text()
  docstring = ast.get_docstring(ast.parse(source)) or ""
  names = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.NAME]
  used = {letter for name in names for match in [SUFFIX.match(name)] if match for letter in match[1]}
  if not used:
    return
  assert "Shapes:" in docstring, f"{path.name}: names use shape letters {sorted(used)} but the header has no Shapes:"
  shapes = docstring[docstring.index("Shapes:") :].split("\n\n")[0]
  listed = set(LISTED.findall(shapes))
  assert used <= listed, f"{path.name}: letters {sorted(used - listed)} are used but not listed in the header"
  assert listed <= set(_glossary()), f"{path.name}: letters {sorted(listed - set(_glossary()))} are not in WORKSPACE.md"
