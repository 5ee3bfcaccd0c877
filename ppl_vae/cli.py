"""The command lines ``train``, ``evaluate``, ``compare`` and ``experiment``: parsers built
from the option dataclasses (:func:`add_options`), and :func:`main_wrapper`, which turns
:class:`UsageError` into ``prog: error: ...`` and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import RECIPE, TrainConfig, field_default, flag
from .distributed import first_to_report, launched, lost_a_peer
from .errors import (
    Note,
    UsageError,
    command_line,
    explain,
    first_line,
    from_our_code,
    users_frames,
)
from .interrupt import Interrupted, signals
from .models import MODELS, get_model, options_class, parse_model_opts
from .models.options import check_keys

PROG = "python -m ppl_vae"


# -- what every command line here is made of --------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Every option shows its default: ``(default: X)``, or ``(off unless given)`` for an
    on/off flag such as ``--no-download``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return f"{text} (off unless given)"
        shown = getattr(action, "shown_default", action.default)
        if shown is argparse.SUPPRESS:
            return text
        if isinstance(shown, list | tuple):
            shown = " ".join(map(str, shown)) or "none"
        return f"{text} (default: {'none' if shown is None else shown})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: ... (see --help)``, whose
    help shows every default (:class:`HelpFormatter`), and which takes no abbreviations
    (``--beta`` on a model without that option would be ``--beta1``, Adam's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, "formatter_class": HelpFormatter,
                                   **kwargs})

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if _main_rank() else None)


def closed_pipe_is_fine(main: Callable[..., int]) -> Callable[..., int]:
    """A reader that stops early (``--help | head``) is no error: stop writing, exit 0."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            with contextlib.suppress(OSError):  # (Python's own flush at exit would fail too)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return wrapped


def main_wrapper(prog: str, run: Callable[[Sequence[str] | None], int]
                 ) -> Callable[[Sequence[str] | None], int]:
    """Turn :class:`UsageError` into ``prog: error: message`` on stderr and exit status 2.

    Python warnings raised during the run (Pyro's, torch's) are held back and shown once
    it has finished: after its output when it succeeds (or fails with a traceback), never
    when it ends in the one error line or an interruption."""

    @closed_pipe_is_fine
    def main(argv: Sequence[str] | None = None) -> int:
        status = 0  # (kept by a traceback, which the warnings may explain)
        try:
            with warnings.catch_warnings(record=True) as held:
                status = guarded(argv)
        finally:
            if status in (0, None):  # success or a traceback: what was held back, after it
                notes = {str(w.message) for w in held if issubclass(w.category, Note)}
                for note in sorted(notes):  # (the package's own: a line, not a source line)
                    print(f"{prog}: note: {note}", file=sys.stderr)
                for w in held:
                    if not issubclass(w.category, Note):
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno,
                                             w.file, w.line)
        if launched() and status == 0:  # a finished torchrun worker leaves without gloo's
            sys.stdout.flush()  # teardown, which now and then aborts at exit (SIGABRT: the
            sys.stderr.flush()  # job would fail)
            os._exit(0)
        return status

    def guarded(argv: Sequence[str] | None) -> int:
        try:  # (SIGTERM too ends any command through its clean-ups, as SIGINT does)
            with command_line(), signals():
                return run(argv)
        except UsageError as e:  # exit 2; a diverged run 3
            if first_to_report():
                with command_line():
                    print(f"{prog}: error: {e}", file=sys.stderr)
            return getattr(e, "exit_status", 2)
        except Interrupted as e:  # a run that checkpointed on SIGINT/SIGTERM: 130/143
            if _main_rank() and first_to_report():  # (not where another rank failed first)
                text = e.message or f"interrupted by {signal.Signals(e.signum).name}"
                print(f"{prog}: {text}", file=sys.stderr)
            return e.status
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except SystemExit as e:  # argparse's own (--help, usage) pass; the user's code's: one line
            theirs = users_frames(traceback.extract_tb(e.__traceback__))
            if not theirs:
                raise
            if first_to_report():
                at = theirs[-1]
                print(f"{prog}: error: the model's code exited (SystemExit({e.code!r}) in "
                      f"{at.name} at {os.path.basename(at.filename)}:{at.lineno}); raise an "
                      "exception there instead", file=sys.stderr)
            return 2
        except Exception as e:
            if lost_a_peer(e):  # under torchrun: another process failed first
                if first_to_report():  # none said why (it was killed): say so, once
                    print(f"{prog}: error: another process of this torchrun job died "
                          "(torchrun's report below names it); continue with --resume RUN_DIR "
                          "where the run has a checkpoint", file=sys.stderr)
                return 1
            # the user's model or guide raised where no hook says so (scoring a split, say):
            # exit 2, the call and the user's frames; anything else is a traceback
            theirs = users_frames(traceback.extract_tb(e.__traceback__))
            if not theirs or from_our_code(e):
                raise
            if first_to_report():
                print(f"{prog}: error: {explain(e, theirs[-1].name)}", file=sys.stderr)
            return 2

    return main


def _main_rank() -> bool:
    """Not a non-zero torchrun rank (rank 0 alone prints an interruption's line and results)."""
    return os.environ.get("RANK", "0") == "0"


# -- parsers built from option dataclasses ----------------------------------------------------
def add_options(parser: argparse.ArgumentParser, options: type, *, skip: Sequence[str] = (),
                default_group: str | None = None, groups: dict | None = None,
                suppress: bool = False) -> dict:
    """The fields of dataclass ``options`` as flags ``--name``, typed by their default (else
    their metadata's ``type``: int, float or str; other fields are left out; a bool on by
    default is ``--no-name``, with ``off_help``, and the other way is taken unlisted; a tuple
    takes one or more values), with the
    metadata's ``help``, ``choices``, ``aliases``, ``metavar``, ``required``, ``action`` and
    ``nargs``, in argument groups by ``group`` (else ``default_group``, else the parser's own).
    With ``suppress`` only the options given are parsed. Returns the groups, by name."""
    groups = {} if groups is None else groups
    for f in dataclasses.fields(options):
        meta, name, default = f.metadata, f.name, field_default(f)
        if name in skip:
            continue
        group = meta.get("group", default_group)
        g = parser if group is None else groups.get(group) or groups.setdefault(
            group, parser.add_argument_group(group))
        text, flags = meta.get("help", ""), [flag(name), *meta.get("aliases", ())]
        if isinstance(default, bool):
            flags = ["--no-" + name.replace("_", "-") if default else flag(name)]
            kw = {"action": "store_false" if default else "store_true", "help": (
                meta.get("off_help") or f"set {name} off ({text})") if default else text or name}
        else:
            many = isinstance(default, tuple | list)
            types = {type(v) for v in (default if many else [default]) if v is not None} or \
                {meta.get("type")}
            if len(types) != 1 or not types <= {int, float, str}:
                continue
            kw = {"help": text or name, "type": types.pop(), **{k: meta[k] for k in (
                "choices", "metavar", "required", "action") if meta.get(k)}}
            kw.update({"nargs": meta.get("nargs", "+")} if many else {})
        g.add_argument(*flags, dest=name, default=argparse.SUPPRESS if suppress else default,
                       **kw).shown_default = default
        if isinstance(default, bool):  # the other way, unlisted: to undo a --config file's
            g.add_argument(flag(name) if default else "--no-" + name.replace("_", "-"),
                           dest=name, action="store_true" if default else "store_false",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return groups


TRAIN_ONLY = ("elbo", "particles", "jit", "compile", "early_stop", "val_fraction", "eval_iwae",
              "checkpoint_every_steps", "check_every_steps", "lr_schedule", "warmup_steps",
              "lr_min", "clip_norm", "precision", "ema", "kl_warmup", "log", "log_every_steps")
"""TrainConfig's fields that ``compare`` neither offers nor reads from a ``--config`` file: its
race takes the plain SVI step of each estimator."""


def train_parser(model: str | type = "vae", compare: bool = False) -> Parser:
    """The parser of ``train`` (or ``compare``) with ``model``'s option group."""
    from .evaluation.comparison import CompareConfig

    cls = get_model(model)
    p = Parser(prog=f"{PROG} {'compare' if compare else 'train'}",
               description="Compare ELBO estimators on one model: bound estimates, gradient "
               "variance and signal-to-noise, and a training race. Runs in one process."
               if compare else "Train a VAE (or any Pyro model/guide pair) by SVI.",
               epilog=f"registered models: {', '.join(sorted(MODELS))}; "
                      "--model NAME --help lists that model's options")
    groups = add_options(p, TrainConfig, skip=TRAIN_ONLY if compare else ())
    recipe = {**RECIPE, **getattr(cls, "recipe", {})}
    for name, value in recipe.items():  # not given: the family's recipe, shown for this --model
        if name in RECIPE and not (compare and name in TRAIN_ONLY):
            p._option_string_actions[flag(name)].shown_default = value
    # a model option named like a run option (lr, seed, ...) is set by --model-opt only
    reserved = {f.name for f in (*dataclasses.fields(TrainConfig),
                                 *dataclasses.fields(CompareConfig))} | {"model_opt", "help"}
    title, fields = f"model options ({cls.__name__})", dataclasses.fields(options_class(cls))
    required = [f.name for f in fields if f.metadata.get("required")]
    g, before = groups.setdefault(title, p.add_argument_group(title)), len(p._actions)
    add_options(p, options_class(cls), skip={*reserved, *required}, default_group=title,
                groups=groups, suppress=True)
    p.model_flags = [a.dest for a in p._actions[before:]]
    only_opt = [f.name for f in fields if f.name not in {*p.model_flags, *required}]
    notes = [f"required: {', '.join(required)}"] if required else []
    notes += [f"the only way for: {', '.join(only_opt)}"] if only_opt else []
    g.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set any option of the model by name, value a Python literal "
                        "(repeatable)" + "".join(f"; {n}" for n in notes))
    if compare:
        add_options(p, CompareConfig, skip=("train",), default_group="comparison",
                    groups=groups)
        p._option_string_actions["--out"].help = "run directory (default: " \
            "runs/compare-<model>-<time>)"
        p._option_string_actions["--overwrite"].help = "replace what the directory holds: " \
            "its files are deleted when the comparison has finished"
    else:
        groups["evaluation and output"].add_argument(
            "--resume", metavar="RUN_DIR", default=None,
            help="continue the run in RUN_DIR exactly from its last checkpoint (its stored "
                 "options; any option given must agree with them)")
    groups["evaluation and output"].add_argument(
        "--config", metavar="FILE", default=None,
        help="read the options from a JSON or YAML file of TrainConfig's fields (" + (
             "the model, data and race; " if compare else "a run's config.json repeats that "
             "run: give it a new --out; ") + "options given on the command line win)")
    return p


def _peek(argv: Sequence[str] | None, flag_: str) -> str | None:
    """The value of ``flag_`` in ``argv`` (None if not given), before the full parser exists."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag_)
    return vars(pre.parse_known_args(argv)[0])[flag_[2:]]


def _parse(argv: Sequence[str] | None, compare: bool = False, model: str | None = None,
           given_only: bool = False) -> dict[str, Any]:
    """Parsed options: TrainConfig's fields, ``model_options``, and compare's own (with
    ``given_only``, just those the command line gives; ``--resume`` is read by :func:`_peek`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    file = _peek(argv, "--config")
    record = options_file(file) if file else {}
    record.pop("overwrite", None)  # (replacing a directory is said on the command line only)
    if record and (given_only or _peek(argv, "--resume")):
        raise UsageError("--config starts a run; --resume continues one with its own "
                         "options: give one of them")
    if compare:  # (a run's config.json: its out is that run's directory)
        record = {k: v for k, v in record.items() if k not in (*TRAIN_ONLY, "out")}
    model = model or _peek(argv, "--model") or record.get("model") or "vae"
    parser = train_parser(model, compare)
    try:  # (a bad value named by its key in the file, not as a flag)
        check_keys(get_model(model), record.get("model_options", {}), "model_options.")
    except UsageError as e:
        raise UsageError(f"--config {file!r}: {e}") from None
    for action in parser._actions if given_only or record else ():
        action.default = argparse.SUPPRESS
    args = vars(parser.parse_args(argv))
    options = {name: args.pop(name) for name in parser.model_flags if name in args}
    options.update(parse_model_opts(args.pop("model_opt", None)))
    args.pop("resume", None)
    args.pop("config", None)
    # the file's options, those given here over them
    return {**record, **args, "model_options": {**record.get("model_options", {}), **options}}


def _unique(pairs: list[tuple[Any, Any]]) -> dict:
    """A mapping from ``pairs``, refusing a key given twice (the last would silently win)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is given twice")
        seen[key] = value
    return seen


def _yaml_loader() -> type:
    """PyYAML's safe loader reading floats as YAML 1.2 does: ``1e-3`` is a number (YAML 1.1,
    PyYAML's default, wants ``1.0e-3`` and reads ``1e-3`` as a string), and refusing a key
    given twice."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # (merge keys, <<: *anchor, first)
            pairs = [(self.construct_object(k, deep=deep), self.construct_object(v, deep=deep))
                     for k, v in node.value]
            _unique(pairs)
            return super().construct_mapping(node, deep=deep)

    number = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(number),
                                 list("-+0123456789."))
    return Loader


def options_file(path: str) -> dict[str, Any]:
    """A file of run options (JSON, or YAML by its suffix): TrainConfig's field names, the
    model's options under ``model_options``; an unknown name is refused (a misspelt option
    would be ignored)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        record = yaml.load(text, _yaml_loader()) if path.lower().endswith((".yaml", ".yml")) \
            else json.loads(text, object_pairs_hook=_unique)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path!r} is not a readable JSON or YAML file of options "
                         f"({type(e).__name__}: {first_line(e, 120)})") from None
    if not isinstance(record, dict):
        what = "nothing" if record is None else f"a {type(record).__name__}"
        raise UsageError(f"--config {path!r} holds {what}, not a mapping of options")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := sorted(set(record) - known, key=str):
        raise UsageError(f"--config {path!r}: {unknown[0]!r} is not an option of a run; the "
                         f"model's own go under 'model_options'")
    if not isinstance(record.get("model_options", {}), dict):
        raise UsageError(f"--config {path!r}: 'model_options' takes a mapping of the model's "
                         "options")
    try:  # (a bad value named by its key in the file, not as a flag)
        TrainConfig.from_dict({**record, "model_options": {}})
    except UsageError as e:
        raise UsageError(f"--config {path!r}: {e}") from None
    return record


def _train(argv: Sequence[str] | None) -> int:
    from .run.train import resume_config, train_run

    run_dir = _peek(argv, "--resume")
    if run_dir is None:
        result = train_run(TrainConfig(**_parse(argv)))
    else:  # the stored options, checked against those given
        given = _parse(argv, model=resume_config(run_dir).model, given_only=True)
        result = train_run(resume_config(run_dir, given), resume=True)
    if not _main_rank():
        return 0  # under torchrun rank 0 reports
    s = result.summary
    _report(s, result.notes, f", {s['n_test']} test images), train ELBO {s['train_elbo']:.2f}, "
            f"{s['train_seconds']:.1f} s of training on {s['device']}")
    print(f"run written to {result.out}")
    return 0


def _report(s: dict, notes: Sequence[str], more: str = ")") -> None:
    """The result lines of ``train`` and ``evaluate``: the test ELBO (``more`` ends its line),
    log p(x) by the IWAE bound where measured, then the notes."""
    print(f"test ELBO {s['test_elbo']:.2f} nats/image ({s['eval_particles']} samples per "
          f"image{more}")
    if "test_log_likelihood_iwae" in s:
        print(f"log p(x) >= {s['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={s['iwae_samples']})")
    for note in notes:
        print(note)


def _one_process(command: str) -> None:
    if launched():
        raise UsageError(f"{command} runs in one process; run it with python -m ppl_vae "
                         f"{command}, not under torchrun with several processes")


def _compare(argv: Sequence[str] | None) -> int:
    from .evaluation.comparison import CompareConfig, compare

    _one_process("compare")
    args = _parse(argv, compare=True)
    own = {f.name: args.pop(f.name) for f in dataclasses.fields(CompareConfig)
           if f.name in args}
    out = args.pop("out", None)
    result = compare(CompareConfig(train=TrainConfig(**args), **own), out)
    print((result.out / "summary.md").read_text())
    print(f"samples per data point: {result.meta['samples']}")
    print(f"comparison written to {result.out}")
    return 0


def evaluate_parser() -> Parser:
    from .evaluation.runs import EvaluateOptions

    p = Parser(prog=f"{PROG} evaluate", description="Re-evaluate a saved run: test ELBO, "
               "log p(x) by the IWAE bound, and the model's own metrics. Runs in one process.")
    add_options(p, EvaluateOptions)
    return p


def _evaluate(argv: Sequence[str] | None) -> int:
    from .evaluation.runs import EvaluateOptions, evaluate_run

    o = EvaluateOptions(**vars(evaluate_parser().parse_args(argv)))
    _one_process("evaluate")
    r = evaluate_run(o.run, o.eval_iwae, o.cuda, o.data_dir, o.eval_particles)
    _report(r, r["notes"])
    return 0


def _experiment(argv: Sequence[str] | None) -> int:
    """``experiment NAME [its options] [--resume] [train's options for its model]``."""
    from .experiments import EXPERIMENTS

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = Parser(prog=f"{PROG} experiment", add_help=False, description="Tables made of "
                 "several training runs, each an ordinary run in its own directory under --out.")
    pre.add_argument("name", choices=list(EXPERIMENTS), help="; ".join(
        f"{k}: {e[3]}" for k, e in EXPERIMENTS.items()))
    if argv[:1] not in ([], ["-h"], ["--help"]) and argv[0] not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {argv[0]!r}; use one of "
                         f"{', '.join(EXPERIMENTS)}")
    run, model, options, _ = EXPERIMENTS.get(argv[0] if argv else "", (None,) * 4)
    if run is not None:
        add_options(pre, options)
    if run is None or argv[1:2] in (["-h"], ["--help"]):
        pre.print_help()
        if run is not None:
            print(f"\nits runs take {PROG} train --model {model}'s options")
        return 0
    known, rest = pre.parse_known_args(argv)
    own = {f.name: getattr(known, f.name) for f in dataclasses.fields(options)}
    args = ["--model", model, *rest]
    if own.get("resume"):  # the table's own options; those given are checked against them
        own["given"] = _parse(args, given_only=True)
        own["quadrants"] = known.quadrants if "--quadrants" in argv else None
    table = run(TrainConfig(**_parse(args)), **own)
    if not _main_rank():
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
