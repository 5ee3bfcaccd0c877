"""Models as Pyro programs: the contract (:mod:`.base`), their options, a class registry,
and the families that ship with ppl_vae, one file each."""

from .base import Model, Program, RunContext, hook
from .conv_vae import ConvVAE
from .cvae import CVAE
from .flow_vae import FlowVAE
from .options import make_options, option_specs, options_dict, parse_model_opts
from .registry import MODELS, get_model, model_name, register_model
from .ssvae import SSVAE
from .vae import VAE


def options_of(cls: type) -> set[str]:
    """The option names of ``cls``."""
    return {s.name for s in option_specs(cls)}


__all__ = ["CVAE", "ConvVAE", "MODELS", "SSVAE", "VAE", "FlowVAE", "Model", "Program",
           "RunContext", "get_model", "hook", "make_options", "model_name", "option_specs",
           "options_dict", "options_of", "parse_model_opts", "register_model"]
