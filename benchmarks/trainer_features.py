"""What three of the trainer's features (issue 32) do on the MNIST-10k split, batch 128, Adam
1e-3, one thread, over several seeds: ``--precision bf16`` against float32 (training images/s
and test ELBO, the 784-400-20 VAE and the convolutional VAE), weight averaging ``--ema D``
(test ELBO) and KL warm-up ``--kl-warmup N`` (test ELBO and active latent units), each
against the same runs without it.

What is measured is what users get: every run is the package's own session, step and loop.

* **bf16 against fp32**: for every seed, two :class:`ppl_vae.Session` s of the same config
  but ``precision`` (the same initial weights), each training by its own ``session.step()``
  (the run's step, bf16 autocast included) in a :class:`ppl_vae.run.loop.Loop`, one epoch
  each in turn, the order swapped every epoch, in one process, so that the machine's drift
  falls on both alike. Images/s: training images per second of training steps (the loop's
  own clock), the median over all epochs after each seed's first. Test ELBO: after the last
  epoch, scored in float32 (10 samples per image, ``Session.score``, as a run's evaluation).
* **EMA and KL warm-up**: each setting and seed is one ``ppl_vae.train`` run of the VAE
  (784-400-20, ``--elbo mc``, the VAE's recipe) for ``--epochs-long`` epochs; the test ELBO
  after ``--at`` epochs is that epoch's row of the run's ``metrics.csv`` (the run's own
  evaluation, 10 samples per image, with the averaged weights under ``--ema``): a run's
  first epochs do not depend on how many follow (constant learning rate; the KL weight and
  the average depend only on the steps taken), so one long run gives the shorter run's
  numbers exactly. The runs without EMA and warm-up are shared by both tables.
* **Active units** (Burda et al. 2016): latent unit u is active if the variance over the
  test images of E_q(z|x)[z_u] (the encoder's mean, ``encode(x)[0]``, of the trained model)
  exceeds 0.01. KL warm-up is measured at the default d = 20 and at d = 50 (``--kl-z-dims``),
  Burda et al.'s size, where units can fall inactive.

Numbers are the mean ± sd over the seeds (and, for the bf16 gap, the mean ± sd of the paired
per-seed differences). Runs are written under a temporary directory (``--out`` keeps them).

    OMP_NUM_THREADS=1 python benchmarks/trainer_features.py             # about 30 min, 2 cores
    OMP_NUM_THREADS=1 python benchmarks/trainer_features.py --docs      # and the docs' page
    OMP_NUM_THREADS=1 python benchmarks/trainer_features.py --dataset digits --seeds 0 \\
        --epochs-mlp 2 --epochs-conv 2 --epochs-long 3 --at 2 3          # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch

from ppl_vae import Session, TrainConfig, train
from ppl_vae.data import load_dataset
from ppl_vae.models import hook
from ppl_vae.run.loop import Loop

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PRECISIONS = ("fp32", "bf16")
ACTIVE = 0.01  # Burda et al.'s threshold on Cov_x(E_q[z_u])


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], digits: int = 2) -> str:
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def config(a, **changes) -> TrainConfig:
    return TrainConfig(**{"dataset": a.dataset, "data_dir": a.data_dir, "download": False,
                          "batch_size": 128, "lr": 1e-3, "threads": a.threads, **changes})


# -- bf16 against fp32 ---------------------------------------------------------------------------
def precision(a, data, model: str, epochs: int) -> dict[str, dict]:
    """Both precisions of ``model``, alternating epoch by epoch, for every seed."""
    speed = {p: [] for p in PRECISIONS}
    elbo = {p: [] for p in PRECISIONS}
    for seed in a.seeds:
        sessions, loops = {}, {}
        for p in PRECISIONS:
            s = sessions[p] = Session(config(a, model=model, epochs=epochs, seed=seed,
                                             precision=p), data, progress=False)
            loops[p] = Loop(s, s.step())
        for epoch in range(epochs):
            for p in (PRECISIONS if epoch % 2 == 0 else PRECISIONS[::-1]):
                _, seconds, _ = loops[p].epoch()
                if epoch:
                    speed[p].append(len(data.train) / seconds)
        for p, s in sessions.items():
            s.module.eval()
            elbo[p].append(s.score(s.data.test, 10).elbo.mean().item())
        print(f"{model} seed {seed}: test ELBO " + ", ".join(
            f"{p} {elbo[p][-1]:.2f}" for p in PRECISIONS) + "; img/s (median so far) " +
            ", ".join(f"{p} {statistics.median(speed[p]):,.0f}" for p in PRECISIONS if speed[p]),
            flush=True)
    base = statistics.median(speed["fp32"])
    return {p: {"model": model, "precision": p, "epochs": epochs,
                "median_img_per_s": statistics.median(speed[p]),
                "ratio_to_fp32": statistics.median(speed[p]) / base,
                "test_elbo_mean": mean_sd(elbo[p])[0], "test_elbo_sd": mean_sd(elbo[p])[1],
                "test_elbo": elbo[p], "img_per_s": speed[p]} for p in PRECISIONS}


# -- EMA and KL warm-up ---------------------------------------------------------------------------
def active_units(module, data) -> tuple[int, list[float]]:
    """Units whose encoder mean varies over the test images by more than :data:`ACTIVE`."""
    module.eval()
    with torch.no_grad():
        x = hook(module, "data_args")(data.test.x, data.test.y)[0]
        loc = module.encode(x)[0]
    var = loc.var(dim=0)
    return int((var > ACTIVE).sum()), var.tolist()


def long_run(a, data, out: Path, ema: float, kl_warmup: int, z: int, seed: int) -> dict:
    run = train(config(a, epochs=a.epochs_long, seed=seed, ema=ema, kl_warmup=kl_warmup,
                       model_options={"z_dim": z},
                       out=str(out / f"z{z}-ema{ema:g}-kl{kl_warmup}-seed{seed}"),
                       overwrite=True), data, progress=False)
    units, var = active_units(run.module, run.data)
    at = {e: run.history[e - 1]["test_elbo"] for e in a.at}
    return {"at": at, "summary_test_elbo": run.summary["test_elbo"], "active_units": units,
            "unit_variances": var, "train_seconds": run.summary["train_seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (TrainConfig.threads)")
    p.add_argument("--parts", nargs="+", default=["bf16", "ema", "kl"],
                   choices=["bf16", "ema", "kl"])
    p.add_argument("--epochs-mlp", type=int, default=10, help="bf16: epochs of the MLP VAE")
    p.add_argument("--epochs-conv", type=int, default=10, help="bf16: epochs of the conv VAE")
    p.add_argument("--epochs-long", type=int, default=30, help="EMA and KL warm-up: epochs")
    p.add_argument("--at", type=int, nargs="+", default=[10, 30],
                   help="EMA and KL warm-up: the epochs whose test ELBO the tables give")
    p.add_argument("--emas", type=float, nargs="+", default=[0.99, 0.999])
    p.add_argument("--kl-warmups", type=int, nargs="+", default=[5, 10])
    p.add_argument("--kl-z-dims", type=int, nargs="+", default=[20, 50],
                   help="KL warm-up: the latent sizes d (EMA: the first)")
    p.add_argument("--out", help="keep the EMA and KL warm-up runs here (default: a "
                                 "temporary directory, removed)")
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/trainer-features.md and .csv")
    a = p.parse_args()
    if min(a.epochs_mlp, a.epochs_conv) < 2:
        p.error("--epochs-mlp and --epochs-conv must be at least 2 (the first is a warm-up)")
    if max(a.at) > a.epochs_long:
        p.error("--at must not exceed --epochs-long")
    if os.environ.get("OMP_NUM_THREADS") != str(a.threads):
        print(f"note: OMP_NUM_THREADS is {os.environ.get('OMP_NUM_THREADS')!r}; the measured "
              f"command sets it to {a.threads} (--threads)", file=sys.stderr)
    began, load = time.perf_counter(), os.getloadavg()[0]
    pyro.enable_validation(False)  # as ppl_vae.train runs by default
    data = load_dataset(a.dataset, a.data_dir, download=False)
    print(f"{data.name}: {len(data.train)} train, {len(data.test)} test images, batch 128, "
          f"Adam 1e-3, torch {torch.__version__}, pyro {pyro.__version__}, {a.threads} "
          f"thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), seeds {a.seeds}",
          flush=True)
    results: dict = {}
    md: list[str] = []
    rows: list[dict] = []
    seeds = ", ".join(map(str, a.seeds))

    if "bf16" in a.parts:
        for model, epochs in (("vae", a.epochs_mlp), ("conv-vae", a.epochs_conv)):
            r = results[f"bf16-{model}"] = precision(a, data, model, epochs)
            gap = [b - f for b, f in zip(r["bf16"]["test_elbo"], r["fp32"]["test_elbo"],
                                         strict=True)]
            r["bf16"]["elbo_gap_to_fp32"] = gap
        md += ["### bf16 against fp32", "",
               f"| model | precision | epochs | median img/s | ratio to fp32 | test ELBO "
               f"(mean ± sd, seeds {seeds}) | bf16 − fp32, paired |", "|" + "---|" * 7]
        for model in ("vae", "conv-vae"):
            for prec, r in results[f"bf16-{model}"].items():
                gap = pm(r["elbo_gap_to_fp32"]) if "elbo_gap_to_fp32" in r else ""
                md.append(f"| {model} | {prec} | {r['epochs']} | {r['median_img_per_s']:,.0f} | "
                          f"{r['ratio_to_fp32']:.3f} | {pm(r['test_elbo'])} | {gap} |")
                rows.append({"part": "bf16", "model": model, "setting": f"--precision {prec}",
                             "epochs": r["epochs"], "median_img_per_s": r["median_img_per_s"],
                             "ratio_to_fp32": r["ratio_to_fp32"],
                             "test_elbo_mean": r["test_elbo_mean"],
                             "test_elbo_sd": r["test_elbo_sd"],
                             "test_elbo": " ".join(f"{v:.2f}" for v in r["test_elbo"])})
        md.append("")
        print("\n" + "\n".join(md), flush=True)

    z0 = a.kl_z_dims[0]
    settings = []  # (ema, kl_warmup, z_dim)
    if {"ema", "kl"} & set(a.parts):
        settings.append((0.0, 0, z0))
    if "ema" in a.parts:
        settings += [(d, 0, z0) for d in a.emas]
    if "kl" in a.parts:
        settings += [(0.0, n, z0) for n in a.kl_warmups]
        for z in a.kl_z_dims[1:]:
            settings += [(0.0, n, z) for n in (0, *a.kl_warmups)]
    long: dict = {}
    with tempfile.TemporaryDirectory(prefix="trainer_features-") as tmp:
        out = Path(a.out or tmp)
        for ema, kl, z in settings:
            for seed in a.seeds:
                r = long[(ema, kl, z, seed)] = long_run(a, data, out, ema, kl, z, seed)
                print(f"d={z} --ema {ema:g} --kl-warmup {kl} seed {seed}: test ELBO " +
                      ", ".join(f"epoch {e} {v:.2f}" for e, v in r["at"].items()) +
                      f" (summary {r['summary_test_elbo']:.2f}), {r['active_units']} of {z} "
                      f"units active, {r['train_seconds']:.0f} s of training", flush=True)

    def table(part: str, title: str, chosen: list[tuple[float, int, int]]) -> None:
        head = " | ".join(f"test ELBO, epoch {e}" for e in a.at)
        md.extend([f"### {title}", "", f"| d | setting | {head} | active units | "
                   "training s per run |", "|" + "---|" * (len(a.at) + 4)])
        for ema, kl, z in chosen:
            runs = [long[(ema, kl, z, s)] for s in a.seeds]
            name = (f"--ema {ema:g}" if ema else f"--kl-warmup {kl}" if kl else "neither")
            md.append(f"| {z} | {name} | " + " | ".join(pm([r["at"][e] for r in runs])
                                                        for e in a.at)
                      + f" | {pm([r['active_units'] for r in runs], 1)} of {z} | "
                      f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} |")
            row = {"part": part, "model": f"vae {data.input_dim}-400-{z}", "setting": name,
                   "epochs": a.epochs_long}
            for e in a.at:
                m, s = mean_sd([r["at"][e] for r in runs])
                row[f"test_elbo_epoch{e}_mean"], row[f"test_elbo_epoch{e}_sd"] = m, s
                row[f"test_elbo_epoch{e}"] = " ".join(f"{r['at'][e]:.2f}" for r in runs)
            row["active_units_mean"] = mean_sd([r["active_units"] for r in runs])[0]
            row["active_units"] = " ".join(str(r["active_units"]) for r in runs)
            rows.append(row)
        md.append("")

    if "ema" in a.parts:
        table("ema", f"Weight averaging (`--ema`), the {data.input_dim}-400-{z0} VAE, "
              f"{a.epochs_long} epochs",
              [(0.0, 0, z0), *[(d, 0, z0) for d in a.emas]])
    if "kl" in a.parts:
        table("kl", f"KL warm-up (`--kl-warmup`), the {data.input_dim}-400-d VAE, "
              f"{a.epochs_long} epochs",
              [(0.0, n, z) for z in a.kl_z_dims for n in (0, *a.kl_warmups)])
    minutes = (time.perf_counter() - began) / 60
    md.append(f"Seeds {seeds}; {a.threads} thread(s); the whole script took {minutes:.0f} "
              f"minutes; the machine's 1-minute load average was {load:.2f} at its start and "
              f"{os.getloadavg()[0]:.2f} at its end.")
    print("\n" + "\n".join(md), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({
            "args": vars(a), "precision": results,
            "runs": [{"ema": e, "kl_warmup": k, "z_dim": z, "seed": s, **r}
                     for (e, k, z, s), r in long.items()]},
            indent=2))
    if a.docs:
        from results_page import write_page

        write_page("trainer-features", "Trainer features: bf16, EMA, KL warm-up",
                   "\n".join(md), rows, seeds=a.seeds, about=__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
