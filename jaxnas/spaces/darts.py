"""The DARTS cell space (Liu, Simonyan & Yang, ICLR 2019).

A network stacks normal and reduction cells. Each cell has two input nodes
(0: c_{k-2}, 1: c_{k-1}) and 4 intermediate nodes; intermediate node i (0..3)
takes exactly two *distinct* earlier nodes from {0, ..., i+1}, each through one of
8 operations, and the cell output concatenates the 4 intermediate nodes.

Architecture pytree (``DartsArch``): per cell type, ``ops`` int32[8] and
``inputs`` int32[8]; entries 2i and 2i+1 belong to intermediate node i, with
``inputs[2i] < inputs[2i+1]`` (canonical order).

Decision vector: per cell, per node, (index of the input pair among the
C(i+2, 2) sorted pairs, op of the first input, op of the second input), i.e.
24 decisions. Every vector is a valid genotype, so generic mutation/crossover
never need repair.
"""

from __future__ import annotations

import ast
import itertools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.spaces.base import InvalidArchitecture, Space

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
       "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
NUM_NODES = 4
CELL_TYPES = ("normal", "reduce")

# PAIRS[i] lists the sorted input pairs available to intermediate node i.
PAIRS = tuple(tuple(itertools.combinations(range(i + 2), 2)) for i in range(NUM_NODES))
_MAX_IN = NUM_NODES + 1  # largest node index usable as an input
# Static tables for jit: pair index -> (a, b), and (a, b) -> pair index (-1 if invalid).
_PAIR_A = np.zeros((NUM_NODES, 10), np.int32)
_PAIR_B = np.zeros((NUM_NODES, 10), np.int32)
_PAIR_INDEX = -np.ones((NUM_NODES, _MAX_IN + 1, _MAX_IN + 1), np.int32)
for _i, _pairs in enumerate(PAIRS):
  for _p, (_a, _b) in enumerate(_pairs):
    _PAIR_A[_i, _p], _PAIR_B[_i, _p] = _a, _b
    _PAIR_INDEX[_i, _a, _b] = _p


class DartsArch(NamedTuple):
  """A DARTS genotype as int32 arrays (see module docstring)."""
  normal_ops: jax.Array
  normal_inputs: jax.Array
  reduce_ops: jax.Array
  reduce_inputs: jax.Array


def _cell_to_vector(ops, inputs):
  ops = jnp.asarray(ops, jnp.int32).reshape(NUM_NODES, 2)
  inputs = jnp.asarray(inputs, jnp.int32).reshape(NUM_NODES, 2)
  a = jnp.clip(inputs[:, 0], 0, _MAX_IN)
  b = jnp.clip(inputs[:, 1], 0, _MAX_IN)
  in_range = (inputs >= 0).all(1) & (inputs <= _MAX_IN).all(1)
  pair = jnp.asarray(_PAIR_INDEX)[jnp.arange(NUM_NODES), a, b]
  pair = jnp.where(in_range, pair, -1)
  return jnp.stack([pair, ops[:, 0], ops[:, 1]], axis=1).reshape(-1)


def _cell_from_vector(v):
  v = v.reshape(NUM_NODES, 3)
  node = jnp.arange(NUM_NODES)
  a = jnp.asarray(_PAIR_A)[node, v[:, 0]]
  b = jnp.asarray(_PAIR_B)[node, v[:, 0]]
  inputs = jnp.stack([a, b], axis=1).reshape(-1)
  ops = v[:, 1:].reshape(-1)
  return ops.astype(jnp.int32), inputs.astype(jnp.int32)


def _to_vector(arch: DartsArch):
  return jnp.concatenate([_cell_to_vector(arch.normal_ops, arch.normal_inputs),
                          _cell_to_vector(arch.reduce_ops, arch.reduce_inputs)])


def _from_vector(vector):
  vector = jnp.asarray(vector, jnp.int32)
  half = 3 * NUM_NODES
  n_ops, n_in = _cell_from_vector(vector[:half])
  r_ops, r_in = _cell_from_vector(vector[half:])
  return DartsArch(n_ops, n_in, r_ops, r_in)


def _cell_list(ops, inputs):
  return [(OPS[int(o)], int(i)) for o, i in zip(np.asarray(ops), np.asarray(inputs))]


def encode(arch: DartsArch) -> str:
  """The genotype string of the DARTS code base (``genotypes.py``)."""
  _validate(arch)
  concat = list(range(2, 2 + NUM_NODES))
  return (f"Genotype(normal={_cell_list(arch.normal_ops, arch.normal_inputs)}, "
          f"normal_concat={concat}, "
          f"reduce={_cell_list(arch.reduce_ops, arch.reduce_inputs)}, "
          f"reduce_concat={concat})")


def _parse_cell(name: str, value) -> tuple[list[int], list[int]]:
  if not isinstance(value, (list, tuple)) or len(value) != 2 * NUM_NODES:
    raise InvalidArchitecture(f"darts: {name} must list {2 * NUM_NODES} (op, input) pairs")
  ops, inputs = [], []
  for node in range(NUM_NODES):
    edges = []
    for op, src in value[2 * node: 2 * node + 2]:
      if op not in OPS:
        raise InvalidArchitecture(f"darts: unknown op {op!r} in {name}; ops are {', '.join(OPS)}")
      if not isinstance(src, int) or not 0 <= src <= node + 1:
        raise InvalidArchitecture(
            f"darts: node {node + 2} of {name} takes input {src!r}, must be in 0..{node + 1}")
      edges.append((src, OPS.index(op)))
    if edges[0][0] == edges[1][0]:
      raise InvalidArchitecture(
          f"darts: node {node + 2} of {name} takes input {edges[0][0]} twice; inputs must differ")
    edges.sort()
    inputs += [edges[0][0], edges[1][0]]
    ops += [edges[0][1], edges[1][1]]
  return ops, inputs


def decode(string: str) -> DartsArch:
  """Parse a ``Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)``."""
  if not isinstance(string, str):
    raise InvalidArchitecture(f"darts: expected a string, got {type(string).__name__}")
  m = re.fullmatch(r"\s*Genotype\((.*)\)\s*", string, flags=re.S)
  if not m:
    raise InvalidArchitecture(f"darts: {string[:60]!r} is not of the form Genotype(normal=[...], ...)")
  try:
    call = ast.parse(f"f({m.group(1)})", mode="eval").body
    fields = {kw.arg: kw.value for kw in call.keywords}
    parsed = {}
    for k in ("normal", "reduce"):
      parsed[k] = ast.literal_eval(fields[k])
    for k in ("normal_concat", "reduce_concat"):
      node = fields.get(k)
      if node is None:
        continue
      if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "range":
        concat = list(range(*[ast.literal_eval(x) for x in node.args]))
      else:
        concat = list(ast.literal_eval(node))
      if concat != list(range(2, 2 + NUM_NODES)):
        raise InvalidArchitecture(f"darts: {k} must be [2, 3, 4, 5], got {concat}")
  except InvalidArchitecture:
    raise
  except (SyntaxError, ValueError, KeyError, TypeError) as e:
    raise InvalidArchitecture(f"darts: cannot parse genotype ({type(e).__name__}: {e})") from None
  n_ops, n_in = _parse_cell("normal", parsed["normal"])
  r_ops, r_in = _parse_cell("reduce", parsed["reduce"])
  return DartsArch(*(jnp.asarray(x, jnp.int32) for x in (n_ops, n_in, r_ops, r_in)))


def _validate(arch: DartsArch) -> None:
  for f in arch._fields:
    x = np.asarray(getattr(arch, f))
    if x.shape != (2 * NUM_NODES,):
      raise InvalidArchitecture(f"darts: {f} must have shape ({2 * NUM_NODES},), got {x.shape}")
  for cell in CELL_TYPES:
    ops = np.asarray(getattr(arch, f"{cell}_ops"))
    inputs = np.asarray(getattr(arch, f"{cell}_inputs"))
    if ops.min() < 0 or ops.max() >= len(OPS):
      raise InvalidArchitecture(f"darts: {cell} op index out of [0, {len(OPS)})")
    for node in range(NUM_NODES):
      a, b = inputs[2 * node], inputs[2 * node + 1]
      if not (0 <= a < b <= node + 1):
        raise InvalidArchitecture(
            f"darts: node {node + 2} of {cell} has inputs ({a}, {b}); need 0 <= a < b <= {node + 1}")


def darts_space() -> Space:
  """The DARTS space: 2 cells x 4 nodes x (input pair, 2 ops); about 1e19 genotypes."""
  cell = []
  for i in range(NUM_NODES):
    cell += [len(PAIRS[i]), len(OPS), len(OPS)]
  return Space(
      name="darts",
      cardinalities=tuple(cell * 2),
      to_vector=_to_vector,
      from_vector=_from_vector,
      encode=encode,
      decode=decode,
  )
