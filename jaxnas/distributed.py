"""Runs that span several processes (``jax.distributed``): start-up, one command line for
all, a watchdog for lost peers, and the host-side collectives the runner needs.

Every process runs the same command. ``initialize`` joins them (explicit coordinator,
process count and index, or whatever ``jax.distributed`` detects: Cloud TPU, SLURM, Open
MPI), with CPU collectives over gloo, so that N processes of K CPU devices each are N*K
global devices with real cross-process collectives: the code path of a TPU pod or a GPU
cluster, testable on one CPU machine (tests/test_distributed.py).

A process that dies in the middle of a collective leaves the others blocked in it. JAX's
own heartbeat ends them only by aborting the process (a C++ fatal error with a stack
trace, after ``heartbeat_timeout_seconds``), so a watchdog thread here beats through the
coordination service's key-value store every ``BEAT_S`` seconds and watches the others'
beats: a peer silent for ``peer_timeout_s`` (SIGKILL, a crash, a lost machine), a peer
that announced its own failure (``fail``), or a coordinator that no longer answers ends
this process too, with one line on stderr naming what happened and a non-zero exit
status. JAX's heartbeat stays as a backstop, set longer than the watchdog's timeout.
Process 0 hosts the coordination service: when it dies JAX ends the others itself, at
once, with its fatal error (no hook for a Python callback there).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

# Seconds between a process's beats (and its checks of the others').
BEAT_S = 1.0
# A process that has failed and hosts the coordinator waits this long before exiting, so
# the others read why (and not only that the coordinator went away).
_COORDINATOR_GRACE_S = 3.0
# Exit status of a process stopped because another process failed.
PEER_LOST = 1
_KEY = "jaxnas"


class DistributedError(RuntimeError):
  """A multi-process run cannot start or go on; the message is one line."""


_watchdog: "_Watchdog | None" = None


def _client():
  # JAX has no public handle on its coordination client; orbax's is the one it uses too.
  from orbax.checkpoint import multihost
  return multihost.get_jax_distributed_client()


def active() -> bool:
  """Whether this process is one of several (``initialize`` ran with more than one)."""
  return _watchdog is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout_s: float = 60.0) -> None:
  """Joins this process to the others (``jax.distributed.initialize``) before JAX starts
  its backends; None arguments are detected from the cluster. Starts the watchdog that
  ends this process when another is silent for ``peer_timeout_s`` seconds. Raises
  DistributedError (one line) where the processes cannot be joined."""
  global _watchdog
  # Only the CPU client reads it: on CPU the processes' devices then share collectives
  # (without it XLA:CPU has none across processes); TPUs and GPUs bring their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
        # The backstop: JAX aborts a process whose peer stopped beating after this long.
        heartbeat_timeout_seconds=int(max(100, 2 * peer_timeout_s)))
  except ValueError as e:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "should be defined" in text or "must be defined" in text:
      raise DistributedError(
          "no cluster detected (Cloud TPU, SLURM, Open MPI) to take the processes from "
          f"({text}); give --coordinator_address, --num_processes and --process_id") from None
    raise DistributedError(text) from None
  except (RuntimeError, TypeError) as e:
    raise DistributedError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  if jax.process_count() > 1:
    _watchdog = _Watchdog(_client(), jax.process_index(), jax.process_count(), peer_timeout_s)
    _watchdog.start()
    atexit.register(_watchdog.finish)  # before JAX's shutdown barrier (atexit runs LIFO)
    sys.excepthook = _announcing_excepthook(sys.excepthook)


class _Watchdog(threading.Thread):
  """Beats for this process and ends it when another process fails or falls silent."""

  def __init__(self, client, index: int, count: int, timeout_s: float):
    super().__init__(name="jaxnas-watchdog", daemon=True)
    self.client, self.index, self.count, self.timeout_s = client, index, count, timeout_s
    self._stopped = threading.Event()

  def stop(self) -> None:
    self._stopped.set()

  def finish(self) -> None:
    """Stops beating at a normal exit, first telling the others that this process is done
    (not gone): it waits in JAX's shutdown barrier for those still writing results."""
    if not self._stopped.is_set():
      try:
        self.client.key_value_set(f"{_KEY}/done/{self.index}", "1", allow_overwrite=True)
      except Exception:  # noqa: BLE001 - nothing left to tell
        pass
    self.stop()

  def run(self) -> None:
    beat, seen, unreachable_since = 0, {}, None
    while not self._stopped.wait(BEAT_S):
      now = time.monotonic()
      try:
        self.client.key_value_set(f"{_KEY}/alive/{self.index}", str(beat), allow_overwrite=True)
        beat += 1
        beats, failures, done = (_by_process(self.client.key_value_dir_get(f"{_KEY}/{d}/"))
                                 for d in ("alive", "failed", "done"))
      except Exception as e:  # noqa: BLE001 - any failure to reach the coordinator
        if self._stopped.is_set():
          return
        unreachable_since = unreachable_since or now
        if now - unreachable_since >= min(self.timeout_s, 5 * BEAT_S):
          _exit(f"lost contact with the coordinator (process 0) of the {self.count} processes "
                f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); it has "
                "stopped or its machine is unreachable. Rerun the same command on every "
                "process to resume from the last checkpoint", PEER_LOST)
        continue
      unreachable_since = None
      for index, message in sorted(failures.items()):
        if index != self.index and not self._stopped.is_set():
          _exit(f"process {index} of {self.count} failed ({message}); stopping this one too",
                PEER_LOST)
      for index in range(self.count):
        if index == self.index or index in done:
          continue
        value = beats.get(index)
        if index not in seen or seen[index][0] != value:
          seen[index] = (value, now)
        elif now - seen[index][1] >= self.timeout_s and not self._stopped.is_set():
          _exit(f"process {index} of {self.count} stopped responding (no heartbeat for "
                f"{self.timeout_s:g} s: killed, crashed or its machine is down); stopping "
                "this one too. Rerun the same command on every process to resume from the "
                "last checkpoint", PEER_LOST)


def _by_process(entries) -> dict[int, str]:
  """``{process index: value}`` of a key-value directory listing (keys end in the index)."""
  return {int(key.rsplit("/", 1)[-1]): value for key, value in entries}


def _exit(message: str, status: int) -> None:
  """Prints ``jaxnas: error: message`` and ends the process at once: the main thread may be
  blocked in a collective that will never complete, and JAX's shutdown barrier at exit
  would wait for the processes that are gone."""
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001 - a closed stdout must not hide the error line
    pass
  print(f"jaxnas: error: {message}", file=sys.stderr, flush=True)
  os._exit(status)


def fail(message: str, status: int) -> None:
  """Ends this process with ``jaxnas: error: message``, first telling the other processes
  why (their watchdogs stop them with this message instead of waiting for a timeout)."""
  if _watchdog is not None:
    _watchdog.stop()
    try:
      _client().key_value_set(f"{_KEY}/failed/{jax.process_index()}", message,
                              allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator is gone: the others notice that too
      pass
    if jax.process_index() == 0:
      time.sleep(_COORDINATOR_GRACE_S)
  _exit(message, status)


def _announcing_excepthook(previous):
  """An excepthook that prints the traceback as usual, then ends the run on every process
  (``fail``) instead of leaving the others blocked in a collective.

  A runtime error may be the echo of a lost peer: gloo fails a collective at once when a
  peer's connection drops ("Connection closed by peer", a socket address). The watchdog is
  then given its timeout to name the process that is gone (it ends this one with that
  line); only when every peer still beats is the error itself reported."""

  def hook(kind, value, tb):
    watchdog = _watchdog
    if watchdog is not None and issubclass(kind, jax.errors.JaxRuntimeError):
      watchdog.join(watchdog.timeout_s + 3 * BEAT_S)
    previous(kind, value, tb)
    first = str(value).splitlines()[0][:200] if str(value) else ""
    fail(f"{kind.__name__}: {first}" if first else kind.__name__, PEER_LOST)

  return hook


def check_same_command(flags: dict[str, Any]) -> None:
  """Raises DistributedError (the same line on every process) unless every process was
  started with the same ``flags`` (name -> value, those that decide what is computed and
  where it is written)."""
  if not active():
    return
  client, index, count = _client(), jax.process_index(), jax.process_count()
  client.key_value_set(f"{_KEY}/command/{index}", json.dumps(flags, sort_keys=True, default=str))
  client.wait_at_barrier(f"{_KEY}/command", 300_000)
  got = {i: json.loads(v) for i, v in _by_process(client.key_value_dir_get(f"{_KEY}/command/")
                                                   ).items()}
  first = got[0]
  for other in range(1, count):
    there = got.get(other, {})
    diffs = [f"--{k}={first.get(k)} on process 0 vs --{k}={there.get(k)} on process {other}"
             for k in sorted(set(first) | set(there)) if first.get(k) != there.get(k)]
    if diffs:
      raise DistributedError(
          f"the processes were started with different command lines ({'; '.join(diffs[:3])}"
          f"{'; ...' if len(diffs) > 3 else ''}); every process runs the same command")


def host(tree: Any) -> Any:
  """``tree`` with every array as a host numpy array of its whole global value; arrays
  spread over other processes' devices are gathered (a collective: every process calls
  it with the same tree)."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def mesh(axis: str, devices=None) -> Mesh:
  """A 1-D mesh named ``axis`` over ``devices`` (default: every device of every process)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (axis,))


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """The host array ``x`` (the same in every process) as one global array laid out by
  ``sharding``, each process placing its own devices' blocks: the form in which host data
  enters a program that spans processes (a local array cannot)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
  """``tree`` replicated on every device of ``mesh`` (unchanged without one): host and
  local arrays as global arrays (``put``) when the mesh spans processes, since a program
  that spans processes takes no local array; else ``jax.device_put``."""
  if mesh is None:
    return tree
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: jax.device_put(a, sharding) if isinstance(a, jax.Array)
                      and not a.is_fully_addressable else put(a, sharding), tree)


def _from_process_0(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def same_as_process_0(value: Any) -> bool:
  """Whether process 0 holds the same ``value`` as this process, compared by a digest of
  its ``repr`` (a collective; True in one process)."""
  if jax.process_count() == 1:
    return True
  digest = np.frombuffer(hashlib.sha256(repr(value).encode()).digest()[:8], np.uint32)
  return bool(np.array_equal(_from_process_0(digest), digest))


def all_processes(flag: bool) -> bool:
  """Whether ``flag`` holds on every process (a collective; True with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_process_0(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (a collective; ``flag`` with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(_from_process_0(np.int32(bool(flag))))


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)`` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
