"""jaxnas: JAX-native, functional Neural Architecture Search.

Architectures are pytrees of int32 choices (``jaxnas.spaces``), strategies are
pure init/ask/tell functions (``jaxnas.strategies``), evaluators turn
populations into fitness (``jaxnas.estimators``), and ``jaxnas.search`` scans a
strategy over steps and vmaps it over seeds. ``python -m jaxnas.main`` is the CLI.
"""

from jaxnas import estimators, spaces, strategies
from jaxnas.estimators import Evaluator, nb201_evaluator
from jaxnas.search import Search, SearchState, make_search, results_of
from jaxnas.spaces import SPACES, DartsArch, InvalidArchitecture, Space, darts_space, nb201_space
from jaxnas.strategies import STRATEGIES, Strategy

__version__ = "0.1.0"

__all__ = ["DartsArch", "Evaluator", "InvalidArchitecture", "SPACES", "STRATEGIES", "Search",
           "SearchState", "Space", "Strategy", "darts_space", "estimators", "make_search",
           "nb201_evaluator", "nb201_space", "results_of", "spaces", "strategies"]
