"""L-inf attacks on a batch: C&W margin, FGSM, PGD, Square, DeepFool.

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
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen).to(x.device)
    sign = lambda *shape: (rand(*shape) < 0.5).to(x.dtype) * 2 - 1

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
        r = int(rand(1).item() * (h - s + 1))
        q = int(rand(1).item() * (w - s + 1))
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
        x_best[active[better]] = x_new[better]
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
