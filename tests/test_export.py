"""``jaxnas.export``: a network saved as a module description plus orbax variables loads and
computes the same outputs without the search machinery; bad exports are one-line errors."""

from __future__ import annotations

import json
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxnas import export
from jaxnas import nn as jnn
from jaxnas.ops import Execution


class Small(nn.Module):
  classes: int = 3
  widths: tuple = (4, 8)
  execution: Execution = Execution("xla", "sum")

  @nn.compact
  def __call__(self, x, arch, train=False):
    x = jnn.ElasticConv(self.widths[-1], 3, conv=self.execution.conv)(x, width=arch["w"])
    x = jnn.BatchNorm()(x, train, width=arch["w"])
    return nn.Dense(self.classes)(x.mean((1, 2)))


class Unwritable(nn.Module):
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, arch, train=False):
    return self.act(x)


def test_round_trip(tmp_path):
  module, arch = Small(), {"w": 8}
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 1))
  variables = module.init(jax.random.PRNGKey(1), x, arch)
  path = export.save(str(tmp_path / "e"), module, arch, variables, image_shape=(6, 6, 1),
                     mean=[0.5], std=[0.25], metadata={"test_accuracy": 12.5})
  net = export.load(path)
  assert net.module == module and net.arch == arch and net.metadata["test_accuracy"] == 12.5
  np.testing.assert_array_equal(net.apply(x), module.apply(variables, x, arch))
  images = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
  want = module.apply(variables, ((images / 255.0 - 0.5) / 0.25).astype(np.float32), arch)
  np.testing.assert_allclose(net.predict(images), want, rtol=1e-5, atol=1e-6)
  assert 0.0 <= net.accuracy(images, np.zeros(3)) <= 100.0
  # A class that cannot be imported where the export is loaded is passed in.
  record = json.loads((tmp_path / "e" / "network.json").read_text())
  record["module"]["class"] = "nowhere:Small"
  (tmp_path / "e" / "network.json").write_text(json.dumps(record))
  with pytest.raises(export.ExportError, match="cannot import nowhere:Small"):
    export.load(path)
  np.testing.assert_array_equal(export.load(path, module=Small).apply(x), net.apply(x))


def test_bad_exports_are_one_line_errors(tmp_path):
  with pytest.raises(export.ExportError, match="not a jaxnas export"):
    export.load(str(tmp_path / "missing"))
  (tmp_path / "network.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(export.ExportError, match="not a jaxnas export"):
    export.load(str(tmp_path))
  with pytest.raises(export.ExportError, match="fields are plain values"):
    export.save(str(tmp_path / "u"), Unwritable(), {}, {}, image_shape=(1, 1, 1), mean=[0],
                std=[1])
