"""Search spaces: architectures as pytrees of int32 choices."""

from jaxnas.spaces.base import Arch, InvalidArchitecture, Space
from jaxnas.spaces.darts import DartsArch, darts_space
from jaxnas.spaces.declared import Choice, Mixture, choice, declare
from jaxnas.spaces.mbconv import mbconv_space
from jaxnas.spaces.nb201 import nb201_space

SPACES = {
    "nb201": nb201_space,
    "darts": darts_space,
    "mbconv": mbconv_space,
}

__all__ = ["Arch", "Choice", "DartsArch", "InvalidArchitecture", "Mixture", "SPACES", "Space",
           "choice", "darts_space", "declare", "mbconv_space", "nb201_space"]
