"""Performance estimators: turn a population of architectures into fitness."""

from jaxnas.estimators.base import Evaluator
from jaxnas.estimators.nb201 import DATASETS as NB201_DATASETS
from jaxnas.estimators.nb201 import nb201_evaluator
from jaxnas.estimators.training import ProxySpec, train_evaluator

__all__ = ["Evaluator", "NB201_DATASETS", "ProxySpec", "nb201_evaluator", "train_evaluator"]
from jaxnas.estimators.zero_cost import PROXIES as ZERO_COST_PROXIES
from jaxnas.estimators.zero_cost import (make_scorer, prefilter, zero_cost_evaluator,
                                         zero_cost_scores)

__all__ += ["ZERO_COST_PROXIES", "make_scorer", "prefilter", "zero_cost_evaluator",
            "zero_cost_scores"]
# One-shot (SPOS): its make_scorer/make_recalibrate stay in jaxnas.estimators.one_shot
# (zero_cost's make_scorer holds the name here).
from jaxnas.estimators.one_shot import (SposState, SupernetConfig, make_spos, supernet_evaluator,
                                        train_supernet)

__all__ += ["SposState", "SupernetConfig", "make_spos", "supernet_evaluator", "train_supernet"]
