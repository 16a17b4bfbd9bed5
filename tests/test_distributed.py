"""Runs that span processes (``jax.distributed``), as users launch them, on this CPU.

Each process is a child running ``python -m jaxnas.main`` with 2 host CPU devices, joined
through a coordinator on a free local port with gloo collectives: 2 processes x 2 devices
are 4 global devices with real cross-process collectives, the code path of a TPU pod or a
GPU cluster. The references are one process with 4 devices. Children compile at the
tests' fast settings (conftest.FAST_COMPILE_FLAGS) and share the run's compilation cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAGS, FASHION_MNIST_SUBSET

TIMEOUT = 300
# A silent peer is given up after this long (the default, 60 s, would only slow the test).
PEER_TIMEOUT = 15
# A Fashion-MNIST search with a population of 8 per generation (2 members per device), 3
# generations of tiny networks, each trained 5 steps of 32 images.
TRAIN = ("--evaluator=train", "--strategy=evolution", "--population=8", "--population_size=8",
         "--num_seeds=1", "--budget=24", "--channels=4", "--cells=1", "--batch_size=32",
         "--train_fraction=0.05", f"--data_dir={FASHION_MNIST_SUBSET}", "--checkpoint_every=1")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}")


def _start(cwd, workdir, flags, processes=2, devices=2, per_process=None):
  """Starts ``processes`` children of ``python -m jaxnas.main *flags`` (one command for all
  but ``--process_id``; ``per_process(i)`` adds flags to process i's); returns them."""
  port = _free_port()
  procs = []
  for i in range(processes):
    launch = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}", f"--peer_timeout={PEER_TIMEOUT}"] if processes > 1 else [])
    extra = list(per_process(i)) if per_process else []
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jaxnas.main", *flags, *extra, f"--workdir={workdir}", *launch],
        cwd=cwd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs, ok=True):
  """``[(returncode, stdout, stderr)]`` of ``procs``; with ``ok``, asserts they all exit 0."""
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, stdout, stderr))
  if ok:
    for i, (code, _, stderr) in enumerate(out):
      assert code == 0, f"process {i}: {stderr[-3000:]}"
      assert "Traceback" not in stderr, stderr[-3000:]
  return out


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _checkpoint_steps(workdir):
  try:
    return [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  except FileNotFoundError:
    return []


def _same_as_one_process(tmp_path, flags):
  """Runs ``flags`` on 2 processes x 2 devices (``two``) and 1 process x 4 devices
  (``one``) side by side, asserts both wrote the same results.json and metrics.jsonl,
  and returns the 2 processes' outputs."""
  two = _start(tmp_path, "two", flags)
  one = _start(tmp_path, "one", flags, processes=1, devices=4)
  out = _finish(two)
  _finish(one)
  for name in ("results.json", "metrics.jsonl"):
    assert _read(tmp_path / "two" / name) == _read(tmp_path / "one" / name), name
  return out


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
  """The training search uninterrupted on 2 processes x 2 devices and on 1 process x 4
  devices, side by side: ``(root, outputs of the 2 processes)``."""
  root = tmp_path_factory.mktemp("train")
  two = _start(root, "two", TRAIN)
  one = _start(root, "one", TRAIN, processes=1, devices=4)
  return root, _finish(two), _finish(one)


def test_tabular_search_across_processes_writes_the_single_process_results(tmp_path):
  """256 seeds sharded over 2 processes x 2 devices: results.json and metrics.jsonl are the
  bytes one process with 4 devices writes (the environment records 4 devices in both)."""
  flags = ("--num_seeds=256", "--budget=30", "--checkpoint_every=10")
  out = _same_as_one_process(tmp_path, flags)
  results = json.loads(_read(tmp_path / "two" / "results.json"))
  assert len(results["runs"]) == 256 and results["environment"]["devices"] == 4
  record = json.loads(_read(tmp_path / "two" / "config.json"))
  assert record["environment"]["processes"] == 2
  assert json.loads(_read(tmp_path / "two" / "timing.json"))["processes"] == 2
  # Process 0 reports; process 1 runs the same search silently.
  assert "best architecture" in out[0][1] and "best architecture" not in out[1][1]
  assert "step 30/30" in out[0][2] and "step 30/30" not in out[1][2]
  # Checkpoints of the sharded state: every step written, one directory for both.
  assert sorted(_checkpoint_steps(tmp_path / "two")) == [10, 20]

  # The verified restore across processes: the newest step damaged, both processes reject
  # it, process 0 moves it aside, both resume from step 10 and end where they did.
  expected = _read(tmp_path / "two" / "results.json")
  os.remove(tmp_path / "two" / "results.json")
  _corrupt(tmp_path / "two" / "checkpoints" / "20")
  out = _finish(_start(tmp_path, "two", flags))
  assert "resuming from checkpoint at step 10" in out[0][2], out[0][2][-3000:]
  assert "checkpoint step 20 is unusable" in out[0][2]
  assert "is unusable" not in out[1][2]  # one report, by the process that moved it
  assert (tmp_path / "two" / "corrupt-checkpoints-20").is_dir()
  assert _read(tmp_path / "two" / "results.json") == expected


def _corrupt(step_dir):
  """Flips bytes in the middle of every data file of a saved state."""
  flipped = 0
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      path = os.path.join(root, name)
      data = bytearray(_read(path))
      if len(data) < 64 or name.startswith("_") or name.endswith(".txt"):
        continue
      for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
      with open(path, "wb") as f:
        f.write(bytes(data))
      flipped += 1
  assert flipped, f"no data files under {step_dir}"


def test_training_search_across_processes_chooses_what_one_process_chooses(train_runs):
  """A population of 8 sharded over 2 processes x 2 devices trains each member as one
  process with 4 devices does: the same fitness, so the same search and best cell."""
  root, _, _ = train_runs
  two = json.loads(_read(root / "two" / "results.json"))
  one = json.loads(_read(root / "one" / "results.json"))
  assert two["summary"]["best_arch"] == one["summary"]["best_arch"]
  assert two["runs"][0]["trajectory"] == one["runs"][0]["trajectory"]
  assert len(two["runs"][0]["trajectory"]) == 24 and two["runs"][0]["failed_evaluations"] == 0
  assert two["runs"][0]["best_score"] > 20.0  # well above chance (10 %)
  assert _read(root / "two" / "results.json") == _read(root / "one" / "results.json")


def test_sigkill_of_one_process_stops_the_other_then_a_rerun_resumes(train_runs):
  """Process 1 SIGKILLed after the first generation's checkpoint: process 0, blocked in the
  next generation's collectives, exits non-zero within 120 s with one line naming process
  1; the same two commands rerun resume from the checkpoint and write the results of the
  uninterrupted 2-process run."""
  root, _, _ = train_runs
  procs = _start(root, "cut", TRAIN)
  deadline = time.time() + TIMEOUT
  while not _checkpoint_steps(root / "cut"):
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
    assert time.time() < deadline
    time.sleep(0.05)
  os.kill(procs[1].pid, signal.SIGKILL)
  killed_at = time.time()
  try:
    procs[0].wait(timeout=120)
  finally:
    waited = time.time() - killed_at
    for p in procs:
      p.kill()
  (code, _, stderr), (code1, _, _) = _finish(procs, ok=False)
  assert code1 == -signal.SIGKILL
  assert code == 1 and waited < 120, (code, waited)  # 1: stopped for a lost peer
  assert not (root / "cut" / "results.json").exists(), "killed too late to test resuming"
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("jaxnas: error: process 1 of 2 stopped responding"), stderr[-3000:]
  assert "Traceback" not in stderr and "Check failure" not in stderr, stderr[-3000:]

  rerun = _finish(_start(root, "cut", TRAIN))
  assert "resuming from checkpoint" in rerun[0][2], rerun[0][2][-3000:]
  for name in ("results.json", "metrics.jsonl"):
    assert _read(root / "cut" / name) == _read(root / "two" / name), name


def test_hyperband_across_processes_writes_the_single_process_results(tmp_path):
  """Hyperband's rungs (2 seeds x 2 cells, then the better cell of each at full epochs)
  train sharded over 2 processes x 2 devices; every process gets each rung's scores and
  keeps the same host state, process 0 writes it: the results of 1 process x 4 devices."""
  flags = ("--strategy=hyperband", "--num_seeds=2", "--budget=3", "--eta=2", "--rungs=2",
           "--hyperband_brackets=1", "--epochs=1", "--channels=4", "--cells=1",
           "--batch_size=32", "--train_fraction=0.05", f"--data_dir={FASHION_MNIST_SUBSET}")
  _same_as_one_process(tmp_path, flags)
  results = json.loads(_read(tmp_path / "two" / "results.json"))
  assert results["budget"]["evaluations_used"] == 3
  assert all(r["best_score"] > 10.0 for r in results["runs"])


def test_darts_across_processes_derives_the_cell_of_one_process(tmp_path):
  """DARTS with its minibatches split over 2 processes x 2 devices (gradients and BN
  moments all-reduced across the processes) derives the cell of 1 process x 4 devices,
  with the same alphas: every process holds the same alpha by construction (the failure
  of data-parallel DARTS elsewhere, NNI issue 5013)."""
  flags = ("--strategy=darts", "--num_seeds=1", "--batch_size=16", "--channels=2",
           "--epochs=2", "--train_fraction=0.02", f"--data_dir={FASHION_MNIST_SUBSET}")
  two = _start(tmp_path, "two", flags)
  one = _start(tmp_path, "one", flags, processes=1, devices=4)
  _finish(two)
  _finish(one)
  a, b = (json.loads(_read(tmp_path / w / "results.json"))["runs"][0] for w in ("two", "one"))
  assert a["best_arch"] == b["best_arch"]
  # The cross-process all-reduce may sum in another order than the in-process one: the
  # bound of tests/test_darts_runner.py's 1 vs 8 devices (measured here: equal).
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(a["alphas"]), np.float64),
                             np.asarray(jax.tree.leaves(b["alphas"]), np.float64),
                             rtol=0, atol=2e-4)
  assert a["trajectory"] == pytest.approx(b["trajectory"], abs=1e-3)


# A SPOS supernet search: 2 epochs of 4 steps of 32 images (8 per device), then 2 generations
# of 3 cells, scored sharded (padded to 4, one per device).
SUPERNET = ("--evaluator=supernet", "--strategy=evolution", "--num_seeds=1", "--budget=6",
            "--population=3", "--channels=4", "--cells=1", "--batch_size=32", "--epochs=2",
            "--train_fraction=0.05", "--bn_batches=1", f"--data_dir={FASHION_MNIST_SUBSET}")


def test_supernet_search_across_processes_writes_the_single_process_results(tmp_path):
  """The SPOS supernet trained data-parallel over 2 processes x 2 devices (minibatches
  split, gradients and BN moments all-reduced across the processes) and its cells scored
  sharded over them: the results.json and metrics.jsonl of 1 process x 4 devices, and the
  same supernet log but for its timings."""
  out = _same_as_one_process(tmp_path, SUPERNET)
  logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
           for line in _read(tmp_path / w / "supernet_metrics.jsonl").splitlines()]
          for w in ("two", "one")]
  assert logs[0] == logs[1] and [x["epoch"] for x in logs[0]] == [1, 2]
  assert sorted(os.listdir(tmp_path / "two" / "supernet")) == ["1", "2"]
  results = json.loads(_read(tmp_path / "two" / "results.json"))
  assert results["environment"]["devices"] == 4
  run = results["runs"][0]
  assert len(run["trajectory"]) == 6 and run["failed_evaluations"] == 0
  assert "supernet epoch 2/2" in out[0][2] and "supernet epoch" not in out[1][2]


def test_processes_started_with_different_commands_are_refused(tmp_path):
  """Both processes stop with the same line naming the flag that differs; nothing is
  written."""
  start = time.time()
  out = _finish(_start(tmp_path, "w", ("--num_seeds=4",),
                       per_process=lambda i: [f"--budget={20 + i}"]), ok=False)
  assert time.time() - start < 60
  lines = []
  for code, _, stderr in out:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    lines.append(stderr.strip().splitlines()[-1])
  assert lines[0] == lines[1]
  assert lines[0] == ("jaxnas: error: the processes were started with different command lines "
                      "(--budget=20 on process 0 vs --budget=21 on process 1); every process "
                      "runs the same command")
  assert not (tmp_path / "w").exists()


BAD_LAUNCHES = {
    ("--process_id=2", "--num_processes=2"): "--process_id must be in [0, --num_processes)",
    ("--num_processes=0",): "--num_processes must be >= 1, got 0",
    ("--nodistributed", "--num_processes=2"): "--num_processes starts a multi-process run; "
                                              "drop --nodistributed",
    ("--coordinator_address=nohost",): "--coordinator_address must be host:port",
    ("--peer_timeout=5",): "--peer_timeout applies to multi-process runs",
    ("--distributed", "--peer_timeout=0"): "--peer_timeout must be > 0",
    ("--distributed", "--mode=retrain", "--arch=x"): "--mode=retrain runs in one process",
}


@pytest.mark.parametrize("flags", sorted(BAD_LAUNCHES))
def test_bad_launch_flags_are_one_line_errors(flags, capsys):
  """Checked before any process is joined (so here, in-process: nothing starts)."""
  from jaxnas import main as cli
  cli.FLAGS.unparse_flags()
  try:
    cli.FLAGS(["jaxnas.main", *flags])
    with pytest.raises(SystemExit) as exit_:
      cli._start_processes()
  finally:
    cli.FLAGS.unparse_flags()
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxnas: error: "), lines
  assert BAD_LAUNCHES[flags] in lines[0], lines[0]


def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path):
  """--distributed where there is no cluster to detect, and no launch flags."""
  proc = subprocess.run([sys.executable, "-m", "jaxnas.main", "--distributed", "--workdir=w"],
                        cwd=tmp_path, env=_env(1), capture_output=True, text=True,
                        timeout=TIMEOUT)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("jaxnas: error: no cluster detected (Cloud TPU, SLURM, Open MPI)")
  assert "--coordinator_address, --num_processes and --process_id" in lines[0]
  assert not (tmp_path / "w").exists()
