"""Models as Pyro programs: a class registry and the models it ships with."""

from .cvae import CVAE
from .registry import MODELS, get_model, register_model
from .vae import VAE

__all__ = ["CVAE", "MODELS", "VAE", "get_model", "register_model"]
