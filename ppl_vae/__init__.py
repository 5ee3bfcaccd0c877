"""ppl_vae: variational autoencoders as Pyro probabilistic programs, trained by SVI.

The public API (README): ``load_dataset``; ``Model`` and the families ``VAE``, ``CVAE``,
``ConvVAE``, ``SSVAE``, ``FlowVAE``, ``register_model``; ``TrainConfig``; ``Session``; ``train``,
``evaluate``, ``compare``; ``score`` and ``log_weights``; ``ppl_vae.appendix`` and
``ppl_vae.plots``.
"""

from . import appendix, plots
from .config import TrainConfig
from .data import Dataset, Split, load_dataset
from .errors import UsageError
from .evaluation.comparison import CompareConfig, Comparison, compare
from .evaluation.runs import evaluate_run, load_run
from .inference.estimators import make_elbo
from .inference.importance import Scores, log_weights, score
from .models import (
    CVAE,
    MODELS,
    SSVAE,
    VAE,
    ConvVAE,
    FlowVAE,
    Model,
    RunContext,
    get_model,
    register_model,
)
from .run.session import Session
from .run.train import Run, train_run

evaluate = evaluate_run
train = train_run

__all__ = [
    "CVAE", "MODELS", "SSVAE", "VAE", "CompareConfig", "Comparison", "ConvVAE", "Dataset",
    "FlowVAE", "Model", "Run",
    "RunContext", "Scores", "Session", "Split", "TrainConfig", "UsageError", "appendix",
    "compare", "evaluate", "evaluate_run", "get_model", "load_dataset", "load_run",
    "log_weights", "make_elbo", "plots", "register_model", "score", "train", "train_run",
]
__version__ = "0.1.0"
