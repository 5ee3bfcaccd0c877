"""ppl_vae: variational autoencoders as Pyro probabilistic programs, trained by SVI.

data -> models (the contract in :mod:`ppl_vae.models.base`) -> inference (estimators, SVI
loop, importance sampling, trainer) -> evaluation (saved runs, the estimator comparison)
-> experiments (tables of several runs) -> CLI and plots.

The public API: ``load_dataset``; ``Model`` (the contract), the families ``VAE``, ``CVAE``,
``ConvVAE``, ``SSVAE`` (M2) and ``FlowVAE`` (``flow-vae``: the VAE with a flow guide), and
``register_model``; ``TrainConfig``; ``train`` and ``evaluate`` (what ``python -m ppl_vae
train`` / ``evaluate`` run); ``score`` and ``log_weights`` (per-data-point ELBO and IWAE
bounds from Pyro traces); ``compare`` (the estimator comparison); ``ppl_vae.appendix``; and
the figure helpers in ``ppl_vae.plots``.
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
from .run.train import Run, train_run

evaluate = evaluate_run
train = train_run

__all__ = [
    "CVAE", "MODELS", "SSVAE", "VAE", "CompareConfig", "Comparison", "ConvVAE", "Dataset",
    "FlowVAE", "Model", "Run",
    "RunContext", "Scores", "Split", "TrainConfig", "UsageError", "appendix",
    "compare", "evaluate", "evaluate_run", "get_model", "load_dataset", "load_run",
    "log_weights", "make_elbo", "plots", "register_model", "score", "train", "train_run",
]
__version__ = "0.1.0"
