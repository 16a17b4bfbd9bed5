"""Trainable networks built from architecture data, and short population training.

The primitives they are built from (convolutions, pools, batch normalisation) and the
``Execution`` that chooses how those compute live in ``jaxnas.ops``.
"""

from jaxnas.models.darts_net import DartsNetwork, derive_darts, fixed_genotype
from jaxnas.models.nb201_net import (OP_IMPLS, NB201Network, cost, specialise,
                                     specialise_variables)
from jaxnas.models.train import (PLANS, WIDTH_IMPLS, TrainConfig, TrainData, make_data,
                                 make_optimizer, make_train, resolve_plan, train_population,
                                 train_population_metrics)
from jaxnas.ops import Execution

__all__ = ["DartsNetwork", "Execution", "NB201Network", "OP_IMPLS", "PLANS", "TrainConfig",
           "TrainData", "cost", "derive_darts", "fixed_genotype", "make_data",
           "make_optimizer", "make_train", "resolve_plan", "specialise",
           "specialise_variables", "train_population", "train_population_metrics",
           "WIDTH_IMPLS"]
