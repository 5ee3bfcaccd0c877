"""The options of a training run, in one place with their defaults.

:class:`TrainConfig` holds what every model shares (data, inference, evaluation, output) and
the chosen model's own options in ``model_options``: an instance of the family's ``Options``
dataclass (``VAE.Options``), or for a plug-in class without one, a dict of
its constructor keywords (:mod:`ppl_vae.models.options`). ``config.json`` of a run is
:meth:`TrainConfig.to_dict`; the command line is built from the same fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .inference.estimators import ELBOS
from .models import get_model, make_options, model_name, options_dict, options_of
from .models.options import coerce, named_as_keys

BINARIZE = ("none", "static", "dynamic")
FAMILY_DEFAULTS = {"elbo": "mc", "epochs": 10, "lr": 1e-3, "early_stop": 0}
"""Run options a model family may choose for its recipe (a ``default_<name>`` class attribute:
M2's ``default_lr = 3e-3``), taken where the user gives none, and their value for a family
that does not."""


def family_default(model_class: type, name: str):
    """The value of run option ``name`` that ``model_class``'s recipe takes."""
    return getattr(model_class, f"default_{name}", FAMILY_DEFAULTS[name])


def absent_meant(model: type) -> dict[str, Any]:
    """The options of ``model``'s ``Options`` that declare ``metadata["absent"]``: the value
    a record written before the option existed meant (M2's ``m1``: 0, M2 alone)."""
    options = getattr(model, "Options", None)
    if not dataclasses.is_dataclass(options):
        return {}
    return {f.name: f.metadata["absent"] for f in dataclasses.fields(options)
            if "absent" in f.metadata}


def _opt(default: Any, help: str, **meta: Any) -> Any:
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Options of one training run (defaults: Kingma & Welling's MNIST VAE, 784-400-20).

    ``model`` is a registered name (``"vae"``), ``"module:Class"``, or a class;
    ``model_options`` a dict or the family's ``Options``: ``TrainConfig(model="vae",
    model_options={"z_dim": 2})``.
    """

    # what
    model: Any = _opt("vae", "registered model name (vae, cvae, ...) or module:Class",
                      group="model")
    model_options: Any = _opt(dict, "the model's own options")
    dataset: str = _opt("digits", "mnist, fashion-mnist, cifar10, svhn, celeba (64x64), digits "
                        "or sample-patches (offline, colour) or npz:PATH", group="data")
    data_dir: str = _opt(lambda: os.environ.get("PPL_VAE_DATA", "data"),
                         "dataset root (env PPL_VAE_DATA)", group="data")
    download: bool = _opt(True, "download a missing dataset", group="data",
                          off_help="never download; fail if the dataset is missing")
    binarize: str = _opt("none", "Bernoulli-sample the pixels once (static) or every epoch "
                         "(dynamic)", group="data", choices=BINARIZE)
    labelled: int = _opt(0, "keep the labels of this many training images, a class-balanced "
                         "draw seeded by --seed; the rest become unlabelled (-1), for "
                         "semi-supervised models (--model ssvae); 0: every label",
                         group="data")
    labelled_share: float = _opt(0.0, "with --labelled: the share of each batch that is "
                                 "labelled rows, cycled through the labelled set (each "
                                 "unlabelled row once per epoch); 0: batches drawn from all "
                                 "rows alike (measured on M2: no gain yet; README)",
                                 group="data")
    # inference
    elbo: str = _opt("", "the estimator; without it, the one the model is built for (its "
                     "default_elbo: ssvae enum, the others mc). mc: Trace_ELBO, analytic: "
                     "TraceMeanField_ELBO, stl: Trace_ELBO "
                     "with the path-derivative (sticking-the-landing) guide gradient, iwae: "
                     "RenyiELBO(alpha=0), iwae-dreg: the IWAE bound with the doubly "
                     "reparameterized guide gradient, rws: reweighted wake-sleep (wake-phi), "
                     "enum: TraceEnum_ELBO (sums out the latents the guide marks with "
                     "config_enumerate), tracegraph: TraceGraph_ELBO (score terms with "
                     "downstream costs and the guide's baselines)", group="inference",
                     choices=ELBOS)
    particles: int = _opt(1, "samples per data point (vectorized where the model allows)",
                          group="inference")
    jit: bool = _opt(False, "use Pyro's Jit* ELBO variants", group="inference")
    compile: bool = _opt(False, "trace the whole SVI step (guide, model, ELBO, backward, Adam) "
                         "once per batch shape and replay it compiled by inductor (as a CUDA "
                         "graph with --cuda); the first step is eager, the last partial batch "
                         "of an epoch is a second shape, compiled when first met; costs "
                         "seconds to compile, so it pays on long runs; falls back to the eager "
                         "step with one line saying why where capture cannot be exact",
                         group="inference")
    lr: float | None = _opt(None, "Adam learning rate (default: the model's own, its "
                            "default_lr: ssvae 3e-3, the others 1e-3)", group="inference",
                            type=float)
    beta1: float = _opt(0.9, "Adam's beta1, the decay of its running mean of the gradient "
                        "(beta2 stays 0.999; Pyro's ss_vae example runs 0.95)",
                        group="inference")
    epochs: int | None = _opt(None, "training epochs (default: the model's own, its "
                              "default_epochs: ssvae 50, the others 10)", group="inference",
                              type=int)
    batch_size: int = _opt(128, "images per SVI step and process (under torchrun the global "
                           "batch is this times the number of processes)", group="inference")
    seed: int = _opt(0, "seed of the weights, the latent noise and the batches",
                     group="inference")
    cuda: bool = _opt(False, "train and evaluate on the GPU", group="inference")
    early_stop: int | None = _opt(None, "stop after this many epochs without a better "
                                  "validation ELBO and keep the best epoch's weights, 0: off "
                                  "(default: the model's own, its default_early_stop: ssvae "
                                  "10, the others 0)", group="inference", type=int)
    val_fraction: float = _opt(0.1, "share of the training split held out for early stopping",
                               group="inference")
    validate: bool = _opt(False, "Pyro validation (distribution arguments and supports) for "
                          "the whole run; slower", group="inference")
    threads: int = _opt(0, "CPU threads per process (torch.set_num_threads); 0: the free "
                        "cores (the cores less the 1-minute load average, at least 1) shared "
                        "among the processes, or OMP_NUM_THREADS where set (README: why)",
                        group="inference")
    checkpoint_every_steps: int = _opt(0, "also write the checkpoint every K steps within "
                                       "epochs (0: at epoch ends only)", group="inference")
    check_every_steps: int = _opt(50, "read the device-side divergence flag every K steps "
                                  "(and at every checkpoint)", group="inference")
    # evaluation
    eval_particles: int = _opt(10, "samples per test image for the test ELBO",
                               group="evaluation and output")
    eval_iwae: int = _opt(0, "also estimate log p(x) by the IWAE bound with K samples (0: off)",
                          group="evaluation and output")
    # output
    out: str | None = _opt(None, "run directory (default: runs/<model>-<time>)",
                           group="evaluation and output", type=str)
    overwrite: bool = _opt(False, "allow the run directory to hold files already",
                           group="evaluation and output")

    def __post_init__(self) -> None:
        for name in FAMILY_DEFAULTS:  # not given: what the family's recipe takes
            if getattr(self, name) in (None, ""):
                setattr(self, name, family_default(self.model_class, name))
        self.validate_options()
        with named_as_keys("model_options.", nested=True):
            self.model_options = make_options(self.model_class, self.model_options)

    @property
    def model_class(self) -> type:
        return get_model(self.model)

    @property
    def model_name(self) -> str:
        return model_name(self.model_class)

    def validate_options(self) -> None:
        """Coerce each option to the type of its default; raise :class:`UsageError` naming
        the first bad one."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if callable(f.default_factory) else f.default
            if f.name in ("model", "model_options"):
                continue
            if isinstance(value, os.PathLike) and isinstance(default, str | None) and \
                    f.name != "dataset":
                continue  # a directory given as a Path
            if default is None and f.metadata.get("type", str) is not str:
                default = f.metadata["type"]()  # a number the model decides: epochs
            if default is None:  # out: a path, or None for the default
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"--{f.name.replace('_', '-')} takes a path, got "
                                     f"{value!r}")
                continue
            setattr(self, f.name, coerce(f.name, value, default))
        for name in ("elbo", "binarize"):
            allowed = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name} {getattr(self, name)!r} is not one of "
                                 f"{', '.join(allowed)}")
        for name, least in (("particles", 1), ("epochs", 1), ("batch_size", 1),
                            ("eval_particles", 1), ("checkpoint_every_steps", 0),
                            ("check_every_steps", 0), ("labelled", 0),
                            ("threads", 0)):  # (coerced: ints)
            if getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number "
                                 f"{'of at least 1' if least else '>= 0'}, got "
                                 f"{getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.beta1 < 1:
            raise UsageError(f"--beta1 must lie in [0, 1), got {self.beta1}")
        if not 0 <= self.labelled_share < 1:
            raise UsageError(f"--labelled-share must lie in [0, 1), got {self.labelled_share}")
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
        if self.elbo == "rws" and self.particles < 2:
            raise UsageError("--elbo rws weighs K particles against each other; give "
                             "--particles K with K >= 2 (e.g. 5)")
        if self.jit and self.compile:
            raise UsageError("--jit and --compile are two ways to compile the step; drop one "
                             "(--compile also compiles the backward pass and Adam)")
        if self.jit and self.elbo not in ("mc", "analytic"):
            raise UsageError(f"--jit with --elbo {self.elbo} is not supported here; drop --jit "
                             "or use --elbo mc|analytic")
        if self.elbo in ("iwae", "iwae-dreg") and self.particles < 2:
            raise UsageError(f"--elbo {self.elbo} with one particle is the plain ELBO; give "
                             "--particles K with K >= 2 (e.g. 5)")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model_name
        d["model_options"] = options_dict(self.model_options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild from ``config.json``, ignoring keys this version does not know; a bad
        value is named by its key. A flat dict (as older versions wrote) has its model's
        options picked out by name."""
        if not isinstance(d, dict):
            raise UsageError(f"a run config is a JSON object of options, got "
                             f"{type(d).__name__}")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if not isinstance(kwargs.get("model", "vae"), str | type):
            raise UsageError(f"key 'model' takes a registered model name or module:Class, got "
                             f"{kwargs['model']!r}")
        if not isinstance(kwargs.get("model_options", {}), dict):
            raise UsageError(f"key 'model_options' takes an object of the model's options, "
                             f"got {kwargs['model_options']!r}")
        with named_as_keys(""):
            model = get_model(kwargs.get("model", "vae"))
            if "model_options" not in d:
                flat = {k: v for k, v in d.items() if k in options_of(model)}
                kwargs["model_options"] = make_options(model, flat)
            else:  # an option added since the record was written: what its absence meant
                kwargs["model_options"] = {**absent_meant(model), **kwargs["model_options"]}
            return cls(**kwargs)
