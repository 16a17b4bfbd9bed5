"""Shared fixtures: a tiny categorical space and an evaluator for it."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import pytest

import jaxnas
from jaxnas.spaces import InvalidArchitecture


def tiny_space(cardinalities=(3, 3), name="tiny") -> jaxnas.Space:
  """A space whose architectures are their own decision vectors."""

  def encode(arch):
    return "-".join(str(int(x)) for x in arch)

  def decode(string):
    try:
      return jnp.asarray([int(x) for x in string.split("-")], jnp.int32)
    except (AttributeError, ValueError) as e:
      raise InvalidArchitecture(str(e)) from None

  ident = lambda v: jnp.asarray(v, jnp.int32)
  return jaxnas.Space(name=name, cardinalities=tuple(cardinalities), to_vector=ident,
                      from_vector=ident, encode=encode, decode=decode)


def tiny_evaluator(space: jaxnas.Space) -> jaxnas.Evaluator:
  """Fitness is a fixed pseudo-random permutation of the ranks, so every value is distinct."""
  size = space.size
  scores = ((jnp.arange(size) * 7919 + 13) % size).astype(jnp.float32)  # 7919 is prime

  def evaluate(key, archs):
    del key
    return scores[space.rank(archs)]

  def report(archs):
    return {"score": scores[space.rank(archs)]}

  return jaxnas.Evaluator(name=space.name, space=space, evaluate=evaluate, report=report,
                          jittable=True)


# The suite runs under pytest-xdist with --dist loadfile (README's test command): each worker
# takes whole modules, so module-scoped fixtures and caches are built once. The modules that
# compile the most are handed out first, so the workers finish at about the same time.
SLOW_FIRST = ("test_train_search.py", "test_darts.py", "test_darts_runner.py",
              "test_darts_space.py", "test_one_shot.py",
              "test_strategies.py", "test_models.py",
              "test_search.py", "test_objectives.py", "test_zero_cost.py", "test_sharding.py")


def _compilation_cache() -> str:
  """One persistent compilation cache per test run, shared by the xdist workers and the
  CLI subprocesses (through the environment): a resumed search, a rerun after SIGKILL or a
  test that compiles what another already compiled loads the executable instead of
  compiling it again, as the CLI does (--compilation_cache). The controller (or the only
  process) makes it before xdist starts the workers, which inherit it, and removes it at
  the end, so every run starts cold."""
  if not os.environ.get("JAXNAS_TEST_XLA_CACHE"):
    os.environ["JAXNAS_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxnas-test-xla-cache-")
  return os.environ["JAXNAS_TEST_XLA_CACHE"]


os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache()
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_collection_modifyitems(items):
  order = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FIRST)))  # stable


@pytest.fixture
def tiny():
  """(space, evaluator) of the 3 x 3 space."""
  space = tiny_space()
  return space, tiny_evaluator(space)


def pytest_sessionfinish(session):
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, after every worker is done
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
