"""Data-parallel training: DDP gradients equal one process's, and ``torchrun`` runs (end to
end, after an elastic restart, the CVAE's variant runs) on gloo over the CPU."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyro
import pyro.distributions as pdist
import pytest
import torch
import torch.multiprocessing as mp

from ppl_vae import distributed as dist
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.program import inspect_program
from ppl_vae.inference.svi import Step, collect_params, elbo_loss
from ppl_vae.models import hook
from ppl_vae.models.vae import VAE

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")

ROWS, PIXELS = 8, 12
SEEDS = (11, 23)  # the latent noise of rank 0's rows and of rank 1's


# -- gradients: two gloo processes against one ----------------------------------------------
class StoreParamVAE(VAE):
    """A VAE whose likelihood adds a logit bias and a positive temperature kept in Pyro's
    param store, outside the module (summed over the ranks like the module's own)."""

    def model(self, x):
        bias = pyro.param("logit_bias", 0.1 * torch.arange(float(x.shape[-1])))
        temp = pyro.param("temperature", torch.tensor(1.3),
                          constraint=pdist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x.shape[0]).to_event(1))
            logits = self.decoder(z) * temp + bias
            pyro.sample("x", pdist.Bernoulli(logits=logits).to_event(1), obs=x)


CASES = {"mc": (VAE, "mc", 1), "analytic": (VAE, "analytic", 1), "store": (StoreParamVAE, "mc", 1),
         "stl": (VAE, "stl", 1), "iwae-dreg": (VAE, "iwae-dreg", 3), "rws": (VAE, "rws", 3),
         "tracegraph": (VAE, "tracegraph", 1)}


def _named_params(module, info) -> list[tuple[str, torch.Tensor]]:
    params = collect_params(module, info)
    names = {id(p): n for n, p in module.named_parameters()}
    names.update({id(p): n for n, p in pyro.get_param_store().named_parameters()})
    return [(names[id(p)], p) for p in params]


def _case(name: str, world: dist.World) -> dict:
    cls, estimator, particles = CASES[name]
    torch.manual_seed(0)
    pyro.clear_param_store()
    x = torch.bernoulli(torch.rand(ROWS, PIXELS))
    module = cls(PIXELS, z_dim=3, hidden=(5,))
    info = inspect_program(module.model, module.guide, x[:2])  # creates the pyro.params
    terms = hook(module, "programs")()
    elbo = make_elbo(estimator, particles, max_plate_nesting=info.max_plate_nesting)

    # one process: the gradient of shard 0's loss (noise s_0) plus shard 1's (noise s_1)
    reference = copy.deepcopy(module)
    ref_loss = elbo_loss(elbo, reference, hook(reference, "programs")(), info)
    ref_params = _named_params(reference, info)
    ref_value = 0.0
    for r, seed in enumerate(SEEDS):
        pyro.set_rng_seed(seed)
        value = ref_loss(x[dist.shard(ROWS, dist.World(r, 2))])
        value.backward()
        ref_value += value.item()
    expected = {n: p.grad.clone() for n, p in ref_params}
    for _, p in ref_params:  # the param-store tensors are shared with `module`
        p.grad = None

    params = _named_params(module, info)
    step = Step.of_elbo(elbo, module, terms, info, world=world)
    pyro.set_rng_seed(SEEDS[world.rank])
    value = step.gradient(x[dist.shard(ROWS, world)]).item()
    got = {n: p.grad.clone() for n, p in params}
    gathered = dist.gather((value, got), world)
    return {
        "names": sorted(got),
        "ref_names": sorted(expected),
        "extra": sorted(n for n, _ in params if n not in dict(module.named_parameters())),
        "loss": sum(v for v, _ in gathered) - ref_value,
        "diff": {n: max((g[n] - expected[n]).abs().max().item() for _, g in gathered)
                 for n in expected},
        "ranks_differ": {n: (gathered[0][1][n] - gathered[1][1][n]).abs().max().item()
                         for n in got},
        "size": {n: expected[n].abs().max().item() for n in expected},
    }


def _worker(rank: int, port: int, result: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    world = dist.setup(cuda=False)
    assert world == dist.World(rank, 2, rank)
    out = {name: _case(name, world) for name in CASES}
    if world.main:
        Path(result).write_text(json.dumps(out))
    # Done: exit without gloo's teardown, which in torch 2.15 now and then aborts ("terminate
    # called without an active exception", SIGABRT) when both ranks destroy their group.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_ddp_gradients_equal_one_process_on_the_combined_batch(tmp_path):
    result = tmp_path / "grads.json"
    context = mp.start_processes(_worker, args=(_free_port(), str(result)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=0.5):
            assert time.monotonic() < deadline, "the gloo workers did not finish in 120 s"
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    out = json.loads(result.read_text())
    assert set(out) == set(CASES)
    for name, case in out.items():
        assert case["names"] == case["ref_names"]
        expected_extra = ["logit_bias", "temperature"] if name == "store" else []
        assert case["extra"] == expected_extra, name
        assert len(case["names"]) == 8 + len(expected_extra)  # 4 Linear layers + extras
        assert abs(case["loss"]) <= 1e-10, (name, case["loss"])
        for param, diff in case["diff"].items():
            assert diff <= 1e-10, (name, param, diff)
            assert case["ranks_differ"][param] == 0.0, (name, param)
            assert case["size"][param] > 1e-3, (name, param)  # a gradient, not zeros


# -- torchrun ----------------------------------------------------------------------------
# ~1400 training rows at 2 per process and step: 720 steps over 2 epochs, a few seconds
RUN = ["--dataset", "digits", "--epochs", "2", "--batch-size", "2", "--hidden", "16",
       "--z-dim", "2", "--lr", "3e-3", "--eval-particles", "2", "--seed", "5"]


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _torchrun(*args, extra: tuple[str, ...] = (), command: str = "train") -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", *extra, "-m", "ppl_vae",
            command, *map(str, args)]


def _start(*args, cwd: Path, extra: tuple[str, ...] = (), env: dict | None = None,
           command: str = "train") -> subprocess.Popen:
    """torchrun in its own session, so that :func:`_finish` can stop it with its workers."""
    return subprocess.Popen(_torchrun(*args, extra=extra, command=command), cwd=cwd,
                            env={**_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(agent: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    try:
        return agent.communicate(timeout=timeout)
    finally:
        if agent.poll() is None:  # timed out, or the test failed: the agent and its workers
            os.killpg(agent.pid, signal.SIGKILL)
            agent.communicate()


def _run(*args, cwd: Path, command: str = "train") -> subprocess.CompletedProcess:
    agent = _start(*args, cwd=cwd, command=command)
    stdout, stderr = _finish(agent)
    return subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr)


def _metrics(path: Path) -> list[dict]:
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """An uninterrupted 2-process run (the end-to-end check and the restart's baseline)."""
    cwd = tmp_path_factory.mktemp("torchrun")
    result = _run(*RUN, "--out", cwd / "A", cwd=cwd)
    return cwd, cwd / "A", result


@pytest.mark.slow
@needs_torchrun
def test_torchrun_with_compile_follows_the_eager_run(plain_run, tmp_path):
    """--compile under torchrun: each rank's loss and gradient from its graph, one all-reduce,
    Adam outside. The same noise as the eager run, so the same numbers to float32 rounding."""
    _, eager, _ = plain_run
    result = _run(*RUN, "--compile", "--out", tmp_path / "C", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(tmp_path / "C")["step"] == "compiled (inductor)"
    assert "--compile" not in result.stdout  # no refusal note
    rows, reference = _metrics(tmp_path / "C"), _metrics(eager)
    assert len(rows) == len(reference) == 2
    for a, b in zip(rows, reference, strict=True):
        for key in ("train_elbo", "test_elbo"):
            assert abs(float(a[key]) - float(b[key])) < 1e-3 * abs(float(b[key])), (key, a, b)


@pytest.mark.slow
@needs_torchrun
def test_torchrun_trains_end_to_end_and_rank_0_writes(plain_run):
    cwd, out, result = plain_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in cwd.iterdir()] == ["A"]  # one run directory, no default one
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    summary = _summary(out)
    assert summary["processes"] == 2 and summary["epochs"] == 2
    assert "rows sharded over 2 processes" in summary["eval_method"]
    assert summary["train_elbo"] == float(rows[-1]["train_elbo"])
    assert summary["n_train"] + summary["n_test"] == 1797
    config = json.loads((out / "config.json").read_text())
    assert (config["epochs"], config["batch_size"], config["seed"]) == (2, 2, 5)
    loop = torch.load(out / "checkpoint.pt", weights_only=True)["loop"]
    assert loop["world_size"] == 2 and len(loop["ranks"]) == 2 and loop["done"]
    assert result.stdout.count("run written to") == 1, result.stdout
    assert f"run written to {out}" in result.stdout


def _workers(agent: int) -> dict[int, int]:
    """The agent's worker processes: rank -> pid."""
    children: list[int] = []
    for task in Path(f"/proc/{agent}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in task.read_text().split()]
    ranks = {}
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


@pytest.mark.slow
@needs_torchrun
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_killed_worker_is_restarted_and_the_run_continues_exactly(plain_run):
    cwd, baseline, _ = plain_run
    assert (baseline / "summary.json").is_file(), "the uninterrupted run failed"
    out = cwd / "B"
    ckpt, summary = out / "checkpoint.pt", out / "summary.json"
    # torchrun (torch 2.15) shares its rendezvous TCPStore with the workers across restarts;
    # ppl_vae's setup() prefixes the keys per attempt (pytorch#135712): no workaround here
    agent = _start(*RUN, "--checkpoint-every-steps", 40, "--out", out, cwd=cwd,
                   extra=("--max-restarts", "1"))
    try:
        deadline = time.monotonic() + 120
        while not ckpt.is_file():  # the first checkpoint: step 40 of 720
            assert agent.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
        workers = _workers(agent.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[0], signal.SIGKILL)  # rank 0: the one that writes the files
        state = torch.load(ckpt, weights_only=True)  # what the restarted group resumes from
        config_stat = os.stat(out / "config.json")
        assert not summary.exists()
    finally:
        stdout, stderr = _finish(agent)
    assert agent.returncode == 0, stderr[-3000:]
    loop = state["loop"]
    assert not loop["done"] and 0 < loop["step"] < 360, (  # 360 steps per epoch
        "the kill did not land mid-training", loop["epoch"], loop["step"])
    assert f"failed (exitcode: -9) local_rank: 0 (pid: {workers[0]})" in stderr, stderr[-3000:]
    # the restarted group resumed the run in place (a fresh start would rewrite config.json)
    now = os.stat(out / "config.json")
    assert (now.st_ino, now.st_mtime_ns) == (config_stat.st_ino, config_stat.st_mtime_ns)
    assert stdout.count("run written to") == 1, stdout

    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    assert numbers(_metrics(out)) == numbers(_metrics(baseline))
    got, want = _summary(out), _summary(baseline)
    for s in (got, want):
        s.pop("train_seconds")
    assert got == want


@pytest.mark.slow
@needs_torchrun
def test_the_cvae_quadrant_table_under_torchrun(tmp_path):
    out = tmp_path / "cvae"
    result = _run("cvae-quadrants", "--dataset", "digits", "--epochs", "1", "--hidden", "16",
                  "--z-dim", "2", "--eval-particles", "2", "--model-opt", "cll_samples=8",
                  "--out", out, cwd=tmp_path, command="experiment")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["cvae"]
    for name in ("summary.json", "cll_table.csv", "cll_table.md"):
        assert (out / name).is_file(), name
    with open(out / "cll_table.csv", newline="") as f:
        table = list(csv.reader(f))
    assert len(table) > 1
    summary = _summary(out)
    assert sorted(summary["cll"]) == ["1", "2", "3"]
    for k in ("1", "2", "3"):
        run = out / f"quadrants-{k}"
        assert _summary(run)["processes"] == 2
        assert "rows sharded over 2 processes" in _summary(run)["eval_method"]
        assert len(_metrics(run)) == 1
    assert result.stdout.count("runs written to") == 1, result.stdout


@pytest.mark.slow
@needs_torchrun
def test_an_error_on_one_rank_alone_is_the_line_the_user_sees(tmp_path):
    """Rank 1's own error (rank 0 is fine) is printed once, before torchrun's banner; rank
    0, whose collective then fails, prints no traceback of its own."""
    tests = str(Path(__file__).resolve().parent)  # plugin_models
    agent = _start("--model", "plugin_models:RankOneFails", "--dataset", "digits", "--epochs",
                   "1", "--out", tmp_path / "run", cwd=tmp_path,
                   env={"PYTHONPATH": os.pathsep.join([tests, _env()["PYTHONPATH"]])})
    _, stderr = _finish(agent)
    assert agent.returncode != 0
    lines = [line for line in stderr.splitlines() if "python -m ppl_vae train:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "RankOneFails.model" in lines[0] and "only rank one meets this" in lines[0]
    assert stderr.index(lines[0]) < stderr.index("ChildFailedError")  # the line comes first
    assert "[rank0]: Traceback" not in stderr and "Connection closed by peer" not in stderr


@pytest.mark.slow
@needs_torchrun
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_killed_rank_leaves_the_survivor_one_line(tmp_path):
    """SIGKILL on rank 1 (no restarts): rank 0 says in one line what happened and how to go
    on (the checkpoint is kept), with no traceback, before torchrun's banner."""
    out = tmp_path / "run"
    agent = _start(*RUN, "--checkpoint-every-steps", 40, "--out", out, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file():
            assert agent.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
        workers = _workers(agent.pid)
        os.kill(workers[1], signal.SIGKILL)
    finally:
        _, stderr = _finish(agent)
    assert agent.returncode != 0
    lines = [line for line in stderr.splitlines() if "python -m ppl_vae train:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "another process of this torchrun job died" in lines[0] or \
        f"--resume {out}" in lines[0], lines[0]
    assert stderr.index(lines[0]) < stderr.index("ChildFailedError")
    assert "[rank0]: Traceback" not in stderr, stderr[-3000:]
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_failing_rank_is_not_cut_short_by_the_agent_s_sigterm(monkeypatch, torchrun):
    """The mechanism behind the survivor's one line: under torchrun, an error leaving the
    training steps defers SIGTERM (the agent's, sent once another process died), and out of
    ``signals()`` SIGTERM is ignored, so the report is not cut short (it was, now and then, on
    a loaded machine: exit -15 and no line). Without torchrun a signal there raises at once
    and the previous handler comes back."""
    from ppl_vae.interrupt import Interrupted, signals

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are the main thread's")
    monkeypatch.setenv("WORLD_SIZE", "2" if torchrun else "1")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(RuntimeError, match="closed by peer"), signals() as guard:
            try:
                with guard.deferred():
                    raise RuntimeError("Connection closed by peer")
            except RuntimeError:
                if torchrun:
                    os.kill(os.getpid(), signal.SIGTERM)
                    assert guard.requested == signal.SIGTERM  # recorded, not raised
                else:
                    with pytest.raises(Interrupted):
                        os.kill(os.getpid(), signal.SIGTERM)
                raise
        if torchrun:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: this process lives on to report
        else:
            assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


ALL_ON = ["--lr-schedule", "cosine", "--warmup-steps", "50", "--clip-norm", "10", "--ema",
          "0.999", "--kl-warmup", "2", "--precision", "bf16", "--logger", "tensorboard",
          "--log-every-steps", "40"]


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("compiled", [(), ("--compile", "--precision", "fp32")],
                         ids=["eager", "compiled"])
def test_every_trainer_feature_at_once_under_torchrun_restarts_exactly(tmp_path, compiled):
    """Schedule, clipping after the sum over ranks, the average, KL warm-up, bf16 and the
    event stream: a worker killed mid-run and restarted ends where an uninterrupted
    2-process run ends (metrics.csv, summary, the TensorBoard scalars and the weights, bit
    for bit), also with --compile in float32 (at this small size this does not tell an eager
    first step of the restarted group from a compiled one: test_round7 checks that)."""
    from test_trainer import events

    whole = _run(*RUN, *ALL_ON, *compiled, "--out", tmp_path / "A", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "B"
    agent = _start(*RUN, *ALL_ON, *compiled, "--checkpoint-every-steps", 40, "--out", out,
                   cwd=tmp_path, extra=("--max-restarts", "1"))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file():
            assert agent.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
        time.sleep(0.5)  # (past the checkpoint: steps the restart takes again)
        worker = _workers(agent.pid)[1]
        os.kill(worker, signal.SIGKILL)
        state = torch.load(out / "checkpoint.pt", weights_only=True)  # what it resumes from
        config_stat = os.stat(out / "config.json")
    finally:
        stdout, stderr = _finish(agent)
    assert agent.returncode == 0, stderr[-3000:]
    assert not state["loop"]["done"] and 0 < state["loop"]["step"] < 360, (
        "the kill did not land mid-training", state["loop"]["epoch"], state["loop"]["step"])
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {worker})" in stderr, stderr[-3000:]
    now = os.stat(out / "config.json")  # resumed in place, not started afresh
    assert (now.st_ino, now.st_mtime_ns) == (config_stat.st_ino, config_stat.st_mtime_ns)

    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    assert numbers(_metrics(out)) == numbers(_metrics(tmp_path / "A"))
    got, want = _summary(out), _summary(tmp_path / "A")
    assert {k: v for k, v in got.items() if "seconds" not in k} == \
        {k: v for k, v in want.items() if "seconds" not in k}
    assert got["clipped_steps"] > 0 and got["processes"] == 2
    assert got.get("step", "compiled").startswith("compiled"), got.get("step")
    weights = [torch.load(d / "checkpoint.pt", weights_only=True)["model"]
               for d in (out, tmp_path / "A")]
    assert all(torch.equal(weights[0][k], v) for k, v in weights[1].items())  # bit for bit
    logged = events(tmp_path / "A")
    assert any(tag.startswith("train/") for tag in logged) and "epoch/test_elbo" in logged
    assert events(out) == logged


def test_global_sites_count_once_in_the_ranks_sum():
    """Under torchrun each rank scales the sites outside the data plate by 1/R
    (:class:`OutsideScale`): the ranks' losses then sum to one process's loss on the combined
    batch, global terms counted once (a deterministic guide: the loss is exact)."""
    from pyro.infer import Trace_ELBO

    from ppl_vae.inference.svi import OutsideScale

    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    b_loc, z_loc = torch.randn(3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def model(x, rows):
        b = pyro.sample("b", pdist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
        pyro.factor("prior_penalty", -(b ** 2).sum())  # an observed site outside the plate
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", pdist.Normal(torch.zeros(len(x), 2, dtype=x.dtype), 1.0)
                            .to_event(1))
            pyro.sample("x", pdist.Normal(b + z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x, rows):
        pyro.sample("b", pdist.Delta(b_loc).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("z", pdist.Delta(z_loc[rows]).to_event(1))

    def loss(m, g, rows):
        return Trace_ELBO().differentiable_loss(m, g, x[rows], rows).item()

    whole = loss(model, guide, slice(0, 6))
    shards = (slice(0, 3), slice(3, 6))
    share = OutsideScale("data", 1 / len(shards))
    scaled = sum(loss(share(model), share(guide), rows) for rows in shards)
    unscaled = sum(loss(model, guide, rows) for rows in shards)
    assert abs(scaled - whole) <= 1e-10 * abs(whole)
    assert abs(unscaled - whole) > 1e-3  # (the global terms twice without it)
