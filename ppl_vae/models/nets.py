"""Plain PyTorch building blocks the Pyro models are made of, and the options every MLP
family shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from torch import nn

from ..config import check_fields
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


@dataclass
class LatentOptions:
    """Options of every family with a latent z and a pixel likelihood; a family's own options
    extend it. Every field's type, ``choices`` and bounds are checked
    (:func:`~ppl_vae.config.check_fields`)."""

    z_dim: int = field(default=20, metadata={"help": "latent dimension d", "least": 1})
    activation: str = field(default="relu", metadata={
        "help": "nonlinearity between layers", "choices": tuple(ACTIVATIONS)})
    likelihood: str = field(default="bernoulli", metadata={
        "help": "the likelihood of each pixel", "choices": LIKELIHOODS})
    gaussian_scale: float = field(default=1.0, metadata={
        "help": "sigma of the Gaussian likelihood", "above": 0})
    beta: float = field(default=1.0, metadata={"help": "KL weight (beta-VAE)", "above": 0})

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class NetworkOptions(LatentOptions):
    """:class:`LatentOptions` of a family of MLPs."""

    hidden: tuple[int, ...] = field(default=(400,), metadata={
        "help": "hidden layer widths of the encoding networks (decoding ones mirror them)",
        "least": 1})

