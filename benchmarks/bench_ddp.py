"""Training throughput of ``python -m ppl_vae train`` in one process and under
``torchrun --nproc_per_node 2`` (DDP, gloo on the CPU; NCCL with ``--cuda``), beside the
plain-PyTorch reference VAE (`benchmarks/reference.py`) in one process.

Each setting runs ``--repeats`` times, alternating settings; throughput is training images
per second from ``summary.json`` (``epochs * n_train / train_seconds``: the training loop
only, not start-up or evaluation), and the table gives the median and its ratio to the
one-process, one-thread run (the reference runs with one thread too). N processes share
the machine's cores: on 2 cores, 2 processes of 1 thread each compete with 1 process of 2
threads, so expect no speed-up there; on a CPU the check that matters is correctness,
which the tests make.

    python benchmarks/bench_ddp.py                    # MNIST-10k split from ../shared/data
    python benchmarks/bench_ddp.py --dataset digits   # offline anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from reference import reference_loss

from ppl_vae.data import load_dataset
from ppl_vae.models import VAE
from ppl_vae.models.vae import VAEOptions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def train_cli(a, nproc: int, threads: int, out: Path) -> float:
    """Images per second of one training run (its summary's training seconds)."""
    args = ["-m", "ppl_vae", "train", "--dataset", a.dataset, "--data-dir", a.data_dir,
            "--no-download", "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
            "--out", str(out), "--eval-particles", "1"] + (["--cuda"] if a.cuda else [])
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(nproc)])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(launcher + args, check=True, env=env, capture_output=True)
    s = json.loads((out / "summary.json").read_text())
    return s["epochs"] * s["n_train"] / s["train_seconds"]


def train_reference(a, threads: int) -> float:
    """The plain-PyTorch VAE (the default 784-400-20 networks) in one process: images per
    second."""
    torch.set_num_threads(threads)
    data = load_dataset(a.dataset, a.data_dir, download=False)
    x = data.train.x.to("cuda" if a.cuda else "cpu")
    vae = VAE.from_options(VAEOptions(), data).to(x.device)
    loss = reference_loss(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(a.epochs):
        for idx in torch.randperm(len(x), device=x.device).split(a.batch_size):
            opt.zero_grad(set_to_none=True)
            loss(x[idx]).backward()
            opt.step()
    if a.cuda:
        torch.cuda.synchronize()
    return a.epochs * len(x) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/ddp-throughput.md and .csv")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    settings = {"plain PyTorch reference, 1 process x 1 thread": None,
                "ppl_vae, 1 process x 1 thread": (1, 1),
                "ppl_vae, 2 processes x 1 thread (DDP, gloo)": (2, 1),
                f"ppl_vae, 1 process x {cores} threads": (1, cores)}
    speed: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for i, (name, how) in enumerate(settings.items()):
                if how is None:
                    speed[name].append(train_reference(a, 1))
                else:
                    speed[name].append(train_cli(a, *how, Path(tmp) / f"{r}-{i}"))
                print(f"{name}: {speed[name][-1]:.0f} img/s", file=sys.stderr)
    base = statistics.median(speed["ppl_vae, 1 process x 1 thread"])
    print(f"| setting ({a.dataset}, batch {a.batch_size} per process, {a.epochs} epochs, "
          f"{'GPU' if a.cuda else f'{cores} CPU cores'}) | img/s (median of {a.repeats}) | "
          "ratio |\n|---|---|---|")
    for name, values in speed.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.0f} | {m / base:.2f} |")
    if a.docs:
        from results_page import write_page

        rows = [{"setting": name, "img_per_s_median": statistics.median(v),
                 "ratio": statistics.median(v) / base, "img_per_s": " ".join(f"{x:.0f}" for x in v)}
                for name, v in speed.items()]
        write_page("ddp-throughput", "Data-parallel throughput", None, rows, seeds=[0],
                   about=__doc__)


if __name__ == "__main__":
    main()
