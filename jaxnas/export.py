"""A trained architecture as a standalone network: a flax module description plus orbax
parameters, loaded and run without the search machinery.

``save(directory, module, arch, variables, ...)`` writes

  network.json  the module's importable class (``module:qualname``) and its dataclass
                fields, the architecture the specialised network is called with, the
                input normalisation, any metadata (e.g. the recorded test accuracy) and,
                for a user's model named by an import spec (``--model``), that spec
  variables/    the specialised network's ``params`` and ``batch_stats`` (orbax)

and ``load(directory)`` gives an ``Exported`` network: ``predict(images)`` on uint8
NHWC images (normalised as in training) or ``apply(x)`` on normalised floats. Loading
imports the module's class, so the user's model code (or jaxnas for the built-in
networks) must be importable; where the class or its fields cannot be rebuilt (a field
that is a function, say), an export with a model spec rebuilds the network from
``registry.load_model(spec)`` instead, and otherwise the module is passed as
``load(directory, module=...)`` (e.g. a class defined in ``__main__`` of another process).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxnas.datasets.loaders import normalize

FORMAT = "jaxnas.export/1"


class ExportError(ValueError):
  """An export that cannot be written or read: one clear line."""


def _import(path: str):
  name, _, qualname = path.partition(":")
  obj = importlib.import_module(name)
  for part in qualname.split("."):
    obj = getattr(obj, part)
  return obj


def _jsonable(value):
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple, e.g. Execution
    cls = type(value)
    return {"__namedtuple__": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {k: _jsonable(v) for k, v in value._asdict().items()}}
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  raise TypeError(type(value).__name__)


def _tuples(value):
  """JSON back to field values: lists as tuples (flax fields are hashable), NamedTuples
  rebuilt."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict) and "__namedtuple__" in value:
    return _import(value["__namedtuple__"])(**{k: _tuples(v)
                                                for k, v in value["fields"].items()})
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def describe(module: nn.Module) -> dict:
  """``{"class": "module:qualname", "fields": {...}}`` of a flax module whose dataclass
  fields are plain values (numbers, strings, lists, dicts)."""
  cls = type(module)
  fields = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name") or not f.init:
      continue
    value = getattr(module, f.name)
    try:
      fields[f.name] = _jsonable(value)
    except TypeError:
      raise ExportError(f"cannot describe {cls.__qualname__}.{f.name} ({type(value).__name__}) "
                        "in JSON; export needs a module whose fields are plain values") from None
  return {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def save(directory: str, module: nn.Module, arch, variables, *, image_shape, mean, std,
         metadata: dict | None = None, model: str | None = None) -> str:
  """Writes the specialised ``module`` (called with ``arch``: Python numbers, or None for
  a module that fixes its architecture in its fields) and its trained ``variables`` to
  ``directory``; returns its absolute path.

  ``model``: the import spec of the user's ``SearchableModel`` the module is a network of
  (``"package.module:ATTR"``), recorded with the architecture string
  ``metadata["arch"]`` so that ``load`` can rebuild the network from it; the module's
  description is then optional (None where its fields are not plain values).
  """
  directory = os.path.abspath(directory)
  if model is not None and not isinstance((metadata or {}).get("arch"), str):
    raise ExportError("an export with a model spec needs metadata['arch'], the "
                      "architecture string the model's space decodes")
  try:
    description = describe(module)
  except ExportError:
    if model is None:
      raise
    description = None  # load rebuilds it from the model spec
  record = {"format": FORMAT, "module": description,
            "arch": _jsonable(arch), "arch_kinds": _jsonable(_kinds(arch)),
            "image_shape": [int(d) for d in image_shape],
            "mean": [float(m) for m in np.ravel(mean)], "std": [float(s) for s in np.ravel(std)],
            "metadata": _jsonable(metadata or {})}
  if model is not None:
    record["model"] = model
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "variables"), jax.device_get(dict(variables)), force=True)
  tmp = os.path.join(directory, "network.json.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(directory, "network.json"))
  return directory


def _kinds(arch):
  """The container kinds of ``arch`` ("list"/"tuple"/"dict" nesting) so that load gives
  the model exactly the structure it was called with."""
  if isinstance(arch, dict):
    return {k: _kinds(v) for k, v in arch.items()}
  if isinstance(arch, list):
    return ["list"] + [_kinds(v) for v in arch]
  if isinstance(arch, tuple):
    return ["tuple"] + [_kinds(v) for v in arch]
  return None


def _restore_kinds(arch, kinds):
  if isinstance(kinds, dict):
    return {k: _restore_kinds(arch[k], kinds[k]) for k in kinds}
  if isinstance(kinds, list):
    seq = [_restore_kinds(a, k) for a, k in zip(arch, kinds[1:])]
    return seq if kinds[0] == "list" else tuple(seq)
  return arch


def _importable(description) -> bool:
  """Whether a recorded module description rebuilds here (its class and fields import)."""
  if description is None:
    return False
  try:
    _import(description["class"])
    _tuples(description["fields"])
  except (ImportError, AttributeError, TypeError):
    return False
  return True


def _network_of_model(record: dict) -> nn.Module:
  """The specialised network of an export's recorded model spec and architecture string."""
  from jaxnas.models.registry import load_model  # the models import flax nets: only here
  spec = record["model"]
  try:
    model = load_model(spec)
    return model.network(model.static(model.space.decode(record["metadata"]["arch"])))
  except (ValueError, KeyError) as e:
    raise ExportError(f"cannot rebuild the exported network of model {spec}: {e}; pass "
                      "it as load(directory, module=...)") from None


class Exported(NamedTuple):
  """A loaded network: ``apply(x)`` on normalised float images, ``predict(images)`` on
  uint8 images; ``metadata`` as saved."""
  module: nn.Module
  arch: Any
  variables: dict
  mean: tuple
  std: tuple
  image_shape: tuple
  metadata: dict

  def apply(self, x):
    return self.module.apply(self.variables, x, self.arch, train=False)

  def predict(self, images, batch_size: int = 500):
    """Logits of uint8 NHWC ``images``, in batches of ``batch_size``."""
    fn = jax.jit(lambda x: self.apply(normalize(x, self.mean, self.std)))
    images = np.asarray(images)
    return jnp.concatenate([fn(images[i:i + batch_size])
                            for i in range(0, len(images), batch_size)])

  def accuracy(self, images, labels, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) on uint8 ``images``."""
    pred = np.asarray(jnp.argmax(self.predict(images, batch_size), -1))
    return 100.0 * float(np.mean(pred == np.asarray(labels)))


def load(directory: str, module: nn.Module | type | None = None) -> Exported:
  """The network saved in ``directory`` (``module``: its class or an instance, when the
  saved class cannot be imported here)."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "network.json")
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"{path}: not a jaxnas export ({e})") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ExportError(f"{path}: not a jaxnas export (format {record.get('format')!r})"
                      if isinstance(record, dict) else f"{path}: not a jaxnas export")
  if isinstance(module, nn.Module):
    net = module
  elif module is None and record.get("model") and not _importable(record["module"]):
    net = _network_of_model(record)
  else:
    if record["module"] is None:
      raise ExportError(f"{path} records no module class; pass it as load(directory, "
                        "module=...)")
    try:
      fields = {k: _tuples(v) for k, v in record["module"]["fields"].items()}
    except (ImportError, AttributeError, TypeError) as e:
      raise ExportError(f"{path}: cannot rebuild the module's fields ({e})") from None
    cls = module
    if cls is None:
      try:
        cls = _import(record["module"]["class"])
      except (ImportError, AttributeError) as e:
        raise ExportError(f"cannot import {record['module']['class']} ({e}); pass the class "
                          "as load(directory, module=...)") from None
    net = cls(**fields)
  arch = _restore_kinds(record["arch"], record.get("arch_kinds"))
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, "variables"))
  return Exported(module=net, arch=arch, variables=variables, mean=tuple(record["mean"]),
                  std=tuple(record["std"]), image_shape=tuple(record["image_shape"]),
                  metadata=record.get("metadata", {}))
