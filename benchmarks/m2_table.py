"""The semi-supervised table (Kingma, Rezende, Mohamed & Welling 2014, table 1): test accuracy
of M1+M2 and of M2 (``--model ssvae`` with ``--m1 50`` / ``--m1 0``) trained with N labelled
images and the rest of the training split unlabelled, beside the same classifier MLP trained
on the N labelled images only, paired by seed; the paper's full-MNIST errors for context.

Every method sees the same data: a fixed 10% of the training split is held out (labels
kept) for early stopping, and the same seeded class-balanced N labels of the rest
(``hide_labels``). The model runs are ``ppl_vae.train_run`` with the family's defaults (enum,
its 50 epochs, alpha 4, Adam 3e-3 with beta1 0.9, batch 128) unless ``--epochs``,
``--model-opt`` (the family's options) or ``--run-opt`` (run options: ``beta1=0.5``) say
otherwise, and ``--early-stop P`` (the package's: validation ELBO, best weights restored).
The classifier is plain PyTorch: the network of q(y|x) (``D -> hidden -> K``, ReLU) on the
pixels, cross-entropy, Adam at the models' learning rate, batch 64 of the labelled rows, as
many steps per epoch as a model epoch and as many epochs, early stopping on its held-out
accuracy with the same patience (best weights kept). Runs go ``--jobs`` at a time, one thread each.

    python benchmarks/m2_table.py --out /tmp/m2                 # MNIST-10k split, ~1 h
    python benchmarks/m2_table.py --dataset digits --labels 50 --epochs 5   # seconds
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ppl_vae import TrainConfig, load_dataset, train_run
from ppl_vae.data import Dataset, hide_labels, pixels
from ppl_vae.models.nets import mlp
from ppl_vae.run.session import resolve

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPER_ERROR = {"m2": {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92},
               "m1+m2": {100: 3.33, 600: 2.59, 1000: 2.40, 3000: 2.18}}
"""Test error (%) on full MNIST (50,000 training images), Kingma et al. 2014, table 1."""
METHODS = {"m1+m2": 50, "m2": 0}  # method -> --m1


def held_out(dataset: str, data_dir: str, labels: int, seed: int, fraction: float) -> Dataset:
    """The data every method of one (labels, seed) cell sees: a fixed held-out share of the
    training split (labelled) and ``labels`` labels of the rest."""
    data = load_dataset(dataset, data_dir, download=False).with_validation(fraction)
    return hide_labels(data, labels, seed)


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        guess = torch.cat([net(pixels(c)).argmax(-1) for c in x.split(4096)])
    return (guess == y).double().mean().item()


def classifier(data: Dataset, hidden: tuple[int, ...], epochs: int, steps_per_epoch: int,
               patience: int, seed: int, batch_size: int = 64, lr: float = 1e-3) -> dict:
    """The MLP ``D -> hidden -> K`` trained by cross-entropy on the labelled training rows
    only; after each epoch of ``steps_per_epoch`` steps its held-out accuracy decides early
    stopping. Test accuracy of the best epoch's weights."""
    torch.manual_seed(seed)
    rows = (data.train.y >= 0).nonzero().squeeze(1)
    x, y = pixels(data.train.x[rows]), data.train.y[rows]
    net = mlp([data.input_dim, *hidden, data.num_classes])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            if len(order) < min(batch_size, len(x)):
                order = torch.cat([order, torch.randperm(len(x), generator=g)])
            idx, order = order[:batch_size], order[batch_size:]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        val = accuracy(net, data.val.x, data.val.y)
        if val > best:
            best, best_epoch, best_state = val, epoch, copy.deepcopy(net.state_dict())
        elif patience and epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    return {"accuracy": accuracy(net, data.test.x, data.test.y), "epoch": best_epoch}


def key_values(pairs: list[str]) -> dict:
    """``["gaussian_scale=0.5"]`` -> ``{"gaussian_scale": 0.5}`` (numbers and tuples read)."""
    opts = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key] = value
    return opts


def one_cell(a: argparse.Namespace, labels: int, seed: int) -> list[dict]:
    """Every method on one (labels, seed): the rows of ``m2_runs.csv``."""
    torch.set_num_threads(1)
    data = held_out(a.dataset, a.data_dir, labels, seed, a.val_fraction)
    steps = math.ceil(len(data.train) / 128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            start = time.perf_counter()
            config = TrainConfig(model="ssvae", dataset=a.dataset, data_dir=a.data_dir,
                                 download=False, labelled=labels, seed=seed, epochs=a.epochs,
                                 early_stop=a.early_stop, threads=1,
                                 labelled_share=a.labelled_share,
                                 model_options={"m1": METHODS[method],
                                                **key_values(a.model_opt)},
                                 **key_values(a.run_opt),
                                 out=f"{tmp}/{method}")
            run = train_run(config, data, progress=False)
            rows.append({"labels": labels, "seed": seed, "method": method,
                         "accuracy": run.summary["test_accuracy"],
                         "epochs": len(run.history), "seconds": time.perf_counter() - start})
        start = time.perf_counter()
        base = classifier(data, (500,), a.epochs, steps, a.early_stop, seed, lr=a.lr)
        rows.append({"labels": labels, "seed": seed, "method": "mlp",
                     "accuracy": base["accuracy"], "epochs": base["epoch"],
                     "seconds": time.perf_counter() - start})
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(runs: list[dict], a: argparse.Namespace, wall: float) -> tuple[str, list[dict]]:
    """The Markdown table (one row per label count) and its CSV rows."""
    out, md = [], []
    head = ["labels", "MLP (labelled only)"]
    for method in a.methods:
        head += [f"{method.upper()}", f"{method.upper()} − MLP (paired)",
                 f"paper {method.upper()} (full MNIST)"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in a.labels:
        acc = {m: {r["seed"]: 100 * r["accuracy"] for r in runs
                   if r["labels"] == n and r["method"] == m} for m in ["mlp", *a.methods]}
        seeds = sorted(acc["mlp"])
        mlp_mean, mlp_sd = mean_sd([acc["mlp"][s] for s in seeds])
        row = {"labels": n, "mlp_mean": round(mlp_mean, 2), "mlp_sd": round(mlp_sd, 2),
               "mlp_per_seed": " ".join(f"{acc['mlp'][s]:.2f}" for s in seeds)}
        cells = [str(n), f"{mlp_mean:.2f} ± {mlp_sd:.2f}"]
        for m in a.methods:
            mean, sd = mean_sd([acc[m][s] for s in seeds])
            diff = [acc[m][s] - acc["mlp"][s] for s in seeds]
            d, d_sd = mean_sd(diff)
            paper = PAPER_ERROR[m].get(n)
            row.update({f"{m}_mean": round(mean, 2), f"{m}_sd": round(sd, 2),
                        f"{m}_minus_mlp": round(d, 2), f"{m}_minus_mlp_sd": round(d_sd, 2),
                        f"{m}_per_seed": " ".join(f"{acc[m][s]:.2f}" for s in seeds),
                        f"{m}_seconds_mean": round(statistics.fmean(
                            r["seconds"] for r in runs if r["labels"] == n and r["method"] == m
                        ), 1),
                        f"paper_{m}_accuracy_full_mnist": "" if paper is None else 100 - paper})
            cells += [f"{mean:.2f} ± {sd:.2f}",
                      f"{d:+.2f} ± {d_sd:.2f} ({' '.join(f'{v:+.1f}' for v in diff)})",
                      "–" if paper is None else f"{100 - paper:.2f}"]
        out.append(row)
        md.append("| " + " | ".join(cells) + " |")
    seconds = {m: statistics.fmean(r["seconds"] for r in runs if r["method"] == m)
               for m in ["mlp", *a.methods]}
    caption = (f"Test accuracy (%) on the {a.dataset} test split, mean ± sd over seeds "
               f"{', '.join(map(str, a.seeds))}; the paired difference per seed in brackets. "
               f"{a.epochs} epochs, early stopping with patience {a.early_stop} on the same "
               f"held-out {a.val_fraction:.0%} of the training split; "
               f"{' '.join(a.model_opt + a.run_opt) or 'the family defaults'}, "
               f"--labelled-share {a.labelled_share}; Adam's learning rate "
               f"{a.lr:g} for the models "
               "and the classifier. Seconds per run (one thread): "
               + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items())
               + f". Wall time {wall / 60:.1f} min with {a.jobs} job(s). Paper: Kingma et "
               "al. 2014, full MNIST (50,000 training images).")
    return caption + "\n\n" + "\n".join(md) + "\n", out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--labels", type=int, nargs="+", default=[100, 600, 1000, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, help="default: the family's recipe")
    p.add_argument("--early-stop", type=int, default=10, help="patience in epochs (0: off)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--labelled-share", type=float, default=0.0)
    p.add_argument("--model-opt", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ssvae options for both methods (alpha=2); else its defaults")
    p.add_argument("--run-opt", nargs="*", default=[], metavar="KEY=VALUE",
                   help="a run option of the models (TrainConfig), e.g. beta1=0.5 or lr=1e-3; "
                        "the classifier takes the same lr")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", help="write m2_table.csv, m2_runs.csv and m2_table.md here")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/m2-table.md and .csv")
    a = p.parse_args()
    recipe = resolve(TrainConfig(model="ssvae", epochs=a.epochs, **key_values(a.run_opt)))[0]
    a.epochs, a.lr = recipe.epochs, recipe.lr  # the classifier's too
    cells = [(n, s) for n in a.labels for s in a.seeds]
    runs: list[dict] = []
    began = time.perf_counter()
    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool, \
            tqdm(total=len(cells), desc="M2 table", unit="cell") as bar:
        for rows in pool.map(one_cell, [a] * len(cells), [n for n, _ in cells],
                             [s for _, s in cells]):
            runs += rows
            bar.update()
            tqdm.write(f"labels {rows[0]['labels']} seed {rows[0]['seed']}: " + ", ".join(
                f"{r['method']} {100 * r['accuracy']:.2f} ({r['seconds']:.0f} s)" for r in rows))
    text, rows = table(runs, a, time.perf_counter() - began)
    print("\n" + text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in (("m2_table.csv", rows), ("m2_runs.csv", runs)):
            with open(out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(data[0]))
                writer.writeheader()
                writer.writerows(data)
        (out / "m2_table.md").write_text(text)
    if a.docs:
        from results_page import write_page

        write_page("m2-table", "Semi-supervised accuracy: M2 and M1+M2", text, rows,
                   seeds=a.seeds, about=__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
