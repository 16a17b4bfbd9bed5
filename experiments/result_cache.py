"""Cache keys for the experiments that reuse earlier trainings and searches.

A reused result is only as good as the code and numerics that made it, so an
entry's name ends in ``-k<digest>`` of ``cache_key()``: a hash of the jaxnas
source files (not git's commit: an installed copy may have no ``.git``) and the
compute environment that results.json records (``host_loop.compute_environment``:
backend, devices, jax/jaxlib, the convolution implementation in force and oneDNN's
version and thread count, which changes its kernel gradients at float level).
The key is also written beside the entry (``<entry>.cache_key.json``) so that an
entry made under another key, or by a script before keys (no ``-k`` suffix), is
never reused silently: it is recomputed under the new name, and the output says
which entry was passed over and why (``"stale: code version changed (a -> b)"``).

Used by spos_correlation.py, darts_vs_random.py and skip_count.py:

  cache = result_cache.Cache()
  entry = cache.entry(parent, "supernet-<settings digest>")  # entry.path: where it lives
  ...  # reuse, resume or compute at entry.path
  record = cache.record("supernet", entry, "cached")  # or "resumed", "computed"
  out["cache"] = cache.summary()
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import NamedTuple

STATUSES = ("cached", "resumed", "computed")
_FIELDS = {"code": "code version", "backend": "backend", "conv_impl": "conv_impl",
           "onednn_threads": "oneDNN threads", "jax": "jax version", "jaxlib": "jaxlib version"}


def _digest(obj, n: int) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def code_version() -> str:
  """Short sha256 over the jaxnas package's source files (paths and contents, sorted)."""
  import jaxnas
  root = os.path.dirname(os.path.abspath(jaxnas.__file__))
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    files += [os.path.join(folder, n) for n in names if n.endswith((".py", ".cc", ".h"))]
  h = hashlib.sha256()
  for path in sorted(files, key=lambda p: os.path.relpath(p, root)):
    h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
    with open(path, "rb") as f:
      h.update(f.read() + b"\0")
  return h.hexdigest()[:12]


def cache_key(execution=None) -> dict:
  """What, besides an experiment's own settings, changes its results: the code version and
  the compute environment a run's results.json records (``host_loop.compute_environment``:
  backend, devices, jax/jaxlib, the conv impl of ``execution`` (a ``jaxnas.ops.Execution``;
  None: the backend's default) and oneDNN's version and threads). Call it after device
  setup, which decides the conv numerics too."""
  from jaxnas import host_loop
  return {"code": code_version(), **host_loop.compute_environment(True, execution)}


class Entry(NamedTuple):
  """Where a result of the current key lives (``path``) and the entries of the same
  settings under other keys that are not reused, each as ``"<path>: <why>"``."""
  path: str
  not_reused: tuple


class Cache:
  """The key of this process and a log of what each entry was: cached, resumed, computed."""

  def __init__(self, key: dict | None = None):
    self.key = cache_key() if key is None else key
    self.digest = _digest(self.key, 8)
    self.records: dict[str, dict] = {}

  def entry(self, parent: str, base: str, suffix: str = "") -> Entry:
    """The entry ``<parent>/<base>-k<digest><suffix>``, and why its siblings (``base``
    under other keys, or without a key) are not reused."""
    path = os.path.join(parent, f"{base}-k{self.digest}{suffix}")
    sibling = re.compile(re.escape(base) + r"(-k[0-9a-f]{8})?" + re.escape(suffix) + "$")
    not_reused = []
    if os.path.isdir(parent):
      for name in sorted(os.listdir(parent)):
        other = os.path.join(parent, name)
        m = sibling.match(name)
        if m and other != path:
          not_reused.append(f"{other}: {self._why_stale(other, m.group(1))}")
    return Entry(path, tuple(not_reused))

  def _why_stale(self, other: str, tag: str | None) -> str:
    if tag is None:
      return "stale: made before cache keys (code version and conv_impl not recorded)"
    try:
      with open(other + ".cache_key.json") as f:
        there = json.load(f)["key"]
    except (OSError, ValueError, KeyError, TypeError):
      return f"stale: made under another cache key ({tag[1:]}, not recorded)"
    changed = [f"{_FIELDS.get(k, k)} changed ({there.get(k)} -> {v})"
               for k, v in self.key.items() if there.get(k) != v]
    return "stale: " + ("; ".join(changed) or f"another cache key ({tag[1:]})")

  def record(self, name: str, entry: Entry, status: str, **extra) -> dict:
    """Notes (and prints) what ``name`` was; writes the key beside ``entry.path``.

    ``"cached"``: read back whole from ``entry.path``; ``"resumed"``: continued from what
    an earlier run saved there (or, with ``seeded_from=``, copied there); ``"computed"``:
    made afresh. Returns the record for the experiment's output.
    """
    if status not in STATUSES:
      raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if os.path.exists(entry.path):
      key_path = entry.path + ".cache_key.json"
      if not os.path.exists(key_path):
        with open(key_path, "w") as f:
          json.dump({"key": self.key, "digest": self.digest}, f, indent=1)
    rec = {"status": status, "cached": status == "cached",
           "cached_from": entry.path if status != "computed" else None, **extra}
    if entry.not_reused:
      rec["not_reused"] = list(entry.not_reused)
    self.records[name] = rec
    line = f"[cache] {name}: {status}"
    if rec["cached_from"]:
      line += f" from {rec['cached_from']}"
    if extra.get("seeded_from"):
      line += f" (seeded from {extra['seeded_from']})"
    print(line, flush=True)
    for why in entry.not_reused:
      print(f"[cache]   not reused: {why}", flush=True)
    return rec

  def summary(self) -> dict:
    """The key and how many entries were reused whole, resumed and computed."""
    count = lambda s: sum(r["status"] == s for r in self.records.values())
    return {"key": self.key, "digest": self.digest, "reused": count("cached"),
            "resumed": count("resumed"), "computed": count("computed")}


def log_lines(path: str) -> list[str] | None:
  """The lines of a JSON-lines log (None without one): compared before and after a
  resumable training, unchanged lines mean nothing was trained."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return [line for line in f if line.strip()]


def status_of(finished_before: bool, log_before: list | None) -> str:
  """``"cached"`` if the entry was finished, ``"resumed"`` if it had logged progress,
  else ``"computed"``."""
  return "cached" if finished_before else "resumed" if log_before else "computed"
