"""The NumPyro anchor: the benchmarks' VAE written the way NumPyro's ``examples/vae.py``
writes it, trained by ``SVI`` with ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) and Adam, in
its own virtual environment (the package never imports JAX).

    model:  z ~ N(0, I),  x ~ Bernoulli(logits = decoder(z))       (grey-level targets)
    guide:  (mu, h) = encoder(x),  z ~ N(mu, softplus(h))

with encoder Dense(H) -> ReLU -> Dense(2Z) and decoder Dense(H) -> ReLU -> Dense(D): the
networks of ``ppl_vae.models.VAE``. It is a worker: ``bench_train.py --methods numpyro
numpyro-fori`` starts it with the other environment's Python, hands it the data and the
initial weights (an ``.npz`` in torch's layout) and asks for one epoch at a time, so that
NumPyro alternates with the torch methods in one run on one core. Two ways to train:

* ``step``: ``jit(svi.update)`` per step, the batch gathered by index outside it;
* ``fori``: an epoch as one jitted ``lax.fori_loop`` over the full batches of a shuffled
  order, gathered inside (the example's way; like it, the last partial batch is dropped).

Protocol: one JSON object per line on stdin, one reply per line on stdout.
``{"init": {...}}`` -> ``{"compile_seconds": s}``; ``{"epoch": n}`` -> ``{"seconds": s,
"rows": r, "loss": l}``; ``{"params": PATH}`` writes the weights (torch's layout) to PATH.

    python3 -m venv benchmarks/.venv-numpyro
    benchmarks/.venv-numpyro/bin/pip install "jax[cpu]" numpyro
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax import lax, random  # noqa: E402
from jax.example_libraries import stax  # noqa: E402
from numpyro import optim  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO  # noqa: E402

numpyro.enable_validation(False)  # (grey-level targets: as ppl_vae trains, Pyro's checks off)


def networks(d: int, h: int, z: int):
    encoder = stax.serial(stax.Dense(h), stax.Relu, stax.Dense(2 * z))
    decoder = stax.serial(stax.Dense(h), stax.Relu, stax.Dense(d))
    return encoder, decoder


def programs(d: int, h: int, z: int, batch: int):
    encoder, decoder = networks(d, h, z)

    def model(x):
        decode = numpyro.module("decoder", decoder, (batch, z))
        with numpyro.plate("data", x.shape[0]):
            latent = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([z]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decode(latent)).to_event(1), obs=x)

    def guide(x):
        encode = numpyro.module("encoder", encoder, (batch, d))
        loc, h_ = jnp.split(encode(x), 2, axis=-1)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, jax.nn.softplus(h_)).to_event(1))

    return model, guide


def from_torch(w: dict, net: str) -> list:
    """stax's ((W, b), (), (W, b)) from torch's ``net.0.weight`` (out x in) and so on."""
    return [(jnp.asarray(w[f"{net}.0.weight"].T), jnp.asarray(w[f"{net}.0.bias"])), (),
            (jnp.asarray(w[f"{net}.2.weight"].T), jnp.asarray(w[f"{net}.2.bias"]))]


def to_torch(params: list, net: str) -> dict:
    (w0, b0), _, (w2, b2) = params
    return {f"{net}.0.weight": np.asarray(w0).T, f"{net}.0.bias": np.asarray(b0),
            f"{net}.2.weight": np.asarray(w2).T, f"{net}.2.bias": np.asarray(b2)}


class Worker:
    def init(self, npz: str, mode: str, batch: int, lr: float, seed: int, elbo: str) -> dict:
        f = np.load(npz)
        self.x = jnp.asarray(f["x"], dtype=jnp.float32)
        weights = {k: f[k] for k in f.files if k != "x"}
        d, h = weights["encoder.0.weight"].shape[1], weights["encoder.0.weight"].shape[0]
        z = weights["decoder.0.weight"].shape[1]
        self.n, self.batch, self.mode = self.x.shape[0], batch, mode
        model, guide = programs(d, h, z, batch)
        loss = TraceMeanField_ELBO() if elbo == "analytic" else Trace_ELBO()
        self.svi = SVI(model, guide, optim.Adam(lr), loss)
        init = {"encoder$params": from_torch(weights, "encoder"),
                "decoder$params": from_torch(weights, "decoder")}
        self.key = random.PRNGKey(seed)
        self.key, k0 = random.split(self.key)
        self.state = self.svi.init(k0, self.x[:batch], init_params=init)
        self.update = jax.jit(self.svi.update)
        steps = self.n // batch

        def epoch(state, key):
            order = random.permutation(key, self.n)

            def body(i, carry):
                state, total = carry
                rows = lax.dynamic_slice_in_dim(order, i * batch, batch)
                state, loss = self.svi.update(state, self.x[rows])
                return state, total + loss

            return lax.fori_loop(0, steps, body, (state, jnp.zeros(())))

        began = time.perf_counter()  # XLA's compile: the executables the epochs call
        if mode == "fori":
            self.epoch_fn = jax.jit(epoch).lower(self.state, self.key).compile()
        else:
            self.full = self.update.lower(self.state, self.x[:batch]).compile()
        return {"compile_seconds": time.perf_counter() - began}

    def epoch(self) -> dict:
        self.key, k = random.split(self.key)
        began = time.perf_counter()
        if self.mode == "fori":
            self.state, total = self.epoch_fn(self.state, k)
            rows = self.n // self.batch * self.batch
        else:
            order = random.permutation(k, self.n)
            total = jnp.zeros(())
            for i in range(0, self.n, self.batch):
                rows = order[i:i + self.batch]
                take = self.full if len(rows) == self.batch else self.update  # (partial: jit)
                self.state, loss = take(self.state, self.x[rows])
                total = total + loss
            rows = self.n
        total = float(jax.block_until_ready(total))
        return {"seconds": time.perf_counter() - began, "rows": rows, "loss": total / rows}

    def params(self, path: str) -> dict:
        p = self.svi.get_params(self.state)
        np.savez(path, **to_torch(p["encoder$params"], "encoder"),
                 **to_torch(p["decoder$params"], "decoder"))
        return {"path": path}


def main() -> int:
    worker = Worker()
    print(json.dumps({"ready": f"jax {jax.__version__}, numpyro {numpyro.__version__}"}),
          flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        if "init" in ask:
            reply = worker.init(**ask["init"])
        elif "epoch" in ask:
            reply = worker.epoch()
        elif "params" in ask:
            reply = worker.params(ask["params"])
        else:
            break
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
