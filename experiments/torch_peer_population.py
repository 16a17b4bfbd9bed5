"""PyTorch peer of bench_population.py: the same random networks (NAS-Bench-201 or MBConv),
trained one by one.

Eager PyTorch builds each network with only its own layers (the way
NAS-Bench-201's own code trains), SGD Nesterov momentum 0.9, weight decay 5e-4,
cosine LR, BatchNorm, on the same Fashion-MNIST split (or random data) and
minibatch size. The population is jaxnas's (same space, same key).
``--space=mbconv``: ``MBConvNet`` is the specialised flax ``MBConvNetwork``
(``jaxnas.models.mbconv_net``) of each member, layer for layer; after the timed
run every member's parameter count is checked against ``mbconv_net.cost`` (for
NB201 against ``nb201_net.cost``) and a mismatch is an error.
Torch is optional: without it the script prints a message and exits 0.

  python experiments/torch_peer_population.py --population=16 --steps=50 --channels=16 \
      --cells=1 --batch=128 --image=28 --in_channels=1
  python experiments/torch_peer_population.py --space=mbconv --population=16 --steps=50 \
      --batch=128 --image=28 --in_channels=1

``step_memory_mb``, also measured after the timed run, is the peak resident
memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above the
resident memory just before, while the member with the most multiply-accumulates
is built and takes two training steps: its parameters, gradients, momentum
buffers, activations and whatever PyTorch's CPU kernels allocate (null where
the peak cannot be reset). The LAST line printed is a JSON object with the keys
of bench_population.py (``compile_s`` is 0: eager mode compiles nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time

T_START = time.perf_counter()

try:
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F
except ImportError:
  print("torch is not installed; skipping the PyTorch peer (pip install torch)")
  sys.exit(0)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnas.datasets import DatasetError, load_fashion_mnist, train_val_split  # noqa: E402
from jaxnas.spaces import SPACES  # noqa: E402
from jaxnas.spaces.declared import to_python  # noqa: E402
from jaxnas.spaces.mbconv import HEAD, STAGES, STEM  # noqa: E402

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))


class ReLUConvBN(tnn.Sequential):

  def __init__(self, c_in, c_out, k, stride=1):
    super().__init__(tnn.ReLU(), tnn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
                     tnn.BatchNorm2d(c_out))


class Zero(tnn.Module):

  def forward(self, x):
    return x.mul(0.0)


def make_op(op, c):
  name = OPS[op]
  if name == "none":
    return Zero()
  if name == "skip_connect":
    return tnn.Identity()
  if name == "nor_conv_1x1":
    return ReLUConvBN(c, c, 1)
  if name == "nor_conv_3x3":
    return ReLUConvBN(c, c, 3)
  return tnn.AvgPool2d(3, 1, 1, count_include_pad=False)


class Cell(tnn.Module):

  def __init__(self, arch, c):
    super().__init__()
    self.edges = tnn.ModuleList([make_op(int(o), c) for o in arch])

  def forward(self, x):
    nodes = [x]
    for j in range(1, 4):
      nodes.append(sum(self.edges[e](nodes[i]) for e, (jj, i) in enumerate(EDGES) if jj == j))
    return nodes[-1]


class Reduction(tnn.Module):

  def __init__(self, c_in, c_out):
    super().__init__()
    self.a = ReLUConvBN(c_in, c_out, 3, 2)
    self.b = ReLUConvBN(c_out, c_out, 3)
    self.shortcut = tnn.Sequential(tnn.AvgPool2d(2, 2), tnn.Conv2d(c_in, c_out, 1, bias=False))

  def forward(self, x):
    return self.shortcut(x) + self.b(self.a(x))


class Net(tnn.Module):

  def __init__(self, arch, c, n, num_classes, in_channels):
    super().__init__()
    layers = [tnn.Conv2d(in_channels, c, 3, 1, 1, bias=False), tnn.BatchNorm2d(c)]
    for stage in range(3):
      cs = c * 2 ** stage
      if stage:
        layers.append(Reduction(cs // 2, cs))
      layers += [Cell(arch, cs) for _ in range(n)]
    layers += [tnn.BatchNorm2d(4 * c), tnn.ReLU(), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(),
               tnn.Linear(4 * c, num_classes)]
    self.net = tnn.Sequential(*layers)

  def forward(self, x):
    return self.net(x)


class MBConv(tnn.Module):
  """Inverted residual (MobileNetV2): 1x1 expand, BN, ReLU6, kxk depthwise (stride), BN,
  ReLU6, 1x1 project, BN, plus the input where ``residual``; convs bias-free."""

  def __init__(self, c_in, c_out, kernel, expand, stride, residual):
    super().__init__()
    mid = expand * c_in
    self.residual = residual
    self.body = tnn.Sequential(
        tnn.Conv2d(c_in, mid, 1, bias=False), tnn.BatchNorm2d(mid), tnn.ReLU6(),
        tnn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
        tnn.BatchNorm2d(mid), tnn.ReLU6(),
        tnn.Conv2d(mid, c_out, 1, bias=False), tnn.BatchNorm2d(c_out))

  def forward(self, x):
    return x + self.body(x) if self.residual else self.body(x)


class MBConvNet(tnn.Module):
  """The specialised ``jaxnas.models.mbconv_net.MBConvNetwork`` of ``arch`` (Python values,
  ``mbconv_space``'s structure): 3x3 stem, the stages' first ``depth`` blocks (the first of
  a stage strided, the others residual), 1x1 head, global average pool, linear."""

  def __init__(self, arch, num_classes, in_channels):
    super().__init__()
    layers = [tnn.Conv2d(in_channels, STEM, 3, 1, 1, bias=False), tnn.BatchNorm2d(STEM),
              tnn.ReLU6()]
    w_in = STEM
    for s, stage in enumerate(STAGES, 1):
      a = arch[f"stage{s}"]
      w = a["width"]
      for b in range(1, a["depth"] + 1):
        block = a[f"block{b}"]
        layers.append(MBConv(w_in if b == 1 else w, w, block["kernel"], block["expand"],
                             stage.stride if b == 1 else 1, residual=b > 1))
      w_in = w
    layers += [tnn.Conv2d(w_in, HEAD, 1, bias=False), tnn.BatchNorm2d(HEAD), tnn.ReLU6(),
               tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(HEAD, num_classes)]
    self.net = tnn.Sequential(*layers)

  def forward(self, x):
    return self.net(x)


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def peak_rss_delta_mb(fn) -> float | None:
  """Peak resident memory above the current while ``fn()`` runs, MB (Linux: ``VmHWM``
  reset by writing 5 to ``/proc/self/clear_refs``; None where that is not possible).
  Freed heap memory is returned to the system first (``malloc_trim``), so that reused
  old allocations do not hide the new ones."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    before = _status_kb("VmRSS")
  except (OSError, KeyError):
    return None
  fn()
  return round((_status_kb("VmHWM") - before) / 1024, 1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--space", default="nb201", choices=("nb201", "mbconv"))
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--channels", type=int, default=None, help="nb201 only (default 16)")
  p.add_argument("--cells", type=int, default=None, help="nb201 only (default 1)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--in_channels", type=int, default=1)
  p.add_argument("--val_examples", type=int, default=1000)
  p.add_argument("--val_fraction", type=float, default=1 / 12)
  p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
  p.add_argument("--random_data", action="store_true")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  if args.space == "mbconv" and (args.channels is not None or args.cells is not None):
    p.error("--channels/--cells apply to --space=nb201 only (the MBConv layout is fixed)")
  if args.space == "nb201":
    args.channels = 16 if args.channels is None else args.channels
    args.cells = 1 if args.cells is None else args.cells
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)

  # The same population as bench_population.py (same space, same key).
  import jax
  space = SPACES[args.space]()
  keys = jax.random.split(jax.random.PRNGKey(args.seed), args.population)
  archs = jax.vmap(lambda k: space.from_vector(space.canonical(space.sample_vector(k))))(keys)
  if args.space == "mbconv":
    members = [to_python(jax.tree.map(lambda a: a[i], archs)) for i in range(args.population)]
  else:
    members = list(np.asarray(archs))

  def build(arch):
    if args.space == "mbconv":
      return MBConvNet(arch, 10, args.in_channels)
    return Net(arch, args.channels, args.cells, 10, args.in_channels)

  source = "random"
  if args.image == 28 and args.in_channels == 1 and not args.random_data:
    try:
      ds = load_fashion_mnist(args.data_dir)
      tx, ty, vx, vy = train_val_split(ds.train_images, ds.train_labels, args.val_fraction,
                                       seed=args.seed)
      vx, vy, mean, std, source = vx[:args.val_examples], vy[:args.val_examples], ds.mean, ds.std, \
          "fashion_mnist"
    except DatasetError as e:
      print(f"Fashion-MNIST unavailable ({e}); using random data", file=sys.stderr)
  if source == "random":
    rng = np.random.default_rng(args.seed)
    shape = (args.image, args.image, args.in_channels)
    tx = rng.integers(0, 256, (10000,) + shape, dtype=np.uint8)
    ty = rng.integers(0, 10, 10000).astype(np.int32)
    vx = rng.integers(0, 256, (args.val_examples,) + shape, dtype=np.uint8)
    vy = rng.integers(0, 10, args.val_examples).astype(np.int32)
    mean, std = (0.5,) * args.in_channels, (0.25,) * args.in_channels

  def to_tensor(x):  # uint8 NHWC -> normalised float NCHW
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    return (t - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

  train_x, train_y = torch.from_numpy(tx), torch.from_numpy(ty.astype(np.int64))
  val_x, val_y = to_tensor(vx), torch.from_numpy(vy.astype(np.int64))
  g = torch.Generator().manual_seed(args.seed + 1)
  batches = [torch.randint(0, len(train_y), (args.batch,), generator=g) for _ in range(args.steps)]

  def make_optimizer(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)

  def train_steps(net, opt, sched, batches):
    """False where the loss became non-finite."""
    net.train()
    for idx in batches:
      x, y = to_tensor(train_x[idx].numpy()), train_y[idx]
      loss = F.cross_entropy(net(x), y)
      if not torch.isfinite(loss):
        return False
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      sched.step()
    return True

  accs, params, train_time = [], [], 0.0
  t_members = time.perf_counter()
  for arch in members:
    net = build(arch)
    params.append(sum(p.numel() for p in net.parameters()))
    opt, sched = make_optimizer(net)
    t = time.perf_counter()
    failed = not train_steps(net, opt, sched, batches)
    train_time += time.perf_counter() - t
    net.eval()
    with torch.no_grad():
      correct = sum(int((net(val_x[i:i + 500]).argmax(1) == val_y[i:i + 500]).sum())
                    for i in range(0, len(val_y), 500))
    accs.append(float("nan") if failed else correct / len(val_y))
  members_time = time.perf_counter() - t_members  # construction, training and evaluation
  end_to_end = time.perf_counter() - T_START

  # Untimed checks: the parameters of every member are those of jaxnas's network.
  from jaxnas.models.registry import model_of
  from jaxnas.models.train import TrainConfig
  sizes = {} if args.space == "mbconv" else {"channels": args.channels, "cells": args.cells}
  model = model_of(TrainConfig(space=args.space, num_classes=10, **sizes))
  shape = (args.image, args.image, args.in_channels)
  want, macs = (np.asarray(c) for c in jax.vmap(lambda a: model.cost(a, shape, 10))(archs))
  for i in range(min(args.population, 4)):
    print(f"member {i}: torch parameters {params[i]:,}, jaxnas cost {int(want[i]):,}",
          file=sys.stderr)
  bad = [i for i in range(args.population) if params[i] != int(want[i])]
  if bad:
    raise SystemExit(f"parameter counts differ from jaxnas's for members {bad}: torch "
                     f"{[params[i] for i in bad]}, jaxnas {[int(want[i]) for i in bad]}")

  largest = int(np.argmax(macs))

  def train_largest():
    net = build(members[largest])
    train_steps(net, *make_optimizer(net), batches[:2])

  memory = peak_rss_delta_mb(train_largest)
  steps_total = args.population * args.steps
  print(json.dumps({
      "framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
      "space": args.space, "data": source, "population": args.population, "steps": args.steps,
      "channels": args.channels, "cells": args.cells, "batch": args.batch, "image": args.image,
      "end_to_end_s": round(end_to_end, 3), "compile_s": 0.0, "train_s": round(train_time, 3),
      # Training steps only, as bench_population.py's field of this name; the _incl_init_eval
      # field adds each member's construction and evaluation (bench_population's steady_s).
      "candidate_steps_per_s": round(steps_total / train_time, 2),
      "candidate_steps_per_s_incl_init_eval": round(steps_total / members_time, 2),
      "end_to_end_candidate_steps_per_s": round(steps_total / end_to_end, 2),
      "val_accuracy_mean": float(np.nanmean(accs)), "failed": int(np.isnan(accs).sum()),
      "params": params,  # per member, each equal to jaxnas's cost (checked above)
      "step_memory_mb": memory, "step_memory_member": largest,
      "step_memory_what": ("peak RSS above the start while the member with the most MACs is "
                           "built and takes 2 training steps" if memory is not None else None),
  }))


if __name__ == "__main__":
  main()
