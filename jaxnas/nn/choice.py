"""Choices among modules and tensors: ``OpChoice``, ``ElasticDepth``, ``input_choice``.

Every block takes its decision as an argument. An int32 array (possibly a
tracer) selects at run time: every candidate's variables exist and one program
serves all members. A Python int builds only the chosen candidate (the
specialised network), under the same names, so its variables are a sub-tree of
the elastic ones. A ``Mixture`` (``Space.relax``) computes every candidate and
returns their weighted sum: the continuous relaxation of DARTS (Liu et al. 2019).

Under a Mixture each candidate's computation is traced inside ``gated(w)``, and
``gate()`` is the product of the weights of the enclosing candidates: how much
the code being traced contributes to the output (0 or 1 for a one-hot Mixture).
Zero-cost proxies that look at activations (NASWOT's ReLU codes) weigh each
activation by it, so a branch the architecture did not choose counts for nothing.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.spaces.declared import Mixture

OP_IMPLS = ("switch", "onehot")
_TRACE = threading.local()  # the gate stack of the trace in progress (trace time only)


@contextlib.contextmanager
def gated(weight):
  """Traces the enclosed computation as contributing with ``weight`` (see ``gate``)."""
  stack = _TRACE.__dict__.setdefault("gates", [])
  stack.append(weight)
  try:
    yield
  finally:
    stack.pop()


def gate():
  """The product of the ``Mixture`` weights of the candidates enclosing the code being
  traced: a float32 scalar (possibly a tracer), or the Python float 1.0 outside any."""
  out = 1.0
  for w in getattr(_TRACE, "gates", ()):
    out = out * jnp.asarray(w, jnp.float32)
  return out


def is_static(choice) -> bool:
  """Whether ``choice`` is a Python/numpy integer (the specialised form) rather than data."""
  return isinstance(choice, (int, np.integer)) and not isinstance(choice, bool)


class Sliced(NamedTuple):
  """A width that is a Python int inside one branch of ``specialised_switch``, over
  *elastic* (max-shape) variables. An elastic layer called with it computes on the first
  ``value`` channels of its parameters and returns ``value`` channels: the specialised
  network's function without its own variables. The masked form (an int32 width)
  computes the same values at the max width, zeros in the inactive channels."""
  value: int


def specialised_switch(module: nn.Module, fn: Callable, choices: Sequence,
                       candidates: Sequence, *operands):
  """``fn(module, *operands, *row)`` for the row of ``candidates`` equal to ``choices``.

  ``choices``: int32 scalars (tracers, or Python ints); ``candidates``: rows of Python
  ints, one value per choice, every combination an architecture can take (a row no
  architecture takes costs compile time only; ``choices`` matching no row run row 0). One
  ``nn.switch`` branch per row, each traced with the row's values as Python ints, so
  ``fn`` can build every shape from them (``Sliced`` widths): where members run one at a
  time (``lax.map``) each computes only its own specialised network; under ``vmap`` JAX
  computes every branch and selects, so there the masked form is the cheaper one. Every
  branch must return the same shapes (pad to the max width). Not during init: the
  variables are created by the masked form. Compile time grows with the rows: each is
  its own specialised program. The branches are rematerialised (``nn.checkpoint``): the
  backward pass recomputes the chosen branch's forward instead of saving residuals."""
  rows = np.asarray(candidates, np.int32).reshape(len(candidates), len(choices))
  picked = jnp.stack([jnp.asarray(c, jnp.int32) for c in choices])
  index = jnp.argmax(jnp.all(picked[None, :] == rows, axis=1))
  # Each branch rematerialised: a differentiated switch otherwise carries the residuals
  # of every branch out of its forward pass (zeros for the branches not taken), 5.1 GB of
  # scratch for the MBConv population program, and its steps ran 1.4x slower.
  branches = [nn.checkpoint(lambda mdl, *ops, row=tuple(int(v) for v in r): fn(mdl, *ops, *row))
              for r in rows]
  return nn.switch(index, branches, module, *operands)


def identity(x):
  """The skip op."""
  return x


def zero(x):
  """The ``none`` op: no connection (exact zeros)."""
  return jnp.zeros_like(x)


def _call(op, x, args, kwargs):
  return op(x, *args, **kwargs) if isinstance(op, nn.Module) else op(x)


class OpChoice(nn.Module):
  """One of ``ops`` applied to ``x``, the index given as data.

  ``ops`` are flax modules (called as ``op(x, *args, **kwargs)``: the extra
  arguments of ``__call__``, e.g. ``train=``) or parameter-free functions of ``x``
  (``identity``, ``zero``, a pool). All ops
  map ``x`` to the same shape. ``impl``:

  * ``"switch"``: ``lax.switch`` (``nn.switch``); where members run one at a
    time (``lax.map``) each pays only for its own op; under ``vmap`` JAX turns
    it into a select over every op, the batched form.
  * ``"onehot"``: the sum of every op weighted by the one-hot of the choice.

  ``weights`` (float ``[len(ops)]``) instead returns ``sum_k weights[k] * op_k(x)``:
  the DARTS mixed op (Liu et al. 2019), the softmax of the architecture weights. A
  ``Mixture`` choice (values: op indices) does the same, each op traced ``gated``.
  """
  ops: Sequence[Any]
  impl: str = "switch"

  def __call__(self, x, choice=None, *args, weights=None, **kwargs):
    if isinstance(choice, Mixture):
      bad = [v for v in choice.values if not 0 <= v < len(self.ops)]
      if bad:
        raise ValueError(f"OpChoice: candidates {bad} not in [0, {len(self.ops)})")
      weights = [sum((choice.weights[j] for j, v in enumerate(choice.values) if v == k),
                     jnp.float32(0.0)) for k in range(len(self.ops))]
    if weights is not None:
      out = 0.0
      for k, op in enumerate(self.ops):
        with gated(weights[k]):
          out = out + weights[k] * _call(op, x, args, kwargs)
      return out
    if is_static(choice):
      if not 0 <= choice < len(self.ops):
        raise ValueError(f"OpChoice: choice {choice} not in [0, {len(self.ops)})")
      return _call(self.ops[int(choice)], x, args, kwargs)
    if self.impl not in OP_IMPLS:
      raise ValueError(f"unknown OpChoice impl {self.impl!r}; choose one of {OP_IMPLS}")
    if self.is_initializing() or self.impl == "onehot":
      # At init every op creates its variables, so all branches share one structure.
      w = jax.nn.one_hot(choice, len(self.ops), dtype=x.dtype)
      return sum(w[k] * _call(op, x, args, kwargs) for k, op in enumerate(self.ops))
    branches = [lambda mdl, x, k=k: _call(mdl.ops[k], x, args, kwargs) for k in range(len(self.ops))]
    return nn.switch(jnp.asarray(choice, jnp.int32), branches, self, x)


class ElasticDepth(nn.Module):
  """``blocks`` applied in order, the first ``depth`` of them; the rest are exact identity.

  ``__call__(x, depth, choices=None, **kwargs)`` runs block ``i`` as
  ``blocks[i](x, choices[i], **kwargs)`` (or without ``choices[i]`` when
  ``choices`` is None); every block maps ``x`` to the same shape. With a traced
  ``depth`` block ``i`` runs under ``nn.cond(i < depth)``: a member running alone
  skips it, a vmapped population computes it and selects (BN statistics of a
  skipped block stay as they were). A Python int ``depth`` builds only the
  first ``depth`` blocks (the specialised network). Blocks before ``min_depth``
  always run. A ``Mixture`` depth runs every block (block ``i`` gated by the
  weight of the depths above ``i``) and returns the weighted sum of the outputs
  after each candidate depth (FBNetV2's depth mixture, Wan et al. 2020).
  """
  blocks: Sequence[nn.Module]
  min_depth: int = 0

  def __call__(self, x, depth, choices=None, **kwargs):
    def run(block, i, x):
      if choices is None:
        return block(x, **kwargs)
      return block(x, choices[i], **kwargs)

    if isinstance(depth, Mixture):
      bad = [v for v in depth.values if not self.min_depth <= v <= len(self.blocks)]
      if bad:
        raise ValueError(f"ElasticDepth: depths {bad} not in [{self.min_depth}, "
                         f"{len(self.blocks)}]")
      after = [x]
      for i, block in enumerate(self.blocks):
        on = jnp.float32(1.0) if i < self.min_depth else depth.expect(
            lambda v, i=i: jnp.float32(v > i))
        with gated(on):
          after.append(run(block, i, after[-1]))
      return depth.expect(lambda v: after[int(v)])
    for i, block in enumerate(self.blocks):
      if is_static(depth):
        if i < depth:
          x = run(block, i, x)
      elif i < self.min_depth:
        x = run(block, i, x)
      elif self.is_initializing():
        x = jnp.where(i < depth, run(block, i, x), x)
      else:
        # The block itself is the lifted module: its variables (wherever it was created)
        # are what the conditional reads and updates.
        x = nn.cond(i < depth, lambda blk, x, i=i: run(blk, i, x), lambda blk, x: x, block, x)
    return x


def input_choice(inputs: Sequence[jax.Array], choice):
  """``inputs[choice]``: one of several same-shape tensors feeds a node (the DARTS cell's
  input edges). A traced ``choice`` selects (gradients reach the chosen input only); a
  ``Mixture`` (values: input indices) is the weighted sum of the inputs."""
  if isinstance(choice, Mixture):
    return choice.expect(lambda v: inputs[int(v)])
  if is_static(choice):
    return inputs[int(choice)]
  return jax.lax.select_n(jnp.asarray(choice, jnp.int32), *inputs)
