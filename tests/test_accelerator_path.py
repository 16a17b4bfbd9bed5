"""The accelerators' default path, run on this CPU at a tiny size so it cannot break unseen.

On a GPU or TPU a population trains with the ``vmap`` plan and the all-ops ``kernel`` edge,
its convolutions as ``im2col`` and its pools as ``reduce_window``; zero-cost proxies run
inside the scanned, seed-vectorised search loop. CI has no accelerator, so these tests pin
the per-backend choices themselves and run that path's programs on CPU, in a child process
compiled at the tests' fast settings (conftest.run_child), against the CPU defaults.
"""

from __future__ import annotations

import json

from jaxnas import ops
from jaxnas.models import train as train_lib

from conftest import FASHION_MNIST_SUBSET, run_child


def test_accelerator_defaults_are_what_was_measured():
  for backend in ("gpu", "tpu"):
    assert ops.conv_impl(backend) == "im2col"
    assert ops.pool_impl(backend) == "window"
    resolved = train_lib.resolve_plan(train_lib.TrainConfig(), backend)
    assert (resolved.plan, resolved.op_impl) == ("vmap", "kernel")
    assert resolved.execution == ops.Execution("im2col", "window")
    assert train_lib.eval_batch_size(backend) == 500
  resolved = train_lib.resolve_plan(train_lib.TrainConfig(), "cpu")
  assert (resolved.plan, resolved.op_impl) == ("map", "switch")
  assert ops.pool_impl("cpu") == "sum"


PLANS_CHILD = """
import json, jax, numpy as np
from jaxnas.models import train as train_lib
from jaxnas.ops import Execution
from jaxnas.spaces import nb201_space
rng = np.random.default_rng(1)
x = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
y = rng.integers(0, 10, 64).astype(np.int32)
data = train_lib.make_data(x[:48], y[:48], x[48:], y[48:], (0.5,), (0.25,))
archs = jax.vmap(nb201_space().sample)(jax.random.split(jax.random.PRNGKey(3), 2))
base = train_lib.TrainConfig(steps=3, batch_size=8, channels=4, eval_batch_size=8)
out = {}
# The CPU default (map + switch, its own conv and pool forms), then the accelerators' path:
# vmap + kernel with im2col convolutions and reduce_window pools, traced afresh.
m = train_lib.train_population_metrics(archs, jax.random.PRNGKey(0), data,
                                       base._replace(plan="map", op_impl="switch"))
out["map"] = np.asarray(m["losses"]).tolist()
m = train_lib.train_population_metrics(archs, jax.random.PRNGKey(0), data,
                                       base._replace(plan="sequential", op_impl="onehot"))
out["sequential"] = np.asarray(m["losses"]).tolist()
accelerator = Execution(conv="im2col", pool="window")
m = train_lib.train_population_metrics(archs, jax.random.PRNGKey(0), data,
                                       base._replace(plan="vmap", op_impl="kernel",
                                                     execution=accelerator))
out["vmap"] = np.asarray(m["losses"]).tolist()
out["vmap_acc"] = np.asarray(m["val_accuracy"]).tolist()
print(json.dumps(out))
"""


def test_plans_agree_and_the_accelerator_forms_train_like_the_cpu_default():
  out = json.loads(run_child(PLANS_CHILD).strip().splitlines()[-1])
  import numpy as np
  vmap, ref = np.asarray(out["vmap"]), np.asarray(out["map"])
  assert vmap.shape == ref.shape == (2, 3) and np.all(np.isfinite(vmap))
  # Other conv, pool and edge forms: the same maths up to float summation order.
  np.testing.assert_allclose(vmap, ref, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(out["sequential"], ref, rtol=2e-4, atol=2e-4)
  assert all(0.0 <= a <= 1.0 for a in out["vmap_acc"])


ZERO_COST_CHILD = """
import json, sys, jax, numpy as np
from jaxnas.estimators import zero_cost as zc
from jaxnas.search import make_search, results_of
from jaxnas.spaces import nb201_space
from jaxnas.strategies import random_search
ev = zc.zero_cost_evaluator("naswot", data_dir=sys.argv[1], batch_size=8, channels=4)
search = make_search(random_search(nb201_space(), batch_size=4), ev, budget=8)
keys = jax.vmap(jax.random.PRNGKey)(np.arange(2))
run = jax.jit(jax.vmap(lambda k: search.run_chunk(search.init(k), 0, search.num_steps)))
state, _ = run(keys)
res = jax.vmap(lambda s: results_of(search, s))(state)
print(json.dumps({"best": np.asarray(res["best_score"]).tolist(),
                  "count": np.asarray(state.archive.count).tolist(),
                  "report": {k: np.asarray(v).tolist() for k, v in res["report"].items()}}))
"""


def test_zero_cost_proxies_inside_the_scanned_seed_vectorised_search():
  from jaxnas.estimators import zero_cost as zc
  out = json.loads(run_child(ZERO_COST_CHILD, FASHION_MNIST_SUBSET).strip().splitlines()[-1])
  import numpy as np
  assert out["count"] == [8, 8]
  assert np.all(np.isfinite(out["best"]))
  assert set(out["report"]) == set(zc.PROXIES)
  np.testing.assert_allclose(out["report"]["naswot"], out["best"], rtol=1e-5)
