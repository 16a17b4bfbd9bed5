"""The host loop of every long run: chunks of compiled work between checkpoints.

A search (chunks of generations), a DARTS search (epochs), Hyperband (rungs)
and the SPOS supernet's training (epochs) all run the same way: restore the
newest checkpoint and cut the metrics log back to it, then repeatedly run one
compiled chunk, time it, append its metrics lines, save a checkpoint. The
wall-time limit (``--max_hours``) is applied here, once for all of them:
checked between chunks, so a chunk in progress is never cut, and a chunk that
would likely overrun the limit (the last one took longer than what is left) is
not started. Elapsed time is carried in the checkpoint, so resumes count too.

Only process 0 writes files (checkpoints themselves are collective); across processes
every one resumes from the same checkpoint and reads the log only once process 0 has cut
it back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
from absl import logging

from jaxnas import distributed
from jaxnas.checkpoint import Checkpointer, truncate_log


def compute_environment(networks: bool, execution=None) -> dict:
  """What besides its config decides a run's numbers: the backend, its devices, jax and
  jaxlib and, for runs that train or score networks (``networks``), the convolution
  implementation of their ``execution`` (a ``jaxnas.ops.Execution``; None: the backend's
  default, what the CLI's networks use) and, for oneDNN's, its version and threads per call
  (its kernel gradients split their sums over the threads, so the count moves results at
  float level). results.json records it; a run resumed under another is named
  (``resumed_changes``)."""
  import jaxlib
  env = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "devices": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
  if networks:
    from jaxnas import native
    from jaxnas.ops import Execution
    env["conv_impl"] = (execution or Execution()).resolve().conv
    if env["conv_impl"] == "onednn":
      d = native.describe()
      env.update(onednn_version=d["onednn_version"], onednn_threads=d["threads"])
  return env


def resumed_changes(before: dict | None, now: dict) -> str | None:
  """``"key: old -> new; ..."`` of what differs between the environment a run began in
  (``before``, from its config.json; None for a run recorded without one) and ``now``,
  warned on stderr in one line; None when nothing does."""
  if not isinstance(before, dict):
    return None
  diffs = [f"{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
           if before.get(k) != now.get(k)]
  if not diffs:
    return None
  text = "; ".join(diffs)
  if primary():
    print(f"jaxnas: warning: resuming a run begun in another environment ({text}); its "
          "results can differ at float level from an uninterrupted run's", file=sys.stderr,
          flush=True)
  return text


def primary() -> bool:
  """Whether this process writes the workdir's JSON files (process 0)."""
  return jax.process_index() == 0


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
  if not primary():
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str, remedy: str, error: type[Exception] = ValueError) -> Any:
  """The JSON in ``path``; ``error`` (the caller's one-line error type) saying what is
  wrong and, in ``remedy``, what to do, where it cannot be read or parsed."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
    raise error(f"{path} is unreadable ({e}); {remedy}") from None


def describe_diff(there: dict, now: dict) -> str:
  """``"key: old there vs new now, ..."`` for the keys of ``now`` whose values differ."""
  return ", ".join(f"{k}: {there.get(k)!r} there vs {v!r} now" for k, v in now.items()
                   if there.get(k) != v)


def append_jsonl(path: str, lines: list[dict]) -> None:
  if primary():
    with open(path, "a") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)


def resume(ckpt: Checkpointer, template: Any, log_path: str, field: str = "step",
           what: str = "") -> tuple[int, Any, float]:
  """``(step, state, elapsed_s)`` from ``ckpt``'s newest verified checkpoint, or
  ``(0, template, 0.0)`` without one.

  The JSON-lines log at ``log_path`` is cut back to that step (lines written
  after the checkpoint, before a kill, would be written again), or removed when
  starting afresh; ``what`` prefixes the log message. Raises ``checkpoint.CheckpointError`` when no checkpoint
  is readable (the unreadable ones are moved aside).
  """
  restored = ckpt.restore_latest(template)
  if restored is None:
    if os.path.exists(log_path) and primary():
      os.remove(log_path)
    distributed.barrier("jaxnas-log-reset")  # no process reads the log before it is reset
    return 0, template, 0.0
  step, state, meta = restored
  logging.info("%sresuming from checkpoint at %s %d", what, field, step)
  if primary():
    truncate_log(log_path, step, field)
  distributed.barrier("jaxnas-log-reset")
  return step, state, float(meta.get("elapsed_s", 0.0))


def drive(step: int, elapsed: float, advance: Callable[[int], tuple[int, Any]],
          commit: Callable[[int, Any, float, float], None], done: Callable[[int], bool],
          max_hours: float = 0.0) -> tuple[int, float, dict | None]:
  """Runs chunks until ``done(step)`` or the wall-time limit; returns ``(step, elapsed, stopped)``.

  ``advance(step) -> (step, out)`` runs one chunk (the timed part);
  ``commit(step, out, seconds, elapsed)`` then logs and checkpoints it.
  ``stopped`` is ``None``, or what results.json records when ``max_hours``
  (0: no limit) ended the run early.
  """
  limit_s, last_s = max_hours * 3600.0, 0.0
  while not done(step):
    # Across processes, process 0's clock decides for all (else one could stop while the
    # others wait for it in the next chunk's collectives).
    if limit_s and distributed.from_process_0(step > 0 and elapsed + last_s > limit_s):
      logging.warning("stopping at step %d: another step (the last took %.0f s) would pass "
                      "--max_hours=%g (%.0f s used)", step, last_s, max_hours, elapsed)
      return step, elapsed, {"reason": "max_hours", "max_hours": max_hours, "at_step": step}
    t0 = time.time()
    step, out = advance(step)
    last_s = time.time() - t0
    elapsed += last_s
    commit(step, out, last_s, elapsed)
  return step, elapsed, None


def timing(elapsed: float, **extra) -> dict:
  """The workdir's timing.json: wall and device seconds (kept out of results.json, which
  an interrupted and an uninterrupted run must write identically)."""
  n = jax.device_count()
  return {"wall_s": round(elapsed, 3), **extra, "devices": n, "device_s": round(elapsed * n, 3),
          "processes": jax.process_count(), "backend": jax.default_backend()}
