"""Performance estimators: turn a population of architectures into fitness."""

from jaxnas.estimators.base import Evaluator
from jaxnas.estimators.nb201 import DATASETS as NB201_DATASETS
from jaxnas.estimators.nb201 import nb201_evaluator

__all__ = ["Evaluator", "NB201_DATASETS", "nb201_evaluator"]
