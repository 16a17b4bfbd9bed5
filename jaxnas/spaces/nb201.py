"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020).

A cell is a DAG on 4 nodes; each of the 6 edges j <- i (i < j) carries one of 5
operations. An architecture is an ``int32[6]`` array of op indices with edges
in the benchmark's string order (1<-0), (2<-0), (2<-1), (3<-0), (3<-1), (3<-2),
so the 15,625 cells are exactly the vectors of the categorical box {0..4}^6.
Canonical string: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.spaces.base import InvalidArchitecture, Space

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NUM_NODES = 4
# (to_node, from_node) for each of the 6 edges, in string order.
EDGES = tuple((j, i) for j in range(1, NUM_NODES) for i in range(j))
NUM_EDGES = len(EDGES)


def _to_vector(arch):
  return jnp.asarray(arch).astype(jnp.int32)


def _from_vector(vector):
  return jnp.asarray(vector).astype(jnp.int32)


def encode(arch) -> str:
  """Canonical NAS-Bench-201 string of an ``int32[6]`` architecture."""
  ops = np.asarray(arch).reshape(-1)
  if ops.shape != (NUM_EDGES,) or ops.min() < 0 or ops.max() >= len(OPS):
    raise InvalidArchitecture(f"nb201: not a NAS-Bench-201 architecture: {ops.tolist()}")
  nodes, e = [], 0
  for j in range(1, NUM_NODES):
    parts = []
    for i in range(j):
      parts.append(f"{OPS[ops[e]]}~{i}")
      e += 1
    nodes.append("|" + "|".join(parts) + "|")
  return "+".join(nodes)


def decode(string: str):
  """Parse a canonical NAS-Bench-201 string; raises InvalidArchitecture."""
  if not isinstance(string, str):
    raise InvalidArchitecture(f"nb201: expected a string, got {type(string).__name__}")
  s = string.strip()
  nodes = s.split("+")
  if len(nodes) != NUM_NODES - 1:
    raise InvalidArchitecture(
        f"nb201: {string!r} has {len(nodes)} node groups, expected {NUM_NODES - 1} "
        "(format |op~0|+|op~0|op~1|+|op~0|op~1|op~2|)")
  ops = []
  for j, node in enumerate(nodes, start=1):
    if not (node.startswith("|") and node.endswith("|")) or len(node) < 2:
      raise InvalidArchitecture(f"nb201: node group {node!r} in {string!r} must be |op~i|...|")
    entries = node[1:-1].split("|")
    if len(entries) != j:
      raise InvalidArchitecture(
          f"nb201: node {j} in {string!r} has {len(entries)} inputs, expected {j}")
    for i, entry in enumerate(entries):
      op, sep, src = entry.partition("~")
      if not sep or src != str(i):
        raise InvalidArchitecture(
            f"nb201: edge {entry!r} of node {j} in {string!r} must be 'op~{i}'")
      if op not in OPS:
        raise InvalidArchitecture(
            f"nb201: unknown op {op!r} in {string!r}; ops are {', '.join(OPS)}")
      ops.append(OPS.index(op))
  return jnp.asarray(ops, jnp.int32)


# The input -> output paths of the cell as edge indices: 3<-0; 1<-0, 3<-1;
# 2<-0, 3<-2; 1<-0, 2<-1, 3<-2.
PATHS = ((3,), (0, 4), (1, 5), (0, 2, 5))
NUM_PATH_FEATURES = sum((len(OPS) - 1) ** len(p) for p in PATHS)


def path_encoding(arch):
  """BANANAS path encoding (White, Neiswanger & Savani 2021) plus the op one-hot.

  For each of the 4 input->output paths, a one-hot over the sequence of ops on
  it, all zeros when one of its edges is ``none`` (the path does not exist).
  Concatenated with the per-edge one-hot: float32[100 + 30].
  """
  ops = jnp.asarray(arch, jnp.int32)
  parts = []
  for path in PATHS:
    alive = jnp.all(jnp.stack([ops[e] != 0 for e in path]))
    index = 0
    for e in path:
      index = index * (len(OPS) - 1) + (ops[e] - 1)
    size = (len(OPS) - 1) ** len(path)
    parts.append(jax.nn.one_hot(jnp.where(alive, index, size), size + 1)[:size])
  parts.append(jax.nn.one_hot(ops, len(OPS)).reshape(-1))
  return jnp.concatenate(parts).astype(jnp.float32)


def nb201_space() -> Space:
  """The NAS-Bench-201 space: 6 edges x 5 ops = 15,625 cells."""
  return Space(
      name="nb201",
      cardinalities=(len(OPS),) * NUM_EDGES,
      to_vector=_to_vector,
      from_vector=_from_vector,
      encode=encode,
      decode=decode,
      features=path_encoding,
  )
