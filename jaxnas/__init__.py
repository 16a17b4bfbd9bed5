"""jaxnas: JAX-native, functional Neural Architecture Search.

Architectures are pytrees of int32 choices (``jaxnas.spaces``), strategies are
pure init/ask/tell functions (``jaxnas.strategies``), evaluators turn
populations into fitness (``jaxnas.estimators``), and ``jaxnas.search`` scans a
strategy over steps and vmaps it over seeds. ``python -m jaxnas.main`` is the CLI.
A user's own flax model, written with the choice blocks of ``jaxnas.nn`` over a
space from ``jaxnas.declare``, becomes a ``jaxnas.searchable`` model that every
trainer of populations, the retrain and ``jaxnas.export`` accept.
"""

from jaxnas import estimators, nn, spaces, strategies
from jaxnas.estimators import Evaluator, nb201_evaluator
from jaxnas.estimators.training import ProxySpec, train_evaluator
from jaxnas.models.protocol import SearchableModel, searchable
from jaxnas.runner import run_search
from jaxnas.search import Search, SearchState, make_search, results_of
from jaxnas.spaces import (SPACES, DartsArch, InvalidArchitecture, Space, choice, darts_space,
                           declare, nb201_space)
from jaxnas.strategies import STRATEGIES, Strategy

__version__ = "0.1.0"

__all__ = ["DartsArch", "Evaluator", "InvalidArchitecture", "ProxySpec", "SPACES", "STRATEGIES",
           "Search", "SearchState", "SearchableModel", "Space", "Strategy", "choice",
           "darts_space", "declare", "estimators", "make_search", "nb201_evaluator",
           "nb201_space", "nn", "results_of", "run_search", "searchable", "spaces",
           "strategies", "train_evaluator"]
