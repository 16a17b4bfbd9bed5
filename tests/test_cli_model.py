"""``--model=package.module:ATTR`` on the command line: a user's model searched by evolution,
Hyperband and NSGA-II, its winner retrained with the printed command and exported, and
the one-line errors of a model that cannot be searched as asked."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import export, runner
from jaxnas.datasets import load_dataset
from jaxnas.models.protocol import count_params
from jaxnas.nn import specialised_shapes
from jaxnas.spaces.declared import to_python

from byo_model import SPACE, SmallCNN
from conftest import FAST_COMPILE_FLAGS, FASHION_MNIST_SUBSET

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300
# The user's code, in the directory the command runs in (importable as `python -m` makes it):
# byo_model's network with a Fashion-MNIST head, named by a zero-argument function.
CLI_MODEL = """
import jaxnas
from byo_model import SPACE, SmallCNN


def make():
  return jaxnas.searchable(SmallCNN(classes=10), SPACE)
"""
MODEL = "--model=cli_model:make"
# A few seconds of training per population: 135 images, 5 steps of 32.
TINY = ("--train_fraction=0.05", "--batch_size=32", f"--data_dir={FASHION_MNIST_SUBSET}",
        "--num_seeds=1")
SEARCHES = {
    "evolution": (MODEL, "--evaluator=train", "--budget=8", "--population=4",
                  "--population_size=4", *TINY),
    "hyperband": (MODEL, "--strategy=hyperband", "--budget=6", "--eta=2", "--rungs=2",
                  "--hyperband_brackets=1", *TINY),
    "nsga2": (MODEL, "--strategy=nsga2", "--objectives=accuracy,params", "--budget=8",
              "--population_size=4", *TINY),
    "supernet": (MODEL, "--evaluator=supernet", "--strategy=random", "--budget=8",
                 "--population=4", "--epochs=1", "--bn_batches=1", *TINY),
    "darts": (MODEL, "--strategy=darts", "--darts_variant=gdas", "--epochs=2", *TINY),
    "zero_cost": (MODEL, "--evaluator=zero_cost", "--proxy=synflow", "--budget=8",
                  "--population=4", "--batch_size=32", f"--data_dir={FASHION_MNIST_SUBSET}",
                  "--num_seeds=1"),
}
# name: (flags, a word the one-line error names); more of them in-process below.
ERRORS = {
    "bad_spec": (("--model=cli_model.make",), "package.module:ATTR"),
    "not_a_model": (("--model=byo_model:SPACE",), "not a SearchableModel"),
    "with_space": ((MODEL, "--space=darts"), "--space"),
    "with_nb201": ((MODEL, "--evaluator=nb201"), "--evaluator=nb201"),
    # byo_model.MODEL has a two-class head: it would train on out-of-range labels (NaN).
    "wrong_head": (("--model=byo_model:MODEL", *TINY), "10 classes"),
}


def _env():
  path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS="cpu")


def _start(cwd, *flags):
  return subprocess.Popen([sys.executable, "-m", "jaxnas.main", *flags], cwd=cwd,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """Every search and bad command at once (each costs a Python + JAX start-up), then the
  retrain that the evolution search prints. ``{name: (returncode, stdout, stderr)}`` and
  the directory they ran in."""
  root = tmp_path_factory.mktemp("cli_model")
  (root / "cli_model.py").write_text(CLI_MODEL)
  procs = {name: _start(root, *flags, f"--workdir={name}") for name, flags in SEARCHES.items()}
  procs.update({name: _start(root, *flags, f"--workdir={name}")
                for name, (flags, _) in ERRORS.items()})
  out = {name: _finish(proc) for name, proc in procs.items()}
  if out["evolution"][0] == 0:
    with open(root / "evolution" / "results.json") as f:
      command = shlex.split(json.load(f)["summary"]["retrain_command"])
    assert command[:3] == ["python", "-m", "jaxnas.main"], command
    out["retrain_command"] = command
    out["retrain"] = _finish(_start(root, *command[3:], "--epochs=1", "--batch_size=64",
                                    "--workdir=retrain"))
  return root, out


def _ok(cli, name):
  root, out = cli
  returncode, stdout, stderr = out[name]
  assert returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return root / name, stdout


def _results(workdir):
  with open(workdir / "results.json") as f:
    return json.load(f)


def _check_search(results, strategy, evaluator="train"):
  config = results["config"]
  assert config["model"] == "cli_model:make" and "space" not in config
  assert config["strategy"] == strategy and config["evaluator"] == evaluator
  run = results["runs"][0]
  arch = SPACE.decode(run["best_arch"])  # the space's string form, which --arch takes
  assert SPACE.encode(arch) == run["best_arch"] == results["summary"]["best_arch"]
  assert 0.0 <= run["best_score"] <= 100.0
  assert "--model=cli_model:make" in results["summary"]["retrain_command"]
  assert f"--arch={run['best_arch']}" in results["summary"]["retrain_command"]
  return run


def _params(arch_string):
  """Parameters of the specialised network of an architecture of the CLI model."""
  arch = to_python(SPACE.decode(arch_string))
  return count_params(specialised_shapes(SmallCNN(classes=10), jnp.zeros((1, 28, 28, 1)), arch))


def test_evolution_searches_a_user_model(cli):
  workdir, stdout = _ok(cli, "evolution")
  results = _results(workdir)
  run = _check_search(results, "evolution")
  assert len(run["trajectory"]) == 8 and run["failed_evaluations"] == 0
  assert run["params"] == _params(run["best_arch"]) and run["flops"] > 0  # model.cost
  assert "(--model=cli_model:make)" in stdout and "retrain it: python -m jaxnas.main" in stdout
  with open(workdir / "config.json") as f:
    assert json.load(f)["config"] == results["config"]


def test_hyperband_searches_a_user_model(cli):
  workdir, _ = _ok(cli, "hyperband")
  results = _results(workdir)
  run = _check_search(results, "hyperband")
  assert results["budget"]["evaluations_used"] == 6 and run["best_epochs"] == 1.0
  with open(workdir / "hyperband_state.json") as f:
    history = json.load(f)["seeds"][0]["history"]  # [vector, epochs, score, rung]
  for rung in (0, 2):  # each bracket's first rung: distinct networks, canonical vectors
    vectors = [h[0] for h in history if h[3] == rung]
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    for v in vectors:
      np.testing.assert_array_equal(SPACE.canonical(jnp.asarray(v)), v)


def test_nsga2_trades_accuracy_for_the_models_parameters(cli):
  workdir, stdout = _ok(cli, "nsga2")
  _check_search(_results(workdir), "nsga2")
  with open(workdir / "pareto.json") as f:
    front = json.load(f)
  assert front["objectives"] == ["accuracy", "params"] and "Pareto front" in stdout
  assert len(front["evaluated"]) == 8 and front["pooled"]
  for point in front["evaluated"]:
    assert point["params"] == _params(point["arch"])
  for p in front["pooled"]:  # nothing evaluated dominates a point of the front
    assert not any(q["accuracy"] >= p["accuracy"] and q["params"] <= p["params"] and
                   (q["accuracy"], q["params"]) != (p["accuracy"], p["params"])
                   for q in front["evaluated"])


def test_a_supernet_of_the_user_model_scores_its_members(cli):
  workdir, stdout = _ok(cli, "supernet")
  run = _check_search(_results(workdir), "random", "supernet")
  assert len(run["trajectory"]) == 8 and run["params"] == _params(run["best_arch"])
  assert "supernet (inherited-weight) validation accuracy" in stdout
  assert os.path.isdir(workdir / "supernet")  # its checkpoint, for a resume


def test_gdas_searches_every_decision_of_the_user_model(cli):
  """DARTS/GDAS on the model's relaxed architecture: one alpha vector per decision of its
  declared space, the derived member in its string form, retrainable."""
  workdir, _ = _ok(cli, "darts")
  results = _results(workdir)
  assert results["config"]["model"] == "cli_model:make"
  run = results["runs"][0]
  assert SPACE.encode(SPACE.decode(run["best_arch"])) == run["best_arch"]
  assert [len(a) for a in run["alphas"]] == list(SPACE.cardinalities)
  assert len(run["trajectory"]) == 2 and 0.0 <= run["best_score"] <= 100.0
  assert results["darts"]["model"] == "cli_model:make"
  assert "--model=cli_model:make" in results["summary"]["retrain_command"]


def test_a_zero_cost_proxy_scores_the_user_models_networks(cli):
  workdir, stdout = _ok(cli, "zero_cost")
  results = _results(workdir)
  config = results["config"]
  assert config["model"] == "cli_model:make" and config["evaluator"] == "zero_cost"
  run = results["runs"][0]
  assert SPACE.encode(SPACE.decode(run["best_arch"])) == run["best_arch"]
  assert np.isfinite(run["best_score"]) and run["params"] == _params(run["best_arch"])
  assert "synflow score of chosen cells" in stdout


def test_retrain_of_the_printed_command_exports_a_loadable_network(cli):
  root, out = cli
  workdir, stdout = _ok(cli, "retrain")
  (arch,) = [a.removeprefix("--arch=") for a in out["retrain_command"] if a.startswith("--arch=")]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["arch"] == arch and results["config"]["model"] == "cli_model:make"
  assert results["test_accuracy"] > 20.0  # Fashion-MNIST has 10 classes: well above chance
  assert f"test accuracy {results['test_accuracy']:.2f} %" in stdout
  with open(workdir / "arch.json") as f:
    arch_json = json.load(f)
  assert arch_json["model"] == "cli_model:make" and "channels" not in arch_json
  assert results["params"] == _params(arch)
  net = export.load(str(workdir / "export"))  # byo_model's class, importable here
  assert net.metadata["arch"] == arch
  with open(workdir / "export" / "network.json") as f:
    assert json.load(f)["model"] == "cli_model:make"
  test = load_dataset("fashion_mnist", FASHION_MNIST_SUBSET)
  assert net.accuracy(test.test_images, test.test_labels) == pytest.approx(
      results["test_accuracy"], abs=0.11)  # one image in 1000, float order aside


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_a_model_that_cannot_be_searched_as_asked_is_a_one_line_error(cli, name):
  root, out = cli
  returncode, _, stderr = out[name]
  assert returncode == 2, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("jaxnas: error: "), stderr[-2000:]
  assert ERRORS[name][1] in lines[0], lines[0]
  assert not (root / name).exists()  # nothing written


def test_the_model_spec_is_part_of_the_config_and_workdir():
  c = runner.SearchConfig(evaluator="train", dataset="fashion_mnist", model="my.models:NET")
  assert c.to_json()["model"] == "my.models:NET" and "space" not in c.to_json()
  assert "-my.models.NET-" in runner.default_workdir(c)
  builtin = runner.SearchConfig()
  assert "model" not in builtin.to_json() and builtin.to_json()["space"] == "nb201"
  for evaluator in runner.MODEL_EVALUATORS:  # byo_model imports from tests/
    runner.validate(dataclasses.replace(c, model="byo_model:MODEL", evaluator=evaluator))


@pytest.mark.parametrize("change, word", [
    ({"model": "no_such_module:MODEL"}, "cannot import no_such_module"),
    ({"model": "byo_model:SmallCNN"}, "the class SmallCNN, not a SearchableModel"),
    ({"model": "byo_model:Block.setup"}, "takes arguments"),
    ({"strategy": "darts", "strategy_args": (("darts_selection", "perturbation"),)},
     "--darts_selection=magnitude with --model"),
    ({"evaluator_args": (("channels", 8),)}, "--channels does not apply to --model"),
    ({"space": "darts"}, "--model and --space exclude each other"),
])
def test_validate_refuses_what_a_model_cannot_do(change, word):
  c = runner.SearchConfig(evaluator="train", dataset="fashion_mnist", model="byo_model:MODEL")
  with pytest.raises(runner.UserError, match=word):
    runner.validate(dataclasses.replace(c, **change))


def test_a_retrain_of_a_model_checks_the_arch_in_its_space():
  from jaxnas import retrain
  space, _ = retrain.check(retrain.RetrainConfig(arch="width=4,depth=1,kernel.0=5,pool=max",
                                                 model="byo_model:MODEL"))
  assert space is SPACE
  with pytest.raises(retrain.RetrainError, match="kernel.1 does not exist"):
    retrain.check(retrain.RetrainConfig(arch="width=4,depth=1,kernel.0=5,kernel.1=3,pool=max",
                                        model="byo_model:MODEL"))
  with pytest.raises(retrain.RetrainError, match="has no attribute NOPE"):
    retrain.check(retrain.RetrainConfig(arch="width=4", model="byo_model:NOPE"))
