"""ppl_vae: variational autoencoders as Pyro probabilistic programs, trained by SVI.

data -> models -> estimators + training -> evaluation -> run (files, figures) -> CLI.

The public API: ``load_dataset``; ``VAE``, ``CVAE`` and ``register_model``; ``train`` and
``evaluate`` (what ``python -m ppl_vae.train`` / ``ppl_vae.evaluate`` run); ``score`` and
``log_weights`` (per-data-point ELBO and IWAE bounds from Pyro traces); ``compare`` (the
estimator comparison); ``ppl_vae.appendix``; and the figure helpers in ``ppl_vae.plots``.
"""

from . import appendix, plots
from .comparison import CompareConfig, Comparison, compare
from .config import TrainConfig
from .data import Dataset, Split, load_dataset
from .errors import UsageError
from .estimators import make_elbo
from .evaluation import Scores, conditional_scores, log_weights, score
from .experiments import train_quadrant_table
from .models import CVAE, MODELS, VAE, get_model, register_model
from .run import Run, evaluate_run, load_run, train

evaluate = evaluate_run

__all__ = [
    "CVAE", "MODELS", "VAE", "CompareConfig", "Comparison", "Dataset", "Run", "Scores",
    "Split", "TrainConfig", "UsageError", "appendix", "compare", "conditional_scores",
    "evaluate", "evaluate_run", "get_model", "load_dataset", "load_run", "log_weights",
    "make_elbo", "plots", "register_model", "score", "train", "train_quadrant_table",
]
__version__ = "0.1.0"
