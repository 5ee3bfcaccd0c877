"""The compiled SVI step (``--compile``) beside the eager Pyro step and a hand-written
plain-PyTorch step of the same networks (``benchmarks/reference.py``), in one process.

Cases (``--cases``):

* ``tiny``: the overhead-bound VAE 16-16-2 at batch 8, on random binary rows;
* ``cvae``: the CVAE quadrant step, 784 -> 500-500 -> z 200, one observed quadrant, batch
  128, on the MNIST-10k split (random binary images where it is missing);
* ``compile``: seconds to compile the 784-400-20 VAE step at batch 128, cold (an empty
  inductor cache) and warm (the same cache again), each in a fresh process.

Per-step times: every method takes ``--steps`` steps per round, the methods in an order that
rotates every round; a method's time is the median over ``--rounds`` rounds of its mean step
time, and its ratio is that over plain eager PyTorch's (lower is faster). Each method trains
its own copy of the same initial weights; the compiled ones are warmed up first (one eager
step, then the capture and compile). Training throughput over epochs of the 784-400-20 VAE
is ``benchmarks/bench_train.py --methods plain mc mc-compiled ...``.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --cases tiny --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from reference import cvae_reference_loss, reference_loss

from ppl_vae.data import load_dataset
from ppl_vae.inference.compiled import CompiledStep
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.svi import Step
from ppl_vae.models import CVAE, VAE
from ppl_vae.models.cvae import CVAEOptions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("plain", "mc", "analytic", "mc-compiled", "analytic-compiled")


def steps_for(init: torch.nn.Module, reference, methods, lr: float = 1e-3) -> dict:
    """One Step per method, each over its own copy of ``init``."""
    out = {}
    for m in methods:
        module = copy.deepcopy(init)
        params = list(module.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        if m == "plain":
            out[m] = Step(params, opt, reference(module))
            continue
        eager = Step.of_elbo(make_elbo(m.split("-")[0]), module, module.programs(),
                             optimizer=opt)
        out[m] = CompiledStep(eager, module) if m.endswith("compiled") else eager
    return out


def time_steps(steps: dict, args: tuple, n: int, rounds: int) -> dict[str, float]:
    """Median over rounds of each method's seconds per step (rotating order)."""
    device = args[0].device
    total = torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.long, device=device)
    for take in steps.values():  # warm-up: the first eager step, the capture, caches
        for i in range(3):
            take(i, args, total, bad)
    for m, take in steps.items():
        if isinstance(take, CompiledStep) and take.refused:
            sys.exit(f"{m}: {take.refused}")
    times: dict[str, list[float]] = {m: [] for m in steps}
    names = list(steps)
    for r in range(rounds):
        for m in names[r % len(names):] + names[:r % len(names)]:
            take = steps[m]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for i in range(3, 3 + n):
                take(i, args, total, bad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[m].append((time.perf_counter() - start) / n)
    return {m: statistics.median(t) for m, t in times.items()}


def table(title: str, medians: dict[str, float]) -> str:
    base = medians["plain"]
    rows = [f"\n{title}\n", "| step | time per step | ratio to plain eager |", "|---|---|---|"]
    rows += [f"| {m} | {t * 1e6:,.0f} µs | {t / base:.2f} |" for m, t in medians.items()]
    return "\n".join(rows)


def tiny(a) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 16, generator=g).bernoulli(generator=g).to(a.device)
    pyro.set_rng_seed(0)
    init = VAE(16, z_dim=2, hidden=(16,)).to(a.device)
    return time_steps(steps_for(init, reference_loss, a.methods), (x,), a.steps, a.rounds)


def cvae(a) -> dict:
    try:
        data = load_dataset("mnist", a.data_dir, download=False)
    except Exception:  # timing does not depend on the pixel values
        print("(the MNIST-10k split is missing: random binary images)", file=sys.stderr)
        from ppl_vae.data import Dataset, Split

        x = torch.rand(256, 784).bernoulli()
        data = Dataset("random", Split(x), Split(x), (1, 28, 28))
    pyro.set_rng_seed(0)
    init = CVAE.from_options(CVAEOptions(hidden=(500, 500), z_dim=200, quadrants=1),
                             data).to(a.device)
    args = init.data_args(data.train.x[:128].to(a.device), None)
    return time_steps(steps_for(init, cvae_reference_loss, a.methods), args,
                      max(1, a.steps // 10), a.rounds)


COMPILE_ONCE = """
import sys, torch, pyro
from ppl_vae.inference.compiled import CompiledStep
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.svi import Step
from ppl_vae.models import VAE
pyro.enable_validation(False)
device = torch.device(sys.argv[1])
vae = VAE(784, z_dim=20, hidden=(400,)).to(device)
x = torch.rand(128, 784, device=device).bernoulli()
opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
step = CompiledStep(Step.of_elbo(make_elbo("mc"), vae, vae.programs(), optimizer=opt), vae)
total, bad = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
for i in range(2):
    step(i, (x,), total, bad)
assert step.refused is None, step.refused
print(step.compile_seconds)
"""


def compile_times(a) -> dict:
    """Seconds to trace, compile and check the 784-400-20 step: cold, then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for kind in ("cold", "warm"):
            done = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(a.device)], env=env,
                                  capture_output=True, text=True, check=True)
            out[kind] = float(done.stdout.strip().splitlines()[-1])
    return out


def docs_table(results: dict) -> list[dict]:
    """One row per case and method: microseconds per step and the ratio to plain eager
    PyTorch; the compile seconds as rows of their own."""
    rows = []
    for case in ("tiny", "cvae"):
        for method, seconds in results.get(case, {}).items():
            rows.append({"case": case, "method": method, "us_per_step": round(seconds * 1e6),
                         "ratio_to_plain": round(seconds / results[case]["plain"], 3)})
    for kind, seconds in results.get("compile", {}).items():
        rows.append({"case": "compile 784-400-20", "method": kind,
                     "compile_seconds": round(seconds, 1)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["tiny", "cvae", "compile"],
                   choices=["tiny", "cvae", "compile"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=200, help="steps per method and round "
                   "(the CVAE takes a tenth)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--docs", action="store_true",
                   help="also write the docs' page, docs/results/compiled-step.md and .csv")
    a = p.parse_args()
    if "plain" not in a.methods:
        a.methods = ["plain", *a.methods]
    a.device = torch.device("cuda" if a.cuda else "cpu")
    pyro.enable_validation(False)  # as ppl_vae train runs by default
    print(f"{a.device}, torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} threads, {a.rounds} rounds", flush=True)
    results = {}
    if "tiny" in a.cases:
        results["tiny"] = tiny(a)
        print(table(f"tiny VAE 16-16-2, batch 8 ({a.steps} steps per round)", results["tiny"]),
              flush=True)
    if "cvae" in a.cases:
        results["cvae"] = cvae(a)
        print(table(f"CVAE quadrant step 784-500-500, z 200, batch 128 "
                    f"({max(1, a.steps // 10)} steps per round)", results["cvae"]), flush=True)
    if "compile" in a.cases:
        results["compile"] = compile_times(a)
        print(f"\ncompiling the 784-400-20 step (trace twice, compile, check): "
              f"{results['compile']['cold']:.1f} s cold, {results['compile']['warm']:.1f} s "
              "warm (inductor's cache filled)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                            "results": results}, indent=2))
    if a.docs:
        from results_page import write_page

        write_page("compiled-step", "The compiled step, per step", None, docs_table(results),
                   seeds=[0], about=__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
