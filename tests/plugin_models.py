"""Models written the way other people write them, for the model-contract tests.

Nothing here imports ppl_vae except where a class defines a hook of the contract as a plain
method (PyroExampleCVAE's ``data_args``, ``from_options`` and ``pretrain``: Pyro's CVAE needs
its pre-trained baseline network and its -1-masked inputs, which no trainer can guess).

* ``PyroExampleVAE``: Pyro's ``examples/vae/vae.py`` VAE as published (``pyro.module`` inside
  model and guide, a hard-coded 784 pixels, ``VAE(z_dim=50, hidden_dim=400, use_cuda=False)``),
  with ``pyro.iarange``/``.independent`` spelled as today's ``pyro.plate``/``.to_event``.
* ``PyroExampleCVAE`` with ``BaselineNet`` and ``MaskedBCELoss``: Pyro's ``examples/cvae``.
  Its model indexes by the batch's mask (``loc[(xs == -1).view(-1, 784)]``), so it cannot
  take a vectorized samples dimension.
* ``PyroModuleVAE``: a VAE written as ``PyroModule``\\ s.
* ``GlobalLatentVAE``: a VAE whose decoder output weights are a global latent with a prior
  (``PyroSample``), guided by an ``AutoNormal`` part beside the amortized encoder.
* ``EnumMixtureVAE``: a class label y ~ Categorical(1/K) beside z, summed out by
  ``TraceEnum_ELBO`` (the guide's y is ``config_enumerate``-d), as in Pyro's ss-vae example;
  ``RankOneFails``, the same raising on torchrun's rank 1 only.
"""

from __future__ import annotations

import os

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample, pyro_method

fudge = 1e-7


# -- Pyro's examples/vae/vae.py --------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        z_loc = self.fc21(hidden)
        z_scale = torch.exp(self.fc22(hidden))
        return z_loc, z_scale


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        loc_img = (self.sigmoid(self.fc21(hidden)) + fudge) * (1 - 2 * fudge)
        return loc_img


class PyroExampleVAE(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400, use_cuda=False):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        if use_cuda:
            self.cuda()
        self.use_cuda = use_cuda
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.size(0)):
            z_loc = x.new_zeros(torch.Size((x.size(0), self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.size(0), self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder.forward(z)
            pyro.sample("obs", dist.Bernoulli(loc_img).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.size(0)):
            z_loc, z_scale = self.encoder.forward(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    def reconstruct_img(self, x):
        z_loc, z_scale = self.encoder(x)
        z = dist.Normal(z_loc, z_scale).sample()
        return self.decoder(z)


# -- Pyro's examples/cvae (baseline.py, cvae.py) ---------------------------------------------
class BaselineNet(nn.Module):
    def __init__(self, hidden_1, hidden_2):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_1)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        self.fc3 = nn.Linear(hidden_2, 784)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = x.view(-1, 784)
        hidden = self.relu(self.fc1(x))
        hidden = self.relu(self.fc2(hidden))
        y = torch.sigmoid(self.fc3(hidden))
        return y


class MaskedBCELoss(nn.Module):
    def __init__(self, masked_with=-1):
        super().__init__()
        self.masked_with = masked_with

    def forward(self, input, target):
        target = target.view(input.shape)
        # today's torch refuses targets outside [0, 1]: clamp the masked -1s (zeroed below)
        loss = F.binary_cross_entropy(input, target.clamp(min=0), reduction="none")
        loss[target == self.masked_with] = 0
        return loss.sum()


class CVAEEncoder(nn.Module):
    def __init__(self, z_dim, hidden_1, hidden_2):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_1)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        self.fc31 = nn.Linear(hidden_2, z_dim)
        self.fc32 = nn.Linear(hidden_2, z_dim)
        self.relu = nn.ReLU()

    def forward(self, x, y):
        xc = x.clone()
        xc[x == -1] = y[x == -1]
        xc = xc.view(-1, 784)
        hidden = self.relu(self.fc1(xc))
        hidden = self.relu(self.fc2(hidden))
        z_loc = self.fc31(hidden)
        z_scale = torch.exp(self.fc32(hidden))
        return z_loc, z_scale


class CVAEDecoder(nn.Module):
    def __init__(self, z_dim, hidden_1, hidden_2):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_1)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        self.fc3 = nn.Linear(hidden_2, 784)
        self.relu = nn.ReLU()

    def forward(self, z):
        y = self.relu(self.fc1(z))
        y = self.relu(self.fc2(y))
        y = torch.sigmoid(self.fc3(y))
        return y


class PyroExampleCVAE(nn.Module):
    def __init__(self, z_dim, hidden_1, hidden_2, pre_trained_baseline_net):
        super().__init__()
        self.baseline_net = pre_trained_baseline_net
        self.prior_net = CVAEEncoder(z_dim, hidden_1, hidden_2)
        self.generation_net = CVAEDecoder(z_dim, hidden_1, hidden_2)
        self.recognition_net = CVAEEncoder(z_dim, hidden_1, hidden_2)

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            with torch.no_grad():
                y_hat = self.baseline_net(xs).view(xs.shape)
            prior_loc, prior_scale = self.prior_net(xs, y_hat)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                mask_loc = loc[(xs == -1).view(-1, 784)].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(mask_loc).to_event(1), obs=mask_ys)
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                y_hat = self.baseline_net(xs).view(xs.shape)
                loc, scale = self.prior_net(xs, y_hat)
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # -- hooks of ppl_vae's model contract (Pyro's example does these in its main.py) --------
    @classmethod
    def from_options(cls, options, data):
        """Pyro's main.py: the baseline first, then CVAE(z_dim, hidden_1, hidden_2, baseline)."""
        o = {"z_dim": 200, "hidden_1": 500, "hidden_2": 500, **dict(options)}
        return cls(o["z_dim"], o["hidden_1"], o["hidden_2"],
                   BaselineNet(o["hidden_1"], o["hidden_2"]))

    def data_args(self, x, y):
        """Pyro's dataset: the input shows the bottom-left quadrant and -1 elsewhere; the
        output shows the rest and -1 where the input is seen (one observed quadrant)."""
        img = x.view(-1, 28, 28)
        seen = torch.zeros(28, 28, dtype=torch.bool, device=x.device)
        seen[14:, :14] = True
        inputs = torch.where(seen, img, torch.full_like(img, -1.0)).reshape(-1, 784)
        outputs = torch.where(seen, torch.full_like(img, -1.0), img).reshape(-1, 784)
        return inputs, outputs

    def pretrain(self, ctx):
        """Pyro's baseline.py: train the baseline NN by the masked BCE first."""
        loss = MaskedBCELoss()
        ctx.fit(lambda xs, ys: loss(self.baseline_net(xs), ys), self.baseline_net,
                name="bce", desc="baseline")


# -- PyroModule VAE ---------------------------------------------------------------------------
class PyroModuleVAE(PyroModule):
    """Everything a PyroModule: the networks' weights are plain parameters (no priors)."""

    def __init__(self, input_dim, z_dim=4, hidden=32):
        super().__init__()
        self.z_dim = z_dim
        self.enc = PyroModule[nn.Linear](input_dim, hidden)
        self.enc_loc = PyroModule[nn.Linear](hidden, z_dim)
        self.enc_scale = PyroModule[nn.Linear](hidden, z_dim)
        self.dec = PyroModule[nn.Sequential](
            PyroModule[nn.Linear](z_dim, hidden), nn.ReLU(),
            PyroModule[nn.Linear](hidden, input_dim))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z), validate_args=False)
                        .to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            h = torch.relu(self.enc(x))
            pyro.sample("z", dist.Normal(self.enc_loc(h),
                                         F.softplus(self.enc_scale(h)) + 1e-4).to_event(1))


# -- a global latent: Bayesian decoder output weights -------------------------------------------
class GlobalLatentVAE(PyroModule):
    """p(W) p(z) p(x|z, W) with W ~ Normal(0, 1) the decoder's output weights (a global
    latent, shared by all images); q(W) an AutoNormal, q(z|x) an MLP encoder."""

    def __init__(self, input_dim, z_dim=4, hidden=32):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * z_dim))
        self.hidden_layer = nn.Linear(z_dim, hidden)
        self.out = PyroModule[nn.Linear](hidden, input_dim)
        self.out.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([input_dim, hidden]).to_event(2))
        self.weights_guide = AutoNormal(pyro.poutine.block(self.model, expose=["out.weight"]),
                                        init_scale=0.01)

    @pyro_method
    def model(self, x):
        weight = self.out.weight  # the global latent: drawn once, outside the data plate
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            logits = F.linear(torch.relu(self.hidden_layer(z)), weight, self.out.bias)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
                        obs=x)

    def guide(self, x):
        self.weights_guide(x)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


# -- a discrete latent summed out by enumeration ---------------------------------------------
class EnumMixtureVAE(nn.Module):
    """y ~ Categorical(1/K), z ~ Normal(0, I), x ~ Bernoulli(f(y, z)); guide q(y|x) q(z|x,y)
    with y enumerated (config_enumerate), as in Pyro's ss-vae for unlabelled images."""

    def __init__(self, input_dim, num_classes=10, z_dim=4, hidden=32):
        super().__init__()
        self.k, self.z_dim = num_classes, z_dim
        self.classify = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(),
                                      nn.Linear(hidden, num_classes))
        self.encode = nn.Sequential(nn.Linear(input_dim + num_classes, hidden), nn.ReLU(),
                                    nn.Linear(hidden, 2 * z_dim))
        self.decode = nn.Sequential(nn.Linear(z_dim + num_classes, hidden), nn.ReLU(),
                                    nn.Linear(hidden, input_dim))

    @staticmethod
    def _cat(a, b):
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.cat([a.expand(*shape, -1), b.expand(*shape, -1)], -1)

    def model(self, x):
        pyro.module("mixture_vae", self)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.k)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            logits = self.decode(self._cat(z, F.one_hot(y, self.k).to(x.dtype)))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
                        obs=x)

    @config_enumerate
    def guide(self, x):
        pyro.module("mixture_vae", self)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.classify(x)))
            loc, log_scale = self.encode(self._cat(x, F.one_hot(y, self.k).to(x.dtype))
                                         ).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class RankOneFails(EnumMixtureVAE):
    """``EnumMixtureVAE`` whose model raises on torchrun's rank 1 alone, once training starts
    (an error only one process meets)."""

    def model(self, x):
        if os.environ.get("RANK") == "1" and self.training:
            raise ValueError("only rank one meets this")
        super().model(x)
