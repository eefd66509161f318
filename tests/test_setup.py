"""The harness itself: namespace imports and the 8 host devices later sharding tests use."""

import importlib

import jax
import pytest


@pytest.mark.parametrize("package", ["models", "ops", "align", "interp", "compress", "bench"])
def test_namespace_maps_folder(package):
  module = importlib.import_module(f"paperjax.{package}")
  assert module.__file__.replace("\\", "/").endswith(f"/{package}/__init__.py")


def test_eight_host_devices():
  assert len(jax.devices("cpu")) == 8


def test_every_subpackage_is_listed_in_pyproject():
  """Editable installs find any folder; a wheel ships only the packages pyproject lists."""
  import pathlib
  import tomllib

  root = pathlib.Path(__file__).resolve().parents[1]
  setuptools_cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(setuptools_cfg["packages"])
  for top, folder in setuptools_cfg["package-dir"].items():
    for init in (root / folder).rglob("__init__.py"):
      sub = init.parent.relative_to(root / folder).parts
      assert ".".join((top, *sub)) in listed, f"add {'.'.join((top, *sub))!r} to [tool.setuptools] packages"
