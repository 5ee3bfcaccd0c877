"""The semi-supervised VAE M2 (``--model ssvae``): its programs' structure, the exactness of
``TraceEnum_ELBO``'s sum over the class (against the sum by hand, float64, the same z noise),
the mixed labelled/unlabelled objective row by row, the one-program evaluation, and runs end
to end on digits with a class-balanced labelled subset."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample
from torch.distributions import Bernoulli, Normal

from ppl_vae import Dataset, Split, TrainConfig, UsageError, load_dataset, make_elbo, score
from ppl_vae.cli import train_main
from ppl_vae.inference.program import inspect_program
from ppl_vae.inference.svi import elbo_loss
from ppl_vae.models import SSVAE, get_model, hook
from ppl_vae.models.ssvae import SSVAEOptions, unlabelled_bound
from ppl_vae.run.train import train_run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

F64 = torch.float64
K = 10
PIXELS = 5
Z = 2
SMALL = dict(hidden=(32,), z_dim=4, m1=0)  # M2 alone (M1+M2: the tests at the end)
PNG = b"\x89PNG\r\n\x1a\n"


def tiny(aux_weight: float = 0.7, **kw) -> SSVAE:
    """5 pixels, 10 classes, z of 2, float64 (seeded by the autouse fixture)."""
    return SSVAE(PIXELS, K, z_dim=Z, hidden=(7,), m1=0, aux_weight=aux_weight, **kw).to(F64)


def batch(n: int = 6, labels=(3, -1, 0, -1, -1, 9)):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, PIXELS, generator=g, dtype=F64)
    return x, torch.tensor(labels[:n], dtype=torch.long)


def standard_normal(*shape: int) -> torch.Tensor:
    """What ``Normal.rsample`` draws next (``torch.empty(...).normal_()``)."""
    return torch.empty(shape, dtype=F64).normal_()


# -- hand computations ------------------------------------------------------------------------
def labelled_elbo(m: SSVAE, x, y, eps) -> torch.Tensor:
    """log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y) at z = mu + sigma * eps, per row."""
    loc, scale = m.encode(x, y)
    z = loc + scale * eps
    log_px = Bernoulli(logits=m.decoder(z, y), validate_args=False).log_prob(x).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(loc, scale).log_prob(z).sum(-1)
    return log_px + log_pz - log_qz - math.log(K)


def enumerated_bound(m: SSVAE, x, eps) -> torch.Tensor:
    """sum_y q(y|x) [L(x, y) - log q(y|x)] with z noise ``eps[y]`` (shape (K, N, d))."""
    log_q = F.log_softmax(m.classify_logits(x), -1)
    total = torch.zeros(x.shape[0], dtype=F64)
    for k in range(K):
        y = torch.full((x.shape[0],), k, dtype=torch.long)
        total = total + log_q[:, k].exp() * (labelled_elbo(m, x, y, eps[k]) - log_q[:, k])
    return total


def sample_sites(trace) -> set[str]:
    return {n for n, s in trace.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s)}


def unlabelled_term(m: SSVAE):
    return [t for t in m.programs() if t[1] == m.model_unlabelled][0]


# -- structure ---------------------------------------------------------------------------------
def test_registered_with_options():
    assert get_model("ssvae") is SSVAE
    opts = SSVAEOptions()
    assert (opts.hidden, opts.z_dim, opts.alpha, opts.m1) == ((500,), 50, 4.0, 50)  # M1+M2
    with pytest.raises(UsageError, match="alpha must be"):
        SSVAEOptions(alpha=-1.0)
    with pytest.raises(UsageError, match="classes takes"):
        SSVAEOptions(classes=1)


def test_programs_sites_plates_and_enumeration_dim():
    m = tiny()
    x, y = batch()
    assert [w for w, _, _ in m.programs()] == [1.0, 1.0, 0.7]
    # the evaluation program: y observed where labelled, sampled from q(y|x) elsewhere
    guide = poutine.trace(m.guide).get_trace(x, y)
    model = poutine.trace(poutine.replay(m.model, trace=guide)).get_trace(x, y)
    assert sample_sites(guide) == {"y_unobserved", "z"}
    sites = sample_sites(model)
    assert {"y_observed", "y_unobserved", "y", "z", "x"} <= sites
    assert torch.equal(guide.nodes["y_unobserved"]["mask"], y < 0)
    assert torch.equal(model.nodes["y_observed"]["mask"], y >= 0)
    value = model.nodes["y"]["value"]
    assert torch.equal(value[y >= 0], y[y >= 0])
    assert torch.equal(value[y < 0], guide.nodes["y_unobserved"]["value"][y < 0])
    for name in ("z", "x", "y_observed"):
        assert [f.name for f in model.nodes[name]["cond_indep_stack"]] == ["data"]
    assert model.nodes["z"]["value"].shape == (6, Z)
    info = inspect_program(m.model, m.guide, x, y)
    assert (info.max_plate_nesting, info.data_plate, info.vectorized) == (1, "data", True)
    # the unlabelled term under TraceEnum_ELBO: y enumerated at dim -2 (left of the data plate)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    _, model_u, guide_u = unlabelled_term(m)
    model_trace, guide_trace = next(elbo._get_traces(model_u, guide_u, (x, y), {}))
    site = guide_trace.nodes["y"]
    assert site["infer"]["enumerate"] == "parallel"
    assert site["value"].shape == (K, 1)
    assert torch.equal(site["value"].reshape(-1), torch.arange(K))
    assert guide_trace.nodes["z"]["value"].shape == (K, 6, Z)
    assert model_trace.nodes["x"]["fn"].batch_shape == (K, 6)
    assert torch.equal(guide_trace.nodes["z"]["mask"], y < 0)


def test_data_args_marks_missing_labels():
    m = tiny()
    x = torch.rand(3, PIXELS)
    _, y = m.data_args(x, None)
    assert y.tolist() == [-1, -1, -1] and y.dtype == torch.long
    _, y = m.data_args(x, torch.tensor([2, -1, 0]))
    assert y.tolist() == [2, -1, 0]


# -- exactness of the enumeration --------------------------------------------------------------
def test_enumeration_equals_the_sum_over_classes_by_hand():
    """TraceEnum_ELBO's loss of the unlabelled term is -sum_i sum_y q(y|x_i)[L(x_i, y) -
    log q(y|x_i)], exactly (float64), with the same z noise (one (K, N, d) draw)."""
    m = tiny()
    x, _ = batch()
    y = torch.full((6,), -1)
    _, model_u, guide_u = unlabelled_term(m)
    pyro.set_rng_seed(5)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model_u, guide_u, x, y)
    pyro.set_rng_seed(5)
    eps = standard_normal(K, 6, Z)
    expected = -enumerated_bound(m, x, eps).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-10)
    # and its gradient reaches the classifier through the weights q(y|x)
    loss.backward()
    assert m.classifier[0].weight.grad.abs().sum() > 0


def test_mixed_batch_gives_each_row_its_own_bound():
    """The whole objective (the three weighted terms, --elbo enum) on a batch with labelled
    and unlabelled rows: labelled rows L(x, y) + a log q(y|x) (never K times), unlabelled rows
    the enumerated U(x), row by row from the same z noise."""
    m = tiny(aux_weight=0.7)
    x, y = batch()
    lab = y >= 0
    loss_fn = elbo_loss(make_elbo("enum", 1), m, m.programs())
    pyro.set_rng_seed(11)
    loss = loss_fn(x, y)
    pyro.set_rng_seed(11)
    eps_labelled = standard_normal(6, Z)  # the labelled term draws z for every row (masked)
    eps_unlabelled = standard_normal(K, 6, Z)
    label = y.clamp(min=0)
    log_q = F.log_softmax(m.classify_logits(x), -1).gather(-1, label[:, None]).squeeze(-1)
    per_row = torch.where(lab, labelled_elbo(m, x, label, eps_labelled) + 0.7 * log_q,
                          enumerated_bound(m, x, eps_unlabelled))
    assert loss.item() == pytest.approx(-per_row.sum().item(), rel=1e-12, abs=1e-10)
    # masked rows contribute exactly nothing: an unlabelled-only batch is its own sum
    _, model_u, guide_u = unlabelled_term(m)
    pyro.set_rng_seed(3)
    part = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model_u, guide_u, x, y)
    pyro.set_rng_seed(3)
    eps = standard_normal(K, 6, Z)
    assert part.item() == pytest.approx(-enumerated_bound(m, x, eps)[~lab].sum().item(),
                                        rel=1e-12, abs=1e-10)


def test_sampled_class_estimates_the_same_bound(sem):
    """--elbo mc samples y ~ q(y|x): its loss averages to the enumerated one."""
    m = tiny()
    x, _ = batch(3)
    y = torch.full((3,), -1)
    _, model_u, guide_u = unlabelled_term(m)
    mc = make_elbo("mc", 2000, max_plate_nesting=1)
    enum = make_elbo("enum", 2000, max_plate_nesting=1)
    with pyro.validation_enabled(False):  # it warns that mc does not enumerate y
        a = torch.tensor([mc.loss(model_u, guide_u, x, y) for _ in range(10)])
    b = torch.tensor([enum.loss(model_u, guide_u, x, y) for _ in range(10)])
    assert abs(a.mean() - b.mean()) < 4 * math.hypot(sem(a), sem(b)) + 1e-9


def test_evaluation_program_scores_both_bounds(sem):
    """score() of the one program: labelled rows estimate L(x, y); unlabelled rows (y
    sampled from q(y|x)) estimate U(x), which unlabelled_bound sums over y exactly."""
    m = tiny()
    x, y = batch()
    labelled = torch.tensor([3, 1, 0, 4, 7, 9])
    s = score(m, x, labelled, num_samples=4000).elbo
    pyro.set_rng_seed(2)
    hand = torch.stack([labelled_elbo(m, x, labelled, standard_normal(6, Z))
                        for _ in range(400)])
    assert torch.allclose(s, hand.mean(0), atol=5 * sem(hand[:, 0]) + 0.02)
    hidden = torch.full((6,), -1)
    draws = torch.stack([score(m, x, hidden, num_samples=1000, seed=i).elbo for i in range(8)])
    exact = unlabelled_bound(m, x, score, particles=4000)
    tol = 5 * draws.std(0) / math.sqrt(8) + 0.02
    assert ((draws.mean(0) - exact).abs() < tol).all(), (draws.mean(0), exact)


# -- runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def few_labels():
    return load_dataset("digits", labelled=50, seed=3)


def test_labelled_subset_is_class_balanced(few_labels):
    y = few_labels.train.y
    assert few_labels.labelled == 50 and int((y >= 0).sum()) == 50
    counts = torch.bincount(y[y >= 0], minlength=K)
    assert counts.tolist() == [5] * K
    assert bool((few_labels.test.y >= 0).all())
    again = load_dataset("digits", labelled=50, seed=3)
    assert torch.equal(again.train.y, y)


def test_train_run_with_few_labels(tmp_path):
    config = TrainConfig(model="ssvae", model_options=SMALL, dataset="digits", labelled=50,
                         elbo="enum", epochs=2, batch_size=64, lr=3e-3, eval_particles=3,
                         out=str(tmp_path / "run"))
    run = train_run(config, progress=False)
    s = run.summary
    assert s["labelled"] == 50
    assert 0 <= s["test_accuracy"] <= 1
    for key in ("test_elbo", "test_elbo_unlabelled", "train_elbo"):
        assert math.isfinite(s[key]), key
    # log p(x) >= log p(x, y): the unlabelled bound is the higher one (up to the z noise)
    assert s["test_elbo_unlabelled"] > s["test_elbo"] - 1.0
    # alpha * B per batch: alpha N / N_labelled per labelled row (batches drawn alike)
    assert config.labelled_share == 0
    assert s["classification_weight"] == pytest.approx(4.0 * len(run.data.train) / 50)
    for name in ("samples_by_class.png", "analogies.png", "elbo_curves.png"):
        assert (run.out / name).read_bytes()[:8] == PNG, name
    saved = json.loads((run.out / "summary.json").read_text())
    assert saved["test_accuracy"] == s["test_accuracy"]
    # the family's on_epoch numbers: the accuracy epoch by epoch, the last one the summary's
    rows = (run.out / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("test_accuracy")
    accuracy = [float(r.split(",")[column]) for r in rows[1:]]
    assert len(accuracy) == 2 and accuracy[-1] == pytest.approx(s["test_accuracy"])
    assert any("50 of" in n for n in run.notes)


def test_every_label_and_no_label(tmp_path, digits):
    """--labelled 0 keeps every label (fully supervised M2: no unlabelled term); training
    labels absent altogether make every row unlabelled (no labelled terms)."""
    common = dict(model="ssvae", model_options=SMALL, epochs=1, batch_size=64,
                  eval_particles=2)
    full = train_run(TrainConfig(**common, out=str(tmp_path / "full")), digits,
                     progress=False)
    assert [t[1].__name__ for t in full.module.programs()] == ["model_labelled",
                                                               "model_classify"]
    assert full.summary["labelled"] == len(full.data.train)  # (less the recipe's val split)
    assert len(full.data.train) + len(full.data.val) == len(digits.train)
    bare = Dataset("bare", Split(digits.train.x), digits.test, digits.image_shape)
    none = train_run(TrainConfig(**common, elbo="enum", out=str(tmp_path / "none")), bare,
                     progress=False)
    assert [t[1].__name__ for t in none.module.programs()] == ["model_unlabelled"]
    assert none.summary["labelled"] == 0 and 0 <= none.summary["test_accuracy"] <= 1


def test_mc_runs_with_a_note_and_analytic_is_refused(tmp_path, few_labels):
    common = dict(model="ssvae", model_options=SMALL, epochs=1, batch_size=64,
                  eval_particles=2)
    run = train_run(TrainConfig(**common, elbo="mc", out=str(tmp_path / "mc")), few_labels,
                    progress=False)
    assert any("enum sums it out exactly" in n for n in run.notes)
    assert math.isfinite(run.summary["test_elbo"])
    with pytest.raises(UsageError, match="analytic"):
        train_run(TrainConfig(**common, elbo="analytic", out=str(tmp_path / "an")),
                  few_labels, progress=False)
    for elbo in ("stl", "iwae-dreg"):  # the family's own line, which names enum
        with pytest.raises(UsageError, match=f"{elbo} needs; use enum"):
            train_run(TrainConfig(**common, elbo=elbo, particles=3, out=str(tmp_path / elbo)),
                      few_labels, progress=False)
    # iwae (RenyiELBO) trains one pair of M2's three terms; the line names what M2 takes
    with pytest.raises(UsageError, match="sums 3; use elbo mc, rws, enum or tracegraph$"):
        train_run(TrainConfig(**common, elbo="iwae", particles=3, out=str(tmp_path / "iwae")),
                  few_labels, progress=False)


def test_cli(cli, tmp_path):
    out = tmp_path / "cli"
    result = cli(train_main, ["--model", "ssvae", "--dataset", "digits", "--labelled", "30",
                              "--elbo", "enum", "--hidden", "16", "--z-dim", "2", "--alpha",
                              "0.5", "--epochs", "1", "--eval-particles", "2", "--out", out])
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] == 30
    config = json.loads((out / "config.json").read_text())
    assert config["labelled"] == 30 and config["model_options"]["alpha"] == 0.5


# -- the batch composition: a share of labelled rows in every batch, the labels cycled -------
@pytest.mark.parametrize("share, batch_size", [(0.5, 64), (0.1, 64), (0.25, 30)])
def test_every_batch_holds_its_share_of_labelled_rows_and_the_labels_cycle(
        few_labels, share, batch_size):
    from dataclasses import replace

    data = replace(few_labels, labelled_share=share)
    y = data.train.y
    order = data.epoch_order(batch_size, torch.Generator().manual_seed(1))
    k = round(share * batch_size)
    batches = order.split(batch_size)
    assert all(int((y[b] >= 0).sum()) == k for b in batches)  # the last batch too
    unlabelled = order[y[order] < 0]
    assert sorted(unlabelled.tolist()) == (y < 0).nonzero().squeeze(1).tolist()  # each once
    labelled = order[y[order] >= 0]
    everyone = sorted((y >= 0).nonzero().squeeze(1).tolist())
    assert len(labelled) >= len(everyone)
    for start in range(0, len(labelled) - len(everyone) + 1, len(everyone)):  # whole cycles
        assert sorted(labelled[start:start + len(everyone)].tolist()) == everyone
    again = data.epoch_order(batch_size, torch.Generator().manual_seed(1))
    assert torch.equal(order, again)  # drawn by the generator alone: resume replays it


def test_without_a_share_or_hidden_labels_an_epoch_is_a_permutation(few_labels, digits):
    from dataclasses import replace

    for data in (replace(few_labels, labelled_share=0.0), replace(digits, labelled_share=0.5)):
        order = data.epoch_order(64, torch.Generator().manual_seed(0))
        assert sorted(order.tolist()) == list(range(len(data.train)))


def test_the_classification_weight_is_alpha_b_per_batch(few_labels):
    """a = alpha / share per labelled row with composed batches, alpha N / N_labelled
    without: alpha * B per batch of B rows either way."""
    from dataclasses import replace

    options = SSVAEOptions(hidden=(8,), z_dim=2, alpha=0.3)
    composed = SSVAE.from_options(options, replace(few_labels, labelled_share=0.25))
    assert composed.aux_weight == pytest.approx(0.3 / 0.25)
    drawn = SSVAE.from_options(options, replace(few_labels, labelled_share=0.0))
    assert drawn.aux_weight == pytest.approx(0.3 * len(few_labels.train) / 50)


def test_alpha_s_schedule_weighs_the_classification_term_epoch_by_epoch(few_labels):
    """With alpha_decay r, the trainer's loss of the classification program in epoch e is
    -a r^(e-1) sum_labelled log q(y|x), exactly (no latent: a deterministic term)."""
    model = SSVAE.from_options(SSVAEOptions(**SMALL, alpha=0.3, alpha_decay=0.5), few_labels)
    v, y = model.data_args(few_labels.train.x[:64], few_labels.train.y[:64])
    assert int((y >= 0).sum()) > 0
    classify = [t for t in model.programs() if t[1] == model.model_classify]
    loss = elbo_loss(make_elbo("enum", 1, max_plate_nesting=1), model, classify)
    with torch.no_grad():
        log_q = torch.log_softmax(model.classifier(v), -1)
        nll = -log_q[y >= 0].gather(1, y[y >= 0, None]).sum()
    for epoch in (1, 2, 4):  # on_epoch after epoch - 1 sets what epoch trains with
        hook(model, "on_epoch")(SimpleNamespace(data=few_labels), epoch - 1)
        expected = model.aux_weight * 0.5 ** (epoch - 1) * nll
        assert loss(v, y).item() == pytest.approx(expected.item(), rel=1e-6), epoch
    assert "aux_factor" not in model.state_dict()  # the epoch decides it: old runs load
    with pytest.raises(UsageError, match="alpha.decay must be a positive number"):
        SSVAEOptions(alpha_decay=0.0)


def test_a_run_applies_the_schedule_each_epoch_and_on_resume(few_labels, tmp_path,
                                                            monkeypatch):
    """on_epoch runs before the first epoch and after each (also for the epoch a resumed run
    re-enters), so an interrupted and resumed run with a schedule equals the uninterrupted
    one."""
    from test_resume import interrupt_at, without_clock

    from ppl_vae.interrupt import Interrupted
    from ppl_vae.run.loop import Loop
    from ppl_vae.run.train import resume_config

    seen, take = [], Loop._take_step
    real = SSVAE.on_epoch
    monkeypatch.setattr(SSVAE, "on_epoch",
                        lambda self, ctx, epoch: (seen.append(epoch), real(self, ctx, epoch))[1])

    def config(out):
        return TrainConfig(model="ssvae", model_options={**SMALL, "alpha_decay": 0.3},
                           epochs=3, batch_size=64, beta1=0.5, eval_particles=2, seed=1,
                           checkpoint_every_steps=5, out=str(tmp_path / out))

    whole = train_run(config("whole"), few_labels, progress=False)
    assert seen == [0, 1, 2, 3]
    assert [set(row) - {"val_elbo"} for row in whole.history] == [
        {"epoch", "train_elbo", "test_elbo", "train_seconds", "test_accuracy"}] * 3
    constant = train_run(replace(config("constant"), model_options=SMALL), few_labels,
                         progress=False)  # (the schedule changes the run)
    assert constant.history[1]["train_elbo"] != whole.history[1]["train_elbo"]
    interrupt_at(monkeypatch, epoch=2, step=7)
    with pytest.raises(Interrupted):
        train_run(config("cut"), few_labels, progress=False)
    seen.clear()
    monkeypatch.setattr(Loop, "_take_step", take)
    resumed = train_run(resume_config(tmp_path / "cut"), few_labels, progress=False,
                        resume=True)
    assert seen == [1, 2, 3]
    assert without_clock(resumed.history) == without_clock(whole.history)


def test_training_batches_are_composed(few_labels, tmp_path, monkeypatch):
    """The trainer takes the data's order: every training batch M2 sees holds its share."""
    from ppl_vae.run.loop import Loop

    seen = []
    take = Loop._take_step

    def record(self, i, args):
        if self.desc == "ssvae":
            seen.append(int((args[1] >= 0).sum()))
        return take(self, i, args)

    monkeypatch.setattr(Loop, "_take_step", record)
    train_run(TrainConfig(model="ssvae", model_options=SMALL, epochs=2, batch_size=40,
                          labelled_share=0.25, eval_particles=2, out=str(tmp_path / "r")),
              few_labels, progress=False)
    assert seen and set(seen) == {10}
    with pytest.raises(UsageError, match="labelled.share must be a number in \\[0, 1\\)"):
        TrainConfig(labelled_share=1.0)


def test_under_torchrun_every_rank_s_batch_holds_the_share(few_labels):
    """The order is built per process (batch B): a step's B * W rows are W batches, and rank
    r's contiguous share is one of them, with its k labelled rows."""
    from dataclasses import replace

    from ppl_vae.distributed import World, shard

    data, b, w = replace(few_labels, labelled_share=0.25), 32, 2
    y = data.train.y
    order = data.epoch_order(b, torch.Generator().manual_seed(2))
    for start in range(0, len(order) - b * w + 1, b * w):  # the whole steps
        chunk = order[start:start + b * w]
        for rank in range(w):
            rows = chunk[shard(len(chunk), World(rank=rank, size=w))]
            assert int((y[rows] >= 0).sum()) == 8


# -- M1+M2: M2 on the standardized means of a VAE trained first -------------------------------
@pytest.fixture(scope="module")
def stacked(few_labels, tmp_path_factory):
    config = TrainConfig(model="ssvae", model_options={**SMALL, "m1": 3, "m1_hidden": (16,)},
                         epochs=2, batch_size=64, eval_particles=2,
                         out=str(tmp_path_factory.mktemp("m1") / "run"))
    return train_run(config, few_labels, progress=False)


def test_m1_is_trained_first_and_its_means_standardized(stacked):
    m, data = stacked.module, stacked.data
    assert m.m1 is not None and m.classifier[0].in_features == 3
    lines = (stacked.out / "m1_metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_m1_loss,test_m1_loss") and len(lines) == 3
    v = m.features(data.train.x)
    assert v.shape == (len(data.train), 3)
    torch.testing.assert_close(v.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.std(0), torch.ones(3), atol=1e-5, rtol=0)
    s = stacked.summary
    assert math.isfinite(s["m1_test_elbo"]) and 0 <= s["test_accuracy"] <= 1
    # the M1 test ELBO (64 pixels) is not M2's (3 features): the report says which is which
    assert any("M2's ELBOs are of those, not of pixels" in n for n in stacked.notes)
    for name in ("samples_by_class.png", "analogies.png"):
        assert (stacked.out / name).read_bytes()[:8] == PNG, name


def test_m1_is_held_fixed_while_m2_trains(stacked):
    """No term of M2's objective sends a gradient into M1."""
    m, data = stacked.module, stacked.data
    x, y = m.data_args(data.train.x[:40], data.train.y[:40])
    m.zero_grad(set_to_none=True)
    for weight, model, guide in m.programs():
        (weight * TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, y)
         ).backward()
    assert all(p.grad is None for p in m.m1.parameters())
    assert all(p.grad is not None for p in m.classifier.parameters())


def test_m1_samples_are_pixels_and_a_reload_gives_the_same_classifier(stacked):
    from ppl_vae import load_run

    m, data = stacked.module, stacked.data
    z = torch.randn(5, Z * 2)
    pix = m.decode(z, torch.arange(5))
    assert pix.shape == (5, data.input_dim) and bool(((pix >= 0) & (pix <= 1)).all())
    _, again, _ = load_run(stacked.out, data=False)
    torch.testing.assert_close(again.m1_shift, m.m1_shift)
    assert torch.equal(again.predict(data.test.x), m.predict(data.test.x))


def test_m1_options_are_checked():
    with pytest.raises(UsageError, match="m1 must be a whole number >= 0, got -1"):
        SSVAEOptions(m1=-1)
    with pytest.raises(UsageError, match="m1.hidden must be whole numbers of at least 1"):
        SSVAEOptions(m1_hidden=(0,))


def test_a_callers_own_validation_split_is_kept(few_labels, tmp_path):
    """Early stopping validates on the split the data bring (the M2 table's held-out rows,
    labelled) instead of carving another one out of the training rows."""
    from ppl_vae.data import hide_labels

    data = hide_labels(load_dataset("digits").with_validation(0.2), 50, seed=0)
    run = train_run(TrainConfig(model="ssvae", model_options=SMALL, epochs=1, early_stop=1,
                                eval_particles=2, out=str(tmp_path / "r")), data,
                    progress=False)
    assert len(run.data.train) == len(data.train) and torch.equal(run.data.val.y, data.val.y)
    assert bool((data.val.y >= 0).all())


def test_the_m2_table_s_pieces_run_on_digits(tmp_path):
    """``benchmarks/m2_table.py``'s own split, classifier and M1+M2 run, end to end in a short
    run: the model early-stops on the table's held-out labelled rows, M1 is fitted first,
    and both report an accuracy. (Whether M1+M2 beats the classifier is the benchmark's
    claim, measured there: README.)"""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "m2_table.py"
    spec = importlib.util.spec_from_file_location("m2_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    data = table.held_out("digits", "", 50, seed=0, fraction=0.1)
    config = TrainConfig(model="ssvae", model_options={**SMALL, "m1": 4, "m1_hidden": (16,)},
                         dataset="digits", labelled=50, epochs=2, eval_particles=2,
                         out=str(tmp_path / "m1m2"))
    run = train_run(config, data, progress=False)
    assert run.config.early_stop == 10 and torch.equal(run.data.val.x, data.val.x)
    assert len(read_csv(run.out / "m1_metrics.csv")) == 2  # M1 first, for the run's epochs
    mlp = table.classifier(data, (16,), 2, math.ceil(len(data.train) / 128), 10, seed=0,
                           lr=run.config.lr)
    assert 0 <= mlp["accuracy"] <= 1 and 0 <= run.summary["test_accuracy"] <= 1


def test_an_m1_never_fitted_is_said_so(few_labels, tmp_path):
    """A loop of one's own that skips pretrain leaves M1 random: the report says so."""
    from ppl_vae.models import RunContext

    m = SSVAE(64, 10, hidden=(16,), z_dim=2, m1=3, m1_hidden=(8,))
    ctx = RunContext(TrainConfig(model="ssvae", eval_particles=2), m.options, few_labels,
                     tmp_path, score=score, figures=False)
    m.report(ctx)
    assert any("M1 was never fitted" in n for n in ctx.notes)


def test_a_run_recorded_before_m1_existed_reads_as_m2_alone():
    """An option added later declares what its absence meant (metadata "absent"): an old
    M2 record without ``m1`` is M2 alone, not the new default M1+M2."""
    from ppl_vae.run.session import from_record, resolve

    record = resolve(TrainConfig(model="ssvae", model_options={"m1": 0}))[0].to_dict()
    del record["model_options"]["m1"], record["model_options"]["m1_hidden"]
    assert from_record(record)[0].model_options.m1 == 0
    assert from_record(resolve(TrainConfig(model="ssvae"))[0].to_dict())[0].model_options.m1 \
        == 50
