"""Every training option in one place, with its default.

The command line (:mod:`ppl_vae.train`) is built from :class:`TrainConfig`, ``config.json`` of a
run is ``dataclasses.asdict`` of it, and :func:`ppl_vae.training.train` takes one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .errors import UsageError

ELBOS = ("mc", "analytic", "iwae")
LIKELIHOODS = ("bernoulli", "gaussian")
BINARIZE = ("none", "static", "dynamic")
ACTIVATIONS = ("relu", "softplus", "tanh", "elu", "gelu")
CONDITIONS = ("quadrants", "label")
CVAE_OBJECTIVES = ("cvae", "gsnn", "hybrid")


def default_data_dir() -> str:
    """``$PPL_VAE_DATA`` if set, else ``./data``."""
    return os.environ.get("PPL_VAE_DATA", "data")


@dataclass
class TrainConfig:
    """Options of one training run (defaults: Kingma & Welling's MNIST VAE, 784-400-20)."""

    # what
    model: str = "vae"
    dataset: str = "digits"
    data_dir: str = field(default_factory=default_data_dir)
    download: bool = True
    binarize: str = "none"
    # model
    z_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    gaussian_scale: float = 1.0
    learn_scale: bool = False
    beta: float = 1.0
    # conditional VAE (--model cvae)
    condition: str = "quadrants"
    quadrants: tuple[int, ...] = (1, 2, 3)
    baseline_input: bool = True
    cvae_objective: str = "cvae"
    hybrid_alpha: float = 0.5
    # inference
    elbo: str = "mc"
    particles: int = 1
    jit: bool = False
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    cuda: bool = False
    early_stop: int = 0
    val_fraction: float = 0.1
    # evaluation
    eval_particles: int = 10
    eval_iwae: int = 0
    cll_samples: int = 100
    # output
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.quadrants = tuple(int(k) for k in self.quadrants)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first bad option."""
        choices = {
            "elbo": ELBOS, "likelihood": LIKELIHOODS, "binarize": BINARIZE,
            "activation": ACTIVATIONS, "condition": CONDITIONS,
            "cvae_objective": CVAE_OBJECTIVES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        positive = ("z_dim", "particles", "epochs", "batch_size", "eval_particles",
                    "cll_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if any(h < 1 for h in self.hidden):
            raise UsageError(f"--hidden widths must be at least 1, got {list(self.hidden)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise UsageError(f"--beta must be a positive number, got {self.beta}")
        if not (math.isfinite(self.gaussian_scale) and self.gaussian_scale > 0):
            raise UsageError(f"--gaussian-scale must be a positive number, got "
                             f"{self.gaussian_scale}")
        if self.learn_scale and self.likelihood != "gaussian":
            raise UsageError("--learn-scale learns the sigma of --likelihood gaussian; add that "
                             "or drop --learn-scale")
        if not self.quadrants or any(k not in (1, 2, 3) for k in self.quadrants):
            raise UsageError(f"--quadrants takes observed-quadrant counts 1, 2 or 3 (one model "
                             f"each), got {list(self.quadrants)}")
        if len(set(self.quadrants)) != len(self.quadrants):
            raise UsageError(f"--quadrants lists a count twice: {list(self.quadrants)}")
        if not 0 <= self.hybrid_alpha <= 1:
            raise UsageError(f"--hybrid-alpha must lie in [0, 1], got {self.hybrid_alpha}")
        if self.cvae_objective == "hybrid" and self.elbo == "iwae":
            raise UsageError("--cvae-objective hybrid adds two ELBOs; use --elbo mc or analytic")
        if self.early_stop < 0:
            raise UsageError(f"--early-stop takes a patience in epochs (0: off), got "
                             f"{self.early_stop}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must lie strictly between 0 and 1, got "
                             f"{self.val_fraction}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must lie in [0, 2**32), got {self.seed}")
        if self.eval_iwae < 0:
            raise UsageError(f"--eval-iwae must be 0 (off) or a number of samples, got "
                             f"{self.eval_iwae}")
        if self.jit and self.elbo == "iwae":
            raise UsageError("--jit has no IWAE (RenyiELBO) variant in Pyro; drop --jit or use "
                             "--elbo mc|analytic")
        if self.elbo == "iwae" and self.particles < 2:
            raise UsageError("--elbo iwae with one particle is the plain ELBO; give --particles "
                             "K with K >= 2 (e.g. 5)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["quadrants"] = list(self.quadrants)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild from ``config.json``, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
