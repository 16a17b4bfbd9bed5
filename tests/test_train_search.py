"""Searches driven by real training (``--evaluator=train``), time limits, and retrain/export.

Networks are tiny (C=4, one cell per stage) and train for a few steps on the
tests' subset of the real Fashion-MNIST (conftest.FASHION_MNIST_SUBSET), so each
program compiles once per test module (the runner and the trainer cache
compiled programs per config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import export, retrain, runner
from jaxnas.datasets import load_fashion_mnist, make_preprocess

from conftest import FASHION_MNIST_SUBSET

# 1620 of the subset's 2700 search-training images, 180 of its 300 validation images.
PROXY = (("batch_size", 32), ("cells", 1), ("channels", 4), ("data_dir", FASHION_MNIST_SUBSET),
         ("epochs", 1.0), ("train_fraction", 0.6))


def _config(**kw):
  base = dict(evaluator="train", dataset="fashion_mnist", strategy="evolution", budget=6,
              num_seeds=2, seed=0, checkpoint_every=1, strategy_args=(("batch_size", 2),),
              evaluator_args=PROXY)
  base.update(kw)
  return runner.SearchConfig(**base)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_train_search_results_and_exact_resume(tmp_path):
  config = _config()
  full = tmp_path / "full"
  results = runner.run(config, str(full))
  assert len(results["runs"]) == 2
  for r in results["runs"]:
    assert len(r["trajectory"]) == 6 and r["failed_evaluations"] == 0
    assert r["duplicate_evaluations"] == 0
    # 12 candidates trained for 51 steps: well above chance (10 %) for the best.
    assert 20.0 < r["best_score"] <= 100.0
    assert r["params"] > 0 and r["flops"] > 0
  assert "--mode=retrain" in results["summary"]["retrain_command"]
  assert json.loads(_read(full / "timing.json"))["wall_s"] > 0

  # A search killed after generation 1: its workdir holds config.json, the
  # checkpoint of step 1 and the log up to step 1 (possibly more lines).
  cut = tmp_path / "cut"
  shutil.copytree(full, cut)
  os.remove(cut / "results.json")
  os.remove(cut / "timing.json")
  for step in os.listdir(cut / "checkpoints"):
    if step.isdigit() and int(step) > 1:
      shutil.rmtree(cut / "checkpoints" / step)
  resumed = runner.run(config, str(cut))
  assert not resumed["already_finished"]
  assert _read(cut / "results.json") == _read(full / "results.json")
  assert _read(cut / "metrics.jsonl") == _read(full / "metrics.jsonl")


def test_max_hours_stops_between_generations_and_is_recorded(tmp_path):
  config = runner.SearchConfig(strategy="random", budget=50, num_seeds=3, checkpoint_every=5,
                               max_hours=1e-9)
  results = runner.run(config, str(tmp_path / "w"))
  budget = results["budget"]
  assert budget["max_hours"] == 1e-9
  assert budget["stopped_early"] == {"reason": "max_hours", "max_hours": 1e-9, "at_step": 5}
  for r in results["runs"]:  # the first chunk ran, nothing after it
    assert len(r["trajectory"]) == 5 and r["best_score"] == max(r["trajectory"])
  again = runner.run(config, str(tmp_path / "w"))
  assert again["already_finished"]


def test_retrain_exports_a_network_that_reproduces_its_test_accuracy(tmp_path):
  arch = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
  c = retrain.RetrainConfig(arch=arch, data_dir=FASHION_MNIST_SUBSET, epochs=1.0, channels=4,
                            cells=1, batch_size=64)  # 47 steps
  result = retrain.retrain(c, str(tmp_path / "r"))
  assert 30.0 < result["test_accuracy"] <= 100.0
  with open(tmp_path / "r" / "arch.json") as f:
    arch_json = json.load(f)
  assert arch_json["arch"] == arch and arch_json["params"] == result["params"]
  net = retrain.network_of(arch_json)
  variables = retrain.load_variables(str(tmp_path / "r"))
  ds = load_fashion_mnist(FASHION_MNIST_SUBSET)
  x = make_preprocess(jnp.asarray(ds.mean), jnp.asarray(ds.std))(None, ds.test_images)
  logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x)
  acc = 100.0 * float(np.mean(np.argmax(np.asarray(logits), -1) == ds.test_labels))
  assert acc == pytest.approx(result["test_accuracy"], abs=0.02)
  # The export alone (network.json + variables, no search code) gives the same accuracy.
  exported = export.load(str(tmp_path / "r" / "export"))
  assert exported.metadata["test_accuracy"] == result["test_accuracy"]
  assert exported.accuracy(ds.test_images, ds.test_labels) == pytest.approx(
      result["test_accuracy"], abs=0.02)
  assert retrain.retrain(c, str(tmp_path / "r"))["already_finished"]


def test_retrain_killed_between_chunks_resumes_to_identical_results(tmp_path, monkeypatch):
  arch = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
  # 47 steps (an epoch): one chunk uninterrupted, chunks of 16 when cut.
  base = retrain.RetrainConfig(arch=arch, data_dir=FASHION_MNIST_SUBSET, epochs=1.0, channels=4,
                               cells=1, batch_size=64)
  full = retrain.retrain(base, str(tmp_path / "full"))
  cut = dataclasses.replace(base, checkpoint_every=16)
  real_save, saved = retrain.Checkpointer.save, []

  def save_then_die(self, step, state, extra=None):
    real_save(self, step, state, extra)
    saved.append(step)
    if len(saved) == 2:
      self.wait()
      raise KeyboardInterrupt

  monkeypatch.setattr(retrain.Checkpointer, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    retrain.retrain(cut, str(tmp_path / "cut"))
  monkeypatch.undo()
  assert saved == [16, 32] and not (tmp_path / "cut" / "results.json").exists()
  resumed = retrain.retrain(cut, str(tmp_path / "cut"))
  lines = [json.loads(x) for x in _read(tmp_path / "cut" / "metrics.jsonl").splitlines()]
  assert [x["step"] for x in lines] == [16, 32, 47]
  for k in ("test_accuracy", "final_loss", "params", "steps"):
    assert resumed[k] == full[k], k
  a, b = (retrain.load_variables(str(tmp_path / d)) for d in ("full", "cut"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(retrain.RetrainError, match="holds another retrain"):
    retrain.retrain(dataclasses.replace(cut, seed=1), str(tmp_path / "cut"))


@pytest.mark.parametrize("flags,message", [
    (["--evaluator=train", "--dataset=cifar10"], "needs a data_dir"),
    (["--evaluator=train", "--dataset=svhn"], "unknown dataset 'svhn'"),
    (["--evaluator=nb201", "--epochs=2"], "--epochs does not apply to --evaluator=nb201 "
                                          "(only to --evaluator=train|supernet)"),
    (["--evaluator=train", "--epochs=inf"], "--epochs must be > 0 and finite"),
    (["--evaluator=train", "--plan=foo"], "--plan must be one of auto, map"),
    (["--evaluator=train", "--width_impl=foo"], "--width_impl must be one of mask, switch"),
    (["--evaluator=supernet", "--width_impl=switch"],
     "--width_impl does not apply to --evaluator=supernet"),
    (["--evaluator=train", "--model=byo_model:model", "--width_impl=switch"],
     "--width_impl does not apply to --model"),
    (["--evaluator=train", "--train_learning_rate=nan"], "--train_learning_rate must be > 0"),
    (["--evaluator=train", "--population=0"], "--population must be > 0"),
    (["--evaluator=train", f"--data_dir={FASHION_MNIST_SUBSET}", "--batch_size=100000"],
     "--batch_size=100000 is more than the 2700 search-training"),
    (["--max_hours=nan"], "--max_hours must be >= 0 and finite"),
    (["--strategy=hyperband", "--budget=4"], "smaller than Hyperband's first rung (9 cells"),
    (["--strategy=hyperband", "--eta=1"], "--eta must be >= 2"),
    (["--mode=retrain", "--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
      "--budget=7"], "--budget does not apply to --mode=retrain"),
    (["--mode=retrain", "--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
      "--space=darts"], "--space=darts does not take --arch="),
    (["--mode=retrain", "--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
      "--epochs=nan"], "--epochs must be > 0 and finite"),
    (["--mode=retrain", "--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
      "--train_learning_rate=0"], "--train_learning_rate must be > 0 and finite"),
    (["--mode=retrain", "--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
      "--channels=0"], "--channels must be >= 1, got 0"),
    (["--evaluator=train", "--train_fraction=1.5"], "train_fraction must be in (0, 1]"),
    (["--evaluator=train", "--data_dir=/nonexistent"], "/nonexistent"),
    (["--max_hours=-1"], "--max_hours must be >= 0"),
    (["--strategy=darts", "--augment"], "--augment does not apply to --strategy=darts"),
    (["--strategy=darts", "--space=darts", "--darts_selection=perturbation"],
     "nb201 space only"),
    (["--strategy=darts", "--darts_tune_steps=-1"], "--darts_tune_steps must be >= 0"),
    (["--mode=retrain"], "needs --arch"),
    (["--mode=retrain", "--arch=|conv~0|"], "conv"),
    (["--mode=retrain", "--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
      "--checkpoint_every=-1"], "--checkpoint_every must be >= 0"),
    (["--arch=|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "only to --mode=retrain"),
])
def test_bad_training_input_is_one_line_error(tmp_path, flags, message):
  proc = subprocess.run([sys.executable, "-m", "jaxnas.main", "--workdir=w", *flags],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jaxnas: error:") and message in err[0], err


def test_workdirs_of_another_kind_or_damaged_are_refused_untouched(tmp_path):
  config = _config()
  cases = {"foreign": ("results.json", '{"a": 1}', "is not the results of this search"),
           "cut": ("results.json", '{"config": {"stra', "results.json is unreadable"),
           "retrain": ("config.json", '{"arch": "|none~0|", "dataset": "fashion_mnist"}',
                       "holds a retrain, not a search")}
  for name, (file, text, message) in cases.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / file).write_text(text)
    with pytest.raises(runner.UserError, match=re.escape(message)):
      runner.run(config, str(tmp_path / name))
    assert sorted(os.listdir(tmp_path / name)) == [file], name  # nothing written
  (tmp_path / "search").mkdir()
  (tmp_path / "search" / "config.json").write_text(json.dumps({"config": config.to_json()}))
  c = retrain.RetrainConfig(arch="|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")
  with pytest.raises(retrain.RetrainError, match="holds a search or other files"):
    retrain.retrain(c, str(tmp_path / "search"))


def test_hyperband_rungs_are_population_calls_and_resume_exactly(tmp_path, monkeypatch):
  # Successive halving, eta 2: 2 cells at half the epochs, the best one at full epochs.
  config = _config(strategy="hyperband", budget=3, num_seeds=2,
                   strategy_args=(("eta", 2), ("hyperband_brackets", 1), ("rungs", 2)))
  results = runner.run(config, str(tmp_path / "full"))
  assert results["budget"]["evaluations_used"] == 3
  assert results["budget"]["epochs_used"] == pytest.approx(2 * 0.5 + 1 * 1.0)
  for r in results["runs"]:
    assert r["best_epochs"] == 1.0 and len(r["trajectory"]) == 3
  lines = [json.loads(x) for x in _read(tmp_path / "full" / "metrics.jsonl").splitlines()]
  assert [(x["cells"], x["epochs"]) for x in lines] == [(2, 0.5), (1, 1.0)]

  # Killed right after the first rung's state was written.
  real_write = runner.multifidelity.host_loop.write_json_atomic
  calls = []

  def write_then_die(path, obj):
    real_write(path, obj)
    calls.append(path)
    raise KeyboardInterrupt

  monkeypatch.setattr(runner.multifidelity.host_loop, "write_json_atomic", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    runner.run(config, str(tmp_path / "cut"))
  monkeypatch.setattr(runner.multifidelity.host_loop, "write_json_atomic", real_write)
  assert len(calls) == 1 and not os.path.exists(tmp_path / "cut" / "results.json")
  runner.run(config, str(tmp_path / "cut"))
  assert _read(tmp_path / "cut" / "results.json") == _read(tmp_path / "full" / "results.json")


def test_spearman_matches_definition():
  from jaxnas.multifidelity import spearman
  assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties get average ranks: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4).
  assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(np.corrcoef(
      [1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1])
  assert np.isnan(spearman([1, 2], [3, 4]))
