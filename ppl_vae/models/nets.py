"""Plain PyTorch building blocks the Pyro models are made of, and the options every MLP
family shares."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from torch import nn

from ..errors import UsageError
from .likelihoods import LIKELIHOODS

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU,
}


def mlp(widths: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with ``activation`` between them
    (none after the last: it outputs logits, locations or log-scales)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(widths)):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def positive(name: str, value: float) -> None:
    """:class:`UsageError` unless ``value`` is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def check_options(options: object) -> None:
    """:class:`UsageError` for an options dataclass whose field with ``choices`` metadata holds
    another value, or whose ``z_dim`` is not a whole number >= 1."""
    for f in dataclasses.fields(options):
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(options, f.name) not in allowed:
            raise UsageError(f"--{f.name.replace('_', '-')} {getattr(options, f.name)!r} is "
                             f"not one of {', '.join(map(str, allowed))}")
    z_dim = options.z_dim
    if z_dim < 1 or z_dim != int(z_dim):
        raise UsageError(f"--z-dim must be a whole number of at least 1, got {z_dim}")


@dataclass
class LatentOptions:
    """Options of every family with a latent z and a pixel likelihood; a family's own options
    extend it. Fields with ``choices`` metadata are checked against them."""

    z_dim: int = field(default=20, metadata={"help": "latent dimension d"})
    activation: str = field(default="relu", metadata={
        "help": "nonlinearity between layers", "choices": tuple(ACTIVATIONS)})
    likelihood: str = field(default="bernoulli", metadata={
        "help": "the likelihood of each pixel", "choices": LIKELIHOODS})
    gaussian_scale: float = field(default=1.0, metadata={
        "help": "sigma of the Gaussian likelihood"})
    beta: float = field(default=1.0, metadata={"help": "KL weight (beta-VAE)"})

    def __post_init__(self) -> None:
        check_options(self)
        positive("beta", self.beta)
        positive("gaussian_scale", self.gaussian_scale)


@dataclass
class NetworkOptions(LatentOptions):
    """:class:`LatentOptions` of a family of MLPs."""

    hidden: tuple[int, ...] = field(default=(400,), metadata={
        "help": "hidden layer widths of the encoding networks (decoding ones mirror them)"})

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        super().__post_init__()
        if any(h < 1 for h in self.hidden):  # none: linear networks
            raise UsageError(f"--hidden widths must be at least 1, got {list(self.hidden)}")
