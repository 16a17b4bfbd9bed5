"""Search strategies: pure init/ask/tell functions on explicit state pytrees.

``STRATEGIES`` maps the CLI's ``--strategy`` names to factories
``factory(space, **hyperparameters) -> Strategy``.
"""

from jaxnas.strategies.base import Archive, Strategy, archive_add, archive_init, propose_batch
from jaxnas.strategies.evolution import evolution
from jaxnas.strategies.gp_bo import gp_bo
from jaxnas.strategies.local_search import local_search
from jaxnas.strategies.nsga2 import nsga2
from jaxnas.strategies.predictor import predictor_search
from jaxnas.strategies.random_search import random_search
from jaxnas.strategies.reinforce import reinforce

STRATEGIES = {
    "random": random_search,
    "evolution": evolution,
    "reinforce": reinforce,
    "local": local_search,
    "predictor": predictor_search,
    "gp_bo": gp_bo,
    "nsga2": nsga2,
}

__all__ = ["Archive", "STRATEGIES", "Strategy", "archive_add", "archive_init", "evolution",
           "gp_bo", "local_search", "nsga2", "predictor_search", "propose_batch", "random_search", "reinforce"]
