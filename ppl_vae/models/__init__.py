"""Models as Pyro programs: the contract (:mod:`.base`), their options, a class registry,
and the families that ship with ppl_vae, one file each."""

from .base import Model, Program, RunContext, hook
from .conv_vae import ConvVAE
from .cvae import CVAE
from .flow_vae import FlowVAE
from .options import make_options, options_class, parse_model_opts
from .registry import MODELS, get_model, model_name, register_model
from .ssvae import SSVAE
from .vae import VAE

__all__ = ["CVAE", "ConvVAE", "MODELS", "SSVAE", "VAE", "FlowVAE", "Model", "Program",
           "RunContext", "get_model", "hook", "make_options", "model_name", "options_class",
           "parse_model_opts", "register_model"]

