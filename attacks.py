"""L-inf attacks on a batch: C&W margin, FGSM, PGD, APGD (and its DLR losses), Square, DeepFool;
`unit_grad` keeps their input gradients alive under fp16 autocast.

Each function needs only torch. None changes the model's train/eval mode (the caller chooses:
eval for evaluation; the training scripts say which they use), none accumulates gradients into
the model's parameters (gradients are taken with torch.autograd.grad w.r.t. the input only), and
each returns a detached adversarial batch inside the box `clip` (None: unbounded input) and, for
the eps-bounded attacks, inside the L-inf ball of radius eps around x.
"""
import torch
import torch.nn.functional as F


def cw_margin(logits, y, kappa=0.0):
    """Per-sample max(max_{j != y} Z_j - Z_y, -kappa), positive when misclassified: the margin
    term of the customized paper's Eq. (6), a loss the defender minimises; kappa stops it pushing
    once a point is correct by kappa. (The attacker's C&W-inf objective clamps the other side:
    pgd(loss="cw") maximises min(margin, kappa).)"""
    true = logits.gather(1, y[:, None]).squeeze(1)
    # -inf, not a large negative constant, so the true class is excluded for any logit range.
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, min=-kappa)


def unit_grad(logits):
    """`logits`, unchanged, whose gradient is rescaled on its way back to max |g| = 1 per sample.
    The sign steps of PGD and APGD are unchanged in exact arithmetic (each sample's loss, and so its
    input gradient, is scaled by a positive number), but under fp16 autocast a confidently classified
    point's gradient (e.g. 1 - p_y ~ 1e-9) no longer underflows to 0 in the network's backward, where
    such a point would never move. Apply it to fp32 logits: `unit_grad(model(x).float())`."""
    if logits.requires_grad:
        logits.register_hook(lambda g: g / g.abs().amax(1, keepdim=True).clamp_min(1e-30))
    return logits


def _loss_fn(loss, kappa):
    if callable(loss):
        return loss
    if loss == "ce":
        return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":  # C&W-inf (Carlini & Wagner 2017, f_6; TRADES' cwloss): min(margin, kappa)
        return lambda logits, y: cw_margin(logits, y, float("inf")).clamp(max=kappa)
    raise ValueError(f"unknown loss {loss!r}; valid: 'ce', 'cw' or a callable")


def _per_sample(v, x):
    """A float, or a [B] tensor reshaped to broadcast over x's non-batch dimensions."""
    if torch.is_tensor(v):
        return v.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return v


def _project(x_adv, x, eps, clip):
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return x_adv.clamp(*clip) if clip is not None else x_adv


def pgd(model, x, y, eps, alpha, steps, loss="ce", random_start=True, restarts=1, kappa=float("inf"),
        clip=(0.0, 1.0)):
    """L-inf PGD (Madry et al. 2018): x <- Proj_{B(x0, eps) and box}(x + alpha * sign(grad)).

    eps, alpha: a float or a per-sample tensor of shape [B] (the customized method's radius).
    loss: "ce", "cw" (the C&W-inf objective min(margin, kappa): a point stops being pushed once it
    is misclassified by kappa; the default inf is the plain margin, the papers use kappa = 50) or
    a callable (logits, y) -> per-sample loss, e.g. a soft-label CE closing over its targets.
    random_start: True (uniform in the ball), False, or a float s (Gaussian, std s).
    With restarts > 1, each sample keeps the first restart that fools the model (prediction != y),
    else the last. The model's mode is the caller's choice.
    """
    loss_fn = _loss_fn(loss, kappa)
    x = x.detach()
    eps, alpha = _per_sample(eps, x), _per_sample(alpha, x)
    best, done = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        x_adv = x.clone()
        if random_start is True:  # uniform in the ball (Madry et al.)
            x_adv = _project(x + (torch.rand_like(x) * 2 - 1) * eps, x, eps, clip)
        elif random_start:  # a float s: x + s N(0, 1) (TRADES starts at s = 0.001)
            x_adv = _project(x + random_start * torch.randn_like(x), x, eps, clip)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            # Sum, not mean: the sign step is per sample, and a sum keeps each sample's gradient
            # independent of the batch size.
            grad, = torch.autograd.grad(loss_fn(model(x_adv), y).sum(), x_adv)
            x_adv = _project(x_adv.detach() + alpha * grad.sign(), x, eps, clip)
        if restarts == 1:
            return x_adv.detach()
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y
        take = ~done
        best[take] = x_adv[take].detach()
        done |= fooled
    return best


def fgsm(model, x, y, eps, loss="ce", kappa=float("inf"), clip=(0.0, 1.0)):
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps from x."""
    return pgd(model, x, y, eps, eps, 1, loss=loss, random_start=False, kappa=kappa, clip=clip)


def dlr_loss(logits, y):
    """Per-sample DLR loss (Croce & Hein 2020): -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3),
    z_pi1 >= z_pi2 >= ... the sorted logits: the margin in units of the logits' spread, so that
    shifting or scaling the logits does not change it (a saturated CE does). Needs 3 classes."""
    top = logits.sort(1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Per-sample targeted DLR loss (Croce & Hein 2020), ascended to push y below `target`:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). Needs 4 classes."""
    top = logits.sort(1, descending=True).values
    pick = lambda c: logits.gather(1, c[:, None]).squeeze(1)
    return -(pick(y) - pick(target)) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def apgd_checkpoints(steps):
    """APGD's checkpoints w_j = ceil(p_j * steps) (Croce & Hein 2020): p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while p_j <= 1. In integer
    hundredths: in floats 0.22 + 0.19 + 0.16 exceeds 0.57, and ceil would move w_3 to 58."""
    p = [0, 22]
    while p[-1] + max(p[-1] - p[-2] - 3, 6) <= 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return sorted({-(-q * steps // 100) for q in p})  # a short run merges repeated checkpoints


def _apgd_run(model, x, y, eps, steps, loss_fn, x_adv, rho=0.75, clip=(0.0, 1.0)):
    """One APGD run (Croce & Hein 2020, Alg. 1) from x_adv (eps: a float or a [B, 1, ...] tensor):
    (highest-loss point per sample, its loss, first point that fooled the model (else x), fooled
    mask, step size of each step [steps, B]). Each x^(k), k = 0..steps: one forward and backward."""
    def loss_grad(x_in):
        x_in = x_in.clone().requires_grad_(True)
        logits = model(x_in)
        loss = loss_fn(logits, y)
        grad, = torch.autograd.grad(loss.sum(), x_in)  # sum: each sample's gradient is its own
        return loss.detach(), grad, logits.argmax(1) != y

    shape = (-1, *[1] * (x.dim() - 1))
    eta = torch.ones(len(x), device=x.device, dtype=x.dtype).view(shape) * 2 * eps  # step 2 eps
    loss, grad, fooled = loss_grad(x_adv)
    best, best_loss, best_grad = x_adv.clone(), loss.clone(), grad.clone()
    adv, done = torch.where(fooled.view(shape), x_adv, x), fooled.clone()
    checks, x_prev, trace = apgd_checkpoints(steps), x_adv, []
    # Per sample since the last checkpoint: how many steps raised the loss, whether that
    # checkpoint halved the step size, and the best loss there (conditions 1 and 2).
    rises, halved, best_at_check = torch.zeros_like(loss), torch.zeros_like(fooled), loss.clone()
    for k in range(1, steps + 1):
        a = 1.0 if k == 1 else 0.75  # momentum from the second step on
        z = _project(x_adv + eta * grad.sign(), x, eps, clip)
        x_prev, x_adv = x_adv, _project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps, clip)
        trace.append(eta.flatten())
        new_loss, grad, fooled = loss_grad(x_adv)
        rises += new_loss > loss
        loss = new_loss
        up = loss > best_loss  # torch.where, not boolean indexing: no host sync per step on CUDA
        best, best_grad = torch.where(up.view(shape), x_adv, best), torch.where(up.view(shape), grad, best_grad)
        best_loss = torch.where(up, loss, best_loss)
        adv = torch.where((fooled & ~done).view(shape), x_adv, adv)
        done |= fooled
        if k in checks[1:]:
            window = k - checks[checks.index(k) - 1]
            halve = (rises < rho * window) | (~halved & (best_loss <= best_at_check))
            # Halve, and go on from the best point (its gradient too), as Alg. 1 does.
            h = halve.view(shape)
            eta, x_adv = torch.where(h, eta / 2, eta), torch.where(h, best, x_adv)
            grad, loss = torch.where(h, best_grad, grad), torch.where(halve, best_loss, loss)
            rises, halved, best_at_check = torch.zeros_like(rises), halve, best_loss.clone()
    return best.detach(), best_loss, adv.detach(), done, torch.stack(trace)


def apgd(model, x, y, eps, steps=100, loss="ce", targeted=False, n_targets=9, restarts=1, rho=0.75,
         seed=0, clip=(0.0, 1.0)):
    """L-inf Auto-PGD (Croce & Hein 2020): APGD-CE (loss="ce"), APGD-DLR (loss="dlr") or, with
    targeted=True, APGD-T (targeted DLR loss, one run per target: the k-th most likely class
    other than y at x, k = 1..n_targets). No step size to tune: it starts at 2 eps and halves at
    the checkpoints `apgd_checkpoints(steps)` where the loss stalls.

    eps: a float or a per-sample tensor of shape [B]. Each run starts at a uniform random point of
    the ball, drawn from a generator seeded with `seed` (the global RNG is untouched). A point
    misclassified at x is returned unchanged; the others are attacked by every run (restart,
    target) until one fools the model. Per sample it returns the first point that fooled the
    model, else the point of highest loss over all runs (each run's own objective).
    """
    if loss not in ("ce", "dlr") or targeted and loss != "dlr":
        raise ValueError(f"loss {loss!r}: valid 'ce' or 'dlr'; APGD-T (targeted) ascends the targeted DLR: 'dlr'")
    gen = torch.Generator().manual_seed(seed)
    x, eps = x.detach(), _per_sample(eps, x)
    with torch.no_grad():
        logits = model(x)
    out, fooled = x.clone(), logits.argmax(1) != y
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).argsort(1, descending=True)
    for k in range(min(n_targets, logits.shape[1] - 1) if targeted else 1):
        for _ in range(restarts):
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                return out
            xi, yi, ei, target = x[idx], y[idx], eps[idx] if torch.is_tensor(eps) else eps, others[idx, k]
            loss_fn = (lambda z, t: dlr_targeted_loss(z, t, target)) if targeted else dlr_loss \
                if loss == "dlr" else (lambda z, t: F.cross_entropy(z, t, reduction="none"))
            start = _project(xi + (torch.rand(xi.shape, generator=gen).to(x) * 2 - 1) * ei, xi, ei, clip)
            top, top_loss, adv, done, _ = _apgd_run(model, xi, yi, ei, steps, loss_fn, start, rho, clip)
            take = done | (top_loss > best_loss[idx])
            out[idx[take]] = torch.where(done.view(-1, *[1] * (x.dim() - 1)), adv, top)[take]
            best_loss[idx] = torch.max(best_loss[idx], top_loss)
            fooled[idx] = done
    return out


def _p_selection(p_init, it, n_queries):
    """Square attack's schedule of the square's area share (Andriushchenko et al. 2020)."""
    it = int(it / n_queries * 10000)
    for bound, div in [(10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256), (10000, 512)]:
        if it <= bound:
            return p_init / div
    return p_init


@torch.no_grad()
def square(model, x, y, eps, n_queries=5000, p_init=0.8, seed=0, clip=(0.0, 1.0)):
    """L-inf Square attack (Andriushchenko et al. 2020), untargeted, margin loss.

    Black box: uses only model(x) outputs, under no_grad. Each sample costs at most n_queries
    forward passes (the clean input, the vertical-stripe initialisation, then one per iteration);
    a sample stops being queried as soon as it is misclassified, so one misclassified at x costs
    one query and is returned unchanged. The result's margin loss is never below x's.
    """
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    sign = lambda *shape: (torch.rand(*shape, generator=gen).to(x.device) < 0.5).to(x.dtype) * 2 - 1

    def margin(x_in, y_in):  # Z_y - max_{j != y} Z_j: <= 0 means fooled
        return -cw_margin(model(x_in), y_in, kappa=float("inf"))

    lo, hi = clip if clip is not None else (-float("inf"), float("inf"))
    c, h, w = x.shape[1:]
    x = x.detach()
    # Query x first: a point misclassified there is not attacked (the reference attacks only
    # correctly classified points), and x stays a candidate for the result.
    m_clean = margin(x, y)
    x_best, m_best = x.clone(), m_clean.clone()
    active = (m_clean > 0).nonzero().squeeze(1)
    if n_queries > 1 and len(active) > 0:
        x_best[active] = (x[active] + eps * sign(len(active), c, 1, w)).clamp(lo, hi)  # stripes
        m_best[active] = margin(x_best[active], y[active])
    for i in range(1, n_queries - 1):
        active = (m_best > 0).nonzero().squeeze(1)
        if len(active) == 0:
            break
        x_cur, x_best_cur, y_cur = x[active], x_best[active], y[active]
        delta = x_best_cur - x_cur
        s = max(int(round((_p_selection(p_init, i, n_queries) * h * w) ** 0.5)), 1)
        s = min(s, h, w)
        r = int(torch.rand(1, generator=gen).item() * (h - s + 1))  # a CPU draw: no device round trip
        q = int(torch.rand(1, generator=gen).item() * (w - s + 1))
        window = (slice(None), slice(None), slice(r, r + s), slice(q, q + s))
        # Resample the window's per-channel sign until it changes the current best image (as the
        # reference implementation does), so no query repeats it; bounded so a saturated window
        # cannot loop forever.
        need = torch.ones(len(active), dtype=torch.bool, device=x.device)
        for _ in range(10):
            new = eps * sign(len(active), c, 1, 1)
            delta[window] = torch.where(need[:, None, None, None], new.expand(-1, -1, s, s),
                                        delta[window])
            changed = (x_cur[window] + delta[window]).clamp(lo, hi) - x_best_cur[window]
            need = changed.abs().flatten(1).lt(1e-7).all(1)
            if not need.any():
                break
        x_new = torch.min(torch.max(x_cur + delta, x_cur - eps), x_cur + eps).clamp(lo, hi)
        m_new = margin(x_new, y_cur)
        better = m_new < m_best[active]
        m_best[active] = torch.where(better, m_new, m_best[active])
        x_best[active] = torch.where(better.view(-1, 1, 1, 1), x_new, x_best_cur)
    # The search starts from the stripes even where they raise the margin (as the reference
    # does); where no query got below x's margin, x itself is the best point seen.
    worse = m_best > m_clean
    x_best[worse] = x[worse]
    return x_best


def deepfool(model, x, y, steps=50, overshoot=0.02, clip=(0.0, 1.0)):
    """L-inf DeepFool (Moosavi-Dezfooli et al. 2016): the smallest step that crosses the nearest
    linearised boundary, repeated until the prediction changes or `steps` run out.

    Returns x_adv; (x_adv - x).abs().amax() per sample is the minimal L-inf perturbation found
    (a sample that never flips is returned at its last iterate). The customized paper's Table 3
    counts a point robust at eps if that perturbation exceeds eps, or if it never flipped.
    """
    x = x.detach()
    r_tot = torch.zeros_like(x)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    x_adv = x.clone()
    for _ in range(steps):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        xa = x_adv[idx].clone().requires_grad_(True)
        logits = model(xa)
        ya = y[idx]
        still = logits.argmax(1) == ya
        if not still.all():
            active[idx[~still]] = False
        if not still.any():
            break
        num_classes = logits.shape[1]
        # One gradient per class (the samples are independent, so a summed output suffices).
        grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), xa, retain_graph=True)[0]
                             for k in range(num_classes)], 1)  # [b, K, ...]
        logits = logits.detach()
        f = logits - logits.gather(1, ya[:, None])                  # f_k - f_y
        wk = grads - grads[torch.arange(len(ya), device=x.device), ya][:, None]       # grad f_k - grad f_y
        dist = f.abs() / (wk.flatten(2).abs().sum(2) + 1e-8)         # L-inf: |f_k| / ||w_k||_1
        dist.scatter_(1, ya[:, None], float("inf"))
        k = dist.argmin(1)
        ar = torch.arange(len(ya), device=x.device)
        w_k = wk[ar, k]
        step = (dist[ar, k] + 1e-4).view(-1, *[1] * (x.dim() - 1)) * w_k.sign()
        keep = idx[still]
        r_tot[keep] += step[still]
        x_new = x[keep] + (1 + overshoot) * r_tot[keep]
        x_adv[keep] = x_new.clamp(*clip) if clip is not None else x_new
    return x_adv.detach()
