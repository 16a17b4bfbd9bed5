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


USER_MODEL = '''
from typing import Callable

import flax.linen as nn
import jaxnas
from jaxnas import nn as jnn

SPACE = jaxnas.declare({"w": jaxnas.choice(4, 8)}, name="user")


class Net(nn.Module):
  act: Callable = nn.relu  # a function: no JSON description of this module

  @nn.compact
  def __call__(self, x, arch, train=False):
    x = self.act(jnn.ElasticConv(8, 3)(x, width=arch["w"]))
    return nn.Dense(3)(jnn.BatchNorm()(x, train, width=arch["w"]).mean((1, 2)))


MODEL = jaxnas.searchable(Net(), SPACE)
'''


def test_a_user_models_export_is_rebuilt_from_its_model_spec(tmp_path, monkeypatch):
  """An export that records its model spec (``--model``) loads even where the module's
  fields have no JSON form, by importing the model and specialising it to the recorded
  architecture string."""
  (tmp_path / "user_model_for_export.py").write_text(USER_MODEL)
  monkeypatch.syspath_prepend(str(tmp_path))
  from jaxnas.models.registry import load_model
  model = load_model("user_model_for_export:MODEL")
  arch = model.space.decode("w=4")
  static = model.static(arch)
  module, call_arch = model.network(static), model.call_arch(static)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 1))
  variables = module.init(jax.random.PRNGKey(1), x, call_arch)
  with pytest.raises(export.ExportError, match="fields are plain values"):
    export.save(str(tmp_path / "no_spec"), module, call_arch, variables, image_shape=(6, 6, 1),
                mean=[0.5], std=[0.25], metadata={"arch": "w=4"})
  with pytest.raises(export.ExportError, match="needs metadata\\['arch'\\]"):
    export.save(str(tmp_path / "no_arch"), module, call_arch, variables, image_shape=(6, 6, 1),
                mean=[0.5], std=[0.25], model="user_model_for_export:MODEL")
  path = export.save(str(tmp_path / "e"), module, call_arch, variables, image_shape=(6, 6, 1),
                     mean=[0.5], std=[0.25], metadata={"arch": "w=4"},
                     model="user_model_for_export:MODEL")
  record = json.loads((tmp_path / "e" / "network.json").read_text())
  assert record["model"] == "user_model_for_export:MODEL" and record["module"] is None
  net = export.load(path)
  assert net.arch == call_arch
  np.testing.assert_array_equal(net.apply(x), module.apply(variables, x, call_arch))
  # A recorded class that does not import here (defined in __main__, say): the spec is used.
  record["module"] = {"class": "__main__:Net", "fields": {}}
  (tmp_path / "e" / "network.json").write_text(json.dumps(record))
  np.testing.assert_array_equal(export.load(path).apply(x), net.apply(x))
  record["model"] = "user_model_for_export:NOPE"
  (tmp_path / "e" / "network.json").write_text(json.dumps(record))
  with pytest.raises(export.ExportError, match="has no attribute NOPE.*load\\(directory"):
    export.load(path)
  np.testing.assert_array_equal(export.load(path, module=module).apply(x), net.apply(x))
