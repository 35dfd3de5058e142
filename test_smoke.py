"""The project's single test file: paper equations against hand computations, attack invariants,
every script end to end through its CLI on tiny fake data, and checkpoint round trips.

Run: python -m pytest -q test_smoke.py
"""
import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image  # torchvision's image backend

import attacks
import evaluate
import models
import train_calibrated as calibrated
import train_customized as customized

torch.set_num_threads(1)  # CI has 2 cores; subprocesses below get the other
HERE = os.path.dirname(os.path.abspath(__file__))


def run_cli(*args, check=True, env=None, timeout=600):
    """Run a script of this project through its real CLI; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---------------------------------------------------------------- models.py and attacks.py
@pytest.mark.parametrize("arch,in_channels,size", [
    ("smallcnn", 1, 28), ("smallcnn", 3, 32), ("preact_resnet18", 3, 32),
    ("preact_resnet18", 1, 28), ("vgg16", 3, 32), ("vgg16", 1, 28)])
def test_models_output_shape(arch, in_channels, size):
    torch.manual_seed(0)
    model = models.get_model(arch, num_classes=7, in_channels=in_channels, image_size=size)
    x = torch.rand(2, in_channels, size, size)
    for train in (True, False):  # batch statistics (training) and running statistics (evaluation)
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_models_wrn34_10_shape_and_parameter_count():
    model = models.get_model("wrn34_10").eval()  # built once, run at batch 1: 46M parameters
    # The published count of the WRN-34-10 of Madry et al. and TRADES.
    assert sum(p.numel() for p in model.parameters()) == 46_160_474
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_models_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    # PreActResNet-18: 11,171,146 is the published count of the widely copied version that skips
    # the final BN-ReLU; the pre-activation design (He et al. 2016, and the copy used across
    # adversarial training) has it, a BatchNorm2d(512): + 2 * 512.
    assert count(models.get_model("preact_resnet18")) == 11_171_146 + 2 * 512
    # MNIST SmallCNN (the calibrated paper's release; README.md, Calibrated adversarial training), by hand:
    # four 3x3 convs with bias, Linear(3136 -> 100), Linear(100 -> 10).
    convs = (9 * 1 + 1) * 32 + (9 * 32 + 1) * 32 + (9 * 32 + 1) * 64 + (9 * 64 + 1) * 64
    assert count(models.get_model("smallcnn", in_channels=1, image_size=28)) == \
        convs + (3136 + 1) * 100 + (100 + 1) * 10 == 379_702
    # VGG-16-BN, by hand: 13 convs with bias, a BatchNorm (weight, bias) after each, Linear(512 -> 10).
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg = sum((9 * i + 1) * o + 2 * o for i, o in zip(widths, widths[1:])) + 512 * 10 + 10
    assert count(models.get_model("vgg16")) == vgg == 14_728_266


@pytest.mark.parametrize("name,shape", [("small", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_models_mask_net_in_unit_interval_with_delta_shape(name, shape):
    torch.manual_seed(0)
    net = models.get_mask_net(name, in_channels=shape[0]).eval()
    x = torch.rand(2, *shape)
    delta = (torch.rand(2, *shape) * 2 - 1) * 0.3
    with torch.no_grad():
        mask = net(x, delta)
        assert mask.shape == delta.shape
        assert (mask > 0).all() and (mask < 1).all()
        # g_phi reads the adversarial image x + delta (README.md, Calibrated adversarial training).
        assert torch.allclose(net(x + delta, torch.zeros_like(delta)), mask, atol=1e-6)


def test_models_unknown_names_raise_value_error_listing_valid_ones():
    with pytest.raises(ValueError) as err:
        models.get_model("resnet50")
    assert all(a in str(err.value) for a in ("smallcnn", "preact_resnet18", "wrn34_10", "vgg16"))
    with pytest.raises(ValueError) as err:
        models.get_mask_net("unet")
    assert all(n in str(err.value) for n in ("small", "resnet18"))


def test_pgd_unknown_loss_raises_value_error():
    with pytest.raises(ValueError, match="'ce', 'cw' or a callable"):
        attacks.pgd(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                    0.1, 0.1, 1, loss="kl")


def test_cw_margin_hand_computation():
    logits = torch.tensor([[1., 3., 2.], [-5., -1., -3.], [-2., -7., -4.], [-1e4, -3e4, -2e4]],
                          requires_grad=True)
    y = torch.tensor([0, 2, 0, 1])
    # max_{j != y} Z_j - Z_y: 3 - 1 = 2; max(-5, -1) + 3 = 2; max(-7, -4) + 2 = -2;
    # max(-1e4, -2e4) + 3e4 = 2e4. Rows 2-4 are all negative: a mask that fills the true class
    # with 0 instead of -inf would give 3, 2 and 3e4.
    raw = torch.tensor([2., 2., -2., 2e4])
    assert torch.equal(attacks.cw_margin(logits, y, kappa=float("inf")), raw)
    assert torch.equal(attacks.cw_margin(logits, y), raw.clamp(min=0.))  # kappa = 0
    assert torch.equal(attacks.cw_margin(logits, y, kappa=1.), torch.tensor([2., 2., -1., 2e4]))
    assert torch.equal(attacks.cw_margin(logits, y, kappa=50.), raw)
    # Its gradient is e_{argmax other} - e_y (zero where the -kappa floor is active).
    grad, = torch.autograd.grad(attacks.cw_margin(logits, y, kappa=1.).sum(), logits)
    assert torch.equal(grad, torch.tensor([[-1., 1., 0.], [0., 1., -1.], [0., 0., 0.], [1., -1., 0.]]))


def _atk_linear2():
    """Two classes on 2-D inputs: Z1 - Z0 = -1.5 x1 + 3.5 x2 - 0.4. For label y, the CE and C&W
    gradients w.r.t. x are positive multiples of W[1-y] - W[y] = +-(-1.5, 3.5)."""
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., -2.], [-0.5, 1.5]]))
        lin.bias.copy_(torch.tensor([0.3, -0.1]))
    return lin


# Points outside [0, 1] (2-D toy data, unbounded), their labels, radii (one 0) and, by hand, the
# sign of the loss gradient: away from class y, sign(W[1-y] - W[y]).
_ATK_X2 = torch.tensor([[-1.5, -0.2], [1.8, 1.4], [2.5, 0.9], [-0.3, 1.2], [1.0, -0.5]])
_ATK_Y2 = torch.tensor([1, 1, 0, 1, 0])
_ATK_EPS2 = torch.tensor([0.5, 0.25, 0.0, 0.3, 1.0])
_ATK_AWAY2 = torch.tensor([[1., -1.], [1., -1.], [-1., 1.], [1., -1.], [-1., 1.]])


def test_pgd_linear_unbounded_hand_computation():
    model, x, y, eps = _atk_linear2(), _ATK_X2, _ATK_Y2, _ATK_EPS2
    assert torch.equal(model(x).argmax(1), y)
    expected = x + eps[:, None] * _ATK_AWAY2  # the ball's corner the constant gradient sign leads to
    for loss, kappa in [("ce", 0.0), ("cw", 50.0)]:
        for random_start in (False, True):  # 10 steps of eps/4 reach the corner from anywhere
            torch.manual_seed(0)
            out = attacks.pgd(model, x, y, eps, eps / 4, 10, loss=loss, kappa=kappa,
                              random_start=random_start, clip=None)
            assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[2], x[2]) and (out < 0).any() and (out > 1).any()  # clip=None: no box
    # The default box (0, 1) clamps the same corner.
    out = attacks.pgd(model, x, y, eps, eps / 4, 10, random_start=False)
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-6)


def test_pgd_callable_soft_label_loss():
    model, x, y, eps = _atk_linear2(), _ATK_X2, _ATK_Y2, _ATK_EPS2
    # Soft labels with 0.9 of their mass on the other class 1 - y, closed over by the loss, which
    # ignores y: d loss / d Z_{1-y} = p_{1-y} - 0.9 < 0, so the soft CE grows towards class y,
    # the opposite way to CE; p_{1-y} only falls on the way, so the sign stays.
    soft = 0.9 * F.one_hot(1 - y, 2) + 0.1 * F.one_hot(y, 2)
    soft_ce = lambda logits, _: -(soft * F.log_softmax(logits, 1)).sum(1)
    assert (model(x).softmax(1).gather(1, (1 - y)[:, None]) < 0.9).all()
    out = attacks.pgd(model, x, y, eps, eps / 4, 10, loss=soft_ce, random_start=False, clip=None)
    assert torch.allclose(out, x - eps[:, None] * _ATK_AWAY2, atol=1e-6)
    with torch.no_grad():
        assert (soft_ce(model(out), y) > soft_ce(model(x), y))[eps > 0].all()


def test_pgd_restarts_keep_first_fooling_perturbation():
    model = _atk_linear2()
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, restarts = 0.5, 4
    # steps=0: each restart is its uniform random start, so which restarts fool is known: replay
    # pgd's draws.
    torch.manual_seed(1)
    starts = torch.stack([x + (torch.rand_like(x) * 2 - 1) * eps for _ in range(restarts)])
    with torch.no_grad():
        fools = torch.stack([model(s).argmax(1) != y for s in starts])  # [restarts, B]
    first = torch.where(fools.any(0), fools.float().argmax(0), restarts - 1)  # else the last
    # The construction has both cases: fooled by an early restart only, by a late one only.
    assert (fools.any(0) & ~fools[-1]).any() and (fools.any(0) & ~fools[0]).any()
    torch.manual_seed(1)
    out = attacks.pgd(model, x, y, eps, eps, 0, restarts=restarts, clip=None)
    assert torch.equal(out, starts[first, torch.arange(len(x))])
    with torch.no_grad():
        assert torch.equal(model(out).argmax(1) != y, fools.any(0))


def test_fgsm_hand_computation():
    # Flatten + Linear on 1 x 2 x 2 images: CE's gradient w.r.t. x is a positive multiple of
    # W[1-y] - W[y] = +-(-1, 2, -1, 0); the last pixel has no gradient, and sign(0) = 0.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.5, -1., 2., 0.], [-0.5, 1., 1., 0.]]))
        model[1].bias.zero_()
    x = torch.tensor([[0.0, 0.95, 0.5, 0.3], [1.0, 0.02, 0.5, 0.7]]).view(2, 1, 2, 2)
    y = torch.tensor([0, 1])
    unboxed = torch.tensor([[-0.1, 1.05, 0.4, 0.3], [1.1, -0.08, 0.6, 0.7]]).view(2, 1, 2, 2)
    assert torch.allclose(attacks.fgsm(model, x, y, 0.1), unboxed.clamp(0, 1), atol=1e-6)
    assert torch.allclose(attacks.fgsm(model, x, y, 0.1, clip=None), unboxed, atol=1e-6)


def test_fgsm_equals_signed_gradient_step_on_trained_model(atk_toy):
    model, x, y = atk_toy
    xr = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    expected = (x + 0.1 * grad.sign()).clamp(0, 1)
    assert torch.allclose(attacks.fgsm(model, x, y, 0.1), expected, atol=1e-6)


def test_deepfool_linear_two_class_exact_distance():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    x = torch.randn(8, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
        w, b = model.weight[1] - model.weight[0], model.bias[1] - model.bias[0]
        dist = (x @ w + b).abs() / w.abs().sum()  # L-inf distance to the plane w.x + b = 0
        toward = torch.where(y[:, None] == 0, w.sign(), -w.sign())  # the corner that crosses it
    for overshoot in (0.0, 0.02):
        out = attacks.deepfool(model, x, y, overshoot=overshoot, clip=None)
        r = out - x
        norm = r.abs().amax(1)
        with torch.no_grad():
            assert (model(out).argmax(1) != y).all()
        assert (norm >= dist).all() and (norm <= (1 + overshoot) * dist + 1e-3).all()
        assert torch.allclose(r, norm[:, None] * toward, atol=1e-5)
    # For a linear model that distance is exact, so PGD agrees with the rule "robust at eps iff
    # the minimal perturbation exceeds eps", per sample.
    for scale, fooled in [(0.98, False), (1.02, True)]:
        out = attacks.pgd(model, x, y, scale * dist, scale * dist / 4, 10, random_start=False,
                          clip=None)
        with torch.no_grad():
            assert ((model(out).argmax(1) != y) == fooled).all()


def test_deepfool_linear_three_class_hand_computation():
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1., 0.], [0., 1.], [-1., -1.]]))
    x = torch.tensor([[2., 1.], [0., -2.], [-1., -2.]])
    y = torch.tensor([0, 1, 2])
    # Row 0: Z = (2, 1, -3); to class 1: |1 - 2| / ||W1 - W0||_1 = 1/2, to class 2: 5/3
    #   -> 1/2 along sign(W1 - W0) = (-1, 1).
    # Row 1: Z = (0, -2, 2): misclassified already -> unchanged.
    # Row 2: Z = (-1, -2, 3); to class 0: 4 / ||(2, 1)||_1 = 4/3, to class 1: 5/3
    #   -> 4/3 along sign(W0 - W2) = (1, 1).
    out = attacks.deepfool(model, x, y, overshoot=0.0, clip=None)
    r = out - x
    assert torch.equal(out[1], x[1])
    dist, direction = torch.tensor([0.5, 4 / 3]), torch.tensor([[-1., 1.], [1., 1.]])
    norm = r[[0, 2]].abs().amax(1)
    assert (norm >= dist).all() and (norm <= dist + 1e-3).all()
    assert torch.allclose(r[[0, 2]], norm[:, None] * direction, atol=1e-6)
    with torch.no_grad():
        assert model(out).argmax(1).tolist() == [1, 2, 0]


@pytest.fixture(scope="module")
def atk_toy():
    """A SmallCNN (3 x 8 x 8 inputs, 3 classes) after 40 Adam steps on noisy copies of three
    random prototypes, in eval mode, and a held-out batch of 32 it classifies correctly."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.rand(3, 3, 8, 8, generator=gen) * 0.6 + 0.2

    def batch(n):
        y = torch.randint(0, 3, (n,), generator=gen)
        return (protos[y] + 0.25 * torch.randn(n, 3, 8, 8, generator=gen)).clamp(0, 1), y

    torch.manual_seed(0)
    model = models.SmallCNN(num_classes=3, in_channels=3, image_size=8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(40):
        x, y = batch(64)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval().zero_grad(set_to_none=True)
    x, y = batch(32)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), y)
    return model, x, y


def _atk_soft_ce(y, num_classes=3):
    """A soft-label CE that closes over its targets: 0.8 one-hot + 0.2 uniform-Dirichlet draw."""
    noise = -torch.rand(len(y), num_classes, generator=torch.Generator().manual_seed(0)).log()
    soft = 0.8 * F.one_hot(y, num_classes) + 0.2 * noise / noise.sum(1, keepdim=True)
    return lambda logits, _: -(soft * F.log_softmax(logits, 1)).sum(1)


def _atk_cases(y, eps):
    """name: (attack(model, x), the per-sample loss it raises, the L-inf radius or None)."""
    ce = lambda z, t: F.cross_entropy(z, t, reduction="none")
    soft = _atk_soft_ce(y)
    margin = lambda z, t: attacks.cw_margin(z, t, kappa=float("inf"))
    return {
        "pgd_ce": (lambda m, x: attacks.pgd(m, x, y, eps, eps / 4, 10), ce, eps),
        "pgd_cw": (lambda m, x: attacks.pgd(m, x, y, eps, eps / 4, 10, loss="cw", kappa=50.),
                   lambda z, t: attacks.cw_margin(z, t, float("inf")).clamp(max=50.), eps),
        "pgd_soft_label": (lambda m, x: attacks.pgd(m, x, y, eps, eps / 4, 10, loss=soft), soft, eps),
        "pgd_restarts": (lambda m, x: attacks.pgd(m, x, y, eps, eps / 4, 5, restarts=3), ce, eps),
        "fgsm": (lambda m, x: attacks.fgsm(m, x, y, eps), ce, eps),
        "square": (lambda m, x: attacks.square(m, x, y, eps, n_queries=30), margin, eps),
        "deepfool": (lambda m, x: attacks.deepfool(m, x, y), margin, None),
    }


@pytest.mark.parametrize("name", ["pgd_ce", "pgd_cw", "pgd_soft_label", "pgd_restarts", "fgsm",
                                  "square", "deepfool"])
def test_attack_contract(atk_toy, name):
    model, x, y = atk_toy
    model = copy.deepcopy(model)
    attack, loss, eps = _atk_cases(y, 0.1)[name]
    params = list(model.parameters())
    preset = [torch.randn_like(p) for p in params]
    # Train mode with no .grad, then eval mode with .grad already set: both stay as they were.
    for train, grads in [(True, [None] * len(params)), (False, preset)]:
        model.train(train)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        x_in = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        out = attack(model, x_in)
        assert all(m.training == train for m in model.modules())
        for p, g in zip(params, grads):
            assert p.grad is None if g is None else torch.equal(p.grad, g)
        assert x_in.grad is None and torch.equal(x_in.detach(), x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert not out.requires_grad and out.grad_fn is None
        assert out.min() >= 0 and out.max() <= 1
        if eps is not None:
            assert (out - x).abs().max() <= eps + 1e-6
        with torch.no_grad():
            assert (loss(model(out), y) >= loss(model(x), y) - 1e-5).all()


@pytest.mark.parametrize("name", ["pgd_ce", "pgd_cw", "pgd_soft_label", "fgsm"])
def test_pgd_per_sample_eps(atk_toy, name):
    model, x, y = atk_toy
    eps = torch.tensor([0.0, 0.03, 0.06, 0.1]).repeat(len(x) // 4)
    torch.manual_seed(0)
    out = _atk_cases(y, eps)[name][0](model, x)
    dist = (out - x).flatten(1).abs().amax(1)
    assert torch.equal(out[eps == 0], x[eps == 0])
    assert (dist <= eps + 1e-6).all()
    assert torch.allclose(dist[eps > 0], eps[eps > 0], atol=1e-6)  # each reaches its own radius
    # A [B] tensor of one value is the float.
    runs = []
    for e in (0.06, torch.full((len(x),), 0.06)):
        torch.manual_seed(0)
        runs.append(_atk_cases(y, e)[name][0](model, x))
    assert torch.allclose(*runs, atol=1e-6)


def test_pgd_restarts_never_drop_a_first_restart_success(atk_toy):
    model, x, y = atk_toy
    runs = []
    for restarts in (1, 4):  # the first restart makes the same draws as a single run
        torch.manual_seed(5)
        runs.append(attacks.pgd(model, x, y, 0.07, 0.02, 5, restarts=restarts))
    with torch.no_grad():
        fooled_1, fooled_4 = (model(r).argmax(1) != y for r in runs)
    assert 0 < fooled_1.sum() < len(y)
    assert torch.equal(runs[1][fooled_1], runs[0][fooled_1]) and (fooled_4 >= fooled_1).all()


class _AtkQuerySpy(torch.nn.Module):
    """Wraps a model for a black-box attack: raises if a gradient could be taken, and logs each
    query, with its margin max_{j != y} Z_j - Z_y (>= 0: fooled), under the clean point it lies
    within eps of (the clean points are more than 2 eps apart)."""

    def __init__(self, model, x, y, eps):
        super().__init__()
        self.model, self.x, self.y, self.eps = model, x, y, eps
        self.queries = [[] for _ in x]

    def forward(self, q):
        if torch.is_grad_enabled() or q.requires_grad:
            raise AssertionError("a black-box attack built a graph")
        logits = self.model(q)
        near = (q[:, None] - self.x[None]).flatten(2).abs().amax(2) <= self.eps + 1e-6
        assert (near.sum(1) == 1).all()
        owner = near.float().argmax(1)
        margins = attacks.cw_margin(logits, self.y[owner], kappa=float("inf"))
        for j, i in enumerate(owner.tolist()):
            self.queries[i].append((q[j].clone(), margins[j].item()))
        return logits


def test_square_query_budget_black_box_and_early_stop(atk_toy):
    model, x, y = atk_toy
    eps, n_queries = 0.15, 60
    y = y.clone()
    y[-1] = (y[-1] + 1) % 3  # x[-1] is misclassified from the start
    spy = _AtkQuerySpy(model, x, y, eps)
    out = attacks.square(spy, x, y, eps, n_queries=n_queries)
    assert (out - x).abs().max() <= eps + 1e-6 and out.min() >= 0 and out.max() <= 1
    never_fooled = 0
    for i, qs in enumerate(spy.queries):
        margins = [m for _, m in qs]
        assert 1 <= len(qs) <= n_queries
        hits = [k for k, m in enumerate(margins) if m >= 0]
        if hits:  # stopped at the first query that fooled the model, and returns it
            assert hits[0] == len(qs) - 1 and torch.equal(out[i], qs[-1][0])
        else:  # never fooled: the whole budget was spent
            assert len(qs) == n_queries
            never_fooled += 1
        # No query repeats the best point so far (the stripes start, then strict improvements):
        # like the reference, a window is resampled until it changes that point.
        best = 1
        for k in range(2, len(qs)):
            assert not torch.equal(qs[k][0], qs[best][0])
            best = k if margins[k] > margins[best] else best
    assert 0 < never_fooled < len(x) - 1  # the case has both kinds of point
    # Only still-correct points are attacked: x[-1] costs the one query that finds it wrong.
    assert len(spy.queries[-1]) == 1 and torch.equal(out[-1], x[-1])


def test_square_deterministic_for_fixed_seed(atk_toy):
    model, x, y = atk_toy
    state = torch.get_rng_state()
    a, b, c = (attacks.square(model, x, y, 0.15, n_queries=40, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: the global one is untouched


def test_apgd_checkpoints_by_hand():
    # p_0 = 0, p_1 = .22, then + max(p_j - p_{j-1} - .03, .06): +.19 = .41, +.16 = .57, +.13 = .70,
    # +.10 = .80, +.07 = .87, +.06 = .93, +.06 = .99; the next, 1.05, is past the end.
    assert attacks.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert attacks.apgd_checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    # ceil(p_j * 10): 2.2 -> 3, 4.1 -> 5, 5.7 -> 6, 7, 8, 8.7 -> 9, 9.3 and 9.9 -> 10 (merged).
    assert attacks.apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]


def test_dlr_losses_hand_computation():
    z = torch.tensor([[1., 4., 2., 0.], [3., 1., 0., -2.]])
    y, target = torch.tensor([0, 0]), torch.tensor([2, 3])
    # Row 0: sorted 4, 2, 1, 0: -(1 - 4) / (4 - 1) = 1; targeted at 2: -(1 - 2) / (4 - (1 + 0) / 2)
    # = 2/7. Row 1 (correct): sorted 3, 1, 0, -2: -(3 - 1) / (3 - 0) = -2/3; targeted at 3:
    # -(3 + 2) / (3 - (0 - 2) / 2) = -5/4.
    assert torch.allclose(attacks.dlr_loss(z, y), torch.tensor([1., -2 / 3]))
    assert torch.allclose(attacks.dlr_targeted_loss(z, y, target), torch.tensor([2 / 7, -5 / 4]))
    # Shifting and scaling the logits changes neither (it would change CE).
    assert torch.allclose(attacks.dlr_loss(3 * z - 7, y), attacks.dlr_loss(z, y))
    assert torch.allclose(attacks.dlr_targeted_loss(3 * z - 7, y, target),
                          attacks.dlr_targeted_loss(z, y, target))


class _ApgdScripted(torch.nn.Module):
    """Two-class logits (v, 0), v the k-th row of a scripted loss table at the k-th call (one per
    sample): 1e-30 * sum(x) rounds away next to v >= 1 but gives every pixel a gradient of sign +1,
    so the iterates move while the loss follows the script. Logs each call's input."""

    def __init__(self, script):
        super().__init__()
        self.script, self.inputs = script, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        v = self.script[len(self.inputs) - 1] + 1e-30 * x.flatten(1).sum(1)
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_apgd_step_size_halves_at_the_checkpoints_where_progress_stalls():
    k = torch.arange(101.)
    # Sample 0 stalls: x^(0) has the best loss, every later iterate a lower constant one, so no
    # window has a rise (condition 1) and it halves at every checkpoint. Sample 1 rises at every
    # step to w_1 = 22 (no halving there), then drops and rises 18 times in 19 steps, never back
    # to the best: condition 1 fails (18 >= 0.75 * 19), condition 2 halves at w_2 = 41; then stalls.
    stall = torch.where(k == 0, 2., 1.)
    late = torch.where(k <= 22, 1 + k, torch.where(k <= 41, 1 + 0.1 * (k - 23), 1.))
    model = _ApgdScripted(torch.stack([stall, late], 1))
    x, y, eps = torch.full((2, 3), 0.5), torch.zeros(2, dtype=torch.long), torch.tensor([0.1, 0.05])
    best, best_loss, adv, fooled, eta = attacks._apgd_run(model, x, y, eps[:, None], 100, lambda z, _: z[:, 0], x)
    steps = k[1:, None]  # the step producing x^(k) uses the size set at the checkpoints before k
    halvings = lambda checks: sum((steps > c).float() for c in checks)
    expected = torch.cat([2 * 0.1 * 0.5 ** halvings([22, 41, 57, 70, 80, 87, 93, 99]),
                          2 * 0.05 * 0.5 ** halvings([41, 57, 70, 80, 87, 93, 99])], 1)
    assert torch.equal(eta, expected)
    assert torch.equal(best_loss, torch.tensor([2., 23.])) and not fooled.any() and torch.equal(adv, x)
    # x^(1) = x + eps (the 2 eps step, projected on the ball), where the iterates stay. At w_1 = 22
    # sample 0 goes back to its best point x^(0) = x, so x^(23) = x^(22) + 0.75 (z - x^(22))
    # + 0.25 (x^(22) - x^(21)) with z = x + eps (the halved step eps): 0.5 + 0.075 - 0.025 = 0.55.
    # Sample 1's best point is x^(22), at the corner x + 0.05.
    assert torch.allclose(model.inputs[1], torch.tensor([[0.6] * 3, [0.55] * 3]))
    assert torch.allclose(model.inputs[23], torch.tensor([[0.55] * 3, [0.55] * 3]))
    assert torch.allclose(best, torch.tensor([[0.5] * 3, [0.55] * 3]))


def test_apgd_never_below_fgsm_by_construction_and_above_pgd_on_a_trained_model(atk_toy):
    model, x, y = atk_toy
    ce = lambda z, t: F.cross_entropy(z, t, reduction="none")
    eps = 0.08
    # By construction: started at x, APGD's first step 2 eps, projected on the ball and the box,
    # is FGSM's point, and APGD returns its highest-loss iterate, so per sample it is never below
    # FGSM (PGD with one step of eps). Up to float rounding of the momentum form of that step.
    _, best_loss, *_ = attacks._apgd_run(model, x, y, eps, 10, ce, x)
    x_fgsm = attacks.fgsm(model, x, y, eps)
    with torch.no_grad():
        assert (best_loss >= ce(model(x_fgsm), y) - 1e-6).all()
    # Empirical, and robust here: at 10 steps each, APGD (random start) fools at least the points
    # PGD (step eps / 4, as the training scripts) fools, and on the points neither fools its mean
    # CE is higher (0.1186 vs 0.1160): PGD stops where 10 fixed steps reach, APGD keeps its best
    # iterate. Per sample neither is guaranteed: PGD may end higher on a few points.
    a, p = attacks.apgd(model, x, y, eps, steps=10), attacks.pgd(model, x, y, eps, eps / 4, 10, random_start=False)
    with torch.no_grad():
        (la, fa), (lp, fp) = ((ce(model(v), y), model(v).argmax(1) != y) for v in (a, p))
    neither = ~fa & ~fp
    assert (fa >= fp).all() and fa.sum() > fp.sum() and neither.sum() >= 16
    assert la[neither].mean() > lp[neither].mean() + 1e-3


@pytest.mark.parametrize("loss,targeted", [("ce", False), ("dlr", False), ("dlr", True)])
def test_apgd_contract(atk_toy, loss, targeted):
    model, x, y = atk_toy
    # A fourth, never likely class for the targeted DLR loss (it needs four).
    model = torch.nn.Sequential(copy.deepcopy(model), torch.nn.ConstantPad1d((0, 1), -10.0))
    params = list(model.parameters())
    preset = [torch.randn_like(p) for p in params]
    eps = torch.tensor([0.0, 0.03, 0.06, 0.1]).repeat(len(x) // 4)
    attack = lambda m, x_in, e=eps, seed=0: attacks.apgd(m, x_in, y, e, steps=12, loss=loss, targeted=targeted,
                                                         n_targets=2, seed=seed)
    for train, grads in [(True, [None] * len(params)), (False, preset)]:
        model.train(train)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        x_in = x.clone().requires_grad_(True)
        state = torch.get_rng_state()
        out = attack(model, x_in)
        assert all(m.training == train for m in model.modules())
        for p, g in zip(params, grads):
            assert p.grad is None if g is None else torch.equal(p.grad, g)
        assert x_in.grad is None and torch.equal(x_in.detach(), x)
        assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad and out.grad_fn is None
        assert out.min() >= 0 and out.max() <= 1
        assert ((out - x).flatten(1).abs().amax(1) <= eps + 1e-6).all() and torch.equal(out[eps == 0], x[eps == 0])
        assert torch.equal(torch.get_rng_state(), state)  # its own generator
    with torch.no_grad():
        fooled = model(out).argmax(1) != y
    assert 0 < fooled.sum() < (eps > 0).sum()  # the case has both kinds of point
    assert torch.equal(attack(model, x), out) and not torch.equal(attack(model, x, seed=1), out)
    # A [B] tensor of one value is the float.
    assert torch.equal(attack(model, x, 0.06), attack(model, x, torch.full((len(x),), 0.06)))


def test_apgd_targets_are_the_most_likely_other_classes(monkeypatch):
    # logits = x: at x the other classes rank 4, 2, 3, 1; eps 0.01 fools no point, so every target
    # gets its run, at most one per other class.
    x, y = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]]), torch.tensor([0])
    seen, loss = [], attacks.dlr_targeted_loss
    monkeypatch.setattr(attacks, "dlr_targeted_loss", lambda z, t, c: seen.append(c.item()) or loss(z, t, c))
    for n_targets, order in [(3, [4, 2, 3]), (9, [4, 2, 3, 1])]:
        seen.clear()
        attacks.apgd(torch.nn.Identity(), x, y, 0.01, steps=3, loss="dlr", targeted=True, n_targets=n_targets)
        assert [c for i, c in enumerate(seen) if i % 4 == 0] == order and len(seen) == 4 * len(order)
    for loss, targeted in [("ce", True), ("kl", False)]:
        with pytest.raises(ValueError, match="valid 'ce' or 'dlr'"):
            attacks.apgd(torch.nn.Identity(), x, y, 0.01, loss=loss, targeted=targeted)


# ---------------------------------------------------------------- train_customized.py
# CPU numerics, exact reproduction and 2 processes on any machine: the CPU, explicitly (CUDA-only tests at the end)
FAKE = ["--dataset", "fake-mnist", "--arch", "smallcnn", "--train-size", "128", "--test-size", "32",
        "--eval-size", "32", "--batch-size", "32", "--device", "cpu"]
CUSTOM = ["train_customized.py", *FAKE, "--eps-max", "0.1", "--eta", "0.01"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def untimed(log):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in log]


def test_customized_adaptive_labels_eq4():
    y, eps = torch.tensor([0, 2, 1]), torch.tensor([0.0, 0.05, 0.1])
    torch.manual_seed(0)
    got = customized.adaptive_labels(y, eps, c=10, beta=1.0, num_classes=3)
    torch.manual_seed(0)
    d = torch.distributions.Dirichlet(torch.ones(3, 3)).sample()
    onehot = torch.eye(3)[y]
    w = torch.tensor([0.0, 0.5, 1.0])[:, None]  # c * eps_i
    assert torch.allclose(got, (1 - w) * onehot + w * d)
    assert torch.allclose(got.sum(1), torch.ones(3)) and (got >= 0).all()
    assert torch.equal(got[0], onehot[0])         # eps_i = 0: the one-hot label
    assert torch.allclose(got[2], d[2])           # c eps_i = 1: pure Dirichlet draw, the limit
    assert got[1, 2] >= 0.5                       # at least 1 - c eps_i on the true class
    assert torch.equal(customized.adaptive_labels(y, eps, 0, 1.0, 3), onehot)  # c = 0


def test_customized_update_epsilons_reset_grow_cap():
    eps = torch.tensor([0.0, 0.01, 0.028, 0.03, 0.02])
    fooled = torch.tensor([True, False, False, False, True])
    got = customized.update_epsilons(eps, fooled, eta=0.005, eps_max=0.031)
    assert torch.allclose(got, torch.tensor([0.0, 0.015, 0.031, 0.031, 0.0]))


def test_customized_mixed_loss_eq6():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0], [-5.0, -7.0, -6.0]])
    y = torch.tensor([0, 0, 1])
    y_soft = torch.tensor([[0.8, 0.1, 0.1], [1.0, 0.0, 0.0], [0.2, 0.6, 0.2]])
    lse = [math.log(math.exp(2) + math.exp(1) + 1), math.log(1 + math.exp(3) + math.exp(-1)),
           math.log(math.exp(-5) + math.exp(-7) + math.exp(-6))]
    ce = [lse[0] - (0.8 * 2 + 0.1 * 1), lse[1] - 0.0, lse[2] - (0.2 * -5 + 0.6 * -7 + 0.2 * -6)]
    margin = [max(1 - 2, -10), max(3 - 0, -10), max(-5 - (-7), -10)]
    got = customized.mixed_loss(logits, y_soft, y, kappa=10)
    assert torch.allclose(got, torch.tensor(ce) + torch.tensor(margin, dtype=torch.float), atol=1e-5)
    # kappa floors the margin of a confidently correct sample
    assert customized.mixed_loss(torch.tensor([[9.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                                 torch.tensor([0]), kappa=2).item() == pytest.approx(
        math.log(1 + math.exp(-9)) - 2, abs=1e-5)


def test_customized_cli_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    run_cli(*CUSTOM, "--epochs", "2", "--out", out)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("lr", "train_loss", "train_adv_acc", "train_clean_acc", "test_clean_acc", "test_pgd_acc",
                "seconds", "images_per_s", "eps_mean", "eps_q10", "eps_q50", "eps_q90", "eps_at_max"):
        assert key in log[-1], key
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    eps = ck["eps"]
    assert ck["epoch"] == 2 and ck["arch"] == "smallcnn" and ck["method"] == "customized"
    assert eps.shape == (128,) and (eps > 0).any()              # the table moved
    steps = eps / 0.01                                          # Alg. 1: eps_i is k * eta, <= eps_max
    assert torch.allclose(steps, steps.round(), atol=1e-4) and eps.max() <= 0.1 + 1e-7
    assert log[-1]["eps_mean"] == pytest.approx(eps.mean().item(), abs=1e-6)
    # The reloaded weights give the clean test accuracy the run logged with its final model.
    model = models.get_model("smallcnn", 10, 1, 28)
    model.load_state_dict(ck["model"])
    model.eval()
    test = torchvision.datasets.FakeData(32, (1, 28, 28), 10, torchvision.transforms.ToTensor(),
                                         random_offset=1_000_000)
    x = torch.stack([test[i][0] for i in range(32)])
    y = torch.tensor([test[i][1] for i in range(32)])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(log[-1]["test_clean_acc"])


@pytest.mark.parametrize("bad", [["--c", "10", "--eps-max", "0.3"], ["--eta", "-0.1"], ["--eps-max", "0"],
                                 ["--beta", "0"], ["--arch", "resnet9000"], ["--dataset", "imagenet22k"],
                                 ["--eps-max", "8/0"], ["--amp", "fp16"], ["--milestones", "3", "0"]])
def test_customized_rejects_invalid_args(bad, tmp_path):
    proc = run_cli(*CUSTOM, "--out", str(tmp_path / "x"), *bad, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr and bad[0] in proc.stderr
    assert bad[0] != "--c" or "in [0, 3.33333]" in proc.stderr  # the bound on c itself, 1 / eps_max
    assert not (tmp_path / "x").exists()


def test_customized_table6_readme_commands_use_the_papers_losses():
    # Table 6: Adv train, Adv+LS and Adp-Adv (IAAT) are CE methods; its CAT row is Table 3's mixed loss.
    with open(os.path.join(HERE, "README.md")) as f:
        lines = [line for line in f if "train_customized.py" in line and "# Table 6: " in line]
    rows = {line.split("# Table 6: ")[1].split(" (")[0].strip():  # name -> the flags after the script
            line.split("train_customized.py")[1].split("#")[0].split() for line in lines}
    got = {name: (a.fixed_eps, a.c, a.loss, a.arch) for name, a in
           ((name, customized.get_args(argv)) for name, argv in rows.items())}
    assert got == {"Adv train": (True, 0, "ce", "vgg16"), "Adv+LS": (True, 10, "ce", "vgg16"),
                   "Adp-Adv": (False, 0, "ce", "vgg16"), "CAT": (False, 10, "mix", "vgg16")}


def test_trainer_boilerplate_is_byte_identical():
    # diff <(sed -n '/shared boilerplate/,$p' train_customized.py) <(... train_calibrated.py) is empty
    tails = []
    for script in ("train_customized.py", "train_calibrated.py"):
        with open(os.path.join(HERE, script)) as f:
            text = f.read()
        tails.append(text[text.rindex("\n", 0, text.index("shared boilerplate")):])
    assert tails[0] == tails[1] and len(tails[0].splitlines()) > 100


# ---------------------------------------------------------------- train_calibrated.py
CAL = ["train_calibrated.py", "--dataset", "fake-mnist", "--train-size", "32", "--test-size", "32",
       "--eval-size", "32", "--batch-size", "32", "--epochs", "2", "--steps", "2", "--device", "cpu"]
CAL_RUNS = {"cw": [], "pgd": ["--attack", "pgd"], "kl": ["--attack", "kl"],
            "no_wce": ["--no-weighted-ce"], "A2": ["--attack", "pgd", "--no-mask"],
            "trades": ["--no-mask", "--no-weighted-ce", "--attack", "kl"]}


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _kl(p, q):  # KL(p || q)
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_calibrated_losses_eq13_eq14_by_hand():
    nat, cali, adv = [[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]], [[1.0, 1.0, 1.0], [0.5, 2.0, 0.0]], \
        [[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
    y = [0, 2]
    p_nat, p_cali, p_adv = ([_softmax(r) for r in z] for z in (nat, cali, adv))
    ce = [-math.log(p[t]) for p, t in zip(p_nat, y)]
    wce = sum(c * (1 - p[t]) for c, p, t in zip(ce, p_nat, y)) / 2
    kl_ref_first = sum(_kl(a, b) for a, b in zip(p_nat, p_cali)) / 2     # KL(P(.|x) || P(.|x_cali))
    kl_paper_literal = sum(_kl(b, a) for a, b in zip(p_nat, p_cali)) / 2
    T = lambda z: torch.tensor(z)
    got = calibrated.calibrated_loss(T(nat), T(cali), T(y), beta=5.0).item()
    assert got == pytest.approx(wce + 5 * kl_ref_first, abs=1e-5)
    assert abs(got - (wce + 5 * kl_paper_literal)) > 1e-2                # the test tells the orders apart
    got = calibrated.calibrated_loss(T(nat), T(cali), T(y), 5.0, weighted_ce=False).item()
    assert got == pytest.approx(sum(ce) / 2 + 5 * kl_ref_first, abs=1e-5)
    ce_cali = sum(-math.log(p[t]) for p, t in zip(p_cali, y)) / 2
    kl_adv = sum(_kl(a, b) for a, b in zip(p_adv, p_cali)) / 2            # KL(P(.|x') || P(.|x_cali))
    got = calibrated.mask_loss(T(cali), T(adv), T(y), beta1=0.3).item()
    assert got == pytest.approx(kl_adv + 0.3 * ce_cali, abs=1e-5)


def test_calibrated_loss_gradients():
    torch.manual_seed(0)
    nat, cali = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 4, 2])
    calibrated.calibrated_loss(nat, cali, y, beta=0.0).backward()
    p = F.softmax(nat.detach(), 1)
    p_y, onehot = p.gather(1, y[:, None]), F.one_hot(y, 5).float()
    # d/dz [-log p_y (1 - p_y)] with p_y not detached: (-(1 - p_y) + p_y log p_y)(onehot - p)
    assert torch.allclose(nat.grad, (-(1 - p_y) + p_y * p_y.log()) * (onehot - p) / 4, atol=1e-6)
    assert not torch.allclose(nat.grad, -(1 - p_y) * (onehot - p) / 4, atol=1e-4)   # a detached weight
    nat.grad = None
    calibrated.calibrated_loss(nat, cali, y, beta=2.0).backward()
    # KL(P(.|x) || P(.|x_cali)): its gradient w.r.t. the calibrated logits is beta (p_cali - p_nat) / B
    assert torch.allclose(cali.grad, 2.0 * (F.softmax(cali.detach(), 1) - p) / 4, atol=1e-6)


@pytest.mark.parametrize("attack", ["pgd", "cw", "kl"])
def test_calibrated_example_in_ball_and_box(attack):
    torch.manual_seed(0)
    args = calibrated.get_args(["--dataset", "fake-mnist", "--attack", attack, "--steps", "3"])
    f, g = models.SmallCNN().eval(), models.SmallMaskNet(1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    x[:, :, :7], x[:, :, 7:14] = 0.0, 1.0                                 # pixels on the box's faces
    torch.manual_seed(1)
    delta = calibrated.attack(f, x, y, args)
    # uniform starts reach the ball's edge; TRADES' 0.001 N(0, 1) start leaves 3 steps of 0.015 and its noise
    assert not delta.requires_grad
    assert delta.abs().amax() < 0.05 if attack == "kl" else delta.abs().amax() > 0.1
    p_nat = F.softmax(f(x), 1).detach()                                  # TRADES: KL(P(.|x) || P(.|x'))
    phi = {"pgd": "ce", "cw": "cw", "kl": lambda z, t: (p_nat * (p_nat.log() - F.log_softmax(z, 1))).sum(1)}
    torch.manual_seed(1)  # TRADES starts at x + 0.001 N(0, 1), the others uniformly in the ball
    ref = attacks.pgd(f, x, y, 0.3, 0.015, 3, loss=phi[attack], random_start=0.001 if attack == "kl" else True,
                      kappa=150) - x
    assert (delta - ref).abs().le(1e-6).float().mean() > 0.99             # Eq. (9) with the chosen phi
    with torch.no_grad():
        mask = g(x, delta)
    x_cali = calibrated.calibrate(x, delta, mask)
    assert ((x_cali - x).abs() <= args.eps + 1e-6).all() and ((x + delta - x).abs() <= args.eps + 1e-6).all()
    assert x_cali.min() >= 0 and x_cali.max() <= 1 and ((x_cali - x).abs() <= delta.abs() + 1e-6).all()
    assert torch.allclose(x_cali, x + mask * delta, atol=1e-6)            # Eq. (10); no clamp needed
    assert calibrated.calibrate(x, torch.full_like(x, 0.3), torch.ones_like(x)).max() == 1  # the box clamp


def test_calibrated_update_order(monkeypatch):
    torch.manual_seed(0)
    args = calibrated.get_args(["--dataset", "fake-mnist", "--beta", "2", "--beta1", "0.5"])
    f, g = models.SmallCNN(), models.SmallMaskNet(1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))  # 6: M sorted would sum otherwise
    delta = ((x + (torch.rand_like(x) * 2 - 1) * args.eps).clamp(0, 1) - x)
    monkeypatch.setattr(calibrated, "attack", lambda *a: delta)          # a fixed x' for the hand check
    opt_f, opt_g = torch.optim.SGD(f.parameters(), 0.5), torch.optim.SGD(g.parameters(), 0.5)
    f0, g0 = copy.deepcopy(f), copy.deepcopy(g)
    state = lambda m: {k: v.clone() for k, v in m.state_dict().items()}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    seen = []

    def spy(opt, name):
        step = opt.step

        def wrapped(*a, **k):
            seen.append((name, state(f), state(g), [p.grad for p in f.parameters()],
                         [p.grad for p in g.parameters()], f.training))
            step(*a, **k)
            seen.append((name + " done", state(f), state(g)))
        opt.step = wrapped

    spy(opt_f, "f")
    spy(opt_g, "g")
    out = calibrated.train_step(f, g, f, f, g, opt_f, opt_g,
                                torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext, x, y, args)
    assert [s[0] for s in seen] == ["f", "f done", "g", "g done"]
    (_, f_at_f, g_at_f, f_grads, g_grads, f_train), (_, f_after_f, g_after_f) = seen[0], seen[1]
    (_, f_at_g, g_at_g, f_grads_at_g, _, f_train_at_g), (_, f_end, g_end) = seen[2], seen[3]
    assert same(f_at_f, state(f0)) and same(g_at_g, g_after_f)
    assert same(g_at_f, state(g0)) and all(gr is None for gr in g_grads)    # f's loss reaches no g grad
    assert same(g_after_f, state(g0)) and not same(f_after_f, state(f0))    # f's step moved f only
    assert same(f_at_g, f_after_f) and same(f_end, f_after_f)               # g's step leaves f alone...
    assert all(a is b for a, b in zip(f_grads, f_grads_at_g))               # ...and adds no f gradient
    assert f_train and not f_train_at_g and not same(g_end, g_after_f)
    # Eq. (13) on f before its step; Eq. (14) on the updated f and g before its step
    with torch.no_grad():
        x_cali = calibrated.calibrate(x, delta, g0(x, delta))
        eq13 = calibrated.calibrated_loss(f0(x), f0(x_cali), y, 2.0)
        eq14 = calibrated.mask_loss(f(x_cali), f(x + delta), y, 0.5)
        eq14_stale = calibrated.mask_loss(f0(x_cali), f0(x + delta), y, 0.5)
    assert out["train_loss"].item() / 6 == pytest.approx(eq13.item(), rel=1e-5)
    assert out["train_mask_loss"].item() / 6 == pytest.approx(eq14.item(), rel=1e-5)
    m = g0(x, delta).flatten()                                              # M's logged mean and quantiles
    assert out["train_mask_q05"].item() / 6 == pytest.approx(torch.quantile(m, 0.05).item(), abs=1e-4)
    assert out["train_mask_q95"].item() / 6 == pytest.approx(torch.quantile(m, 0.95).item(), abs=1e-4)
    # bit for bit as logged before the sort replaced kthvalue (the landed Table 1 logs): the mean of M
    # in its own order (a sorted sum rounds differently), the k-th smallest entries
    assert torch.equal(out["train_mask_mean"], m.mean() * 6)
    assert [out[f"train_mask_q{q:02d}"] for q in (5, 95)] == [m.kthvalue(round(q * len(m))).values * 6
                                                              for q in (0.05, 0.95)]
    assert abs(eq14.item() - eq14_stale.item()) > 1e-4                    # the check can tell


@pytest.fixture(scope="module")
def calibrated_runs(tmp_path_factory):
    """Every --attack and ablation end to end, 2 epochs of one batch each: {name: (out, log)}."""
    runs = {}
    for name, flags in CAL_RUNS.items():
        out = str(tmp_path_factory.mktemp("calibrated") / name)
        run_cli(*CAL, *flags, "--out", out)
        with open(os.path.join(out, "log.jsonl")) as f:
            runs[name] = out, [json.loads(line) for line in f]
    return runs


@pytest.mark.parametrize("name", list(CAL_RUNS))
def test_calibrated_cli_flags_end_to_end(calibrated_runs, name):
    out, log = calibrated_runs[name]
    masked = "--no-mask" not in CAL_RUNS[name]
    assert [r["epoch"] for r in log] == [1, 2]
    keys = {"epoch", "lr", "train_loss", "train_nat_acc", "train_adv_acc", "train_cali_acc", "train_clean_acc",
            "train_pgd_acc", "test_clean_acc", "test_pgd_acc", "seconds", "images_per_s"}
    mask_keys = {"train_mask_loss", "train_mask_mean", "train_mask_q05", "train_mask_q95", "mask_lr"}
    assert set(log[-1]) == keys | (mask_keys if masked else set())
    assert all(math.isfinite(v) for r in log for v in r.values())
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert ck["method"] == "calibrated" and ck["arch"] == "smallcnn" and ck["epoch"] == 2
    flags = CAL_RUNS[name]
    assert ck["args"]["attack"] == (flags[flags.index("--attack") + 1] if "--attack" in flags else "cw")
    assert ("mask_net" in ck) == masked
    if masked:
        assert ck["args"]["mask_arch"] == "small" and ck["mask_scheduler"]["last_epoch"] == 2
        assert all(0 < r["train_mask_q05"] <= r["train_mask_mean"] <= r["train_mask_q95"] < 1 for r in log)
        assert all(r["train_mask_loss"] > 0 for r in log)
    else:  # x_cali = x': the calibrated and adversarial predictions are one
        assert ck["args"]["mask_arch"] is None
        assert all(r["train_cali_acc"] == r["train_adv_acc"] for r in log)


def test_calibrated_unweighted_ce_raises_the_loss(calibrated_runs):
    # Epoch 1 is one batch; same seed, so the same attack, mask and KL: only the natural term
    # differs, and plain CE exceeds CE weighted by 1 - p_y (Eq. 8) by mean(CE p_y) > 0.
    (_, weighted), (_, plain) = calibrated_runs["cw"], calibrated_runs["no_wce"]
    assert plain[0]["train_loss"] > weighted[0]["train_loss"] + 0.05
    assert plain[0]["train_mask_loss"] == pytest.approx(weighted[0]["train_mask_loss"], rel=1e-4)


def test_calibrated_checkpoint_reload(calibrated_runs, tmp_path):
    out, log = calibrated_runs["cw"]
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    args = calibrated.get_args(CAL[1:] + ["--out", str(tmp_path)])
    args.device = "cpu"
    _, _, test = calibrated.get_data(args)
    f = models.get_model(ck["arch"], ck["num_classes"], ck["in_channels"], ck["image_size"])
    g = models.get_mask_net(ck["args"]["mask_arch"], ck["in_channels"])
    f.load_state_dict(ck["model"])
    g.load_state_dict(ck["mask_net"])
    f.eval()
    x, y = torch.stack([test[i][0] for i in range(32)]), torch.tensor([test[i][1] for i in range(32)])
    with torch.no_grad():
        assert (f(x).argmax(1) == y).float().mean().item() == pytest.approx(log[-1]["test_clean_acc"])


def test_calibrated_presets_and_arg_errors(capsys, tmp_path):
    a = calibrated.get_args(["--beta1", "0.1", "--attack", "cw"])           # the headline command
    assert (a.dataset, a.arch, a.mask_arch, a.optimizer, a.batch_size, a.epochs) == \
        ("cifar10", "preact_resnet18", "resnet18", "sgd", 128, 140)
    assert (a.beta, a.beta1, a.eps, a.alpha, a.steps, a.kappa, a.lr, a.momentum, a.wd) == \
        (5, 0.1, 8 / 255, 2 / 255, 10, 50, 0.1, 0.9, 5e-4)
    assert (a.mask_optimizer, a.mask_lr) == ("sgd", 0.1)                     # the CIFAR release: g as f
    for ds in ("mnist", "fake-mnist"):
        a = calibrated.get_args(["--dataset", ds])
        assert (a.arch, a.mask_arch, a.optimizer, a.lr, a.wd, a.batch_size, a.epochs) == \
            ("smallcnn", "small", "adam", 1e-3, 0, 100, 40)
        assert (a.beta, a.beta1, a.eps, a.alpha, a.steps) == (1, 0.3, 0.3, pytest.approx(0.015), 20)
        assert a.kappa == 150                                                # the MNIST release's CAT_cw
        assert (a.mask_optimizer, a.mask_lr) == ("sgd", 0.01)                # not the release's Adam: README
    a = calibrated.get_args(["--dataset", "mnist", "--eps", "0.4", "--beta", "2"])
    assert (a.alpha, a.beta) == (pytest.approx(0.02), 2)                      # alpha = eps / 20
    assert calibrated.get_args(["--eps", "12/255"]).eps == 12 / 255           # Fig. 3
    assert calibrated.get_args(["--no-mask"]).mask_arch is None
    for bad in (["--beta", "-1"], ["--beta1", "-0.1"], ["--eps", "0"], ["--eps", "8/0"], ["--alpha", "0.5"],
                ["--alpha", "0"], ["--steps", "0"], ["--kappa", "-1"], ["--lr", "0"], ["--attack", "fgsm"],
                ["--mask-arch", "unet"], ["--mask-lr", "0"], ["--arch", "resnet9000"]):
        with pytest.raises(SystemExit) as e:
            calibrated.get_args(["--dataset", "fake-mnist", *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "error" in err and bad[0] in err, bad
    proc = run_cli(*CAL, "--beta", "-1", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "error" in proc.stderr and not (tmp_path / "x").exists()
    assert calibrated.get_args(["--no-mask"]).mask_arch is None


def test_calibrated_help_shows_the_active_preset_and_names_both(capsys):
    for argv, beta, kappa in (([], "5.0", "50.0"), (["--dataset", "mnist"], "1.0", "150.0")):
        with pytest.raises(SystemExit):
            calibrated.get_args([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())                     # argparse wraps lines
        assert f"5 on CIFAR-10, 1 on MNIST) (default: {beta})" in text
        assert f"150 on MNIST) (default: {kappa})" in text


@pytest.mark.parametrize("arch,expect", [("preact_resnet18", [100, 120]), ("wrn34_10", [100, 110])])
def test_calibrated_lr_milestones_of_the_release(arch, expect):
    a = calibrated.get_args(["--arch", arch])
    assert calibrated.milestones(a, *calibrated.PAPER_SCHEDULE["wrn34_10" if arch == "wrn34_10" else "cifar"]) \
        == expect
    a = calibrated.get_args(["--arch", arch, "--epochs", "14", "--milestones", "3", "5"])
    assert calibrated.milestones(a, 140, (100, 120)) == [3, 5]               # --milestones wins
    assert calibrated.milestones(calibrated.get_args(["--dataset", "mnist", "--epochs", "4"]), 40, (30,)) == [3]


def test_calibrated_warns_when_the_mask_collapses(tmp_path):
    # An Adam step of 0.5 on g with a large beta1 drives M to 0 within the first batches (the MNIST
    # release's failure, sped up): every epoch's mean leaves (0.02, 0.98) and each says so in one line.
    out = str(tmp_path / "run")
    proc = run_cli(*CAL, "--mask-optimizer", "adam", "--mask-lr", "0.5", "--beta1", "50", "--train-size", "96",
                   "--out", out)
    log = read_log(out)
    assert log[0]["train_mask_mean"] < 0.4 and log[1]["train_mask_q95"] < 0.02, log  # from 0.5 at init
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == sum(r["train_mask_mean"] <= 0.02 for r in log) >= 1, (warnings, log)
    assert "epoch 2: mean mask 0.0" in warnings[-1] and "natural training" in warnings[-1]
    quiet = run_cli(*CAL, "--out", str(tmp_path / "quiet"))                  # the default keeps M alive
    assert "warning" not in quiet.stderr and all(0.02 < r["train_mask_mean"] < 0.98 for r in read_log(
        str(tmp_path / "quiet")))


@pytest.mark.parametrize("argv,line", [
    ([*CUSTOM, "--eps-max", "-1"], "train_customized.py: error: --eps-max must be > 0, got -1 (see --help)"),
    ([*CAL, "--eps", "-1"], "train_calibrated.py: error: --eps must be > 0, got -1 (see --help)")])
def test_range_error_names_the_flag_the_rule_and_the_value(argv, line, tmp_path):
    proc = run_cli(*argv, "--out", str(tmp_path / "x"), check=False)
    assert (proc.returncode, proc.stderr) == (2, line + "\n") and not (tmp_path / "x").exists()


@pytest.mark.parametrize("script,prefix", [("train_customized.py", "--eps-m"), ("train_calibrated.py", "--no-m"),
                                           ("evaluate.py", "--n-ex")])
def test_flag_abbreviations_are_refused(script, prefix, tmp_path):
    # argparse's default would read --eps-m as --eps-max, --no-m as --no-mask, --n-ex as --n-examples
    first = ["--ckpt", str(tmp_path / "none.pt")] if script == "evaluate.py" else ["--out", str(tmp_path / "x")]
    proc = run_cli(script, *first, prefix, "1", check=False)
    assert proc.returncode == 2 and proc.stderr == f"{script}: error: unrecognized arguments: {prefix} 1 (see --help)\n"


# ---------------------------------------------------------------- evaluate.py
EVAL_QUICK = ["--steps", "2", "--square-queries", "10", "--n-examples", "32", "--batch-size", "16", "--device", "cpu"]


class EvalPrototypes(torch.nn.Module):
    """logit_c = <p_c, x - 0.5> with p_c in {-1, 1}^64: an honest linear model whose points lie at
    spread distances from the boundary, so that it is robust on about two thirds at eps 0.1."""

    def __init__(self, protos):
        super().__init__()
        self.protos = protos

    def forward(self, x):
        return (x - 0.5).flatten(1) @ self.protos.flatten(1).T


class EvalRounding(torch.nn.Module):
    """Planted gradient masking: the forward rounds its input to 8 bits, so every input gradient
    is zero while a black-box attack sees the same (non-robust) model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


def prototype_toy(classes, n):
    """A linear model on `classes` prototypes and n noisy points of them, at seeded distances."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 2, (classes, 1, 8, 8), generator=g).float() * 2 - 1
    y = torch.randint(0, classes, (n,), generator=g)
    scale = torch.linspace(0, 0.3, n)[torch.randperm(n, generator=g)]
    x = (0.5 + scale[:, None, None, None] * protos[y] + 0.1 * torch.randn(n, 1, 8, 8, generator=g))
    x = torch.round(x.clamp(0, 1) * 255) / 255  # on the 8-bit grid, as images are
    return EvalPrototypes(protos), torch.utils.data.TensorDataset(x, y)


@pytest.fixture(scope="module")
def eval_toy():
    return prototype_toy(4, 64)


def eval_args(*argv, protocol="calibrated"):
    args = evaluate.get_args(["--ckpt", "unused", "--batch-size", "16", "--eps", "0.1", "--device", "cpu", *argv])
    args.protocol = protocol
    return args


def eval_run(model, data, args, source=None):
    specs, sanity = evaluate.protocol_attacks(args, mnist_like=True)
    natural, robust, results, sanity = evaluate.evaluate(model, data, specs, sanity, args, source)
    return natural, robust, results, evaluate.masking_flags(results, sanity, len(data))


def eval_checkpoint(path, model=None, **override):
    """A checkpoint in the training scripts' format: fake-mnist, SmallCNN, 64 test images."""
    ck = {"model": (model or models.SmallCNN()).state_dict(), "arch": "smallcnn", "num_classes": 10,
          "in_channels": 1, "image_size": 28, "dataset": "fake-mnist", "method": "calibrated", "epoch": 1,
          "args": {"data_dir": "./data", "seed": 0, "test_size": 64, "dataset": "fake-mnist"}}
    torch.save({**ck, **override}, path)
    return str(path)


@pytest.mark.parametrize("script,protocol", [("train_customized.py", "customized"),
                                             ("train_calibrated.py", "calibrated")])
def test_eval_cli_on_trained_checkpoint(script, protocol, tmp_path):
    out = str(tmp_path / "run")
    run_cli(script, "--dataset", "fake-mnist", "--arch", "smallcnn", "--epochs", "1", "--train-size", "64",
            "--test-size", "64", "--eval-size", "16", "--batch-size", "32", "--steps", "2", "--seed", "3",
            "--eps-max" if protocol == "customized" else "--eps", "0.1", "--device", "cpu", "--out", out)
    ck_path = os.path.join(out, "model.pt")
    proc = run_cli("evaluate.py", "--ckpt", ck_path, *EVAL_QUICK, "--eps", "0.05", "--attack-all")
    with open(os.path.join(out, f"model_eval_{protocol}.json")) as f:  # default: next to the checkpoint
        rep = json.load(f)
    names = {"customized": ["pgd100", "cw100", "deepfool", "apgd-ce", "apgd-t", "square"],
             "calibrated": ["pgd20", "pgd100", "cw", "fgsm", "apgd-ce", "apgd-t", "square"]}
    assert rep["protocol"] == protocol  # the default is the checkpoint's method
    assert [r["name"] for r in rep["attacks"]] == names[protocol]
    with open(ck_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    ck = torch.load(ck_path, weights_only=True)
    assert rep["checkpoint"]["path"] == os.path.abspath(ck_path) and rep["checkpoint"]["sha256"] == sha
    assert rep["checkpoint"]["arch"] == "smallcnn" and rep["checkpoint"]["args"]["seed"] == 3
    assert (rep["n_examples"], rep["seed"], rep["device"], rep["attack_all"]) == (32, 0, "cpu", True)
    for r in rep["attacks"]:
        assert r["settings"]["eps"] == 0.05 and {"accuracy", "attacked", "newly_broken", "images_per_s"} <= r.keys()
        assert r["settings"].get("steps", 2) in (2, 50)  # --steps; DeepFool keeps its iteration cap
    assert set(rep["flags"]) == {"square_below_whitebox", "fgsm_below_pgd", "more_steps_no_gain", "large_eps_not_zero"}
    assert rep["sanity"]["settings"]["eps"] == 0.5 and rep["transfer_from"] is None
    # Natural accuracy: an independent computation on the test set the trainers build.
    model = models.get_model("smallcnn", 10, 1, 28)
    model.load_state_dict(ck["model"])
    test = torchvision.datasets.FakeData(64, (1, 28, 28), 10, torchvision.transforms.ToTensor(),
                                         random_offset=1_000_003)
    x, y = torch.stack([test[i][0] for i in range(32)]), torch.tensor([test[i][1] for i in range(32)])
    with torch.no_grad():
        assert rep["natural"] == pytest.approx((model.eval()(x).argmax(1) == y).float().mean().item())
    # Worst case per sample: never above any single attack (each alone, --attack-all).
    assert rep["any_attack"] <= min([rep["natural"]] + [r["accuracy"] for r in rep["attacks"]])
    assert "any attack" in proc.stdout and f"{100 * rep['any_attack']:.2f}" in proc.stdout
    assert all(f"{name}:" in proc.stderr for name in names[protocol]) and "images/s" in proc.stderr


def test_eval_shortcut_gives_the_same_worst_case(eval_toy):
    """Attacking only the points every earlier attack missed gives the same any-attack accuracy
    and the same per-attack new breaks as attacking every point, for fewer attacked points."""
    model, data = eval_toy
    for protocol, names in (("calibrated", "pgd20,pgd100,fgsm"), ("customized", "deepfool")):
        runs = [eval_run(model, data, eval_args("--attacks", names, *flag, protocol=protocol))
                for flag in ([], ["--attack-all"])]
        (nat, fast_any, fast, _), (nat2, all_any, slow, _) = runs
        assert torch.equal(nat, nat2) and torch.equal(fast_any, all_any)
        assert 0.3 < fast_any.float().mean() < nat.float().mean()  # a partly robust model
        assert [r["newly_broken"] for r in fast] == [r["newly_broken"] for r in slow]
        assert sum(r["attacked"] for r in fast) <= sum(r["attacked"] for r in slow)
    assert fast[0]["accuracy"] == slow[0]["accuracy"]  # the first attack sees every correct point


def test_eval_any_attack_is_the_per_sample_worst_case(eval_toy):
    model, data = eval_toy
    # The paper's attacks; with APGD: test_eval_apgd_columns_added_marked_and_dropped_by_paper_only.
    args = eval_args("--attack-all", "--square-queries", "100", "--paper-only")
    nat, robust, results, _ = eval_run(model, data, args)
    assert [r["name"] for r in results] == ["pgd20", "pgd100", "cw", "fgsm", "square"]
    accs = [r["accuracy"] for r in results]
    assert robust.float().mean().item() <= min(accs) <= max(accs) <= nat.float().mean().item()
    # Natural accuracy, independently: the prototype model's argmax on the whole set.
    x, y = data.tensors
    assert nat.float().mean().item() == (model(x).argmax(1) == y).float().mean().item()


def test_eval_deterministic_for_a_fixed_seed(eval_toy):
    model, data = eval_toy
    args = eval_args("--attacks", "apgd-ce,square", "--square-queries", "50")  # random starts, random search
    a, b = eval_run(model, data, args), eval_run(model, data, args)
    assert torch.equal(a[1], b[1]) and [r["accuracy"] for r in a[2]] == [r["accuracy"] for r in b[2]]


def test_eval_speed_flags_give_the_same_numbers(eval_toy, capsys):
    """--channels-last, --workers and --compile change how, not what: every attack,
    deepfool on the eager model included, breaks the same points."""
    model, data = eval_toy
    names = ("--attacks", "pgd100,cw100,deepfool", "--steps", "5")
    plain = eval_run(model, data, eval_args(*names, protocol="customized"))
    args = eval_args(*names, "--channels-last", "--workers", "1", "--compile", protocol="customized")
    fast = eval_run(evaluate.accelerate(model, args), data, args)
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])
    assert [r["newly_broken"] for r in plain[2]] == [r["newly_broken"] for r in fast[2]]
    assert 0 < plain[1].float().mean() < plain[0].float().mean()
    capsys.readouterr()
    # --amp on a CPU without native bf16 (here: oneDNN pinned to AVX2, where bf16 is emulated) is one line
    proc = run_cli("evaluate.py", "--ckpt", "x", "--amp", "--device", "cpu", check=False,
                   env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "native bf16" in proc.stderr


def test_eval_amp_runs_apgd_and_square_on_the_fp32_forward(eval_toy):
    # bf16 blurs the loss comparisons APGD and Square steer by (benchmarks/cpu_speed.py --strength):
    # under --amp they query the fp32 forward and break exactly the points of an fp32 run
    if not (torch.cpu._is_avx512_bf16_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("this CPU has no native bf16 (AVX512_BF16 or AMX)")
    model, data = eval_toy
    names = ("--attacks", "pgd20,apgd-ce,square", "--steps", "5", "--square-queries", "20", "--attack-all")
    plain = {r["name"]: r for r in eval_run(model, data, eval_args(*names))[2]}
    args = eval_args(*names, "--amp")
    specs, sanity = evaluate.protocol_attacks(args, mnist_like=True)
    natural, _, results, _ = evaluate.evaluate(evaluate.accelerate(model, args), data, specs, sanity, args,
                                               None, [evaluate.accelerate(model, args, amp=False), None])
    amp = {r["name"]: r for r in results}
    assert [amp[n]["forward"] for n in ("pgd20", "apgd-ce", "square")] == ["bf16", "fp32", "fp32"]
    assert all(plain[n]["forward"] == "fp32" for n in plain)
    assert amp["pgd20"]["attacked"] == plain["pgd20"]["attacked"] > 0  # bf16 keeps the toy's predictions
    for n in ("apgd-ce", "square"):
        assert amp[n]["accuracy"] == plain[n]["accuracy"] and amp[n]["newly_broken"] == plain[n]["newly_broken"]
    assert plain["apgd-ce"]["accuracy"] < natural.float().mean()  # the attack breaks some points


def test_eval_apgd_columns_added_marked_and_dropped_by_paper_only(eval_toy, capsys):
    model, data = eval_toy
    for protocol, paper in (("calibrated", ["pgd20", "pgd100", "cw", "fgsm", "square"]),
                            ("customized", ["pgd100", "cw100", "deepfool"])):
        specs, _ = evaluate.protocol_attacks(eval_args(protocol=protocol), mnist_like=True)
        names = [s["name"] for s in specs]
        # After the paper's white-box attacks, before Square: the worst case Square is judged against.
        # The customized protocol has no black box of its own: Square is added there too.
        added = ["apgd-ce", "apgd-t"]
        assert names == (paper[:-1] + added + ["square"] if "square" in paper else paper + added + ["square"])
        assert [s["name"] for s in specs if s.get("added")] == added + ["square"] * (protocol == "customized")
        apgd = {s["name"]: s for s in specs if s.get("added") and s["kind"] == "apgd"}
        assert apgd["apgd-ce"] == dict(name="apgd-ce", kind="apgd", added=True, eps=0.1, steps=100, loss="ce",
                                       targeted=False, n_targets=0, restarts=1, rho=0.75)
        assert apgd["apgd-t"] == {**apgd["apgd-ce"], "name": "apgd-t", "loss": "dlr", "targeted": True, "n_targets": 9}
        specs, _ = evaluate.protocol_attacks(eval_args("--paper-only", protocol=protocol), mnist_like=True)
        assert [s["name"] for s in specs] == paper
    specs, _ = evaluate.protocol_attacks(eval_args("--steps", "3"), True)
    assert [s["steps"] for s in specs if s.get("added")] == [3, 3]  # --steps: quick runs
    # Each attack alone (--attack-all): the any-attack column is at or below every column.
    args = eval_args("--attack-all", "--steps", "10", "--square-queries", "20")
    nat, robust, results, flags = eval_run(model, data, args)
    any_attack = robust.float().mean().item()
    assert all(any_attack <= r["accuracy"] for r in results) and any_attack < nat.float().mean().item()
    report = {"natural": nat.float().mean().item(), "attacks": results, "any_attack": any_attack,
              "attack_all": True, "flags": flags}
    capsys.readouterr()
    evaluate.print_table("model", report)
    header, *_, footnote = capsys.readouterr().out.splitlines()[:4]
    assert header.split() == ["natural", "pgd20", "pgd100", "cw", "fgsm", "apgd-ce*", "apgd-t*", "square", "any",
                              "attack"]
    assert footnote.startswith("* added, not in the paper's protocol")
    evaluate.print_table("model", {**report, "attacks": [r for r in results if not r["settings"].get("added")]})
    assert "*" not in capsys.readouterr().out


def test_eval_calibrated_cw_has_no_random_start(eval_toy):
    """The calibrated paper, Sec. 5.1.1 and footnote 2: C&W-inf without a random start, so the seed cannot
    change it, and it is exactly attacks.pgd from x."""
    model, data = eval_toy
    cw = next(s for s in evaluate.protocol_attacks(eval_args(), True)[0] if s["name"] == "cw")
    assert cw["random_start"] is False and (cw["steps"], cw["kappa"], cw["alpha"]) == (30, 50.0, 0.015)
    x, y = data.tensors
    runs = [evaluate.run_attack(cw, model, model, data, torch.arange(len(y)), eval_args("--seed", s))[0]
            for s in ("0", "1")]
    x_adv = attacks.pgd(model, x, y, 0.1, 0.015, 30, "cw", False, kappa=50.0)
    with torch.no_grad():
        expected = model(x_adv).argmax(1) == y
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], expected)


def test_eval_flags_planted_gradient_masking(eval_toy):
    model, data = eval_toy
    args = eval_args("--square-queries", "100")
    *_, honest = eval_run(model, data, args)
    *_, masked = eval_run(EvalRounding(model), data, args)
    assert not honest["square_below_whitebox"]["raised"] and not honest["large_eps_not_zero"]["raised"]
    assert masked["square_below_whitebox"]["raised"]  # Square breaks what no gradient attack can
    assert masked["large_eps_not_zero"]["raised"]     # eps 0.5 leaves the model untouched
    assert masked["more_steps_no_gain"]["raised"]
    assert masked["fgsm_below_pgd"]["raised"] is False  # nothing moves: FGSM is no better


def test_eval_transfer_from_itself_equals_white_box(eval_toy):
    model, data = eval_toy
    args = eval_args("--attacks", "pgd20,fgsm")
    _, white, _, _ = eval_run(model, data, args)
    _, transfer, _, _ = eval_run(model, data, args, source=EvalPrototypes(model.protos.clone()))
    _, other, _, _ = eval_run(model, data, args, source=EvalPrototypes(-model.protos))
    assert torch.equal(white, transfer) and other.float().mean() > white.float().mean()


def test_pgd_cw_attacks_confidently_correct_points():
    """C&W-inf is the attacker's min(margin, kappa): a point correct by more than kappa still gets
    a gradient (cw_margin's floor at -kappa, the defender's Eq. 6 hinge, would give it none)."""
    lin = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[60.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    x, y = torch.ones(1, 4), torch.tensor([0])                       # margin 1 - 60 = -59
    x_adv = attacks.pgd(lin, x, y, 0.5, 0.1, 10, loss="cw", kappa=50.0, random_start=False, clip=None)
    assert torch.allclose(x_adv, torch.tensor([[0.5, 1.5, 1.5, 1.0]]))  # pushed to the ball's edge
    fooled = torch.tensor([[0.0, 80.0, 0.0]], requires_grad=True)   # fooled by more than kappa
    loss = attacks._loss_fn("cw", 50.0)(fooled, y)
    assert loss.item() == 50.0 and torch.autograd.grad(loss.sum(), fooled)[0].abs().sum() == 0


def test_eval_bad_checkpoints_one_line_exit_2(tmp_path, capsys):
    """Through main() in process (the CLI path is in test_pickle_with_code_is_refused_and_never_runs)."""
    good = eval_checkpoint(tmp_path / "good.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"model": Payload()}, tmp_path / "code.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {str(tmp_path / "missing.pt"): "no checkpoint",
             str(tmp_path / "text.pt"): "not a readable checkpoint",
             str(tmp_path / "code.pt"): "refused",
             str(tmp_path / "list.pt"): "not a checkpoint of this project",
             eval_checkpoint(tmp_path / "arch.pt", arch="resnet9000"): "unknown arch",
             eval_checkpoint(tmp_path / "fit.pt", arch="preact_resnet18"): "does not fit",
             eval_checkpoint(tmp_path / "mnist.pt", dataset="mnist"): "cannot load the mnist test set"}
    for path, why in cases.items():
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--ckpt", path, "--data-dir", str(tmp_path / "nodata")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and why in err and len(err.strip().splitlines()) == 1, (path, err)
    assert not marker.exists()  # the pickle's code never ran
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", good, "--attacks", "pgd20,nosuch"])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err


def test_eval_refuses_non_finite_weights_and_logits_before_any_attack(tmp_path, capsys):
    """A diverged run's NaN logits would argmax to one class and read as a plausible 10 % table."""
    model, out = models.SmallCNN(), str(tmp_path / "report.json")
    with torch.no_grad():
        model.classifier[0].weight[3, 7] = float("nan")
    path = eval_checkpoint(tmp_path / "nan.pt", model)
    proc = run_cli("evaluate.py", "--ckpt", path, *EVAL_QUICK, "--out", out, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {path}: non-finite weights (NaN or inf) in classifier.0.weight; refused\n"
    # Finite weights whose logits overflow float32 (100 x 1 x 1e37): refused on the natural pass
    with torch.no_grad():
        model.classifier[0].weight.zero_()
        model.classifier[0].bias.fill_(1.0)
        model.classifier[2].weight.fill_(1e37)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", eval_checkpoint(tmp_path / "inf.pt", model), *EVAL_QUICK, "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: non-finite logits (NaN or inf) on the clean test images; refused\n"
    assert not os.path.exists(out)


def test_eval_main_in_process_eval_mode(tmp_path):
    path = eval_checkpoint(tmp_path / "m.pt", method="customized")
    model, _ = evaluate.load_model(path)
    assert not model.training
    out = str(tmp_path / "new" / "r.json")  # a folder --out names is made
    evaluate.main(["--ckpt", path, "--protocol", "calibrated", "--attacks", "fgsm", "--n-examples", "8",
                   "--device", "cpu", "--out", out])
    with open(out) as f:
        rep = json.load(f)
    assert rep["protocol"] == "calibrated" and rep["n_examples"] == 8 and rep["sanity"] is None
    assert rep["attacks"][0]["settings"] == {"name": "fgsm", "kind": "fgsm", "eps": 0.3}  # MNIST-like eps


def test_eval_adversarial_examples_outside_ball_or_box_are_refused(eval_toy, monkeypatch, capsys):
    """Every attack's x_adv is checked in survives(): a broken attack exits with one line naming it."""
    model, _ = eval_toy
    x, y = torch.linspace(0, 1, 8 * 64).view(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)  # 0 and 1 included
    specs = {s["name"]: s for s in evaluate.protocol_attacks(eval_args(), True)[0]}  # eps 0.1
    broken = {"fgsm": ("fgsm", lambda m, x, y, eps: (x + 1.5 * eps).clamp(max=1), 0.05),  # out of the ball
              "square": ("square", lambda m, x, y, *a: x + 0.02, 0.02),                   # out of the box
              "pgd20": ("pgd", lambda m, x, y, *a: x * float("nan"), float("nan"))}       # NaN
    for name, (fn, attack, over) in broken.items():
        monkeypatch.setattr(attacks, fn, attack)
        with pytest.raises(SystemExit) as e:
            evaluate.survives(specs[name], model, model, x, y, 0)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {name}: adversarial examples outside the L-inf ball of eps 0.1 or the [0, 1] "
                              f"box, by up to {over:.3g}"), err
    x_adv = (x + 0.1).clamp(0, 1)  # on the ball's edge and the box's: counted
    evaluate.check_threat_model(specs["fgsm"], x, x_adv)
    evaluate.check_threat_model(specs["fgsm"], x, x_adv + 1e-7 * (x_adv < 1))


def test_eval_autoattack_not_installed_or_too_few_classes_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """Asked for and not there: one line naming the pip command, exit 2, before any attack runs."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("pyautoattack", "autoattack")
                        else real(name, *a))
    path = eval_checkpoint(tmp_path / "m.pt")
    for flag in (["--autoattack"], ["--attacks", "pgd20,autoattack"], ["--attacks", "autoattack"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--ckpt", path, "--n-examples", "8", "--device", "cpu", *flag])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == "" and err == "error: --autoattack: AutoAttack is not installed: " \
            "pip install pyautoattack\n", (flag, err)  # no table, no attack's progress line
    # Installed, but APGD-T and FAB-T target 9 other classes: refused up front, not after every other attack.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real("json") if name == "pyautoattack"
                        else real(name, *a))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", eval_checkpoint(tmp_path / "c4.pt", models.SmallCNN(num_classes=4), num_classes=4),
                       "--autoattack", "--device", "cpu"])
    assert e.value.code == 2 and "needs 10 classes or more; the model has 4" in capsys.readouterr().err


def test_eval_autoattack_selected_by_flag_or_attacks_last_before_sanity():
    names = lambda *argv: [s["name"] for s in evaluate.protocol_attacks(eval_args(*argv), True)[0]]
    assert names("--autoattack")[-2:] == ["square", "autoattack"]
    assert names("--autoattack", "--attacks", "pgd20,sanity") == ["pgd20", "autoattack"]
    assert names("--attacks", "autoattack,pgd20") == ["pgd20", "autoattack"] and names("--attacks", "autoattack") \
        == ["autoattack"]
    assert "autoattack" not in names() and "autoattack" in names("--autoattack", "--paper-only")
    spec = evaluate.protocol_attacks(eval_args("--autoattack", "--steps", "3", "--restarts", "2"), True)[0][-1]
    package, version = evaluate.autoattack_package() or (None, None)
    assert spec == dict(name="autoattack", kind="autoattack", eps=0.1, version="standard", package=package,
                        package_version=version)  # --steps and --restarts leave AutoAttack standard


needs_autoattack = pytest.mark.skipif(evaluate.autoattack_package() is None,
                                      reason="AutoAttack is optional: pip install pyautoattack")


@pytest.fixture(scope="module")
def eval_toy10():
    """eval_toy's linear model with 10 classes (AutoAttack standard targets 9 others), 16 points."""
    return prototype_toy(10, 16)


def test_eval_progress_line_once_per_update(monkeypatch, capsys):
    """A batch over 30 s prints a progress line; the closing line is not printed twice."""
    clock = iter(range(0, 10_000, 40))
    monkeypatch.setattr(evaluate.time, "time", lambda: next(clock))
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 28, 28), torch.zeros(4).long())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    evaluate.run_attack({"name": "natural", "kind": "natural"}, model, model, data, torch.arange(4),
                        eval_args("--batch-size", "2"))
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == ["   natural: 2/4 points", "   natural: 4/4 points"]


def test_eval_autoattack_alone_in_both_modes_and_its_agreement_with_the_chain(monkeypatch):
    """AutoAttack attacks every naturally correct point even after a chain that runs on survivors
    (its column is its own number), and counts the points only it breaks and those only the chain
    breaks. Scripted masks: point 0 natural-wrong, the chain (pgd20) breaks 1 and 2, AutoAttack 2 and 3."""
    breaks = {"natural": {0}, "pgd20": {1, 2}, "autoattack": {2, 3}}
    seen = {}

    def fake(spec, source, model, data, points, args):
        seen.setdefault(spec["name"], points.tolist())
        return torch.tensor([int(i) not in breaks[spec["name"]] for i in points]), 0.0
    monkeypatch.setattr(evaluate, "run_attack", fake)
    for mode in ([], ["--attack-all"]):
        seen.clear()
        specs = [{"name": "pgd20", "kind": "pgd"}, {"name": "autoattack", "kind": "autoattack"}]
        natural, robust, (pgd, aa), _ = evaluate.evaluate(None, list(range(8)), specs, None, eval_args(*mode))
        assert seen["autoattack"] == list(range(1, 8)) == seen["pgd20"]  # every naturally correct point
        assert robust.nonzero().flatten().tolist() == [4, 5, 6, 7] and aa["accuracy"] == 5 / 8
        assert (aa["newly_broken"], aa["missed"], pgd["newly_broken"]) == (1, 1, 2)  # 3 only AA, 1 only pgd20
    breaks["pgd100"] = {3}  # a chain without AutoAttack: each attack on the survivors, nothing "missed"
    *_, (pgd20, pgd100), _ = evaluate.evaluate(None, list(range(8)), [{"name": "pgd20", "kind": "pgd"},
                                                                      {"name": "pgd100", "kind": "pgd"}], None, eval_args())
    assert (pgd100["attacked"], pgd100["newly_broken"], pgd20["missed"], pgd100["missed"]) == (5, 1, None, None)


@needs_autoattack
def test_eval_autoattack_exact_on_a_linear_model_in_ball_and_box(eval_toy10, monkeypatch):
    """On a linear model the worst case over the eps-ball and the [0, 1] box is exact, per other class
    j: min over delta of <p_y - p_j, x + delta - 0.5> takes each pixel to its range's end. AutoAttack
    finds every point that is not robust, and its examples are in the ball and the box."""
    model, data = eval_toy10
    check, seen = evaluate.check_threat_model, []
    monkeypatch.setattr(evaluate, "check_threat_model", lambda spec, x, x_adv: seen.append((x, x_adv)) or
                        check(spec, x, x_adv))
    nat, robust, results, _ = eval_run(model, data, eval_args("--attacks", "autoattack"))
    x, y = data.tensors
    w, xf = model.protos.flatten(1), x.flatten(1)
    lo, hi = (-xf).clamp(min=-0.1), (1 - xf).clamp(max=0.1)
    d = w[y][:, None] - w[None]                                                      # (n, class j, pixel)
    worst = ((xf - 0.5)[:, None] * d).sum(-1) + torch.minimum(d * lo[:, None], d * hi[:, None]).sum(-1)
    worst[torch.arange(len(y)), y] = float("inf")
    exact = worst.min(1).values > 0
    assert torch.equal(robust, exact) and 0 < exact.sum() < nat.sum()  # partly robust: every stage ran
    assert results[0]["accuracy"] == exact.float().mean().item() and results[0]["attacked"] == int(nat.sum())
    assert len(seen) == 1 and all((x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
                                  for x, x_adv in seen)


@needs_autoattack
def test_eval_autoattack_cli_column_json_and_log(tmp_path):
    """Through the CLI with --attacks: a SmallCNN that memorized 8 noise images falls to 0 at eps 0.3."""
    test = torchvision.datasets.FakeData(64, (1, 28, 28), 10, torchvision.transforms.ToTensor(),
                                         random_offset=1_000_000)  # eval_checkpoint's test set
    x, y = torch.stack([test[i][0] for i in range(8)]), torch.tensor([test[i][1] for i in range(8)])
    torch.manual_seed(0)
    model = models.SmallCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out = str(tmp_path / "r.json")
    proc = run_cli("evaluate.py", "--ckpt", eval_checkpoint(tmp_path / "m.pt", model), "--attacks", "pgd20,autoattack",
                   "--attack-all", "--steps", "2", "--n-examples", "8", "--device", "cpu", "--out", out)
    with open(out) as f:
        rep = json.load(f)
    package, version = evaluate.autoattack_package()
    pgd, aa = rep["attacks"]
    assert (pgd["name"], aa["name"], aa["settings"]["package"], aa["settings"]["package_version"]) == \
        ("pgd20", "autoattack", package, version)
    assert rep["natural"] == 1.0 and pgd["accuracy"] > 0.5 and aa["accuracy"] == rep["any_attack"] == 0.0
    assert aa["attacked"] == 8 and "autoattack" in proc.stdout.splitlines()[0]  # --attack-all: every point
    if package == "pyautoattack":  # its accuracy after each of its attacks, on stderr
        assert "auto-attack DEBUG: robust accuracy after APGD-CE: 0.00%" in proc.stderr


@needs_autoattack
def test_eval_autoattack_log_warnings_to_stderr_not_its_chatter(capsys):
    checks = pytest.importorskip("pyautoattack.checks")
    log, root = logging.getLogger("auto-attack"), list(logging.getLogger().handlers)
    saved = log.handlers[:], log.level, log.propagate
    log.handlers.clear()
    try:
        evaluate.show_autoattack_log()
        evaluate.show_autoattack_log()  # once
        checks.check_square_sr({"clean": 1.0, "apgd-ce": 0.5, "square": 0.25}, logger=log)  # its own warning
        log.debug("robust accuracy after SQUARE: 25.00% (total time 1.0 s)")
        log.debug("square - 1/1 - 2 out of 4 successfully perturbed")
    finally:
        log.handlers[:], log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("auto-attack WARNING: Square Attack has decreased the robust accuracy")
    assert err[1] == "auto-attack DEBUG: robust accuracy after SQUARE: 25.00% (total time 1.0 s)"
    assert logging.getLogger().handlers == root


# ---------------------------------------------------------------- resume, errors, determinism
def final_state(out):
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    return ck, untimed(read_log(out))


def assert_same_run(a, b):
    (ck_a, log_a), (ck_b, log_b) = final_state(a), final_state(b)
    assert ck_a["epoch"] == ck_b["epoch"] and ck_a.keys() == ck_b.keys()
    for net in ("model", "mask_net"):  # the mask net: calibrated only
        for k in ck_a.get(net, {}):
            assert torch.equal(ck_a[net][k], ck_b[net][k]), (net, k)
    if "eps" in ck_a:  # the eps table: customized only
        assert torch.equal(ck_a["eps"], ck_b["eps"])
    assert log_a == log_b


def start_and_stop(args, out, sig, after_lines):
    """Start a training run, send `sig` once its log has `after_lines` lines; return its stderr."""
    proc = subprocess.Popen([sys.executable, *args, "--out", out], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "model.pt")) and len(open(log).readlines()) >= after_lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    args = [*CUSTOM, "--epochs", "4"]
    run_cli(*args, "--out", str(tmp_path / "straight"))
    code, _ = start_and_stop(args, str(tmp_path / "killed"), signal.SIGKILL, after_lines=1)
    assert code == -signal.SIGKILL
    assert torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["epoch"] < 4
    run_cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


def test_calibrated_resume_after_sigkill_restores_both_nets(tmp_path):
    # Bit-identical only if f, g_phi, both optimizers and both schedulers come back, and each
    # epoch's randomness is a function of (seed, epoch) alone.
    args = [*CAL, "--epochs", "3", "--train-size", "256"]
    run_cli(*args, "--out", str(tmp_path / "straight"))
    code, _ = start_and_stop(args, str(tmp_path / "killed"), signal.SIGKILL, after_lines=1)
    assert code == -signal.SIGKILL
    assert torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["epoch"] < 3
    run_cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


def test_eps_warmup_ramps_the_training_attack_per_batch_in_both_trainers(monkeypatch):
    """--eps-warmup N: the training attack's eps (and, in the calibrated trainer, its absolute step)
    times min(1, epochs done / N) at each batch; the same flag in both trainers' shared part."""
    args = customized.get_args([*FAKE, "--eps-warmup", "2", "--batch-size", "2", "--fixed-eps", "--c", "0"])
    data = customized.Indexed(torch.utils.data.TensorDataset(torch.rand(8, 1, 28, 28), torch.zeros(8).long()),
                              range(8))
    args.workers = 0  # setup()'s
    seen = [[args.eps_scale for _ in customized.batches(data, e, args, 1, 0)] for e in range(3)]
    assert seen == [[0.0, 0.125, 0.25, 0.375], [0.5, 0.625, 0.75, 0.875], [1.0] * 4]
    assert customized.get_args(FAKE).eps_scale == 1.0 and calibrated.get_args(["--dataset", "fake-mnist"]).eps_scale \
        == 1.0  # off by default: the papers
    got = []
    monkeypatch.setattr(attacks, "pgd", lambda model, x, y, eps, alpha, *a, **k: got.append((eps, alpha)) or x)
    torch.manual_seed(0)
    model, x, y = models.SmallCNN(), torch.rand(4, 1, 28, 28), torch.arange(4)
    args.eps_scale, args.num_classes = 0.25, 10
    opt = torch.optim.SGD(model.parameters(), 0.1)
    amp = torch.amp.GradScaler("cpu", enabled=False)
    customized.train_step(model, model, model, opt, amp, contextlib.nullcontext, x, y, torch.arange(4),
                          torch.zeros(8), args)
    radius = torch.full((4,), 0.25 * args.eps_max)
    assert torch.equal(got[0][0], radius) and torch.equal(got[0][1], args.alpha * radius)
    cal = calibrated.get_args(["--dataset", "fake-mnist", "--eps-warmup", "3"])
    cal.eps_scale = 0.5
    calibrated.attack(model, x, y, cal)
    assert got[1] == (0.5 * cal.eps, 0.5 * cal.alpha)
    with pytest.raises(SystemExit) as e:
        calibrated.get_args(["--dataset", "fake-mnist", "--eps-warmup", "-1"])
    assert e.value.code == 2


def test_eps_warmup_run_resumes_mid_ramp_and_extends_by_epochs(tmp_path):
    """AT with a 1.5-epoch warm-up: 1 epoch then --resume --epochs 2 is the straight 2-epoch run (given
    --milestones), and the ramp changes training from the first batch."""
    args = [*CUSTOM, "--fixed-eps", "--c", "0", "--loss", "ce", "--steps", "3", "--milestones", "1"]
    run_cli(*args, "--epochs", "2", "--eps-warmup", "1.5", "--out", str(tmp_path / "straight"))
    run_cli(*args, "--epochs", "1", "--eps-warmup", "1.5", "--out", str(tmp_path / "split"))
    run_cli(*args, "--epochs", "2", "--eps-warmup", "1.5", "--out", str(tmp_path / "split"), "--resume")
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    run_cli(*args, "--epochs", "1", "--out", str(tmp_path / "full"))
    assert read_log(tmp_path / "full")[0]["train_loss"] != read_log(tmp_path / "straight")[0]["train_loss"]
    proc = run_cli(*args, "--epochs", "2", "--out", str(tmp_path / "split"), "--resume", check=False)
    assert proc.returncode != 0 and "trained with other settings: eps_warmup" in proc.stderr  # not runtime
    # without --milestones the schedule scales with --epochs: extending would not be the straight run
    run_cli(*args[:-2], "--epochs", "1", "--out", str(tmp_path / "scaled"))
    proc = run_cli(*args[:-2], "--epochs", "2", "--out", str(tmp_path / "scaled"), "--resume", check=False)
    assert proc.returncode != 0 and "trained with other settings: epochs" in proc.stderr


def test_seed_determinism_and_seed_matters(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_cli(*CUSTOM, "--epochs", "1", "--seed", seed, "--out", str(tmp_path / name))
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert final_state(tmp_path / "a")[1] != final_state(tmp_path / "c")[1]
    assert read_log(tmp_path / "a")[0]["lr"] == pytest.approx(0.1)  # --epochs 1 trains at the full lr


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.path.join(HERE, '.pwned')}",))


@pytest.mark.parametrize("script", ["train_customized.py", "evaluate.py"])
def test_pickle_with_code_is_refused_and_never_runs(script, tmp_path):
    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    marker = os.path.join(HERE, ".pwned")
    args = [*CUSTOM, "--out", str(tmp_path / "o"), "--resume", str(bad)] if script.startswith("train") \
        else ["evaluate.py", "--ckpt", str(bad)]
    proc = run_cli(*args, check=False)
    assert proc.returncode != 0 and not os.path.exists(marker)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_bad_inputs_one_line_errors(tmp_path):
    out = str(tmp_path / "run")
    run_cli(*CUSTOM, "--epochs", "1", "--out", out)
    cases = {
        "holds a run": [*CUSTOM, "--epochs", "1", "--out", out],
        "other settings: eta": [*CUSTOM, "--epochs", "1", "--out", out, "--resume", "--eta", "0.02"],
        "no checkpoint": [*CUSTOM, "--out", str(tmp_path / "none"), "--resume"],
        "cannot load mnist": [*CUSTOM, "--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"),
                              "--out", str(tmp_path / "m")],
        "not a loadable checkpoint": [*CUSTOM, "--out", str(tmp_path / "t"), "--resume", __file__],
    }
    for expect, args in cases.items():
        proc = run_cli(*args, check=False, env={"no_proxy": "*", "https_proxy": "http://127.0.0.1:9"})
        assert proc.returncode != 0, expect
        assert expect in proc.stderr and "Traceback" not in proc.stderr, (expect, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not proc.stderr.strip().endswith(":"), proc.stderr  # the reason, not a dangling header


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    # Poison the loss from the 5th batch (epoch 2 of 4 batches) through the real main().
    code = ("import sys, torch, train_customized as t\n"
            "step, calls = t.train_step, [0]\n"
            "def poisoned(*a):\n"
            "    calls[0] += 1\n"
            "    out = step(*a)\n"
            "    return {**out, 'train_loss': out['train_loss'] * float('nan')} if calls[0] >= 5 else out\n"
            "t.train_step = poisoned\n"
            "t.main(sys.argv[1:])\n")
    proc = run_cli("-c", code, *CUSTOM[1:], "--epochs", "3", "--out", out, check=False)
    assert proc.returncode != 0
    # Checked once an epoch on the all-reduced mean (no host sync per batch): epoch 2 stops, epoch 1 is kept.
    assert "non-finite loss in epoch 2; " in proc.stderr and "Traceback" not in proc.stderr
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert len(read_log(out)) == 1


# ---------------------------------------------------------------- torchrun, amp
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("script", ["train_customized.py", "train_calibrated.py"])
def test_cpu_amp_bf16_refused_where_emulated_and_trains_where_native(script, tmp_path):
    run = [*(CUSTOM if script == "train_customized.py" else CAL), "--epochs", "1"]
    fast = [*run, "--amp", "bf16", "--channels-last"]
    # oneDNN pinned to AVX2 emulates bf16 (~7x slower): one line, exit 2, nothing written
    proc = run_cli(*fast, "--out", str(tmp_path / "emulated"), check=False, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "native bf16" in proc.stderr
    assert not (tmp_path / "emulated").exists()
    if not NATIVE_BF16:
        pytest.skip("this CPU has no native bf16 (AVX512_BF16 or AMX)")
    run_cli(*fast, "--out", str(tmp_path / "bf16"))
    run_cli(*run, "--out", str(tmp_path / "fp32"))
    (bf16,), (fp32,) = read_log(str(tmp_path / "bf16")), read_log(str(tmp_path / "fp32"))
    # bf16 changes the numerics (not bit-equal) but not the method: the same loss to within 2 %
    assert bf16["train_loss"] != fp32["train_loss"] and bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.02)
    ck = torch.load(str(tmp_path / "bf16" / "model.pt"), weights_only=True)
    assert all(v.dtype == torch.float32 for v in ck["model"].values())  # master weights stay fp32
    assert ck["args"]["amp"] == "bf16" and ck["args"]["channels_last"]


def torchrun(*args, out):
    return run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                   "--out", out, timeout=300)


def test_torchrun_customized_eps_table_consistent_across_ranks(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun(*CUSTOM[:1], *FAKE, "--eps-max", "0.1", "--eta", "0.01", "--batch-size", "16", "--epochs", "1",
             out=out)
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    (rec,) = read_log(out)
    eps = ck["eps"]
    # From eps = 0, one epoch sets eps_i = eta exactly on the samples whose attack failed, on
    # whichever rank attacked them. train_adv_acc is all-reduced over both ranks, so rank 0's
    # table holds every rank's updates iff its mean is eta x that accuracy.
    assert eps.mean().item() == pytest.approx(0.01 * rec["train_adv_acc"], abs=1e-6)
    from torch.utils.data.distributed import DistributedSampler
    rank1 = list(DistributedSampler(range(128), 2, 1, shuffle=True, seed=0))
    assert (eps[rank1] > 0).any(), "no update from rank 1 reached rank 0's table"
    assert rec["images_per_s"] > 0 and sorted(os.listdir(out)) == ["log.jsonl", "model.pt"]


def test_torchrun_calibrated_two_ranks(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun("train_calibrated.py", *FAKE, "--steps", "2", "--batch-size", "16", "--epochs", "1", out=out)
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    (rec,) = read_log(out)
    assert ck["epoch"] == 1 and "mask_net" in ck
    assert rec["epoch"] == 1 and 0 < rec["train_mask_mean"] < 1 and rec["images_per_s"] > 0
    assert sorted(os.listdir(out)) == ["log.jsonl", "model.pt"]


def test_amp_on_cpu_is_refused(tmp_path):
    proc = run_cli(*CUSTOM, "--amp", "fp16", "--out", str(tmp_path / "x"), check=False)  # CUSTOM: --device cpu
    assert proc.returncode == 2 and "--amp fp16 needs CUDA" in proc.stderr


def test_ranks_never_share_an_index_within_an_epoch():
    """Under torchrun a training set that does not divide by the world size is not padded with
    repeated indices (drop_last), so no two ranks write the same eps_i in one step."""
    args = customized.get_args(CUSTOM[1:])
    args.workers = 0
    data = customized.Indexed(torch.utils.data.TensorDataset(torch.zeros(127, 1), torch.zeros(127).long()), range(127))
    shards = [torch.cat([idx for *_, idx in customized.batches(data, 3, args, 2, rank)]).tolist() for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 63 and not set(shards[0]) & set(shards[1])
    one = torch.cat([idx for *_, idx in customized.batches(data, 3, args, 1, 0)]).tolist()
    assert sorted(one) == list(range(127))                               # one process: every sample, as before


def test_resume_under_fp16_from_a_run_without_a_grad_scaler(tmp_path):
    """--amp may change on resume: a checkpoint of --amp off or bf16 holds the disabled GradScaler's
    empty state, which an enabled one refused (RuntimeError); now the fp16 run starts a fresh scaler."""
    out = str(tmp_path / "run")
    run_cli(*CUSTOM, "--epochs", "1", "--out", out)
    args = customized.get_args([*CUSTOM[1:], "--epochs", "1", "--out", out, "--resume"])
    args.amp = "fp16"  # CUDA only on the command line; open_run is the same on the CPU, which has a GradScaler
    model = models.get_model("smallcnn", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = {"model": model, "optimizer": opt, "scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [1]),
             "scaler": scaler, "eps": torch.zeros(128)}
    assert customized.open_run(args, state) == (1, None)
    ck = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert ck["scaler"] == {} and scaler.get_scale() == 2.0 ** 16        # a fresh scaler
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items()) and torch.equal(state["eps"],
                                                                                                        ck["eps"])


def test_fp16_training_attack_moves_confident_points_as_fp32_does():
    """Under fp16 autocast the input gradient of a confidently classified point underflows to 0 and
    PGD never moves it (a weaker training attack); wrap()'s attack_net rescales each sample's logit
    gradient first (attacks.unit_grad), and the attack takes fp32's steps. fp16 autocast on the CPU
    shows the same underflow as on CUDA."""
    torch.manual_seed(0)
    model = models.SmallCNN().eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(3000)                            # margins 13-27, as trained nets' points
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    args = customized.get_args(CUSTOM[1:])
    args.amp = "fp16"
    _, attack_net, _, _ = customized.wrap(model, args, 1)

    def attack(net, fp16):
        with torch.autocast("cpu", torch.float16, enabled=fp16):
            return attacks.pgd(net, x, y, 0.1, 0.02, 3, random_start=False)
    moved = lambda x_adv: (x_adv != x).flatten(1).any(1)
    fp32, plain, fixed = attack(model, False), attack(model, True), attack(attack_net, True)
    assert moved(fp32).all() and (~moved(plain)).sum() >= 8              # the defect, on most points
    assert moved(fixed).all() and (fixed - fp32).abs().le(1e-6).float().mean() > 0.95


# ---------------------------------------------------------------- benchmarks
def test_toy_margin_eps4_distorts_customized_does_not():
    """Fig. 1 of the customized paper, reduced to 200 training points and one seed (~2 s). Measured
    at this size over seeds 0-11: natural and eps-1 AT 1.000, eps-4 AT 0.854-0.890 (boundary ~55-60
    deg off the true one), customized 0.994-1.000."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import toy_margin
    res, (x, y) = toy_margin.run(0, n=200)
    acc = {k: a for k, (_, a) in res.items()}
    assert acc["natural"] >= 0.99 and acc["AT eps 1"] >= 0.99, acc
    assert acc["AT eps 4"] <= 0.92, acc
    assert acc["customized"] >= 0.97 and acc["customized"] >= acc["AT eps 4"] + 0.05, acc
    # PGD (10 steps of eps/4 from a random start) reaches the closed-form L-inf worst case.
    at4 = res["AT eps 4"][0]
    assert torch.allclose(attacks.pgd(at4, x, y, 4.0, 1.0, 10, clip=None),
                          toy_margin.worst_case(at4, x, y, 4.0))
    assert toy_margin.tilt(at4)[0] > 45 > toy_margin.tilt(res["customized"][0])[0]


def test_toy_margin_json_records_each_seed_and_the_sample_std(tmp_path, capsys):
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import toy_margin
    toy_margin.main(["--seeds", "2", "--n", "100", "--json", str(tmp_path / "toy.json")])
    out = json.load(open(tmp_path / "toy.json"))
    acc = torch.tensor([s["AT eps 4"]["test_acc"] for s in out["seeds"]], dtype=torch.float64)
    assert [s["seed"] for s in out["seeds"]] == [0, 1] and out["args"]["n"] == 100 and out["commit"]
    sample_std = abs(acc[0] - acc[1]).item() / 2 ** 0.5  # n - 1 = 1; the population std would be half the gap
    assert acc[0] != acc[1] and out["summary"]["AT eps 4"]["std"] == pytest.approx(sample_std)
    assert f"AT eps 4    test acc {acc.mean():.3f} ± {acc.std():.3f}" in capsys.readouterr().out


def test_table1_customized_rows_eta_ratio_eps_record_and_provenance(tmp_path):
    """The customized rows keep the paper's eta / eps_max (0.005 at 8/255) at 40 epochs and eps / E at 3;
    Table 6's ablations differ from customized in one part each; the eps table's final counts are exact;
    provenance merges consecutive training segments on one kind of machine."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import mnist_table1
    import runner
    flag = lambda flags, k: flags[flags.index(k) + 1] if k in flags else None
    _, cus40 = mnist_table1.row_flags("customized(0.3)", 40)
    _, cus3 = mnist_table1.row_flags("customized(0.3)", 3)
    assert (flag(cus40, "--eta"), flag(cus3, "--eta"), flag(cus40, "--c")) == ("0.04781", "0.1", "1.046")
    assert 0.3 * float(flag(cus40, "--c")) == pytest.approx(10 * 8 / 255, rel=1e-3)  # c * eps_max as at 8/255
    _, ls = mnist_table1.row_flags("Adv+LS(0.3)", 40)
    _, adp = mnist_table1.row_flags("Adp-Adv(0.3)", 40)
    assert "--fixed-eps" in ls and flag(ls, "--c") == "1.046" and flag(ls, "--loss") == "ce"
    assert flag(adp, "--c") == "0" and flag(adp, "--eta") == "0.04781" and flag(adp, "--loss") == "ce"
    eta = torch.tensor(0.04781)
    torch.save({"eps": torch.stack([torch.tensor(0.0), eta, eta + eta, torch.tensor(0.3), torch.tensor(0.3)])},
               tmp_path / "model.pt")
    assert runner.eps_counts(str(tmp_path / "model.pt")) == {"0": 1, "0.04781": 1, "0.09562": 1, "0.3": 2}
    row = {"name": "customized(0.3)", "seed": 0, "epochs": 3, "commit": "abc", "seconds": 7200, "command": "python x",
           "acc": {"natural": 0.99, "pgd20": 0.9}, "eval_seconds": 1800, "strong": {"seconds": 1800},
           "eps_per_epoch": {"mean": [0.04, 0.1, 0.2], "at_max": [0.0, 0.1, 0.5]},
           "training_machines": [{"from_epoch": e, "cpu": cpu, "onednn_isa": isa, "amp": amp} for e, cpu, isa, amp in
                                 ((0, "AMD EPYC", "Intel AVX2", "off"), (1, "AMD EPYC", "Intel AVX2", "off"),
                                  (2, "Intel(R) Xeon(R) Processor", "Intel AMX with bfloat16", "bf16"))]}
    assert "| customized(0.3) | 0 | abc | 1-2 AMD EPYC, AVX2, fp32; 3-3 Intel Xeon, AMX, bf16 | 2.0 | 1.0 |" in \
        mnist_table1.provenance([row])
    assert "| customized(0.3) | 0 | 0.040 (0 %) | 0.100 (10 %) | - |" in mnist_table1.eps_trajectory([row], (1, 2, 5))
    assert "| CAT | customized(0.3) | 99.0 | 90.0 | - |" in mnist_table1.table6([row])
    assert "| Adv+LS | Adv+LS(0.3) | not trained yet |" in mnist_table1.table6([row])


def test_table1_verdicts_by_the_paired_seed_differences():
    """'holds' needs every seed positive and mean > sd of the paired differences; a run at chance is
    starred and its difference not counted."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import mnist_table1
    row = lambda name, seed, pgd20, nat=0.98: {"name": name, "seed": seed, "n_test": 10000,
                                               "acc": {"natural": nat, "pgd20": pgd20, "pgd100": pgd20, "cw": pgd20}}
    claim = lambda text, a, b: next(line for line in text.splitlines() if line.startswith(f"| {a} > {b} |"))
    cw, trades, at = "calibrated_cw(0.3)", "TRADES(0.3)", "AT(0.3)"
    rows = [row(cw, s, a) for s, a in enumerate((0.92, 0.91, 0.93))] + \
        [row(trades, s, a) for s, a in enumerate((0.90, 0.90, 0.91))] + \
        [row(at, s, a, n) for s, (a, n) in enumerate(((0.93, 0.98), (0.1135, 0.1135), (0.90, 0.98)))]
    text = mnist_table1.summary(rows)
    # cw - TRADES: +2, +1, +2 (mean 1.67 > sd 0.58): holds; cw - AT: -1, +79.7, +3: undecided
    assert "**holds**: +2.0, +1.0, +2.0 (mean +1.7, sd 0.6)" in claim(text, cw, trades).split(" | ")[1]
    assert "**undecided**: -1.0, +79.7*, +3.0" in claim(text, cw, at)
    assert f"| {at} | 0, 1*, 2 |" in text and "stuck at chance" in text
    # a float32 accuracy on a tie rounds half up, as its image count does: 9,575 and 1,135 of 10,000
    assert [mnist_table1.pct(x) for x in (0.9574999809265137, 0.11349999904632568, 0.9125, 1.0)] == \
        ["95.8", "11.4", "91.3", "100.0"]
    assert mnist_table1.pct(0.9164000153541565 - 0.9438999891281128, "+") == "-2.8"  # 9,164 - 9,439 images
    worse = [row(cw, s, a) for s, a in enumerate((0.88, 0.87, 0.89))] + rows[3:]  # -2, -3, -2 against TRADES
    assert "**does not hold**: -2.0, -3.0, -2.0" in claim(mnist_table1.summary(worse), cw, trades)
    # two seeds of AT at chance: +2, +79.7*, +81.7* would "hold" (mean 54.5 > sd 45.3) if counted; the
    # starred ones are not, so one seed remains; every seed at chance: no test at all
    stalled = rows[:6] + [row(at, 0, 0.90)] + [row(at, s, 0.1135, 0.1135) for s in (1, 2)]
    assert "**undecided**: +2.0, +79.7*, +81.7* (seed 0 only" in claim(mnist_table1.summary(stalled), cw, at)
    dead = rows[:6] + [row(at, s, 0.1135, 0.1135) for s in (0, 1, 2)]
    assert "**not a test**: +80.7*, +79.7*, +81.7*" in claim(mnist_table1.summary(dead), cw, at)


def write_mnist_root(root, n_train=200, n_test=40):
    """A root that torchvision.datasets.MNIST reads offline: the four raw idx files, random pixels."""
    g = torch.Generator().manual_seed(0)
    os.makedirs(os.path.join(root, "MNIST", "raw"))
    for split, n in (("train", n_train), ("t10k", n_test)):
        with open(os.path.join(root, "MNIST", "raw", f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + torch.randint(0, 256, (n, 28, 28), generator=g,
                                                                          dtype=torch.uint8).numpy().tobytes())
        with open(os.path.join(root, "MNIST", "raw", f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + torch.randint(0, 10, (n,), generator=g,
                                                                dtype=torch.uint8).numpy().tobytes())
    return str(root)


def test_mnist_table1_keeps_models_reproduces_landed_rows_and_skips_finished_work(tmp_path):
    data, res = write_mnist_root(tmp_path / "data"), tmp_path / "results" / "table1.json"
    table1 = lambda *a: run_cli("benchmarks/mnist_table1.py", "--quick", "--jobs", "1", "--rows", "AT(0.3)",
                                "--data-dir", data, "--out", str(tmp_path / "runs"), "--results", str(res),
                                "--n-test", "40", "--n-strong", "20", *a)
    rows = lambda: json.loads(res.read_text())["rows"]
    table1("--seeds", "0")
    (row,) = rows()
    path = os.path.normpath(os.path.join(HERE, row["checkpoint"]["path"]))
    assert path == str(tmp_path / "results" / "checkpoints" / "AT(0.3)_seed0.pt")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == row["checkpoint"]["sha256"]
    kept, run = (torch.load(p, weights_only=True) for p in (path, tmp_path / "runs" / "AT(0.3)_seed0" / "model.pt"))
    assert set(kept) == {"model", "arch", "num_classes", "in_channels", "image_size", "dataset", "method", "epoch",
                         "args"}                                       # weights only: no optimizer, no eps table
    assert all(torch.equal(kept["model"][k], v) for k, v in run["model"].items())
    strong = row["acc_strong"]
    assert strong["n"] == 20 and row["strong"]["square_queries"] == 20 and isinstance(row["flags"], list)
    assert row["strong"]["threads"] == 1                               # one thread per job unless --threads
    columns = ("natural", "pgd20", "pgd100", "cw", "fgsm", "apgd-ce", "apgd-t", "square")
    assert set(columns) < set(strong) and strong["any"] <= min(strong[k] for k in columns)
    assert row["n_test"] == 40 and set(row["acc"]) == {"natural", "pgd20", "pgd100", "cw"}
    # Finished work is skipped: the same call again trains and evaluates nothing.
    before = res.read_text()
    assert "training" not in table1("--seeds", "0").stdout and res.read_text() == before
    if evaluate.autoattack_package():  # step 5, as optional as AutoAttack
        out = table1("--seeds", "0", "--autoattack").stdout
        (row_aa,) = rows()
        s, e, n = row_aa["acc_strong"], row_aa["autoattack"], strong["n"]
        assert "training" not in out and {k: s[k] for k in strong} == strong and "AutoAttack standard after" in out
        # |AA broken| - |chain broken| = only AA - only the chain; the union drops only AA's from the chain's
        assert round(n * (e["chain_any_again"] - s["autoattack"])) == e["only_autoattack"] - e["only_chain"]
        assert round(n * (e["chain_any_again"] - s["any_with_autoattack"])) == e["only_autoattack"]
        before = res.read_text()
        again = table1("--seeds", "0", "--autoattack").stdout
        assert "AutoAttack standard after" not in again and res.read_text() == before
        # A row without step 4 gets steps 4 and 5 in one run: step 4's numbers, AutoAttack after the chain
        res.write_text(json.dumps({"rows": [{k: v for k, v in row_aa.items()
                                             if k not in ("acc_strong", "flags", "strong", "autoattack")}]}))
        out = table1("--seeds", "0", "--autoattack").stdout
        (one,) = rows()
        s1, e1 = one["acc_strong"], one["autoattack"]
        assert "training" not in out and "AutoAttack standard after" not in out and e1["with_step_4"]
        assert {k: s1[k] for k in strong} == strong and one["flags"] == row["flags"]
        assert round(n * (s1["any"] - s1["autoattack"])) == e1["only_autoattack"] - e1["only_chain"]
        assert round(n * (s1["any"] - s1["any_with_autoattack"])) == e1["only_autoattack"]
        assert one["strong"]["command"] == e1["command"] and "--autoattack" in e1["command"]
    # A landed row (no kept model) is retrained by its command. The same log: its landed numbers
    # stand (a marker shows they were not re-evaluated); a different log: re-evaluated, both kept.
    landed = {k: v for k, v in row.items() if k not in ("checkpoint", "acc_strong", "flags", "strong")}
    marked = {**landed, "acc": {**landed["acc"], "natural": 0.123}}
    for case in ("equal", "differs"):
        res.write_text(json.dumps({"rows": [marked]}))
        shutil.rmtree(tmp_path / "runs")
        os.remove(path)
        table1("--seeds", "0", "--no-strong")
        (new,) = rows()
        assert new["reproduced"]["log_equal"] == (case == "equal") and "acc_strong" not in new
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == new["checkpoint"]["sha256"] == row["checkpoint"]["sha256"]
        if case == "equal":
            assert new["acc"] == marked["acc"] and "landed_acc" not in new["reproduced"]
        else:
            assert new["acc"] == row["acc"] and new["reproduced"]["landed_acc"] == marked["acc"]
        marked = {**marked, "epoch_log": [{**marked["epoch_log"][0], "train_loss": 1.0}]}


def test_mnist_table1_budget_curve_trains_in_segments_the_same_run(tmp_path):
    """--budget-curve: seed 0 trains to epoch 1, keeps that classifier, resumes to epoch 2: the log
    and weights of one straight run, the snapshot that of a 1-epoch run; each gets the strong
    evaluation; rows of another budget are other entries."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import mnist_table1
    data, res = write_mnist_root(tmp_path / "data"), tmp_path / "results" / "table1.json"
    table1 = lambda *a: run_cli("benchmarks/mnist_table1.py", "--quick", "--jobs", "1", "--rows", "AT(0.3)",
                                "--data-dir", data, "--out", str(tmp_path / "runs"), "--results", str(res),
                                "--n-test", "20", "--n-strong", "10", "--seeds", "0", *a).stdout
    os.makedirs(run := tmp_path / "runs" / "AT(0.3)_seed0")  # a start stopped before its first epoch ended
    (run / "machines.jsonl").write_text(json.dumps({"from_epoch": 0, "cpu": "stopped"}) + "\n")
    out = table1("--epochs", "2", "--budget-curve", "1")
    assert "training to epoch 1 (--overwrite)" in out and "training to epoch 2 (--resume)" in out
    (row,) = json.loads(res.read_text())["rows"]
    (at,) = row["budget_curve"]
    assert at["epoch"] == 1 and at["acc_strong"]["n"] == 10 and "acc_strong" in row and row["epochs"] == 2
    assert [m["from_epoch"] for m in row["training_machines"]] == [0, 1]  # each segment: where it ran
    assert "stopped" not in str(row["training_machines"])  # superseded by the start that trained from epoch 0
    assert all(m["onednn_isa"] and m["ONEDNN_MAX_CPU_ISA"] == "AVX2" for m in row["training_machines"])
    cmd = row["command"].split()[1:]
    for epochs in (1, 2):  # the same command straight, with the row's kernels
        ref = str(tmp_path / f"straight{epochs}")
        run_cli(*cmd[:cmd.index("--out") + 1], ref, *cmd[cmd.index("--out") + 2:], "--epochs", str(epochs),
                env=mnist_table1.ISA)
        kept = torch.load(os.path.join(HERE, (at if epochs == 1 else row)["checkpoint"]["path"]), weights_only=True)
        straight = torch.load(os.path.join(ref, "model.pt"), weights_only=True)
        assert all(torch.equal(kept["model"][k], v) for k, v in straight["model"].items()) and kept["epoch"] == epochs
    assert untimed(row["epoch_log"]) == untimed(read_log(ref))
    table1("--epochs", "1", "--no-strong")  # another budget: another entry, the 2-epoch one untouched
    rows = json.loads(res.read_text())["rows"]
    assert [r["epochs"] for r in rows] == [1, 2] and rows[1] == row


# ---------------------------------------------------------------- CUDA only (skipped without a GPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_CUDA = [*FAKE[:-2], "--device", "cuda", "--epochs", "1"]


@cuda
@pytest.mark.parametrize("flags", [[], ["--amp"], ["--amp", "fp16"], ["--amp", "--channels-last"], ["--compile"]])
@pytest.mark.parametrize("script", ["train_customized.py", "train_calibrated.py"])
def test_cuda_trainers_and_evaluate_end_to_end(script, flags, tmp_path):
    out = str(tmp_path / "run")
    run_cli(script, *ON_CUDA, "--steps", "3", *flags, "--out", out)
    (rec,) = read_log(out)
    assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float)) and rec["images_per_s"] > 0
    proc = run_cli("evaluate.py", "--ckpt", os.path.join(out, "model.pt"), *EVAL_QUICK[:-2], "--device", "cuda",
                   *[f for f in flags if f != "fp16"], "--out", str(tmp_path / "eval.json"))
    rep = json.loads((tmp_path / "eval.json").read_text())
    assert rep["device"] == "cuda" and 0 <= rep["any_attack"] <= rep["natural"] and "any attack" in proc.stdout


@cuda
def test_cuda_fp16_resume_of_an_fp32_run_and_local_rank_check(tmp_path):
    out = str(tmp_path / "run")
    run_cli(*CUSTOM[:1], *ON_CUDA, "--out", out)
    run_cli(*CUSTOM[:1], *ON_CUDA, "--out", out, "--resume", "--amp", "fp16")  # crashed before: empty scaler state
    proc = run_cli(*CUSTOM[:1], *ON_CUDA, "--out", str(tmp_path / "r"), check=False,
                   env={"LOCAL_RANK": str(torch.cuda.device_count())})
    assert proc.returncode != 0 and "LOCAL_RANK" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@cuda
def test_cuda_train_steps_do_not_sync_the_host():
    """No host sync inside a training step (fp32 and bf16; fp16's GradScaler reads its inf check once
    per optimizer step, by design): the GPU is never left waiting for Python."""
    x, y = torch.rand(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    steps = []
    for amp in ("off", "bf16"):
        args = customized.get_args([*ON_CUDA, "--eps-max", "0.1", "--eta", "0.01"])
        args.device, args.amp, args.num_classes = "cuda", amp, 10
        model = models.get_model("smallcnn", 10, 1, 28).cuda()
        net, attack_net, autocast, scaler = customized.wrap(model, args, 1)
        opt, table = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), torch.zeros(64, device="cuda")
        idx = torch.arange(32, device="cuda")
        steps.append(functools.partial(customized.train_step, model, net, attack_net, opt, scaler, autocast, x, y, idx,
                                       table, args))
        args = calibrated.get_args(["--dataset", "fake-mnist", "--steps", "3"])
        args.device, args.amp = "cuda", amp
        f, g = models.get_model("smallcnn", 10, 1, 28).cuda(), models.get_mask_net("small", 1).cuda()
        f_net, attack_f, autocast, scaler = calibrated.wrap(f, args, 1)
        opt_f, _ = calibrated.make_optimizer(f, "adam", 1e-3, [], args)
        opt_g, _ = calibrated.make_optimizer(g, "sgd", 0.01, [], args)
        steps.append(functools.partial(calibrated.train_step, f, g, f_net, attack_f, g, opt_f, opt_g, scaler, autocast,
                                       x, y, args))
    for step in steps:
        step()                                    # warm-up: cuDNN's benchmark search may synchronize
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(v.device.type == "cuda" for v in out.values())


def test_cifar10_tables_smoke_run_keeps_models_estimates_and_skips_finished_rows(tmp_path):
    """The CIFAR-10 tables' pipeline end to end on FakeData (--smoke: SmallCNN, 1 attack step): a
    time estimate per row first, both papers' protocols, the kept checkpoint, the strong worst case."""
    res = tmp_path / "results" / "tables.json"
    run = lambda: run_cli("benchmarks/cifar10_tables.py", "--smoke", "--device", "cpu", "--rows", "AT_prn18",
                          "customized_vgg16", "--out", str(tmp_path / "runs"), "--results", str(res))
    proc = run()
    assert "2 of 2 jobs to run" in proc.stdout and "| AT_prn18 | " in proc.stdout      # the estimate table
    rows = {r["name"]: r for r in json.loads(res.read_text())["rows"]}
    assert set(rows["AT_prn18"]["acc"]) == {"natural", "fgsm", "pgd20", "pgd100", "cw"}     # the calibrated paper's
    assert set(rows["customized_vgg16"]["acc"]) == {"natural", "pgd100", "cw100", "deepfool"}  # the customized paper's
    for r in rows.values():
        assert "--arch smallcnn" in r["command"] and r["commit"] and r["seconds"] > 0
        with open(os.path.join(HERE, r["checkpoint"]["path"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == r["checkpoint"]["sha256"]
        strong = r["acc_strong"]
        assert strong["n"] == 8 and {"apgd-ce", "apgd-t", "square"} < set(strong)
        assert strong["any"] <= min(v for k, v in strong.items() if k not in ("n", "any", "sanity_eps0.5"))
    assert "[83.0]" in proc.stdout and "[85.44]" in proc.stdout                      # the papers' numbers beside
    before = res.read_text()
    assert "0 of 2 jobs to run" in run().stdout and res.read_text() == before


def test_gpu_check_tiny_mode_on_the_cpu_and_one_line_without_cuda(tmp_path):
    if not torch.cuda.is_available():
        proc = run_cli("benchmarks/gpu_check.py", check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "no CUDA" in proc.stderr
    out = tmp_path / "gpu_check.json"
    proc = run_cli("benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out))
    rep = json.loads(out.read_text())
    assert rep["failures"] == [] and "0 failures" in proc.stdout
    got = {(r["method"], r["precision"]) for r in rep["rows"]}
    assert got == {(m, p) for m in ("PGD-AT", "customized", "TRADES", "calibrated_cw")
                   for p in ("fp32", "bf16", "fp16", "bf16+cl")}
    for r in rep["rows"]:
        assert r["images_per_s"] > 0 and math.isfinite(r["loss"]) and 0 <= r["zero_grad_share"] <= 1
    fp16 = [r for r in rep["rows"] if r["precision"] == "fp16"]
    # the confident copy's input gradients underflow in fp16 without attacks.unit_grad, not with it
    assert max(r["zero_grad_share"] for r in fp16) == 0 < max(r["zero_grad_share_without_fix"] for r in fp16)
    checks = rep["checks"]
    assert [x["workers"] for x in checks["loader"]] == [0, min(8, os.cpu_count())]
    assert checks["evaluate"]["max_diff"] == 0 and checks["resume"]["epochs"] == [1, 2, 3]
    assert checks["resume"]["killed_after_epochs"] < 3 and "skipped" in checks["torchrun"]


# ---------------------------------------------------------------- benchmarks/figures.py
def test_figures_redraw_byte_identical_run_figures_and_eps_trajectory(tmp_path):
    pytest.importorskip("matplotlib")
    digests = lambda d: {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in sorted(os.listdir(d))}
    with open(os.path.join(HERE, "benchmarks", "results", "mnist_table1.json")) as f:
        has_customized = any(r["name"] == "customized(0.3)" and r["epochs"] == 40 and r["seed"] == 0
                         for r in json.load(f)["rows"])
    out = tmp_path / "figures"
    proc = run_cli("benchmarks/figures.py", "--out", str(out))   # the committed JSON, --out instead of the repo's
    first = digests(out)
    assert set(first) == {"toy_margin.png", "table1_e40.png", "budget_curve.png", *["customized_eps.png"] * has_customized}
    assert ("skipped customized_eps.png" in proc.stdout) != has_customized
    assert not any(b"Software" in (out / f).read_bytes() for f in first)  # no matplotlib version in the file
    run_cli("benchmarks/figures.py", "--out", str(out))
    assert digests(out) == first                                         # a redraw is byte-identical
    # --run on a tiny run of each trainer (in process: each CLI start costs seconds of imports)
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import figures
    tiny = ["--dataset", "fake-mnist", "--arch", "smallcnn", "--epochs", "1", "--train-size", "64", "--test-size",
            "16", "--eval-size", "16", "--batch-size", "32", "--steps", "2", "--device", "cpu"]
    for trainer, flags, png in ((customized, ["--eps-max", "0.1", "--eta", "0.05"], "eps_hist.png"),
                                (calibrated, ["--eps", "0.1"], "masks.png")):
        run = str(tmp_path / png.removesuffix(".png"))
        trainer.main([*tiny, *flags, "--out", run])
        figures.main(["--run", run])
        assert sorted(os.listdir(run)) == sorted(["log.jsonl", "model.pt", png])
        assert Image.open(os.path.join(run, png)).size[0] == 1200
    # one line: no model.pt, and a checkpoint with nothing to draw (no adaptive eps table, no mask net)
    torch.save({"args": {"fixed_eps": True}, "eps": torch.zeros(4), "model": {}}, tmp_path / "model.pt")
    for run, why in ((tmp_path / "figures", "no model.pt"), (tmp_path, "neither")):
        with pytest.raises(SystemExit) as e:
            figures.main(["--run", str(run)])
        assert str(e.value.code).startswith("error: ") and why in str(e.value.code) and "\n" not in str(e.value.code)
    # the customized row's eps trajectory on a synthetic row, with and without the final counts
    log = [{"epoch": e, "eps_mean": 0.3 * (1 - 0.9 ** e), "eps_at_max": min(1.0, e / 40)} for e in range(1, 41)]
    row = {"name": "customized(0.3)", "seed": 0, "epochs": 40, "epoch_log": log}
    figures.draw_customized_eps(row, tmp_path / "one.png")
    counts = {"0.0": 5, "0.04781": 9, "0.3": 50}  # row["eps_final_counts"]: {eps_i as str: training samples}
    figures.draw_customized_eps({**row, "eps_final_counts": counts}, tmp_path / "two.png")
    assert all(Image.open(tmp_path / f).size[0] == 1200 for f in ("one.png", "two.png"))
