"""ppl_vae: variational autoencoders as Pyro probabilistic programs, trained by SVI.

data -> models -> estimators + training -> evaluation -> run (files, figures) -> CLI.
"""

from .config import TrainConfig
from .data import Dataset, Split, load_dataset
from .errors import UsageError
from .estimators import make_elbo
from .evaluation import Scores, log_weights, score
from .models import MODELS, VAE, get_model, register_model
from .run import Run, evaluate_run, train

__all__ = [
    "MODELS", "VAE", "Dataset", "Run", "Scores", "Split", "TrainConfig", "UsageError",
    "evaluate_run", "get_model", "load_dataset", "log_weights", "make_elbo", "register_model",
    "score", "train",
]
__version__ = "0.1.0"
