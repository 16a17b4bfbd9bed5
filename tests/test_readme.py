"""Every ``python -m jaxnas.main`` command of README.md still parses and makes a valid run
(experiments/readme_commands.py runs them all; this keeps their flags from rotting in CI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxnas import main as cli
from jaxnas import retrain, runner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
from readme_commands import BYO_MODULE, byo_module_source, readme_commands  # noqa: E402

COMMANDS = readme_commands()


@pytest.fixture(scope="module", autouse=True)
def byo_module(tmp_path_factory):
  """The README's example model as the importable module its ``--model`` commands name."""
  directory = tmp_path_factory.mktemp("byo_module")
  (directory / f"{BYO_MODULE}.py").write_text(byo_module_source())
  sys.path.insert(0, str(directory))
  yield
  sys.path.remove(str(directory))
  sys.modules.pop(BYO_MODULE, None)


def test_the_readme_has_its_commands():
  assert len(COMMANDS) >= 12
  assert [] in COMMANDS  # the Quickstart's default job


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_is_valid(args):
  cli.FLAGS.unparse_flags()
  try:
    cli.FLAGS(["jaxnas.main", *args])
    if cli.FLAGS.mode == "retrain":
      retrain.check(retrain.config_from_flags(cli.FLAGS))
    else:
      runner.validate(cli.search_config())
  finally:
    cli.FLAGS.unparse_flags()


def _byo_snippet() -> str:
  """The Python block of README.md's "Bring your own model" section, as printed."""
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
  with open(path) as f:
    text = f.read()
  section = text[text.index("## Bring your own model"):]
  return section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]


def test_bring_your_own_model_example_runs_as_printed(tmp_path):
  """The example searches a user's CNN (its population trained as one program per
  generation shape: one compilation for both generations), retrains and exports the
  winner, and the loaded export reproduces the recorded test accuracy."""
  script = tmp_path / "my_search.py"
  script.write_text(_byo_snippet() + "\n")
  env = {**os.environ, "JAX_LOG_COMPILES": "1"}
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                        text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  best, score, params = lines[-2].split()
  space_arch = best.split(",")
  assert space_arch[0].startswith("width=") and 10.0 < float(score) <= 100.0
  assert int(float(params)) > 0
  recorded, reloaded = (float(v) for v in lines[-1].split())
  assert recorded > 70.0 and reloaded == pytest.approx(recorded, abs=1e-6)
  population_programs = [l for l in proc.stderr.splitlines()
                         if "Compiling jit(run)" in l and "ShapedArray(int32[8])" in l]
  assert len(population_programs) == 1, population_programs
