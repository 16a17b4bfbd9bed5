"""Every ``python -m jaxnas.main`` command of README.md still parses and makes a valid run
(experiments/readme_commands.py runs them all; this keeps their flags from rotting in CI)."""

from __future__ import annotations

import os
import sys

import pytest

from jaxnas import main as cli
from jaxnas import retrain, runner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
from readme_commands import readme_commands  # noqa: E402

COMMANDS = readme_commands()


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
