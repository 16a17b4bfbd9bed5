"""Search spaces: architectures as pytrees of int32 choices."""

from jaxnas.spaces.base import Arch, InvalidArchitecture, Space
from jaxnas.spaces.darts import DartsArch, darts_space
from jaxnas.spaces.declared import Choice, choice, declare
from jaxnas.spaces.nb201 import nb201_space

SPACES = {
    "nb201": nb201_space,
    "darts": darts_space,
}

__all__ = ["Arch", "Choice", "DartsArch", "InvalidArchitecture", "SPACES", "Space", "choice",
           "darts_space", "declare", "nb201_space"]
