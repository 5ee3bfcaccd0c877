"""ppl_vae: variational autoencoders as Pyro probabilistic programs, trained by SVI.
The public API is ``__all__`` (docs: reference/api.md)."""

import os as _os
import sys as _sys

try:  # first: an environment torch cannot start in is one line from the command line
    import torch._dynamo as _dynamo  # noqa: F401  (it makes the inductor cache directory)
except OSError as _e:  # e.g. TORCHINDUCTOR_CACHE_DIR below a regular file
    _names = [k for k, v in _os.environ.items() if k.startswith(("TORCH", "TRITON", "XDG"))
              and v and str(getattr(_e, "filename", "") or "").startswith(v)]
    _line = (f"torch cannot start: {type(_e).__name__}: {_e}"
             + (f" (from {_names[0]}); point it at a writable directory or unset it"
                if _names else "; check the environment torch starts in"))
    if _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0]) == "ppl-vae":
        print(f"python -m ppl_vae: error: {_line}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise ImportError(_line) from None

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

__all__ = ["CVAE", "MODELS", "SSVAE", "VAE", "CompareConfig", "Comparison", "ConvVAE", "Dataset",
           "FlowVAE", "Model", "Run", "RunContext", "Scores", "Session", "Split", "TrainConfig",
           "UsageError", "appendix", "compare", "evaluate", "evaluate_run", "get_model",
           "load_dataset", "load_run", "log_weights", "make_elbo", "plots", "register_model",
           "score", "train", "train_run"]
__version__ = "0.1.0"
