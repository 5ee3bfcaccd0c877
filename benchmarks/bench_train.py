"""Training throughput of the Pyro VAE against a plain-PyTorch VAE of the same networks.

Every method trains its own copy of the same initial weights on the same in-memory data
path (``ppl_vae.training.run_epoch``: one tensor on the device, batches by a shuffled index),
one epoch each in turn, rotating the order every round. Throughput is training images per
second, the median over the epochs after the first (warm-up). The test ELBO of every method
is then measured by the same evaluator (``ppl_vae.evaluation.score``, 10 samples per image).

    python benchmarks/bench_train.py                      # MNIST-10k split from ../shared/data
    python benchmarks/bench_train.py --dataset digits     # offline anywhere
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import pyro
import torch

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_dataset
from ppl_vae.estimators import make_elbo
from ppl_vae.evaluation import score
from ppl_vae.models import VAE
from ppl_vae.reference import reference_loss
from ppl_vae.training import backward_step, elbo_step, run_epoch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--methods", nargs="+", default=["plain", "mc", "analytic"],
                   choices=["plain", "mc", "analytic", "iwae"])
    p.add_argument("--epochs", type=int, default=10, help="epochs per method (first = warm-up)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, nargs="+", default=[400])
    p.add_argument("--particles", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if a.epochs < 2:
        p.error("--epochs must be at least 2 (the first is a warm-up)")
    device = torch.device("cuda" if a.cuda else "cpu")

    data = load_dataset(a.dataset, a.data_dir, download=False).to(device)
    cfg = TrainConfig(dataset=a.dataset, z_dim=a.z_dim, hidden=tuple(a.hidden), lr=a.lr)
    pyro.set_rng_seed(a.seed)
    init = VAE.from_config(cfg, data).to(device)
    runs = {}
    for m in a.methods:
        vae = copy.deepcopy(init)
        step = (backward_step(reference_loss(vae)) if m == "plain"
                else elbo_step(make_elbo(m, a.particles), vae))
        runs[m] = {"vae": vae, "step": step, "seconds": [],
                   "opt": torch.optim.Adam(vae.parameters(), lr=a.lr)}

    print(f"{data.name}: {len(data.train)} train images, batch {a.batch_size}, "
          f"VAE {data.input_dim}-{'-'.join(map(str, a.hidden))}-{a.z_dim}, {device}, "
          f"torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for epoch in range(a.epochs):
        order = a.methods[epoch % len(a.methods):] + a.methods[:epoch % len(a.methods)]
        for m in order:
            r = runs[m]
            _, seconds = run_epoch(r["step"], r["opt"], (data.train_epoch(),), a.batch_size,
                                   progress=False)
            r["seconds"].append(seconds)
        print(f"epoch {epoch + 1}/{a.epochs}: " + ", ".join(
            f"{m} {len(data.train) / runs[m]['seconds'][-1]:,.0f} img/s" for m in a.methods),
            flush=True)

    results = {}
    for m, r in runs.items():
        per_epoch = [len(data.train) / s for s in r["seconds"][1:]]
        r["vae"].eval()
        results[m] = {
            "median_img_per_s": statistics.median(per_epoch),
            "img_per_s": per_epoch,
            "test_elbo": score(r["vae"], data.test.x, num_samples=10).summary()["test_elbo"],
        }
    base = results["plain"]["median_img_per_s"] if "plain" in results else None
    print("\n| method | median img/s | ratio to plain | test ELBO after "
          f"{a.epochs} epochs |\n|---|---|---|---|")
    for m, r in results.items():
        ratio = f"{r['median_img_per_s'] / base:.3f}" if base else "-"
        r["ratio_to_plain"] = r["median_img_per_s"] / base if base else None
        print(f"| {m} | {r['median_img_per_s']:,.0f} | {ratio} | {r['test_elbo']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
