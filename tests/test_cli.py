"""The command line, run as a user would: output files, resume after SIGKILL, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxnas import runner

TIMEOUT = 180


def _command(*flags):
  return [sys.executable, "-m", "jaxnas.main", *flags]


def _run(cwd, *flags):
  return subprocess.run(_command(*flags), cwd=cwd, capture_output=True, text=True,
                        timeout=TIMEOUT)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _assert_ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_default_run_and_rerun(tmp_path):
  proc = _run(tmp_path, "--workdir=w")
  _assert_ok(proc)
  w = tmp_path / "w"
  results = json.loads(_read(w / "results.json"))
  config = results["config"]
  # Defaults documented in main.py's flags.
  assert config["strategy"] == "evolution" and config["budget"] == 100
  assert config["num_seeds"] == 10 and config["evaluator"] == "nb201"
  assert len(results["runs"]) == 10
  for i, r in enumerate(results["runs"]):
    assert r["seed"] == i and isinstance(r["seed"], int)
    assert isinstance(r["best_arch"], str) and r["best_arch"].count("~") == 6
    assert isinstance(r["best_score"], float)
    traj = r["trajectory"]
    assert len(traj) == 100 and all(isinstance(x, float) for x in traj)
    assert all(a <= b for a, b in zip(traj, traj[1:]))
    assert traj[-1] == r["best_score"]
  lines = [json.loads(line) for line in _read(w / "metrics.jsonl").decode().splitlines()]
  assert [line["step"] for line in lines] == list(range(1, 101))
  for line in lines:
    assert {"best", "diversity", "step", "evaluations"} <= set(line)
  assert lines[-1]["evaluations"] == 100
  env = json.loads(_read(w / "config.json"))
  assert env["config"] == config
  assert env["environment"]["versions"]["jax"]
  assert env["environment"]["versions"]["jaxnas"]

  assert results["environment"] == env["environment"]["compute"]
  assert results["environment"]["backend"] == "cpu" and "conv_impl" not in results["environment"]
  assert results["trajectory_axes"]["x"] == "architectures evaluated"

  before = (_read(w / "results.json"), os.stat(w / "results.json").st_mtime_ns)
  again = _run(tmp_path, "--workdir=w")
  _assert_ok(again)
  assert "already finished" in again.stdout
  assert (_read(w / "results.json"), os.stat(w / "results.json").st_mtime_ns) == before

  # A run resumed in another environment than it began in says so once and records it.
  record = json.loads(_read(w / "config.json"))
  record["environment"]["compute"]["jaxlib"] = "0.0.1"
  (w / "config.json").write_text(json.dumps(record))
  os.remove(w / "results.json")
  resumed = _run(tmp_path, "--workdir=w")
  _assert_ok(resumed)
  warning = [l for l in resumed.stderr.splitlines() if l.startswith("jaxnas: warning: resum")]
  assert len(warning) == 1 and "jaxlib: 0.0.1 -> " in warning[0], resumed.stderr[-2000:]
  assert json.loads(_read(w / "results.json"))["resumed_changes"].startswith("jaxlib: 0.0.1")


def test_compilation_cache_is_filled_then_loaded_with_identical_results(tmp_path):
  """--compilation_cache: the first run stores its programs, a rerun of the same search into
  another workdir loads them and writes the same bytes; an unusable directory costs only
  the cache (a one-line warning), never the run."""
  flags = ("--budget=30", "--num_seeds=4", "--compilation_cache=cc")
  first = _run(tmp_path, *flags, "--workdir=a")
  _assert_ok(first)
  stored = sorted(os.listdir(tmp_path / "cc"))
  assert any(name.startswith("jit_") for name in stored), stored
  second = subprocess.run(_command(*flags, "--workdir=b"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT, env=dict(os.environ, JAX_LOG_COMPILES="1"))
  _assert_ok(second)
  hits = {name.split("-")[0] for name in stored}
  for name in hits:
    assert f"Persistent compilation cache hit for '{name}'" in second.stderr, name
  assert sorted(os.listdir(tmp_path / "cc")) == stored
  assert _read(tmp_path / "a" / "results.json") == _read(tmp_path / "b" / "results.json")
  (tmp_path / "file").write_text("")
  blocked = _run(tmp_path, "--budget=30", "--num_seeds=4", "--compilation_cache=file/cc",
                 "--workdir=c")
  _assert_ok(blocked)
  assert "jaxnas: warning: compilation cache off" in blocked.stderr
  assert _read(tmp_path / "c" / "results.json") == _read(tmp_path / "a" / "results.json")


KILL_FLAGS = ("--strategy=predictor", "--num_seeds=8", "--budget=150", "--checkpoint_every=1")
KILL_STEPS = 15


def _checkpoint_steps(workdir):
  try:
    return [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  except FileNotFoundError:
    return []


def _start_and_kill(cwd, workdir, at_step):
  """Starts the run, SIGKILLs it once a checkpoint of step >= at_step exists."""
  proc = subprocess.Popen(_command(*KILL_FLAGS, f"--workdir={workdir}"), cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + TIMEOUT
  while max(_checkpoint_steps(cwd / workdir), default=0) < at_step:
    assert proc.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (cwd / workdir / "results.json").exists(), "killed too late to test resuming"


def test_sigkill_then_rerun_is_bit_identical(tmp_path):
  # The uninterrupted reference runs concurrently with the interrupted one.
  reference = subprocess.Popen(_command(*KILL_FLAGS, "--workdir=ref"), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _start_and_kill(tmp_path, "cut", 1)  # right after the first checkpoint
  _start_and_kill(tmp_path, "cut", KILL_STEPS // 2)  # in the middle of the resumed run
  resumed = _run(tmp_path, *KILL_FLAGS, "--workdir=cut")
  _assert_ok(resumed)
  # It did resume (a rerun from scratch would also match the reference).
  assert "resuming from checkpoint" in resumed.stderr
  out, err = reference.communicate(timeout=TIMEOUT)
  assert reference.returncode == 0, err[-3000:]
  assert _read(tmp_path / "cut" / "results.json") == _read(tmp_path / "ref" / "results.json")
  assert _read(tmp_path / "cut" / "metrics.jsonl") == _read(tmp_path / "ref" / "metrics.jsonl")


BAD_INPUTS = {
    "unknown_strategy": ("--strategy=annealing",),
    "unknown_dataset": ("--dataset=mnist",),
    "unknown_evaluator": ("--evaluator=surrogate",),
    "zero_budget": ("--budget=0",),
    "zero_seeds": ("--num_seeds=0",),
    "budget_not_int": ("--budget=abc",),
    "budget_too_large": ("--budget=20000",),
    "flag_not_for_strategy": ("--strategy=random", "--tournament_size=3"),
    "tournament_larger_than_population": ("--population_size=3", "--tournament_size=5"),
    "unknown_flag": ("--budjet=10",),
    "positional_argument": ("--budget=10", "extra"),
    "other_config_in_workdir": ("--budget=6",),  # the workdir holds a budget=5 search
    "negative_cpu_devices": ("--cpu_devices=-1",),
}
# Caught after JAX has started (and logged its devices): only the last stderr line is checked.
AFTER_JAX_START = {"other_config_in_workdir", "budget_too_large", "tournament_larger_than_population"}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """Runs every bad command concurrently (each costs a Python + JAX start-up)."""
  root = tmp_path_factory.mktemp("bad")
  runner.run(runner.SearchConfig(strategy="random", budget=5, num_seeds=1), str(root / "taken"))
  procs = {}
  for name, flags in BAD_INPUTS.items():
    workdir = "taken" if name == "other_config_in_workdir" else name
    procs[name] = subprocess.Popen(
        _command("--strategy=random", "--num_seeds=1", *flags, f"--workdir={workdir}")
        if name == "other_config_in_workdir" else _command(*flags, f"--workdir={workdir}"),
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / f"xla-{name}")})
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    out[name] = (proc.returncode, stdout, stderr, root)
  return out


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(name, bad_runs):
  returncode, stdout, stderr, root = bad_runs[name]
  assert returncode == 2, (returncode, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines, "nothing on stderr"
  assert lines[-1].startswith("jaxnas: error: "), stderr[-2000:]
  assert len(lines[-1]) > len("jaxnas: error: ") + 10
  if name not in AFTER_JAX_START:
    assert len(lines) == 1, stderr
  # A rejected run leaves no results behind (and the taken workdir keeps its own).
  if name != "other_config_in_workdir":
    assert not (root / name / "results.json").exists()
  if name not in AFTER_JAX_START:  # nor a compilation cache directory
    assert not (root / f"xla-{name}").exists()
  else:
    taken = json.loads(_read(root / "taken" / "results.json"))
    assert taken["config"]["budget"] == 5


def test_bad_input_messages_name_the_problem(bad_runs):
  expect = {"unknown_strategy": "annealing", "unknown_dataset": "mnist",
            "unknown_evaluator": "surrogate", "zero_budget": "budget",
            "zero_seeds": "num_seeds", "budget_not_int": "abc",
            "flag_not_for_strategy": "tournament_size", "unknown_flag": "budjet",
            "positional_argument": "extra", "other_config_in_workdir": "budget",
            "budget_too_large": "20000", "tournament_larger_than_population": "tournament_size",
            "negative_cpu_devices": "cpu_devices"}
  for name, word in expect.items():
    stderr = bad_runs[name][2]
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert word in last, (name, last)
