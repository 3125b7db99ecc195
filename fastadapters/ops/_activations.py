"""The bottleneck activations: names and integer codes from the one table, fastadapters.kernels.ACTIVATIONS;
the torch function of each name here (the torch backends and fastadapters.reference use them)."""

import torch
import torch.nn.functional as F

from fastadapters.kernels import ACTIVATIONS

_BY_NAME = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid}
# The torch function of each activation code (gelu is the exact erf form, as in every backend).
TORCH_FNS = tuple(_BY_NAME[name] for name in ACTIVATIONS)


def torch_fn(name: str):
    """The torch function of activation `name` (one of ACTIVATIONS)."""
    return TORCH_FNS[ACTIVATIONS.index(name)]


def check(name: str, activation) -> int:
    """The code of `activation`, or ValueError naming the argument `name` and the accepted names."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)
