"""The options of a training run (:class:`TrainConfig`), the ``option(...)`` fields the
command line is built from (:func:`ppl_vae.cli.add_options`), and their one check
(:func:`check_fields`). It imports no model: what depends on the family is resolved by the
run's :class:`~ppl_vae.run.session.Session`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

MOST_THREADS = 4 * (os.cpu_count() or 1)
"""``--threads`` at most: more threads than this machine's cores only wait for them."""
MOST_SAMPLES = 2**31
"""Samples per data point at most (``--particles``, ``--eval-particles``, ``--eval-iwae``)."""
MOST_INT = 2**62
"""Any whole number an option takes, at most: within torch's int64 (no overflow later)."""
RECIPE = {"elbo": "mc", "epochs": 10, "lr": 1e-3, "early_stop": 0}
"""The run options a model family's ``recipe`` may choose (M2's ``{"lr": 3e-3, ...}``),
taken where the user gives none, and their value for a family whose recipe does not."""


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field that is a command-line option: ``help`` and argparse metadata
    (``choices``, ``type``, ``group``, ``off_help``, ``flag``, ``nargs``)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def flag(name: str, keys: str | None = None) -> str:
    """How a message names option ``name``: as a flag (``--z-dim``), or given ``keys`` as
    the key ``keys + name`` of a file (``key 'model_options.z_dim'``)."""
    return "--" + name.replace("_", "-") if keys is None else f"key {keys + name!r}"


_KINDS = ((bool, bool, "True or False"), (int, numbers.Integral, "a whole number"),
          (float, numbers.Real, "a number"), (str, str, "a string"))
"""An option's type, the values it accepts and its name in a message."""
_BOUNDS = {"least": operator.ge, "above": operator.gt, "below": operator.lt, "most": operator.le}
"""The bounds an option's metadata may set, each a test of a value."""


def coerce(value: Any, default: Any, what: str) -> Any:
    """``value`` as the type of an option's ``default`` (a list or a single value for a
    tuple), or :class:`UsageError` naming ``what`` (``--z-dim``, ``key 'z_dim'``) and the
    type it takes. The one place options are coerced."""
    if isinstance(default, tuple):
        items = tuple(value) if isinstance(value, list | tuple) else (value,)
        return tuple(coerce(v, default[0], what) for v in items) if default else items
    for kind, accepted, said in _KINDS:  # (bool before int: True is an int, yet no number)
        if isinstance(default, kind):
            if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
                raise UsageError(f"{what} takes {said}, got {value!r}")
            return kind(value)  # (numpy's scalars as Python's)
    return value


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def check_fields(obj: Any, keys: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Coerce each field of dataclass ``obj`` to the type of its default (or of its metadata
    ``type``), and check its metadata's ``choices`` and bounds (``least``: >=, ``above``: >,
    ``below``: <, ``most``: <=, each value of a tuple): the one check of every options
    dataclass. A bad value is named as a flag, or as ``keys + name`` (a key of a file)."""
    for f in dataclasses.fields(obj):
        value, meta, default = getattr(obj, f.name), f.metadata, field_default(f)
        if f.name in skip or (value is None and default is None):  # (None: "not given")
            continue
        if default is None:
            default = meta["type"]()
        elif default == () and "type" in meta:  # (each value of this type)
            default = (meta["type"](),)
        if isinstance(value, os.PathLike) and isinstance(default, str):
            value = os.fspath(value)
        what = flag(f.name, keys)
        value = coerce(value, default, what)
        setattr(obj, f.name, value)
        values = value if isinstance(value, tuple) else (value,)
        if "choices" in meta and not all(v in meta["choices"] for v in values):
            raise UsageError(f"{what} {value!r} is not one of "
                             f"{', '.join(map(str, meta['choices']))}")
        bounds = {k: meta[k] for k in _BOUNDS if k in meta}
        if bounds and not all(_within(v, bounds) for v in values):
            rule = _rule(values[0], **bounds)
            if isinstance(value, tuple):  # (a rule for each value)
                rule, value = rule.replace("a ", "", 1).replace("number", "numbers", 1), list(value)
            raise UsageError(f"{what} must be {rule}, got {value!r}")
        if any(type(v) is int and v > MOST_INT for v in values):
            raise UsageError(f"{what} must be a whole number of at most {MOST_INT}, got {value!r}")


def _within(v: Any, bounds: dict[str, float]) -> bool:
    return (not isinstance(v, float) or math.isfinite(v)) and \
        all(_BOUNDS[k](v, bound) for k, bound in bounds.items())


def _rule(v: Any, least: float | None = None, above: float | None = None,
          below: float | None = None, most: float | None = None) -> str:
    if below is None and most is None:
        if isinstance(v, int):
            return f"a whole number {'>= 0' if least == 0 else f'of at least {least}'}"
        return "a positive number" if above == 0 else \
            f"a number >= {least}" if least is not None else f"a number > {above}"
    if above == 0 and below is None and not isinstance(v, int):  # (most given)
        return f"a positive number up to {most:g}"
    kind = "a whole number" if isinstance(v, int) else "a number"
    left = f"[{least}" if least is not None else f"({above}"
    return f"{kind} in {left}, {below})" if most is None else f"{kind} in {left}, {most}]"


@dataclass
class TrainConfig:
    """Options of one training run (defaults: Kingma & Welling's MNIST VAE, 784-400-20).

    ``model`` is a registered name (``"vae"``), ``"module:Class"``, or a class;
    ``model_options`` a dict or the family's ``Options``: ``TrainConfig(model="vae",
    model_options={"z_dim": 2})``. ``elbo``, ``epochs``, ``lr`` and ``early_stop`` left at
    None take the family's recipe (:data:`RECIPE`).
    """

    # what
    model: Any = option("vae", "registered model name (vae, cvae, ...) or module:Class for "
                        "your own", group="model")
    model_options: Any = option(dict, "the model's own options")
    dataset: str = option("digits", "mnist, fashion-mnist, cifar10, svhn, celeba (64x64), "
                          "digits or sample-patches (offline, colour) or npz:PATH", group="data")
    data_dir: str = option(lambda: os.environ.get("PPL_VAE_DATA", "data"),
                           "dataset root (env PPL_VAE_DATA)", group="data")
    download: bool = option(True, "download a missing dataset", group="data",
                            off_help="never download; fail if the dataset is missing")
    binarize: str = option("none", "Bernoulli-sample the pixels once (static) or every epoch "
                           "(dynamic)", group="data", choices=("none", "static", "dynamic"))
    labelled: int = option(0, "keep the labels of this many training images, a class-balanced "
                           "draw seeded by --seed; the rest become unlabelled (-1), for "
                           "semi-supervised models (--model ssvae); 0: every label",
                           group="data", least=0)
    labelled_share: float = option(
        0.0, "with --labelled: the share of each batch that is labelled rows, cycled through the "
        "labelled set (each unlabelled row once per epoch); 0: batches drawn from all rows alike "
        "(measured on M2: no gain yet; docs: results/m2-recipe.md)",
        group="data", least=0, below=1)
    # inference
    elbo: str | None = option(
        None, "the estimator (not given: the model's recipe). mc: Trace_ELBO, analytic: "
        "TraceMeanField_ELBO, stl: Trace_ELBO with the path-derivative (sticking-the-landing) "
        "guide gradient, iwae: RenyiELBO(alpha=0), iwae-dreg: the IWAE bound with the doubly "
        "reparameterized guide gradient, rws: reweighted wake-sleep (wake-phi), enum: "
        "TraceEnum_ELBO (sums out the latents the guide marks with config_enumerate), tracegraph: "
        "TraceGraph_ELBO (score terms with downstream costs and the guide's baselines)",
        group="inference", type=str)
    particles: int = option(1, "samples per data point (vectorized where the model allows)",
                            group="inference", least=1, most=MOST_SAMPLES)
    jit: bool = option(False, "use Pyro's Jit* ELBO variants", group="inference")
    compile: bool = option(
        False, "trace the whole SVI step (guide, model, ELBO, backward, Adam) once per batch "
        "shape and replay it compiled by inductor (as a CUDA graph with --cuda); the first step "
        "is eager, the last partial batch of an epoch is a second shape, compiled when first met; "
        "costs seconds to compile, so it pays on long runs; falls back to the eager step with one "
        "line saying why where capture cannot be exact", group="inference")
    lr: float | None = option(None, "Adam learning rate (not given: the model's recipe)",
                              group="inference", type=float, above=0, most=1e38)
    beta1: float = option(0.9, "Adam's beta1, the decay of its running mean of the gradient "
                          "(beta2 stays 0.999; Pyro's ss_vae example runs 0.95)",
                          group="inference", least=0, below=1)
    epochs: int | None = option(None, "training epochs (not given: the model's recipe)",
                                group="inference", type=int, least=1)
    batch_size: int = option(128, "rows per SVI step and process; under torchrun "
                             "--nproc_per_node N the global batch is N times this",
                             group="inference", least=1)
    seed: int = option(0, "seed of the weights, the latent noise and the batches",
                       group="inference", least=0, below=2**32)
    cuda: bool = option(False, "train and evaluate on the GPU", group="inference")
    early_stop: int | None = option(
        None, "stop after this many epochs without a better validation ELBO and keep the best "
        "epoch's weights, 0: off (not given: the model's recipe)",
        group="inference", type=int, least=0)
    val_fraction: float = option(0.1, "share of the training split held out for early "
                                 "stopping", group="inference", above=0, below=1)
    validate: bool = option(False, "Pyro validation (distribution arguments and supports) for "
                            "the whole run; slower", group="inference")
    threads: int = option(
        0, "CPU threads per process (torch.set_num_threads); 0: the free cores (the cores less the "
        "1-minute load average, at least 1) shared among the processes, or OMP_NUM_THREADS where "
        "set (docs: getting-started.md, threads)", group="inference", least=0, most=MOST_THREADS)
    checkpoint_every_steps: int = option(
        0, "also write the checkpoint every K steps within epochs (0: at epoch ends only)",
        group="inference", least=0)
    check_every_steps: int = option(50, "read the device-side divergence flag every K steps "
                                    "(and at every checkpoint and epoch end; 0: only there)",
                                    group="inference", least=0)
    # the trainer
    lr_schedule: str = option(
        "constant", "the learning rate over the run: constant; cosine or linear decay to "
        "--lr-min over all steps (after --warmup-steps); plateau: halved at the N-th epoch in a "
        "row without a better validation ELBO, N half --early-stop's patience (at least 1), or 5 "
        "without it", group="trainer", choices=("constant", "cosine", "linear", "plateau"))
    warmup_steps: int = option(0, "steps of linear warm-up from lr / N to --lr (before cosine, "
                               "linear or constant)", group="trainer", least=0)
    lr_min: float = option(0.0, "the learning rate cosine and linear decay end at, and plateau's "
                           "floor", group="trainer", least=0)
    clip_norm: float = option(0.0, "clip the global gradient norm (all parameters, after the "
                              "sum over processes) at C (0: off); the run counts the steps "
                              "clipped", group="trainer", least=0)
    precision: str = option(
        "fp32", "bf16: the networks run under torch.autocast in bfloat16, log-densities, the "
        "ELBO, the KL and Adam in float32 (docs: howto/trainer-options.md, when it pays); fp16 is "
        "refused (it needs a gradient scaler)", group="trainer", choices=("fp32", "bf16", "fp16"))
    ema: float = option(
        0.0, "decay D of an exponential moving average of the weights, updated every step and "
        "used to validate, evaluate, draw and save (the raw weights are kept for resuming; 0: "
        "off). It starts at the initial weights and spans about 1/(1-D) steps: keep that well "
        "below the run's steps (0.99 for a few thousand)", group="trainer", least=0, below=1)
    kl_warmup: int = option(0, "the latent sites' weight rises linearly from 0 in epoch 1 to 1 "
                            "(times the model's --beta) in epoch N + 1 (0: off)",
                            group="trainer", least=0)
    log: str = option(
        "none", "live logging: tensorboard (event files in the run directory) or mlflow (a local "
        "store in the run directory); pip install -e \".[tensorboard]\" or \".[mlflow]\" "
        "(--logger: the same, a spelling torchrun's own --log-dir does not swallow)",
        group="trainer", choices=("none", "tensorboard", "mlflow"), aliases=("--logger",))
    log_every_steps: int = option(50, "with --log: training scalars every K steps",
                                  group="trainer", least=1)
    # evaluation
    eval_particles: int = option(10, "samples per test image for the test ELBO of each "
                                 "epoch (the final one: --eval-iwae's K where given)",
                                 group="evaluation and output", least=1, most=MOST_SAMPLES)
    eval_iwae: int = option(0, "also estimate log p(x) by the IWAE bound with K samples "
                            "(0: off)", group="evaluation and output", least=0, most=MOST_SAMPLES)
    # output
    out: str | None = option(None, "run directory (default: runs/<model>-<time>)",
                             group="evaluation and output", type=str)
    overwrite: bool = option(False, "replace what the run directory holds: every file in it is "
                             "deleted when the new run writes its first checkpoint",
                             group="evaluation and output")

    def validate_options(self, keys: str | None = None) -> None:
        """Coerce each option to its type and check its range; :class:`UsageError` names the
        first bad one (as a flag, or as ``keys + name``, a key of a file)."""
        if not isinstance(self.model, str | type):
            raise UsageError(f"{flag('model', keys)} takes a registered model name, "
                             f"module:Class or a class, got {self.model!r}")
        check_fields(self, keys, skip=("model", "model_options"))
        if self.jit and self.compile:
            raise UsageError("--jit and --compile are two ways to compile the step; drop one "
                             "(--compile also compiles the backward pass and Adam)")
        if self.precision == "fp16":
            raise UsageError("--precision fp16 needs a gradient scaler, which this version does "
                             "not keep exact under --resume; use --precision bf16")
        if self.lr_schedule == "plateau" and self.warmup_steps:
            raise UsageError("--lr-schedule plateau takes no warm-up; drop --warmup-steps or "
                             "use cosine, linear or constant")

    __post_init__ = validate_options

    def with_recipe(self, recipe: Mapping[str, Any]) -> TrainConfig:
        """This config with what the user left at None taken from the family's ``recipe``
        (then :data:`RECIPE`), and the checks that need the estimator."""
        chosen = {name: {**RECIPE, **recipe}[name] for name in RECIPE
                  if getattr(self, name) is None}
        config = dataclasses.replace(self, **chosen)
        if config.jit and config.elbo not in ("mc", "analytic"):
            raise UsageError(f"--jit with --elbo {config.elbo} is not supported here; drop "
                             "--jit or use --elbo mc|analytic")
        if config.elbo == "rws" and config.particles < 2:
            raise UsageError("--elbo rws weighs K particles against each other; give "
                             "--particles K with K >= 2 (e.g. 5)")
        if config.lr_min >= config.lr and config.lr_schedule in ("cosine", "linear", "plateau"):
            raise UsageError(f"--lr-min {config.lr_min:g} must lie below --lr {config.lr:g}")
        if config.elbo in ("iwae", "iwae-dreg") and config.particles < 2:
            raise UsageError(f"--elbo {config.elbo} with one particle is the plain ELBO; give "
                             "--particles K with K >= 2 (e.g. 5)")
        return config

    def to_dict(self) -> dict:
        """The options as JSON values (``config.json``): the model by name (a class: its
        ``module:Class``), its options as a dict, tuples as lists."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.model, type):
            d["model"] = f"{self.model.__module__}:{self.model.__qualname__}"
        d["model_options"] = options_dict(self.model_options)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        """Rebuild from ``config.json``, ignoring keys this version does not know; a bad
        value is named by its key (the model's options stay as recorded: a flat dict, as
        older versions wrote, keeps them at the top level; the session picks them out)."""
        if not isinstance(d, dict):
            raise UsageError(f"a run config is a JSON object of options, got "
                             f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(config, f.name, d[f.name] if f.name in d else field_default(f))
        if "model_options" not in d:  # a flat record: every unknown key may be an option
            config.model_options = {k: v for k, v in d.items() if k not in known}
        if not isinstance(config.model_options, dict):
            raise UsageError(f"key 'model_options' takes an object of the model's options, "
                             f"got {config.model_options!r}")
        config.validate_options(keys="")
        return config


def options_dict(options: Any) -> dict[str, Any]:
    """A model's options as JSON-ready values (tuples as lists), for ``config.json``."""
    d = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
