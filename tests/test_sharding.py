"""Population training sharded over 8 host devices equals training the members on one device.

The device count is fixed when JAX starts, so the comparison runs in a child
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import textwrap

from conftest import run_child

CHILD = textwrap.dedent("""
    import jax, numpy as np
    from jaxnas.models import TrainConfig, make_data, train_population_metrics
    from jaxnas.models.sharded import train_population_sharded
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (256, 8, 8, 1), dtype=np.uint8)
    y = (x.reshape(256, -1).mean(1) > 127).astype(np.int32)  # learnable
    data = make_data(x[:192], y[:192], x[192:], y[192:], (0.5,), (0.25,))
    cfg = TrainConfig(steps=4, batch_size=16, channels=4, cells=1, num_classes=2,
                      eval_batch_size=32, plan="map")
    # 5 members on 8 devices: padding; a NaN member (learning rate 1e30) stays contained.
    archs = np.array([[3, 2, 1, 0, 4, 3], [1] * 6, [3] * 6, [0] * 6, [2, 4, 3, 1, 0, 2]], np.int32)
    scales = np.array([1, 1, 1e30, 1, 1], np.float32)
    key = jax.random.PRNGKey(3)
    # Reference on one device: members one after another (the same compiled train).
    a = train_population_metrics(archs, key, data, cfg._replace(plan="sequential"),
                                 lr_scales=scales)
    b = train_population_sharded(archs, key, data, cfg, lr_scales=scales)
    assert b["val_accuracy"].shape == (5,)
    fa, fb = np.asarray(a["failed"]), np.asarray(b["failed"])
    assert fa.tolist() == fb.tolist() and fa[2] and fa.sum() == 1, (fa, fb)
    np.testing.assert_allclose(np.asarray(a["val_accuracy"]), np.asarray(b["val_accuracy"]),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(a["losses"]), np.asarray(b["losses"]), rtol=1e-5)
    print("OK", np.asarray(b["val_accuracy"]).round(3).tolist())
""")


def test_sharded_population_equals_single_device():
  # The programs train 4 steps on 8x8 images: compiling them dominates, so the child compiles
  # at the tests' fast settings (both sides of the comparison alike).
  stdout = run_child(CHILD, devices=8, timeout=600)
  assert stdout.startswith("OK"), stdout
