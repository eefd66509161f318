"""`python -m paperjax.bench`: every registered benchmark, one report."""

from absl import app

from paperjax.bench import cli, registry

if __name__ == "__main__":
  app.run(cli.main_for({name: registry.load(name) for name in registry.BENCHMARKS}))
