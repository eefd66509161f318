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
