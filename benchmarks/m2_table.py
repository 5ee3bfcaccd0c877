"""The semi-supervised M2 table (Kingma, Rezende, Mohamed & Welling 2014, table 1): test
accuracy of M2's classifier q(y|x) after training with N labelled images and the rest of the
training split unlabelled, beside the same MLP trained as a plain classifier on the N
labelled images only, and the paper's M2 errors on full MNIST for context.

Each M2 run is ``ppl_vae.train_run`` with ``--model ssvae --labelled N --elbo enum --seed S``
(the model's defaults: hidden 500, z 50, alpha 2.0; Adam 1e-3, batch 128, ``--epochs``
epochs, no early stopping). The baseline is plain PyTorch: the classifier MLP of q(y|x)
(784-500-10, ReLU), cross-entropy, Adam 1e-3, batch 64, a fixed ``--baseline-steps`` steps
on the same seeded, class-balanced labelled subset (``load_dataset(..., labelled=N,
seed=S)``), no early stopping (there is no labelled validation data to stop on), evaluated
once at the end.

    OMP_NUM_THREADS=1 python benchmarks/m2_table.py --out /tmp/m2      # MNIST-10k split
    python benchmarks/m2_table.py --dataset digits --labels 50 100 --epochs 3   # seconds
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ppl_vae import TrainConfig, load_dataset, train_run
from ppl_vae.data import pixels
from ppl_vae.models.nets import mlp

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPER_M2_ERROR = {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}
"""M2's test error (%) on full MNIST (50,000 training images), Kingma et al. 2014, table 1."""


def baseline_accuracy(data, hidden: tuple[int, ...], steps: int, seed: int,
                      batch_size: int = 64, lr: float = 1e-3) -> float:
    """Test accuracy of the MLP ``D -> hidden -> K`` trained by cross-entropy on the labelled
    training rows only, for ``steps`` Adam steps (reshuffled epochs)."""
    torch.manual_seed(seed)
    y = data.train.y
    rows = (y >= 0).nonzero().squeeze(1)
    x, y = pixels(data.train.x[rows]), y[rows]
    net = mlp([data.input_dim, *hidden, data.num_classes])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    with torch.no_grad():
        guess = torch.cat([net(c).argmax(-1) for c in pixels(data.test.x).split(4096)])
    return (guess == data.test.y).double().mean().item()


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--labels", type=int, nargs="+", default=[100, 600, 1000, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15, help="M2 training epochs")
    p.add_argument("--hidden", type=int, nargs="+", default=[500])
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--baseline-steps", type=int, default=1000)
    p.add_argument("--out", help="write m2_table.csv, m2_runs.csv and m2_table.md here")
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # OMP_NUM_THREADS decides
    hidden = tuple(a.hidden)
    runs = []
    began = time.perf_counter()
    bar = tqdm(total=len(a.labels) * len(a.seeds), desc="M2 table", unit="run")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.labels:
            for seed in a.seeds:
                start = time.perf_counter()
                data = load_dataset(a.dataset, a.data_dir, download=False, labelled=n,
                                    seed=seed)
                config = TrainConfig(model="ssvae", dataset=a.dataset, data_dir=a.data_dir,
                                     download=False, labelled=n, seed=seed, elbo="enum",
                                     epochs=a.epochs,
                                     model_options={"hidden": hidden, "z_dim": a.z_dim,
                                                    "alpha": a.alpha},
                                     out=f"{tmp}/m2-{n}-{seed}")
                s = train_run(config, data, progress=False).summary
                m2_seconds = time.perf_counter() - start
                base = baseline_accuracy(data, hidden, a.baseline_steps, seed)
                runs.append({"labels": n, "seed": seed, "m2_accuracy": s["test_accuracy"],
                             "mlp_accuracy": base, "m2_test_elbo": s["test_elbo"],
                             "m2_test_elbo_unlabelled": s["test_elbo_unlabelled"],
                             "m2_seconds": round(m2_seconds, 1)})
                bar.set_postfix(labels=n, seed=seed, m2=f"{s['test_accuracy']:.3f}",
                                mlp=f"{base:.3f}")
                bar.update()
                tqdm.write(f"labels {n} seed {seed}: M2 {s['test_accuracy']:.4f}, MLP "
                           f"{base:.4f} ({m2_seconds:.0f} s)")
    bar.close()
    wall = time.perf_counter() - began
    rows = []
    for n in a.labels:
        mine = [r for r in runs if r["labels"] == n]
        m2, m2_sd = mean_sd([100 * r["m2_accuracy"] for r in mine])
        base, base_sd = mean_sd([100 * r["mlp_accuracy"] for r in mine])
        rows.append({"labels": n, "m2_accuracy_mean": round(m2, 2), "m2_accuracy_sd":
                     round(m2_sd, 2), "m2_error_mean": round(100 - m2, 2),
                     "mlp_accuracy_mean": round(base, 2), "mlp_accuracy_sd": round(base_sd, 2),
                     "paper_m2_error_full_mnist": PAPER_M2_ERROR.get(n, ""),
                     "m2_per_seed": " ".join(f"{100 * r['m2_accuracy']:.2f}" for r in mine),
                     "mlp_per_seed": " ".join(f"{100 * r['mlp_accuracy']:.2f}" for r in mine)})
    seeds = ", ".join(map(str, a.seeds))
    caption = (f"Test accuracy (%) on the {a.dataset} test split, mean ± sd over seeds {seeds}. "
               f"M2: --model ssvae --elbo enum, hidden {list(hidden)}, z {a.z_dim}, alpha "
               f"{a.alpha}, Adam 1e-3, batch 128, {a.epochs} epochs. MLP: the same network as "
               f"q(y|x), cross-entropy on the labelled images only, {a.baseline_steps} Adam "
               "steps of batch 64. Paper: M2's error on full MNIST (Kingma et al. 2014). "
               f"Wall time {wall / 60:.1f} min ({torch.get_num_threads()} thread(s)).")
    md = ["| labels | M2 accuracy | M2 error | MLP on labelled only | paper M2 error (full "
          "MNIST) | M2 per seed | MLP per seed |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_m2_error_full_mnist']:.2f}%" if r["paper_m2_error_full_mnist"] \
            != "" else "–"
        md.append(f"| {r['labels']} | {r['m2_accuracy_mean']:.2f} ± {r['m2_accuracy_sd']:.2f} "
                  f"| {r['m2_error_mean']:.2f}% | {r['mlp_accuracy_mean']:.2f} ± "
                  f"{r['mlp_accuracy_sd']:.2f} | {paper} | {r['m2_per_seed']} | "
                  f"{r['mlp_per_seed']} |")
    text = caption + "\n\n" + "\n".join(md) + "\n"
    print("\n" + text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in (("m2_table.csv", rows), ("m2_runs.csv", runs)):
            with open(out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
        (out / "m2_table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
