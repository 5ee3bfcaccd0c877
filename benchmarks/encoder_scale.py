"""Which scale head should the VAE's encoder have? Test ELBO after training, per head and
estimator, over several seeds (``--encoder-scale logvar|logscale|softplus``).

Each run is ``ppl_vae.train`` with the VAE defaults (784-400-20 on MNIST, batch 128, Adam
1e-3, 10 epochs) and only the head and the estimator changed; the table gives the mean and
standard deviation over seeds of the test ELBO (10 samples per image), in nats per image.

    python benchmarks/encoder_scale.py                    # MNIST-10k split in ../shared/data
    python benchmarks/encoder_scale.py --dataset digits   # offline anywhere, seconds
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

from ppl_vae import TrainConfig, train
from ppl_vae.models.vae import ENCODER_SCALES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--heads", nargs="+", default=list(ENCODER_SCALES), choices=ENCODER_SCALES)
    p.add_argument("--elbos", nargs="+", default=["analytic", "mc"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", help="write encoder_scale.csv and encoder_scale.md here")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/encoder-scale.md and .csv")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for elbo in a.elbos:
            for head in a.heads:
                values = []
                for seed in a.seeds:
                    config = TrainConfig(dataset=a.dataset, data_dir=a.data_dir, download=False,
                                         elbo=elbo, epochs=a.epochs, seed=seed,
                                         model_options={"encoder_scale": head},
                                         out=f"{tmp}/{elbo}-{head}-{seed}")
                    values.append(train(config, progress=False).summary["test_elbo"])
                    print(f"{elbo} {head} seed {seed}: {values[-1]:.2f}", flush=True)
                rows.append({"elbo": elbo, "encoder_scale": head,
                             "test_elbo_mean": statistics.fmean(values),
                             "test_elbo_sd": statistics.stdev(values) if len(values) > 1 else 0,
                             "seeds": " ".join(map(str, a.seeds)),
                             "values": " ".join(f"{v:.2f}" for v in values)})
    md = [f"| estimator | encoder scale head | test ELBO (mean ± sd, seeds "
          f"{', '.join(map(str, a.seeds))}) | per seed |", "|---|---|---|---|"]
    md += [f"| {r['elbo']} | {r['encoder_scale']} | {r['test_elbo_mean']:.2f} ± "
           f"{r['test_elbo_sd']:.2f} | {r['values']} |" for r in rows]
    print("\n" + "\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "encoder_scale.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "encoder_scale.md").write_text("\n".join(md) + "\n")
    if a.docs:
        from results_page import write_page

        write_page("encoder-scale", "The encoder's scale head", "\n".join(md), rows,
                   seeds=a.seeds, about=__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
