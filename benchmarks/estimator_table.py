"""Which estimator trains the better model? The same VAE trained with each ``--elbo`` from the
same seeds, then scored the same way: test ELBO and the IWAE bound on log p(x).

    OMP_NUM_THREADS=1 python benchmarks/estimator_table.py --data-dir ../shared/data \\
        --epochs 10 --seeds 0 1 2 --eval-iwae 1000 --jobs 2

Each (estimator, K, seed) is one ``python -m ppl_vae train`` run (``--jobs`` at a time, one
thread each); a finished run in ``--out`` is not trained again, and one scored with another
``--eval-iwae`` K is re-scored by ``python -m ppl_vae evaluate`` (whose test ELBO then uses
the same K samples). The table (Markdown and CSV) has the mean ± sd over the seeds and the
median seconds per epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ppl_vae.files import write_csv, write_text

CONFIGS = [("mc", 1), ("analytic", 1), ("stl", 1), ("iwae", 5), ("iwae-dreg", 5),
           ("iwae", 50), ("iwae-dreg", 50)]


def run(a, elbo: str, k: int, seed: int) -> dict:
    out = Path(a.out) / f"{elbo}-k{k}-seed{seed}"
    if not (out / "summary.json").is_file():
        cmd = [sys.executable, "-m", "ppl_vae", "train", "--dataset", "mnist", "--data-dir",
               a.data_dir, "--no-download", "--elbo", elbo, "--particles", str(k), "--epochs",
               str(a.epochs), "--seed", str(seed), "--eval-iwae", str(a.eval_iwae), "--out",
               str(out), "--overwrite"]
        subprocess.run(cmd, check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    s = json.loads((out / "summary.json").read_text())
    if s.get("iwae_samples") != a.eval_iwae:  # a finished run, scored again with this K
        subprocess.run([sys.executable, "-m", "ppl_vae", "evaluate", "--run", str(out),
                        "--eval-iwae", str(a.eval_iwae)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        s = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv") as f:
        seconds = [float(r["train_seconds"]) for r in csv.DictReader(f)]
    return {"elbo": elbo, "particles": k, "seed": seed, "test_elbo": s["test_elbo"],
            "test_iwae": s["test_log_likelihood_iwae"], "epoch_seconds": statistics.median(seconds)}


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-iwae", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/estimator-table")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/estimator-table.md and .csv")
    a = p.parse_args()
    jobs = [(e, k, s) for e, k in CONFIGS for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: run(a, *j), jobs))
    table = []
    for e, k in CONFIGS:
        mine = [r for r in rows if (r["elbo"], r["particles"]) == (e, k)]
        elbo, iwae = [r["test_elbo"] for r in mine], [r["test_iwae"] for r in mine]
        table.append({"elbo": e, "K": k, "test_elbo": statistics.mean(elbo),
                      "test_elbo_sd": sd(elbo), "test_iwae": statistics.mean(iwae),
                      "test_iwae_sd": sd(iwae),
                      "epoch_seconds": statistics.median(r["epoch_seconds"] for r in mine)})
    out = Path(a.out)
    write_csv(out / "table.csv", table)
    lines = [f"| --elbo | K | test ELBO (mean ± sd, seeds {', '.join(map(str, a.seeds))}) | "
             f"IWAE-{a.eval_iwae} bound | s / epoch |", "|---|---|---|---|---|"]
    lines += [f"| {r['elbo']} | {r['K']} | {r['test_elbo']:.2f} ± {r['test_elbo_sd']:.2f} | "
              f"{r['test_iwae']:.2f} ± {r['test_iwae_sd']:.2f} | {r['epoch_seconds']:.2f} |"
              for r in table]
    write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if a.docs:
        from results_page import write_page

        write_page("estimator-table", "Training with each estimator", "\n".join(lines), table,
                   seeds=a.seeds, about=__doc__)


if __name__ == "__main__":
    main()
