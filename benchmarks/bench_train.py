"""Training throughput and test ELBO of the Pyro VAE against a plain-PyTorch VAE of the same
networks (``benchmarks/reference.py``), in the same process.

For every seed, each method trains its own copy of the same initial weights on the same
in-memory data path (``ppl_vae.run.loop.Loop``, the trainer's loop: one tensor on the device,
batches by a shuffled index, the same batches for every method), one epoch each in turn,
rotating the order every epoch. ``*-compiled`` is
the whole step as one inductor graph (``--compile``); its first epoch, the warm-up, holds
the compile. Throughput is
training images per second: the median over all epochs after each seed's first (warm-up).
Test ELBO (nats per image, 10 samples, ``ppl_vae.score``) is given as the mean and
standard deviation over seeds, since training noise moves it by about a nat.

    python benchmarks/bench_train.py                      # MNIST-10k split from ../shared/data
    python benchmarks/bench_train.py --dataset digits     # offline anywhere

``numpyro`` and ``numpyro-fori`` are the NumPyro anchor (``benchmarks/numpyro_vae.py``: the
same networks, data and initial weights, ``Trace_ELBO``, Adam), trained in a worker process of
NumPyro's own virtual environment (``--numpyro-python``) one epoch at a time, alternating with
the torch methods; its test ELBO is computed by the same code from its trained weights. Pin
the run to one core so that every method has the same one:

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_train.py \
        --methods plain mc-compiled numpyro numpyro-fori --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyro
import torch
from reference import reference_loss

from ppl_vae import Session, TrainConfig
from ppl_vae.data import load_dataset
from ppl_vae.inference.compiled import CompiledStep
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.importance import score
from ppl_vae.inference.svi import Step
from ppl_vae.models.vae import ENCODER_SCALES, VAEOptions
from ppl_vae.run.loop import Loop

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HERE = Path(__file__).resolve().parent
NUMPYRO_PYTHON = HERE / ".venv-numpyro" / "bin" / "python"


class NumPyroRun:
    """A NumPyro method in its worker process, driven like a :class:`Loop`: ``epoch()``
    trains one (``rows``: the rows it took), ``module`` a copy of ``init`` that
    :meth:`finish` loads with the trained weights."""

    def __init__(self, python: str, mode: str, data, init: torch.nn.Module, batch: int,
                 lr: float, seed: int) -> None:
        self.module, self.rows = copy.deepcopy(init), 0
        self.dir = tempfile.TemporaryDirectory()
        npz = Path(self.dir.name) / "init.npz"
        weights = {k: t.cpu().numpy() for k, t in init.state_dict().items()
                   if k.startswith(("encoder.", "decoder."))}
        np.savez(npz, x=data.train.x.cpu().numpy(), **weights)
        self.proc = subprocess.Popen([python, str(HERE / "numpyro_vae.py")], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.version = self._read()["ready"]
        self.compile_seconds = self._ask(init={"npz": str(npz), "mode": mode, "batch": batch,
                                               "lr": lr, "seed": seed, "elbo": "mc"})[
            "compile_seconds"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the NumPyro worker stopped (exit status {self.proc.wait()})")
        return json.loads(line)

    def _ask(self, **ask) -> dict:
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def epoch(self) -> tuple[float, float, None]:
        r = self._ask(epoch=1)
        self.rows = r["rows"]
        return r["loss"], r["seconds"], None

    def finish(self) -> None:
        path = Path(self.dir.name) / "trained.npz"
        self._ask(params=str(path))
        trained = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
        self.module.load_state_dict(trained, strict=False)
        self.proc.stdin.close()
        self.proc.wait()
        self.dir.cleanup()


def train_epochs(a, data, runs: dict, speed: dict) -> None:
    """``a.epochs`` epochs of every method (one :class:`Loop` each), rotating the order each
    epoch; the img/s of every epoch after the first into ``speed``."""
    for epoch in range(a.epochs):
        k = epoch % len(a.methods)
        for m in a.methods[k:] + a.methods[:k]:
            _, seconds, _ = runs[m].epoch()
            if epoch:
                rows = runs[m].rows if isinstance(runs[m], NumPyroRun) else len(data.train)
                speed[m].append(rows / seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--methods", nargs="+", default=["plain", "mc", "analytic"],
                   choices=["plain", "mc", "analytic", "iwae", "mc-compiled",
                            "analytic-compiled", "numpyro", "numpyro-fori"])
    p.add_argument("--epochs", type=int, default=10, help="epochs per method and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, nargs="+", default=[400])
    p.add_argument("--particles", type=int, default=1)
    p.add_argument("--encoder-scale", choices=ENCODER_SCALES,
                   default=VAEOptions.encoder_scale)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--numpyro-python", default=str(NUMPYRO_PYTHON),
                   help="the Python of NumPyro's virtual environment (see numpyro_vae.py)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/train-throughput.md and .csv "
                        "(compiled-throughput.md with a -compiled method, "
                        "numpyro-anchor-DATASET.md with a numpyro one)")
    a = p.parse_args()
    if a.epochs < 2:
        p.error("--epochs must be at least 2 (the first is a warm-up)")
    device = torch.device("cuda" if a.cuda else "cpu")
    if any(m.startswith("numpyro") for m in a.methods) and not Path(a.numpyro_python).exists():
        p.error(f"no NumPyro environment at {a.numpyro_python}: make it as numpyro_vae.py says, "
                "or give --numpyro-python")
    data = load_dataset(a.dataset, a.data_dir, download=False).to(device)
    options = VAEOptions(z_dim=a.z_dim, hidden=tuple(a.hidden), encoder_scale=a.encoder_scale)
    print(f"{data.name}: {len(data.train)} train images, batch {a.batch_size}, "
          f"VAE {data.input_dim}-{'-'.join(map(str, a.hidden))}-{a.z_dim} "
          f"({a.encoder_scale} scale head), {device}, "
          f"torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} threads, seeds {a.seeds}, {a.epochs} epochs", flush=True)

    pyro.enable_validation(False)  # as ppl_vae.train runs by default (and --compile needs)
    speed = {m: [] for m in a.methods}
    elbo = {m: [] for m in a.methods}
    compile_s = {m: [] for m in a.methods}
    for seed in a.seeds:
        session = Session(TrainConfig(dataset=a.dataset, data_dir=a.data_dir, model_options=options,
                                      batch_size=a.batch_size, epochs=a.epochs, seed=seed,
                                      lr=a.lr, cuda=a.cuda), data, progress=False)
        init = session.module  # (seeded: every method starts from these weights)
        runs = {}
        for m in a.methods:
            if m.startswith("numpyro"):
                runs[m] = NumPyroRun(a.numpyro_python, "fori" if m.endswith("fori") else "step",
                                     data, init, a.batch_size, a.lr, seed)
                continue
            vae = copy.deepcopy(init)
            params = list(vae.parameters())
            opt = torch.optim.Adam(params, lr=a.lr)
            step = (Step(params, opt, reference_loss(vae)) if m == "plain" else
                    Step.of_elbo(make_elbo(m.split("-")[0], a.particles), vae, vae.programs(),
                                 optimizer=opt))
            if m.endswith("-compiled"):  # the whole step as one graph (--compile)
                step = CompiledStep(step, vae)
            runs[m] = Loop(session, step, module=vae,
                           inputs=lambda g: (data.train_epoch(g),))
        train_epochs(a, data, runs, speed)
        for m, loop in runs.items():
            if isinstance(loop, NumPyroRun):
                loop.finish()
                compile_s[m].append(loop.compile_seconds)
            elif isinstance(loop.take, CompiledStep):
                if loop.take.refused:
                    sys.exit(f"{m}: {loop.take.refused}")
                compile_s[m].append(loop.take.compile_seconds)
        for m, loop in runs.items():
            vae = loop.module
            vae.eval()
            elbo[m].append(score(vae, data.test.x, num_samples=10).summary()["test_elbo"])
        print(f"seed {seed}: test ELBO " + ", ".join(f"{m} {elbo[m][-1]:.2f}" for m in a.methods),
              flush=True)

    base = statistics.median(speed["plain"]) if "plain" in speed else None
    results = {}
    print(f"\n| method | median img/s | ratio to plain | test ELBO after {a.epochs} epochs "
          f"(mean ± sd over {len(a.seeds)} seeds) | compile, s (seeds) |\n|---|---|---|---|---|")
    for m in a.methods:
        med = statistics.median(speed[m])
        sd = statistics.stdev(elbo[m]) if len(elbo[m]) > 1 else 0.0
        results[m] = {"median_img_per_s": med, "ratio_to_plain": med / base if base else None,
                      "img_per_s": speed[m], "test_elbo": elbo[m],
                      "test_elbo_mean": statistics.fmean(elbo[m]), "test_elbo_sd": sd,
                      "compile_seconds": compile_s[m]}
        ratio = f"{med / base:.3f}" if base else "-"
        took = " / ".join(f"{c:.1f}" for c in compile_s[m]) or "-"
        print(f"| {m} | {med:,.0f} | {ratio} | {statistics.fmean(elbo[m]):.2f} ± {sd:.2f} | "
              f"{took} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    if a.docs:
        from results_page import docs_rows, write_page

        compiled = any(m.endswith("-compiled") for m in a.methods)
        anchor = any(m.startswith("numpyro") for m in a.methods)
        name = (f"numpyro-anchor-{a.dataset}" if anchor
                else "compiled-throughput" if compiled else "train-throughput")
        vae = f"{data.input_dim}-{'-'.join(map(str, a.hidden))}-{a.z_dim}"
        title = (f"Against NumPyro: the {vae} VAE at batch {a.batch_size}" if anchor else
                 "Training throughput and test ELBO")
        write_page(name, title, None, docs_rows(results, "method"), seeds=a.seeds,
                   about=__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
