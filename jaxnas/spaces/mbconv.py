"""The MBConv macro space: MobileNetV2 / ProxylessNAS / Once-for-All stages of inverted
residual blocks, sized for 28x28 and 32x32 images.

Per stage the depth, per block the depthwise kernel and the expansion ratio, and
per stage a width multiplier are chosen (Cai et al. 2019, ProxylessNAS; Cai et
al. 2020, Once-for-All). The layout (``STAGES``) keeps a member's training to
seconds on a CPU: a 16-channel stem at full resolution, then

=====  ======  ==============================  ========  ===============
stage  stride  widths (multipliers 0.5/0.75/1)  depth     per block
=====  ======  ==============================  ========  ===============
1      1       8 / 12 / 16                      2, 3, 4   kernel 3/5/7,
2      2       16 / 24 / 32                     2, 3, 4   expansion 3/4/6
3      2       24 / 36 / 48                     2, 3, 4
4      1       32 / 48 / 64                     2, 3, 4
=====  ======  ==============================  ========  ===============

and a 1x1 conv to ``HEAD`` channels, global average pooling and a linear
classifier (28x28 -> 28 -> 14 -> 7 -> 7; 32x32 -> 32 -> 16 -> 8 -> 8: the resolutions of
NAS-Bench-201's three stages; experiments/NOTES_mbconv.md measures why stage 1 is not at
stride 2). Blocks past a stage's depth do not exist: their kernel and expansion are conditional choices
(``when``), so the canonical vector counts networks, not vectors. 4 stages x (3
widths x (9^2 + 9^3 + 9^4) block settings) = 22,113^4 ~ 2.4e17 networks, from 31K
parameters and 3.7M multiply-accumulates per 28x28 image to 531K and 60.9M.

An architecture is the declared structure ``{"stage1": {"width", "depth",
"block1": {"kernel", "expand"}, ..., "block4": {...}}, ..., "stage4": {...}}`` and
its string form reads ``stage1.width=24,stage1.depth=3,stage1.block1.kernel=5,...``.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxnas.spaces.base import Space
from jaxnas.spaces.declared import choice, declare


class Stage(NamedTuple):
  """One stage: its widest output channels (multiplier 1.0) and the stride of its first block."""
  width: int
  stride: int


STEM = 16  # channels of the 3x3 stem conv (stride 1)
STAGES = (Stage(16, 1), Stage(32, 2), Stage(48, 2), Stage(64, 1))
HEAD = 128  # channels of the final 1x1 conv
MULTIPLIERS = (0.5, 0.75, 1.0)
DEPTHS = (2, 3, 4)
KERNELS = (3, 5, 7)
EXPANSIONS = (3, 4, 6)


def stage_widths(stage: Stage) -> tuple[int, ...]:
  """The candidate output channels of ``stage``: its width times each multiplier."""
  return tuple(int(round(stage.width * m)) for m in MULTIPLIERS)


def mbconv_space() -> Space:
  """The MBConv space (module docstring). Candidates are declared smallest first."""
  structure = {}
  for s, stage in enumerate(STAGES, 1):
    entry = {"width": choice(*stage_widths(stage)), "depth": choice(*DEPTHS)}
    for b in range(1, max(DEPTHS) + 1):
      when = None if b <= min(DEPTHS) else (lambda a, s=s, b=b: a[f"stage{s}"]["depth"] >= b)
      entry[f"block{b}"] = {"kernel": choice(*KERNELS, when=when),
                            "expand": choice(*EXPANSIONS, when=when)}
    structure[f"stage{s}"] = entry
  return declare(structure, name="mbconv")
