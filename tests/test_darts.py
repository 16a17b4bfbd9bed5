"""DARTS/GDAS/DARTS-: exact second-order gradients, determinism, seeds, remat (resume and
data parallelism through the runner: test_darts_runner.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.strategies.darts import DartsConfig, DartsData, make_darts

from conftest import FAST_COMPILE


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


def _data(n=64, image=8, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 255, (2 * n, image, image, 1), dtype=np.uint8)
  y = (x.reshape(2 * n, -1).mean(1) // (256 / classes)).astype(np.int32)
  return DartsData(*jax.device_put((x[:n], y[:n], x[n:], y[n:], np.float32([0.5]),
                                    np.float32([0.25]))))


def _tiny(**kw):
  base = dict(epochs=1, steps_per_epoch=2, batch_size=8, channels=2, cells=1, num_classes=3)
  base.update(kw)
  return make_darts(DartsConfig(**base))


def test_mixed_hvp_matches_finite_differences():
  """In float64 (ReLU kinks make float32 central differences meaningless at small eps)."""
  darts = _tiny()
  data = _data()
  key = jax.random.PRNGKey(0)
  state = _compile(darts.init, key, data)(key, data)
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)
    params, stats, alpha = f64(state.params), f64(state.batch_stats), f64(state.alpha)
    x = (data.train_images[:8].astype(jnp.float64) / 255 - 0.5) / 0.25
    y = data.train_labels[:8]
    rng = np.random.default_rng(1)  # not jax.random: that compiles a sampler per shape
    v = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float64), params)
    args = (params, stats, alpha, state.key, state.step, x, y, v)
    hvp = _compile(darts.mixed_hvp, *args)(*args)

    def grad_alpha(p):
      return jax.grad(lambda a: darts.losses(p, stats, a, state.key, state.step, x, y))(alpha)

    eps = 1e-6
    plus = jax.tree.map(lambda p, d: p + eps * d, params, v)
    minus = jax.tree.map(lambda p, d: p - eps * d, params, v)
    grad_at = _compile(grad_alpha, plus)  # one program for both points
    fd = (grad_at(plus) - grad_at(minus)) / (2 * eps)
    assert hvp.dtype == jnp.float64 and float(jnp.abs(hvp).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(hvp), np.asarray(fd), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(fd).max()))


def test_second_order_alpha_gradient_is_the_exact_unrolled_gradient():
  """Adam's first update is lr * sign(g) (bias-corrected); compare the raw gradient instead."""
  darts = _tiny(order=2, alpha_weight_decay=0.0)
  data = _data()
  key = jax.random.PRNGKey(0)
  state = _compile(darts.init, key, data)(key, data)
  # Reproduce step 0's batches and compare g_alpha from the step with full autodiff
  # through the one-step unroll: d/dalpha L_val(w - xi dL_train/dw(w, alpha), alpha).
  from jaxnas.datasets import make_preprocess
  pre = make_preprocess(data.mean, data.std)
  k_t, k_v, k_g = jax.random.split(jax.random.fold_in(state.key, state.step), 3)
  ti = jax.random.randint(k_t, (8,), 0, data.train_labels.shape[0])
  vi = jax.random.randint(k_v, (8,), 0, data.val_labels.shape[0])
  xt, yt = pre(None, data.train_images[ti]), data.train_labels[ti]
  xv, yv = pre(None, data.val_images[vi]), data.val_labels[vi]
  xi = darts.config.w_lr
  stats = state.batch_stats

  def unrolled_val(a):
    g = jax.grad(lambda p: darts.losses(p, stats, a, k_g, state.step, xt, yt))(state.params)
    w1 = jax.tree.map(lambda p, gi: p - xi * gi, state.params, g)
    return darts.losses(w1, stats, a, k_g, state.step, xv, yv)

  def ours_of(params, alpha):
    g_w = jax.grad(lambda p: darts.losses(p, stats, alpha, k_g, state.step, xt, yt))(params)
    w1 = jax.tree.map(lambda p, gi: p - xi * gi, params, g_w)
    v, g_direct = jax.grad(lambda p, a: darts.losses(p, stats, a, k_g, state.step, xv, yv),
                           argnums=(0, 1))(w1, alpha)
    return g_direct - xi * darts.mixed_hvp(params, stats, alpha, k_g, state.step, xt, yt, v)

  # Two separately compiled programs: full autodiff through the unroll, and our formula.
  exact = _compile(jax.grad(unrolled_val), state.alpha)(state.alpha)
  ours = _compile(ours_of, state.params, state.alpha)(state.params, state.alpha)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(exact), rtol=1e-3, atol=1e-6)


def test_same_seed_same_alphas_and_vmap_over_seeds_equals_single_runs():
  data = _data()
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  # darts- differs from darts only in edge_weights' added constant; gdas adds sampling.
  for variant in ("darts", "gdas"):
    darts = _tiny(variant=variant)
    run = _compile(jax.vmap(lambda k: darts.run_epoch(darts.init(k, data), data)), keys)
    a, ma = run(keys)
    b, _ = run(keys)
    np.testing.assert_array_equal(np.asarray(a.alpha), np.asarray(b.alpha))
    assert not np.array_equal(np.asarray(a.alpha[0]), np.asarray(a.alpha[1]))
    if variant == "darts":  # one unbatched compile is enough to pin vmap == single
      s, m = _compile(lambda k: darts.run_epoch(darts.init(k, data), data), keys[1])(keys[1])
      np.testing.assert_allclose(np.asarray(s.alpha), np.asarray(a.alpha[1]), rtol=1e-5,
                                 atol=1e-6)
      assert np.asarray(m["arch"]).tolist() == np.asarray(ma["arch"][1]).tolist()


def test_nb201_supernet_with_remat_equals_the_stored_one():
  """remat=True (late_remat per mixed edge) changes what is stored, not what is computed."""
  from jaxnas.models.supernet import NB201SuperNet
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  w = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32))
  plain = NB201SuperNet(channels=2, cells=1, num_classes=3)
  key = jax.random.PRNGKey(0)
  v = _compile(lambda k: plain.init(k, x, w, False), key)(key)

  def grads(net):
    def f(params, w):
      y, new = net.apply({"params": params, "batch_stats": v["batch_stats"]}, x, w, True,
                         mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), new["batch_stats"]
    g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    return _compile(g, v["params"], w)(v["params"], w)

  (l0, s0), g0 = grads(plain)
  (l1, s1), g1 = grads(plain.clone(remat=True))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in ((g0, g1), (s0, s1)):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), a, b)
  assert float(jnp.abs(g0[1]).max()) > 0


def test_warmup_epochs_freeze_alpha_then_let_it_learn():
  data = _data()
  darts = _tiny(epochs=2, warmup_epochs=1)
  key = jax.random.PRNGKey(0)
  s0 = darts.init(key, data)
  run = _compile(darts.run_epoch, s0, data)
  s1, _ = run(s0, data)
  # Warm-up epoch: the weights moved, alpha and its optimizer did not.
  np.testing.assert_array_equal(np.asarray(s1.alpha), np.asarray(s0.alpha))
  for a, b in zip(jax.tree.leaves(s1.alpha_opt), jax.tree.leaves(s0.alpha_opt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params))]
  assert any(moved)
  s2, _ = run(s1, data)
  assert not np.array_equal(np.asarray(s2.alpha), np.asarray(s1.alpha))
  with pytest.raises(ValueError, match="warmup_epochs"):
    _tiny(epochs=2, warmup_epochs=2)


def test_fused_first_order_step_equals_the_two_pass_step():
  """The fused step (one traced supernet, a two-iteration scan) computes the two-pass step,
  warm-up (alpha frozen in epoch 1) included."""
  data = _data()
  finals = []
  for fused in (False, True):
    darts = _tiny(epochs=2, steps_per_epoch=2, fused=fused, warmup_epochs=1)
    state = darts.init(jax.random.PRNGKey(3), data)
    run_epoch = _compile(darts.run_epoch, state, data)
    for _ in range(2):
      state, metrics = run_epoch(state, data)
    finals.append((state, metrics))
  (a, ma), (b, mb) = finals
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(a.alpha - _tiny().init(jax.random.PRNGKey(3), data).alpha))) > 0


def test_perturbation_selection_decides_each_edge_by_the_costliest_removal():
  data = _data()
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  # One search epoch, compiled once; each selection variant compiles only `select`.
  search = _tiny()
  states = _compile(jax.vmap(lambda k: search.run_epoch(search.init(k, data), data)[0]),
                    keys)(keys)

  def selector(tune_steps):
    darts = _tiny(selection="perturbation", selection_batches=2, tune_steps=tune_steps)
    return lambda state: darts.select(state, data)

  arch, info = _compile(jax.vmap(selector(0)), states)(states)
  arch, order, acc, base = (np.asarray(a) for a in (arch, info["order"], info["removal_acc"],
                                                    info["base_acc"]))
  for s in range(2):
    assert sorted(order[s].tolist()) == list(range(6))  # every edge decided once
    for i, e in enumerate(order[s]):
      assert arch[s, e] == np.argmin(acc[s, i])  # the removal that hurts most
  # `none` adds zeros: masking its weight (and not renormalising the others) leaves the
  # supernet as it is, so its column is the unperturbed accuracy of each decision.
  np.testing.assert_array_equal(acc[..., 0], base)
  assert not np.array_equal(order[0], order[1])  # each seed its own edge order
  # Tuning between decisions changes what later decisions measure, not the first one.
  _, tuned = _compile(jax.vmap(selector(3)), states)(states)
  np.testing.assert_array_equal(np.asarray(tuned["removal_acc"])[:, 0], acc[:, 0])
  assert not np.array_equal(np.asarray(tuned["removal_acc"])[:, 1:], acc[:, 1:])
  # vmap over seeds == one seed alone.
  one = jax.tree.map(lambda x: x[1], states)
  single_arch, single = _compile(selector(0), one)(one)
  np.testing.assert_array_equal(np.asarray(single_arch), arch[1])
  np.testing.assert_allclose(np.asarray(single["removal_acc"]), acc[1], atol=1e-6)


@pytest.mark.parametrize("variant", ["darts", "gdas"])
def test_user_model_supernet_searches_every_decision_and_scores_the_derived_member(variant):
  """A ``searchable`` model's supernet relaxes every decision (op, width, kernel, depth):
  its alphas all learn, the derived member decodes in the user's space, and its one-hot
  weights compute exactly the member's own network on the supernet's weights."""
  import jaxnas
  from byo_model import SPACE, SmallCNN
  model = jaxnas.searchable(SmallCNN(classes=3), SPACE)
  darts = make_darts(DartsConfig(variant=variant, model=model, epochs=1, steps_per_epoch=3,
                                 batch_size=8, num_classes=3, alpha_lr=0.05))
  data = _data()
  key = jax.random.PRNGKey(0)
  state = _compile(darts.init, key, data)(key, data)
  assert [a.shape for a in state.alpha] == [(k,) for k in SPACE.cardinalities]
  new, m = _compile(darts.run_epoch, state, data)(state, data)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(new.alpha, state.alpha)]
  assert all(d > 0 for d in moved), moved  # the depth and every width/kernel/op learn
  arch = darts.supernet.derive(new.alpha)
  assert SPACE.decode(SPACE.encode(arch)) is not None
  np.testing.assert_array_equal(np.asarray(SPACE.to_vector(m["arch"])),
                                np.asarray(SPACE.to_vector(arch)))
  x = (data.val_images[:16].astype(jnp.float32) / 255 - 0.5) / 0.25
  relaxed = darts.supernet.net.apply({"params": new.params, "batch_stats": new.batch_stats},
                                     x, darts.supernet.weights_of(arch), False)
  member = SmallCNN(classes=3).apply({"params": new.params["module"],
                                      "batch_stats": new.batch_stats["module"]}, x, arch)
  np.testing.assert_allclose(np.asarray(relaxed), np.asarray(member), rtol=1e-5, atol=1e-5)


def test_user_model_without_a_skip_op_refuses_darts_minus():
  import jaxnas
  from byo_model import SPACE, SmallCNN
  with pytest.raises(ValueError, match="no skip op"):
    make_darts(DartsConfig(variant="darts-", model=jaxnas.searchable(SmallCNN(), SPACE)))
