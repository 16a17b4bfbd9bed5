"""Checkpointing of the one search-state pytree with orbax, verified on restore.

Each checkpoint holds two items: ``state`` (the whole search state, saved with
``StandardSave``) and ``meta`` (JSON: the step and a SHA-256 of every leaf's
dtype, shape and bytes). Orbax commits a step atomically (temporary directory,
then rename), so a SIGKILL during a save leaves the previous steps intact.
Restoring walks from the newest step back: a step that fails to restore or
whose checksum does not match is reported, moved aside (never silently used,
never deleted) and the previous one is tried.

Across several processes (``jaxnas.distributed``) every process calls ``save`` and
``restore_latest`` with the same state: arrays sharded over the processes' devices are
written shard by shard by their owners, host-local arrays (a training search's state,
the same in every process) as numpy by process 0; the checksum is of the whole gathered
state, so it is the one a single process computes. A step counts as restored only when
it loads and verifies on every process, and process 0 alone moves a bad one aside, so
all processes resume from the same step.
"""

from __future__ import annotations

import hashlib
import json
import logging as logging_std
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxnas import distributed


class CheckpointError(RuntimeError):
  """No usable checkpoint although the directory holds some."""


class CheckpointsDiffer(CheckpointError):
  """The processes of a multi-process run list different checkpoints (nothing moved)."""


def tree_checksum(tree: Any) -> str:
  """SHA-256 of a pytree's structure, leaf dtypes, shapes and bytes (of the whole value of
  arrays sharded over several processes: then a collective)."""
  h = hashlib.sha256()
  if jax.process_count() > 1:
    tree = distributed.host(tree)
  leaves, treedef = jax.tree.flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _closed_loop_filter(previous):
  """An unraisable hook that drops ``RuntimeError: Event loop is closed`` and passes every
  other report to ``previous``.

  When a step fails to restore, orbax closes its event loop while tensorstore still
  completes the reads it had started; each completion posted to the closed loop is
  reported as unraisable (tens of tracebacks on stderr, some before the failure surfaces,
  some after). They are the failure already reported."""

  def hook(report):
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  return hook


class _StepReadErrors(logging_std.Filter):
  """Drops asyncio's "Task exception was never retrieved" and "Future exception was never
  retrieved" for the reads of a step that failed to restore (orbax leaves the sibling
  reads' exceptions unretrieved, in tasks or in bare futures)."""

  def __init__(self, step_dir: str):
    super().__init__()
    self.step_dir = step_dir

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith(("Task exception was never retrieved",
                                    "Future exception was never retrieved"))
                and self.step_dir in message)


class Checkpointer:
  """Saves and restores the search state pytree under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, extra: dict | None = None) -> None:
    state = _savable(state)
    meta = {"step": int(step), "checksum": tree_checksum(state), **(extra or {})}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def _quarantine(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory),
                       f"corrupt-{os.path.basename(self.directory)}-{step}")
    if jax.process_index() == 0:  # the others wait, then see it gone
      logging.warning("checkpoint step %d is unusable (%s); moved to %s", step, reason, dst)
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(src, dst)
    distributed.barrier(f"jaxnas-quarantine-{step}")
    self._manager.reload()

  def restore_latest(self, template: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest verified checkpoint, or None if there are none."""
    steps = self.all_steps()
    if jax.process_count() > 1:
      template = _savable(template)
      if not distributed.all_processes(distributed.same_as_process_0(steps)):
        raise CheckpointsDiffer(f"the processes see different checkpoints in {self.directory} "
                              "(it must be one directory that every process reads)")
    if not steps:
      return None
    problems = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _closed_loop_filter(previous_hook)
    asyncio_log = logging_std.getLogger("asyncio")
    for step in reversed(steps):
      # Installed before the read: a failed read's sibling tasks can be collected, and
      # reported, while the failure is still propagating out of orbax.
      step_reports = _StepReadErrors(os.path.join(self.directory, str(step)) + os.sep)
      asyncio_log.addFilter(step_reports)
      try:
        restored, error = None, None
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - raised below, once all processes know
          error = e
        # Every process learns whether all read the step before any verifies it (the
        # checksum of a sharded state is a collective).
        if jax.process_count() > 1 and not distributed.all_processes(error is None):
          error = error or CheckpointError("another process could not read it")
        if error is not None:
          raise error
        state, meta = restored["state"], restored["meta"]
        if meta.get("checksum") != tree_checksum(state):
          raise CheckpointError("checksum mismatch")
        asyncio_log.removeFilter(step_reports)  # a step that restored leaves no reports
        if not problems:  # nothing failed: no late reports to drop
          sys.unraisablehook = previous_hook
        return step, state, meta
      except Exception as e:  # any failure to read a step means: try the previous one
        first_line = str(e).splitlines()[0] if str(e) else ""
        reason = f"{type(e).__name__}: {first_line[:120]}"
        problems.append(f"step {step}: {reason}")
        self._quarantine(step, reason)
    raise CheckpointError("no readable checkpoint in " + self.directory + ": " + "; ".join(problems))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _savable(state: Any) -> Any:
  """``state`` as orbax saves it from several processes: arrays on this process's devices
  only (the same in every process) as numpy, which process 0 writes; arrays sharded over
  the processes as they are. Unchanged in one process."""
  if jax.process_count() == 1:
    return state
  return jax.tree.map(lambda x: np.asarray(x) if not isinstance(x, jax.Array)
                      or x.is_fully_addressable else x, state)



def truncate_log(path: str, upto: int, field: str = "step") -> None:
  """Drops the JSON lines of ``path`` whose ``field`` is past ``upto`` (written after the
  checkpoint a resume starts from, before a kill), and a torn last line; atomic."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)[field] <= upto:
          keep.append(line)
      except (json.JSONDecodeError, KeyError):
        break  # a torn last line
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)
