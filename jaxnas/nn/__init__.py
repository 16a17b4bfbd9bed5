"""Choice blocks: flax (Linen) layers that take their architecture decision as data.

A model written from these blocks is one function of ``(variables, x, arch)``
for every member of its search space, so ``vmap``, ``lax.map`` and
``shard_map`` run a whole population of different architectures as one
compiled program (``jaxnas.models.train``). Called with Python ints instead of
arrays, the same blocks build the *specialised* network of one architecture,
whose variables are slices of the elastic ones (``extract``): weight sharing
(Guo et al. 2020, SPOS; Cai et al. 2020, Once-for-All) and export come from
the same code.

* ``OpChoice``: one of several ops (NNI's ``LayerChoice``; the NB201 edge, the
  DARTS slot); ``weights=`` gives the DARTS mixed op (Liu et al. 2019).
* ``ElasticConv`` / ``ElasticDense`` / ``BatchNorm``: active width by prefix
  slice and active kernel by centre crop of max-shape parameters (NNI's
  ``MixedConv2d``, Once-for-All's elastic kernel without its transform);
  inactive channels are exact zeros forward and get zero gradients.
* ``ElasticDepth``: a stack of max-depth blocks, blocks past the chosen depth
  exact identity (and skipped by ``lax.cond`` where members run one at a time).
* ``input_choice``: which earlier tensor feeds a node (NNI's ``InputChoice``).
* ``specialised_switch`` / ``Sliced``: a block's traced widths turned into Python ints, one
  ``lax.switch`` branch per combination, so a member running alone (``lax.map``, CPU)
  computes its own specialised network on slices of the elastic variables.
* ``relu6``: ReLU6 that data-free proxies can unbound (``linearized``; SynFlow).

Every block also takes a ``Mixture`` (``Space.relax``): the weighted sum over its
candidates, which DARTS/GDAS train (``protocol.searchable``'s supernet) and
zero-cost proxies score one-hot; ``gate()`` says how much the code being traced
contributes under it.
"""

from jaxnas.nn.activations import linearized, relu6
from jaxnas.nn.choice import (ElasticDepth, OpChoice, Sliced, gate, gated, identity,
                              input_choice, is_static, specialised_switch, zero)
from jaxnas.nn.elastic import BatchNorm, ElasticConv, ElasticDense, channel_mask
from jaxnas.nn.extract import extract, specialised_shapes
from jaxnas.spaces.declared import Mixture

__all__ = ["BatchNorm", "ElasticConv", "ElasticDense", "ElasticDepth", "Mixture", "OpChoice",
           "Sliced", "channel_mask", "extract", "gate", "gated", "identity", "input_choice",
           "is_static", "linearized", "relu6", "specialised_switch", "specialised_shapes", "zero"]
