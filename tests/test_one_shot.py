"""One-shot weight sharing (SPOS, ``--evaluator=supernet``): training, scoring, resume, CLI.

A tiny supernet (C=4, one cell per stage) trains for six epochs on the search
split of the tests' Fashion-MNIST subset (2700 images, as many as 5 % of the
full set's), once per module (its many steps run 5x faster compiled normally);
the short scoring programs and the test-only ones are compiled at XLA
optimisation level 0 (``compiler_options``).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import ops, runner
from jaxnas.estimators import one_shot
from jaxnas.estimators.training import search_split
from jaxnas.models import nb201_net
from jaxnas.spaces import nb201_space

from conftest import FAST_COMPILE, FASHION_MNIST_SUBSET, run_python

CONFIG = one_shot.SupernetConfig(data_dir=FASHION_MNIST_SUBSET, channels=4, cells=1,
                                 batch_size=64, train_fraction=1.0, epochs=6.0, bn_batches=2)
SPACE = nb201_space()
CONNECTED = np.array([  # connected cells of each op mix (a disconnected one scores chance)
    [3, 3, 3, 3, 3, 3],
    [2, 1, 3, 4, 0, 3],
    [1, 3, 0, 2, 3, 1],
    [3, 0, 0, 1, 4, 2],
    [4, 2, 2, 0, 3, 3],
    [2, 2, 2, 2, 2, 2],
], np.int32)


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


def _random_cells(n, seed):
  return np.asarray(jax.vmap(SPACE.sample)(jax.random.split(jax.random.PRNGKey(seed), n)))


@pytest.fixture(scope="module")
def data():
  ds, d = search_split(one_shot.proxy_spec(CONFIG))
  return ds.num_classes, d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """(evaluator, final SPOS state, workdir) of CONFIG; the evaluator loads the trained supernet."""
  num_classes, d = data
  workdir = tmp_path_factory.mktemp("supernet") / "w"
  state = one_shot.train_supernet(CONFIG, d, num_classes, str(workdir))
  evaluator = one_shot.supernet_evaluator(CONFIG, str(workdir), compiler_options=FAST_COMPILE)
  return evaluator, state, workdir


def test_spos_training_scores_sampled_paths_well_above_chance(trained, data):
  evaluator, state, _ = trained
  num_classes, d = data
  spos = one_shot.make_spos(CONFIG, num_classes, d.train_images.shape[1:],
                            d.train_labels.shape[0])
  assert int(state.step) == spos.total_steps == 6 * spos.steps_per_epoch
  cells = np.concatenate([CONNECTED, _random_cells(10, 1)])
  scores = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), cells))
  assert scores.shape == (len(cells),) and scores.dtype == np.float32
  assert np.all(np.isfinite(scores)) and np.all((0 <= scores) & (scores <= 100))
  # 10 classes: chance is 10 %. Six short epochs put connected cells far above (measured:
  # medians ~49 % for CONNECTED and ~48 % for all; the untrained supernet scores ~11 %).
  assert np.median(scores[:len(CONNECTED)]) > 35.0, scores
  assert np.median(scores) > 30.0, scores
  # The same scorer on the untrained supernet is near chance: training is what helps.
  key = jax.random.PRNGKey(CONFIG.supernet_seed)
  untrained = _compile(spos.init, key)(key)
  untrained = {"params": untrained.params, "batch_stats": untrained.batch_stats}
  calib = one_shot.calibration_batches(CONFIG, d)
  before = np.asarray(_compile(one_shot.make_scorer(CONFIG, num_classes), untrained, CONNECTED,
                               calib, d)(untrained, CONNECTED, calib, d))
  assert np.median(scores[:len(CONNECTED)]) > np.median(before) + 20.0, (before, scores)


def test_scores_are_fixed_per_cell_whatever_the_key_and_population(trained):
  evaluator, _, _ = trained
  cells = _random_cells(6, 2)
  first = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), cells))
  order = np.array([3, 0, 5, 1, 4, 2])
  # Another key, another order, other cells around them, a duplicate.
  mixed = np.concatenate([CONNECTED[:2], cells[order], cells[:1]])
  again = np.asarray(evaluator.evaluate(jax.random.PRNGKey(7), mixed))
  np.testing.assert_array_equal(again[2:8], first[order])
  assert again[8] == first[0]
  assert len(set(first.tolist())) > 1  # not a constant


def test_map_and_vmap_plans_agree(trained, data):
  _, state, _ = trained
  num_classes, d = data
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  calib = one_shot.calibration_batches(CONFIG, d)
  cells = CONNECTED[:4]
  by_map = _compile(one_shot.make_scorer(CONFIG, num_classes, plan="map"), variables, cells,
                    calib, d)(variables, cells, calib, d)
  by_vmap = _compile(one_shot.make_scorer(CONFIG, num_classes, plan="vmap"), variables, cells,
                     calib, d)(variables, cells, calib, d)
  # Float differences between switch and kernel ops may flip an argmax; allow one image.
  one_image = 100.0 / d.val_labels.shape[0]
  np.testing.assert_allclose(np.asarray(by_vmap), np.asarray(by_map), atol=1.01 * one_image)


def test_bn_recalibration_is_the_exact_batch_average_and_beats_stale_statistics(trained, data):
  _, state, _ = trained
  num_classes, d = data
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  calib = one_shot.calibration_batches(CONFIG, d)
  assert calib.shape == (2, 64, 28, 28, 1)
  arch = CONNECTED[1]
  recal = _compile(one_shot.make_recalibrate(CONFIG, num_classes), state.params,
                   state.batch_stats, arch, calib, d)(state.params, state.batch_stats, arch,
                                                      calib, d)
  # The stem BN sees conv(images): its statistics are the mean over the two batches of
  # each batch's mean and biased variance (not the variance of the union, not a momentum).
  x = (np.asarray(calib, np.float32) / 255.0 - np.asarray(d.mean)) / np.asarray(d.std)
  y = np.stack([np.asarray(ops.conv2d(jnp.asarray(b), state.params["stem"])) for b in x])
  y = y.astype(np.float64)
  means, variances = y.mean(axis=(1, 2, 3)), y.var(axis=(1, 2, 3))  # per batch and channel
  stem = recal["stem_bn"]["bn"]
  tol = dict(rtol=1e-3, atol=1e-4)  # float32 sums over 50k pixels
  np.testing.assert_allclose(stem["mean"], means.mean(0), **tol)
  np.testing.assert_allclose(stem["var"], variances.mean(0), **tol)
  # Both batches count: not the last one alone (as momentum 0 would leave), nor the first.
  for b in range(2):
    assert np.max(np.abs(stem["mean"] - means[b])) > 10 * tol["atol"], (stem["mean"], means)

  stale = _compile(one_shot.make_scorer(CONFIG._replace(bn_batches=0), num_classes), variables,
                   CONNECTED, calib[:0], d)(variables, CONNECTED, calib[:0], d)
  fresh = _compile(one_shot.make_scorer(CONFIG, num_classes), variables, CONNECTED, calib,
                   d)(variables, CONNECTED, calib, d)
  stale, fresh = np.asarray(stale), np.asarray(fresh)
  assert np.all(np.isfinite(stale)) and np.all(np.isfinite(fresh))
  # The supernet's running statistics mix all paths; each cell's own are much better
  # (measured: mean 20 % stale vs 49 % recalibrated).
  assert fresh.mean() > stale.mean() + 15.0, (stale, fresh)


def test_one_spos_step_updates_only_the_sampled_path(data):
  num_classes, d = data
  # 1/E of an epoch: exactly one live step, then dead steps that change nothing.
  spe = d.train_labels.shape[0] // CONFIG.batch_size
  config = CONFIG._replace(epochs=1.0 / spe)
  spos = one_shot.make_spos(config, num_classes, d.train_images.shape[1:],
                            d.train_labels.shape[0])
  assert spos.total_steps == 1 and spos.num_epochs == 1
  key = jax.random.PRNGKey(3)
  state = _compile(spos.init, key)(key)
  new, metrics = _compile(spos.run_epoch, state, d)(state, d)
  assert int(new.step) == 1
  assert np.asarray(metrics["live"]).tolist() == [True] + [False] * (spe - 1)
  arch = np.asarray(SPACE.sample(jax.random.fold_in(jax.random.fold_in(state.key, 0), 0)))
  trace_new, trace_old = new.opt_state[1][0].trace, state.opt_state[1][0].trace
  conv_ops = {"nor_conv_1x1": nb201_net.CONV1, "nor_conv_3x3": nb201_net.CONV3}
  checked = 0
  for stage_cell, cell in new.params.items():
    if not stage_cell.startswith("cell"):
      continue
    for edge, sub in cell.items():
      for op, code in conv_ops.items():
        on_path = arch[int(edge[4:])] == code
        leaves = zip(jax.tree.leaves(sub[op]), jax.tree.leaves(state.params[stage_cell][edge][op]),
                     jax.tree.leaves(trace_new[stage_cell][edge][op]),
                     jax.tree.leaves(trace_old[stage_cell][edge][op]))
        for p_new, p_old, t_new, t_old in leaves:
          checked += 1
          assert np.array_equal(p_new, p_old) != on_path, (stage_cell, edge, op, arch)
          assert np.array_equal(t_new, t_old) != on_path
  assert checked == 3 * 6 * 2 * 3  # 3 cells x 6 edges x 2 conv ops x (kernel, scale, bias)
  # The stem is on every path.
  assert not np.array_equal(new.params["stem"], state.params["stem"])


def test_supernet_resume_ends_identical_and_other_settings_are_refused(tmp_path, trained, data):
  _, full, trained_dir = trained
  num_classes, d = data
  assert sorted(os.listdir(trained_dir / "supernet")) == ["4", "5", "6"]  # keeps 3
  lines = [json.loads(x) for x in (trained_dir / "supernet_metrics.jsonl").read_text().splitlines()]
  assert [x["epoch"] for x in lines] == list(range(1, 7)) and lines[-1]["loss"] < lines[0]["loss"]
  # Killed after epoch 4 (its log already one line further).
  w = tmp_path / "w"
  shutil.copytree(trained_dir, w)
  shutil.rmtree(w / "supernet" / "6")
  shutil.rmtree(w / "supernet" / "5")
  resumed = one_shot.train_supernet(CONFIG, d, num_classes, str(w))
  assert sorted(os.listdir(w / "supernet")) == ["4", "5", "6"]
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert len((w / "supernet_metrics.jsonl").read_text().splitlines()) == 6
  with pytest.raises(ValueError, match="other settings"):
    one_shot.train_supernet(CONFIG._replace(epochs=4.0), d, num_classes, str(w), FAST_COMPILE)
  # Scoring settings do not change the supernet: it is loaded, not retrained.
  loaded = one_shot.train_supernet(CONFIG._replace(bn_batches=3), d, num_classes, str(w),
                                   FAST_COMPILE)
  np.testing.assert_array_equal(loaded.params["stem"], full.params["stem"])


@pytest.mark.parametrize("args,message", [
    ((("bn_batches", -1),), "bn_batches must be >= 0"),
    ((("plan", "sequential"),), "does not apply to the supernet"),
    ((("epochs", 0.0),), "epochs must be > 0"),
    ((("bn_batches", 100),), "exceeds the"),
    ((("proxy", "naswot"),), "--proxy does not apply to --evaluator=supernet"),
])
def test_bad_supernet_settings_are_user_errors(tmp_path, args, message):
  config = runner.SearchConfig(evaluator="supernet", dataset="fashion_mnist", budget=2,
                               num_seeds=1, evaluator_args=(("data_dir", FASHION_MNIST_SUBSET),
                                                            ("train_fraction", 1.0)) + args)
  with pytest.raises(runner.UserError, match=message):
    runner.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "config.json").exists()
  hyperband = runner.SearchConfig(evaluator="supernet", dataset="fashion_mnist",
                                  strategy="hyperband")
  with pytest.raises(runner.UserError, match="needs --evaluator=train"):
    runner.validate(hyperband)


CLI_FLAGS = ("--evaluator=supernet", "--strategy=evolution", "--budget=6", "--num_seeds=2",
             "--population=2", "--channels=4", "--cells=1", "--batch_size=32", "--epochs=2",
             f"--data_dir={FASHION_MNIST_SUBSET}", "--train_fraction=0.4", "--bn_batches=2")


def _cli(cwd, *flags):
  proc = run_python(["-m", "jaxnas.main", *CLI_FLAGS, *flags], cwd=cwd, timeout=240)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def cli_search(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  return root, _cli(root, "--workdir=w")


def test_cli_supernet_search_writes_results_and_a_rerun_is_finished(cli_search):
  root, proc = cli_search
  w = root / "w"
  results = json.loads((w / "results.json").read_text())
  assert results["config"]["evaluator"] == "supernet"
  assert results["config"]["checkpoint_every"] == 1  # the default for supernet
  assert results["config"]["evaluator_args"]["bn_batches"] == 2
  assert len(results["runs"]) == 2
  for r in results["runs"]:
    assert len(r["trajectory"]) == 6 and r["failed_evaluations"] == 0
    assert r["duplicate_evaluations"] == 0
    assert 15.0 < r["best_score"] <= 100.0
    assert r["params"] > 0 and r["flops"] > 0 and r["best_arch"].count("~") == 6
  assert "--mode=retrain" in results["summary"]["retrain_command"]
  assert "supernet (inherited-weight) validation accuracy" in proc.stdout
  assert sorted(os.listdir(w / "supernet")) == ["1", "2"]
  # The supernet's training counts against --max_hours: it is part of the search's wall time.
  timing = json.loads((w / "timing.json").read_text())
  assert 0.0 < timing["setup_s"] < timing["wall_s"]
  again = _cli(root, "--workdir=w")
  assert "already finished" in again.stdout
  assert "supernet epoch" not in again.stderr  # nothing trained, not even loaded


def test_cli_supernet_search_resumes_to_identical_results(cli_search):
  root, _ = cli_search
  w, cut = root / "w", root / "cut"
  shutil.copytree(w, cut)
  os.remove(cut / "results.json")
  os.remove(cut / "timing.json")
  for sub, keep in (("checkpoints", 1), ("supernet", 1)):
    for step in os.listdir(cut / sub):
      if step.isdigit() and int(step) > keep:
        shutil.rmtree(cut / sub / step)
  proc = _cli(root, "--workdir=cut")
  assert "supernet: resuming from checkpoint at epoch 1" in proc.stderr
  assert "resuming from checkpoint at step 1" in proc.stderr
  assert (cut / "results.json").read_bytes() == (w / "results.json").read_bytes()
  assert (cut / "metrics.jsonl").read_bytes() == (w / "metrics.jsonl").read_bytes()
