"""Trainable networks built from architecture data, and short population training."""

from jaxnas.models.darts_net import DartsNetwork, derive_darts, fixed_genotype
from jaxnas.models.nb201_net import (OP_IMPLS, NB201Network, avg_pool_3x3, conv2d, cost,
                                     specialise, specialise_variables)
from jaxnas.models.train import (PLANS, TrainConfig, TrainData, make_data, make_optimizer,
                                 make_train, resolve_plan, train_population,
                                 train_population_metrics)

__all__ = ["DartsNetwork", "derive_darts", "fixed_genotype", "NB201Network", "OP_IMPLS", "PLANS", "TrainConfig", "TrainData", "avg_pool_3x3",
           "conv2d", "cost", "make_data", "make_optimizer", "make_train", "resolve_plan",
           "specialise", "specialise_variables", "train_population", "train_population_metrics"]
