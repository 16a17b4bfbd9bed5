"""Shared fixtures: a tiny categorical space and an evaluator for it."""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import pytest

import jaxnas
from jaxnas.spaces import InvalidArchitecture


# The Fashion-MNIST of every test: a class-balanced subset of the real images (3000 training,
# 1000 test; tests/data/fashion-mnist-subset/README.md), shipped so that each training test
# runs wherever the tests run, on the images CI uses, and loads in milliseconds. Its search
# split holds 1/20 of the full set's 54000 images, so a test's train_fraction is 20x what it
# was on the full set and trains on as many images. Only test_datasets' check of the full set
# reads Debian's dataset-fashion-mnist (jaxnas.datasets.FASHION_MNIST_DIR), and skips without it.
FASHION_MNIST_SUBSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "fashion-mnist-subset")


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


# Programs the tests build themselves run in milliseconds and compile for tens of seconds at
# XLA's defaults, so they are compiled at -O0 without LLVM's expensive passes and with
# XLA:CPU's legacy loop emitters: at -O0 its MLIR fusion emitters cost more compile time
# than LLVM saves (CPU seconds, measured module by module: test_zero_cost.py 130 -> 87,
# test_models.py 157 -> 141, two second-order DARTS tests 198 -> 118; experiments/NOTES_tests.md,
# 2026-11-30). Same semantics, other generated code. JAXNAS_TEST_FUSION_EMITTERS=1 keeps the
# MLIR emitters, for such comparisons. Subprocesses get the same as XLA_FLAGS (run_child).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
if os.environ.get("JAXNAS_TEST_FUSION_EMITTERS") != "1":
  FAST_COMPILE["xla_cpu_use_fusion_emitters"] = False
FAST_COMPILE_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())
# jit at those settings, for tests whose programs run for less time than they compile.
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# A module whose tests compile the library's own programs (which take no compiler options
# from a test) and barely run them sets ``FAST_LIBRARY_COMPILE = True``: its compiles then
# skip most of XLA's optimisation (``jax_disable_most_optimizations``: -O0, no expensive
# LLVM passes). Opted in where measured faster (experiments/NOTES_tests.md). JAX's
# in-memory caches are cleared whenever the setting changes between modules, so no
# executable compiled at one setting runs in a module at the other.
_library_compile = {"fast": False}


@pytest.fixture(autouse=True, scope="module")
def _library_compile_setting(request):
  fast = bool(getattr(request.module, "FAST_LIBRARY_COMPILE", False))
  if fast != _library_compile["fast"]:
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", fast)
    _library_compile["fast"] = fast
  yield


def run_python(argv, *, devices: int = 1, cwd=None, timeout: int = 900):
  """Runs ``python *argv`` in a fresh process on ``devices`` host CPU devices, compiling
  at ``FAST_COMPILE_FLAGS`` (which an in-process test cannot set for the library's own
  programs); asserts it exits 0 and returns the ``CompletedProcess``. The persistent
  compilation cache below is shared through the environment, so a second child loads
  what the first compiled."""
  import subprocess
  import sys
  flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *map(str, argv)], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def run_child(code: str, *args, devices: int = 1, timeout: int = 900) -> str:
  """``run_python`` of ``code`` (with ``args`` as sys.argv[1:]); returns its stdout."""
  return run_python(["-c", code, *args], devices=devices, timeout=timeout).stdout


# The suite runs under pytest-xdist with --dist loadfile (README's test command): each worker
# takes whole modules, so module-scoped fixtures and caches are built once. The modules that
# compile the most are handed out first, so the workers finish at about the same time.
SLOW_FIRST = ("test_train_search.py", "test_darts.py", "test_distributed.py",
              "test_darts_runner.py", "test_darts_space.py", "test_one_shot.py",
              "test_strategies.py", "test_declared.py", "test_models.py",
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


def skip_unless_onednn(impl: str = "onednn") -> None:
  """Skips a test of the oneDNN convolutions where they cannot be built (no compiler or no
  ``libdnnl-dev``), unless ``JAXNAS_REQUIRE_ONEDNN=1`` (set by .ci/run, which installs
  them), where that is a failure."""
  from jaxnas import native
  if impl != "onednn" or native.onednn_available():
    return
  if os.environ.get("JAXNAS_REQUIRE_ONEDNN") == "1":
    pytest.fail(f"oneDNN convolutions required but unavailable: {native.onednn_status()}")
  pytest.skip(f"oneDNN convolutions unavailable: {native.onednn_status()}")


def member_grads(module, variables, x, members, call, batched: bool = False):
  """Per member (a row of the int32 array ``members``; ``lax.map`` under ``jit``, or
  ``vmap`` with ``batched``): the gradient of ``sum(sin(y) * arange(C) / C)`` (C channels) with
  respect to the parameters, and ``(y, updated batch statistics)``, where
  ``y = module.apply(variables, *call(x, row), train=True)``. The harness that checks a
  choice block's implementations against each other member by member (``call`` masks ``x``
  to the member's input width and builds the block's choice arguments)."""
  def loss(params, row):
    y, new = module.apply({**variables, "params": params}, *call(x, row), train=True,
                          mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1]) / y.shape[-1]), (y, new)

  grad = lambda r: jax.grad(loss, has_aux=True)(variables["params"], r)
  return jax.jit(lambda rows: jax.vmap(grad)(rows) if batched else jax.lax.map(grad, rows))(
      members)
