"""The command line: ``python -m ppl_vae {train,evaluate,compare,appendix,experiment}`` (also the
``ppl-vae`` script, and ``python -m ppl_vae.train`` etc.).

The options of ``train`` and ``compare`` come from :class:`~ppl_vae.config.TrainConfig` and
from the chosen model's option group (its ``Options`` dataclass, or its constructor's
keywords), so ``--model NAME --help`` lists that model's. Bad input ends in one line
``prog: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from .commandline import HelpFormatter, Parser, main_wrapper
from .config import TrainConfig
from .errors import UsageError
from .models import MODELS, get_model, option_specs, parse_model_opts

PROG = "python -m ppl_vae"


# -- building parsers from option dataclasses ------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(group, name: str, default: Any, help: str, choices=None, *,
                suppress: bool = False, off_help: str | None = None,
                type_: type | None = None) -> bool:
    """Add ``--name`` typed by ``type_`` or its default (``--no-name`` for an option that is
    on by default, with ``off_help``); False when the type has no flag form."""
    kw: dict[str, Any] = {"help": help or name}
    if isinstance(default, bool):
        if default:
            kw["help"] = off_help or f"set {name} off ({help})"
        action = group.add_argument("--no-" + name.replace("_", "-") if default else _flag(name),
                                    dest=name, action="store_false" if default else "store_true",
                                    **kw)
        if suppress:  # only options the user gives reach the model
            action.default = argparse.SUPPRESS
        return True
    if isinstance(default, tuple | list):
        types = {type(v) for v in default}
        if not default or len(types) != 1 or not types <= {int, float, str}:
            return False
        kw.update(nargs="+", type=types.pop())
    elif isinstance(default, int | float | str):
        kw["type"] = type(default)
    elif type_ is not None:
        kw["type"] = type_
    else:
        return False
    if choices:
        kw["choices"] = choices
    action = group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS
                                if suppress else default, **kw)
    action.shown_default = default
    return True


TRAIN_ONLY = ("elbo", "particles", "jit", "compile", "early_stop", "val_fraction", "eval_iwae",
              "checkpoint_every_steps", "check_every_steps")


def train_parser(model: str | type = "vae", compare: bool = False) -> Parser:
    """The parser of ``train`` (or ``compare``) with ``model``'s option group."""
    cls = get_model(model)
    name = "compare" if compare else "train"
    p = Parser(prog=f"{PROG} {name}", formatter_class=HelpFormatter,
               description=COMPARE_DESCRIPTION if compare else
               "Train a VAE (or any Pyro model/guide pair) by SVI.",
               epilog=f"registered models: {', '.join(sorted(MODELS))}; "
                      "--model NAME --help lists that model's options")
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_options" or (compare and f.name in TRAIN_ONLY):
            continue
        group_name = f.metadata.get("group", "data")
        g = groups.setdefault(group_name, p.add_argument_group(group_name))
        if f.name == "model":
            g.add_argument("--model", default="vae", help="registered model name ("
                           + ", ".join(sorted(MODELS)) + ") or module:Class for your own")
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        helptext = f.metadata["help"]
        if f.name == "batch_size":
            helptext = ("rows per SVI step and process; under torchrun --nproc_per_node N the "
                        "global batch is N times this")
        _add_option(g, f.name, default, helptext, f.metadata.get("choices"),
                    off_help=f.metadata.get("off_help"), type_=f.metadata.get("type"))
    # a model option named like a run option (lr, seed, ...) is set by --model-opt only
    reserved = {f.name for f in dataclasses.fields(TrainConfig)} | set(COMPARE_ONLY) | {
        "particles", "model_opt", "help"}
    g = p.add_argument_group(f"model options ({cls.__name__})")
    p.model_flags, only_opt, required = [], [], []
    for spec in option_specs(cls):
        if spec.required:
            required.append(spec.name)
        elif spec.name not in reserved and _add_option(
                g, spec.name, spec.default, spec.help, spec.choices, suppress=True,
                off_help=spec.off_help):
            p.model_flags.append(spec.name)
        else:
            only_opt.append(spec.name)
    notes = [f"required: {', '.join(required)}"] if required else []
    notes += [f"the only way for: {', '.join(only_opt)}"] if only_opt else []
    g.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set any option of the model by name, value a Python literal "
                        "(repeatable)" + "".join(f"; {n}" for n in notes))
    if not compare:
        groups["evaluation and output"].add_argument(
            "--resume", metavar="RUN_DIR", default=None,
            help="continue the run in RUN_DIR exactly from its last checkpoint (its stored "
                 "options; any option given must agree with them)")
    if compare:
        g = groups["inference"]
        g.add_argument("--particles", type=int, nargs="+", default=[1, 10],
                       help="particle counts of the mc and analytic estimators to compare "
                            "(the largest is also the K of the race's IWAE racer)")
        g = p.add_argument_group("comparison")
        g.add_argument("--run", default=None,
                       help="start from this training run's checkpoint (default: a fresh model)")
        g.add_argument("--warmup-epochs", type=int, default=0,
                       help="without --run: pre-train the model (its pretrain hook) and train "
                            "this many epochs (mc) before measuring")
        g.add_argument("--repeats", type=int, default=200,
                       help="repeated estimates and gradient draws")
        g.add_argument("--iwae-samples", type=int, nargs="+", default=[1, 10, 100],
                       help="K of the IWAE bound estimates")
        g.add_argument("--eval-batch", type=int, default=128,
                       help="test images in the fixed evaluation batch")
        g.add_argument("--no-race", dest="race", action="store_false",
                       help="skip the training race")
        g.add_argument("--target", type=float, default=None,
                       help="test ELBO the race times (default: the worst final one)")
    return p


def _resume_dir(argv: Sequence[str] | None) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume")
    return pre.parse_known_args(argv)[0].resume


def _model_in(argv: Sequence[str] | None) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="vae")
    known, _ = pre.parse_known_args(argv)
    return known.model


_UNSET = object()


def _parse(argv: Sequence[str] | None, compare: bool = False, model: str | None = None,
           given_only: bool = False) -> dict[str, Any]:
    """Parsed options: TrainConfig's fields, ``model_options``, and compare's own (with
    ``given_only``, just those the command line gives)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = train_parser(model or _model_in(argv), compare)
    unset = argparse.Namespace(**{k: _UNSET for k in vars(parser.parse_args([]))})
    args = vars(parser.parse_args(argv, namespace=unset if given_only else None))
    if given_only:
        args = {k: v for k, v in args.items() if v is not _UNSET}
    options = {name: args.pop(name) for name in parser.model_flags if name in args}
    options.update(parse_model_opts(args.pop("model_opt", [])))
    args["model_options"] = options
    return args


def _train(argv: Sequence[str] | None) -> int:
    from .run.train import resume_config, train_run

    run_dir = _resume_dir(argv)
    if run_dir is None:
        args = _parse(argv)
        args.pop("resume")
        result = train_run(TrainConfig(**args))
    else:  # the stored options, checked against those given
        given = _parse(argv, model=resume_config(run_dir).model_name, given_only=True)
        given.pop("resume")
        result = train_run(resume_config(run_dir, given), resume=True)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports
    s = result.summary
    print(f"test ELBO {s['test_elbo']:.2f} nats/image ({s['eval_particles']} samples per image, "
          f"{s['n_test']} test images), train ELBO {s['train_elbo']:.2f}, "
          f"{s['train_seconds']:.1f} s of training on {s['device']}")
    if "test_log_likelihood_iwae" in s:
        print(f"log p(x) >= {s['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={s['iwae_samples']})")
    for note in result.notes:
        print(note)
    print(f"run written to {result.out}")
    return 0


COMPARE_DESCRIPTION = ("Compare ELBO estimators on one model: bound estimates, gradient "
                       "variance and signal-to-noise, and a training race. Runs in one "
                       "process.")
COMPARE_ONLY = ("run", "warmup_epochs", "repeats", "iwae_samples", "eval_batch", "race", "target")


def _one_process(command: str) -> None:
    from .run.distributed import launched

    if launched():
        raise UsageError(f"{command} runs in one process; run it with python -m ppl_vae "
                         f"{command}, not under torchrun with several processes")


def _compare(argv: Sequence[str] | None) -> int:
    from .evaluation.comparison import CompareConfig, compare

    _one_process("compare")
    args = _parse(argv, compare=True)
    extra = {k: args.pop(k) for k in COMPARE_ONLY}
    particles = args.pop("particles")
    out = args.pop("out")
    config = TrainConfig(**args)
    result = compare(CompareConfig(train=config, particles=tuple(particles), **extra), out)
    print((result.out / "summary.md").read_text())
    print(f"samples per data point: {result.meta['samples']}")
    print(f"comparison written to {result.out}")
    return 0


def evaluate_parser() -> Parser:
    p = Parser(prog=f"{PROG} evaluate", formatter_class=HelpFormatter,
               description="Re-evaluate a saved run: test ELBO, log p(x) by the IWAE bound, "
                           "and the model's own metrics. Runs in one process.")
    p.add_argument("--run", required=True, help="run directory written by train")
    p.add_argument("--eval-iwae", type=int, default=0, metavar="K",
                   help="IWAE log-likelihood bound with K samples per image (0: off)")
    p.add_argument("--eval-particles", type=int, default=None,
                   help="samples per image for the test ELBO (default: the run's; with "
                        "--eval-iwae the ELBO uses the same K samples)")
    p.add_argument("--data-dir", default=None, help="dataset root, if it moved (default: the "
                                                     "run's)")
    p.add_argument("--cuda", action="store_true", help="evaluate on the GPU")
    return p


def _evaluate(argv: Sequence[str] | None) -> int:
    from .evaluation.runs import evaluate_run

    a = evaluate_parser().parse_args(argv)
    _one_process("evaluate")
    if a.eval_iwae < 0 or (a.eval_particles is not None and a.eval_particles < 1):
        raise UsageError("--eval-iwae must be >= 0 and --eval-particles >= 1")
    r = evaluate_run(a.run, a.eval_iwae, a.cuda, a.data_dir, a.eval_particles)
    print(f"test ELBO {r['test_elbo']:.2f} nats/image ({r['eval_particles']} samples per image)")
    if "test_log_likelihood_iwae" in r:
        print(f"log p(x) >= {r['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={r['iwae_samples']})")
    for note in r["notes"]:
        print(note)
    return 0


def _experiment(argv: Sequence[str] | None) -> int:
    """``experiment NAME [its arguments] [--resume] [train's options for its model]``."""
    from .experiments import EXPERIMENTS

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = Parser(prog=f"{PROG} experiment", formatter_class=HelpFormatter, add_help=False,
                 description="Tables made of several training runs, each an ordinary run "
                             "in its own directory under --out.")
    pre.add_argument("name", choices=list(EXPERIMENTS), help="; ".join(
        f"{k}: {e.help}" for k, e in EXPERIMENTS.items()))
    pre.add_argument("--resume", action="store_true", help="continue the table in --out: "
                     "finished runs are read back, an interrupted one resumes")
    if argv[:1] not in ([], ["-h"], ["--help"]) and argv[0] not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {argv[0]!r}; use one of "
                         f"{', '.join(EXPERIMENTS)}")
    chosen = EXPERIMENTS.get(argv[0]) if argv else None
    for name, kw in (chosen.arguments if chosen else {}).items():
        pre.add_argument(_flag(name), **kw)
    if chosen is None or argv[1:2] in (["-h"], ["--help"]):
        pre.print_help()
        if chosen is not None:
            print(f"\nits runs take {PROG} train --model {chosen.model}'s options")
        return 0
    known, rest = pre.parse_known_args(argv)
    args = _parse(["--model", chosen.model, *rest])
    args.pop("resume")
    table = chosen.run(TrainConfig(**args), resume=known.resume,
                       **{k: getattr(known, k) for k in chosen.arguments})
    if os.environ.get("RANK", "0") != "0":
        return 0
    for name, run in table.runs.items():
        for note in run.notes:  # first lines: the table follows
            print(f"{name}: {note.splitlines()[0]}")
    print(table.table)
    print(f"{table.seconds:.0f} s in all; runs written to {table.out}")
    return 0


train_main = main_wrapper(f"{PROG} train", _train)
experiment_main = main_wrapper(f"{PROG} experiment", _experiment)
evaluate_main = main_wrapper(f"{PROG} evaluate", _evaluate)
compare_main = main_wrapper(f"{PROG} compare", _compare)


def appendix_main(argv: Sequence[str] | None = None) -> int:
    from .appendix.__main__ import main as appendix

    return appendix(argv)


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "compare": compare_main,
            "appendix": appendix_main, "experiment": experiment_main}


def main(argv: Sequence[str] | None = None) -> int:
    """``ppl-vae COMMAND [options]``: the entry point of ``python -m ppl_vae``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]\n\n"
                  "train     train a model by SVI\n"
                  "evaluate  re-evaluate a saved run\n"
                  "compare   compare ELBO estimators on one model\n"
                  "appendix  MLE/MAP with AutoDelta, NUTS and the amortization gaps\n"
                  "experiment  tables of several runs (cvae-quadrants)\n\n"
                  f"{PROG} COMMAND --help lists a command's options")
            return 0
        got = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{PROG}: error: {got}; use one of {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
