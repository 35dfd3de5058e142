"""What the methods cost: per-batch training throughput of each trainer's real train_step, and
the attacks' throughput, in one process, interleaved, median of --reps repetitions.

    python benchmarks/overhead.py                               # SmallCNN, MNIST-shaped input
    python benchmarks/overhead.py --arch preact_resnet18 --batches 3
    python benchmarks/overhead.py --json                        # one JSON object, for tracking

Rows: customized (full) vs PGD-AT (--fixed-eps --c 0 --loss ce), target ratio <= 1.03 (paper
000: "negligible overhead"); calibrated vs TRADES (--no-mask --no-weighted-ce --attack kl),
target <= 1.25, next to the ratio of network passes; attacks.pgd PGD-20 vs a textbook loop;
Square queries/s; an evaluation chain on still-correct points only vs on every point; APGD-CE-100
vs PGD-100 (one forward and backward a step each: target ~1).
Time ratios: lower is better. Peak memory per row: RSS on CPU, max allocated on CUDA.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attacks  # noqa: E402
import train_calibrated  # noqa: E402
import train_customized  # noqa: E402
from models import get_mask_net, get_model  # noqa: E402


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets VmHWM, the peak RSS, so each row has its own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_mib(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def customized_step(flags, shape, common):
    args = train_customized.get_args([*common, *flags])
    args.num_classes, args.in_channels, args.image_size = 10, shape[0], shape[-1]
    model = get_model(args.arch, 10, shape[0], shape[-1]).to(args.device)
    opt = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    net, attack_net, autocast, scaler = train_customized.wrap(model, args, 1)
    table = torch.zeros(args.batch_size, device=args.device)
    step = train_customized.train_step
    return lambda x, y, idx: step(model, net, attack_net, opt, scaler, autocast, x, y, idx, table, args)


def calibrated_step(flags, shape, common):
    args = train_calibrated.get_args([*common, *flags])
    args.num_classes, args.in_channels, args.image_size = 10, shape[0], shape[-1]
    model = get_model(args.arch, 10, shape[0], shape[-1]).to(args.device)
    net, attack_net, autocast, scaler = train_calibrated.wrap(model, args, 1)
    mask_net = None if args.no_mask else get_mask_net(args.mask_arch, shape[0]).to(args.device)
    f_opt = train_calibrated.make_optimizer(model, args.optimizer, args.lr, [], args)[0]
    g_opt = mask_net and train_calibrated.make_optimizer(mask_net, args.mask_optimizer, args.mask_lr, [], args)[0]
    step = train_calibrated.train_step
    return lambda x, y, idx: step(model, mask_net, net, attack_net, mask_net, f_opt, g_opt, scaler, autocast, x, y,
                                  args)


def textbook_pgd(model, x, y, eps, alpha, steps):
    """The loop every tutorial writes: CE, sign step, clip to the ball and the box."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def eval_chain(model, x, y, eps, still_correct):
    """Natural -> PGD-20 -> C&W-20, each attack on the points still correct, or on all."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for loss in ("ce", "cw"):
        idx = robust.nonzero().squeeze(1) if still_correct else torch.arange(len(y), device=y.device)
        x_adv = attacks.pgd(model, x[idx], y[idx], eps, eps / 10, 20, loss=loss, random_start=False)
        with torch.no_grad():
            robust[idx] &= model(x_adv).argmax(1) == y[idx]
    return robust.float().mean().item()


EVAL_EPS = 0.15  # above the training eps below: a share of points survives, not all (0.2: none)


def robust_share_model(shape, eps, device, steps=150):
    """A SmallCNN that is robust on a good share of points: PGD-trained on class templates plus
    noise (learnable, unlike FakeData), so the still-correct-only shortcut has points to skip."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(10, *shape, generator=g)
    model = get_model("smallcnn", 10, shape[0], shape[-1]).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sample = lambda n: (lambda y: ((templates[y] + 0.3 * torch.randn(n, *shape, generator=g)).clamp(0, 1), y))(
        torch.randint(0, 10, (n,), generator=g))
    for _ in range(steps):
        x, y = (t.to(device) for t in sample(64))
        x_adv = attacks.pgd(model.eval(), x, y, eps, eps / 4, 5)
        loss = F.cross_entropy(model.train()(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), sample


def time_rows(rows, reps, device):
    """Median seconds of each row over `reps` interleaved repetitions (one warm-up dropped)."""
    times, peaks = {k: [] for k in rows}, {k: 0.0 for k in rows}
    for rep in range(reps + 1):
        for name, fn in rows.items():
            reset_peak(device)
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], peak_mib(device))
    return {k: statistics.median(v) for k, v in times.items()}, peaks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--arch", default="smallcnn", help="smallcnn (MNIST-shaped input) or preact_resnet18 (CIFAR)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=4, help="training batches per timed repetition")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions; the median is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    torch.manual_seed(0)
    mnist = args.arch == "smallcnn"
    shape, eps = ((1, 28, 28), 0.3) if mnist else ((3, 32, 32), 8 / 255)
    common = ["--arch", args.arch, "--dataset", "fake-mnist" if mnist else "fake-cifar10", "--device", device,
              "--batch-size", str(args.batch_size)]
    bs, n = args.batch_size, args.batches
    data = [(torch.rand(bs, *shape, device=device), torch.randint(0, 10, (bs,), device=device)) for _ in range(n)]
    idx = torch.arange(bs, device=device)
    at, trades = ["--fixed-eps", "--c", "0", "--loss", "ce"], ["--no-mask", "--no-weighted-ce", "--attack", "kl"]
    steps = {"PGD-AT (--fixed-eps --c 0 --loss ce)": customized_step(at, shape, common),
             "customized (defaults)": customized_step([], shape, common),
             "TRADES (--no-mask --no-weighted-ce --attack kl)": calibrated_step(trades, shape, common),
             "calibrated (defaults)": calibrated_step([], shape, common)}
    rows = {k: (lambda f: lambda: [f(x, y, idx) for x, y in data])(f) for k, f in steps.items()}
    model = get_model(args.arch, 10, *shape[:1], shape[-1]).to(device).eval()
    x, y = data[0]
    rows["attacks.pgd PGD-20"] = lambda: attacks.pgd(model, x, y, eps, eps / 10, 20, random_start=False)
    rows["textbook PGD-20 loop"] = lambda: textbook_pgd(model, x, y, eps, eps / 10, 20)
    queries = [0]
    counted = lambda z: (queries.__setitem__(0, queries[0] + len(z)), model(z))[1]
    rows["Square (100 queries)"] = lambda: attacks.square(counted, x, y, eps, n_queries=100)
    robust_model, sample = robust_share_model((1, 28, 28), 0.1, device)
    xe, ye = (t.to(device) for t in sample(4 * bs))
    rows["eval chain, still-correct points only"] = lambda: eval_chain(robust_model, xe, ye, EVAL_EPS, True)
    rows["eval chain, every point"] = lambda: eval_chain(robust_model, xe, ye, EVAL_EPS, False)
    with torch.no_grad():  # APGD skips points misclassified at x: attack the model's own labels
        y_pred = model(x).argmax(1)
    rows["attacks.pgd PGD-100"] = lambda: attacks.pgd(model, x, y_pred, eps, eps / 40, 100, random_start=False)
    rows["attacks.apgd APGD-CE-100"] = lambda: attacks.apgd(model, x, y_pred, eps, 100)
    secs, peaks = time_rows(rows, args.reps, device)
    per_s = {k: (bs * n if k in steps else bs) / v for k, v in secs.items()}
    per_s["Square (100 queries)"] = queries[0] / (args.reps + 1) / secs["Square (100 queries)"]
    for name in ("eval chain, still-correct points only", "eval chain, every point"):
        per_s[name] = 4 * bs / secs[name]
    k = list(rows)
    result = {
        "customized_over_at": secs[k[1]] / secs[k[0]],
        "calibrated_over_trades": secs[k[3]] / secs[k[2]],
        "pgd_over_textbook": secs[k[4]] / secs[k[5]],
        "still_correct_over_all": secs[k[7]] / secs[k[8]],
        "apgd_over_pgd": secs[k[10]] / secs[k[9]],
        "robust_share": eval_chain(robust_model, xe, ye, EVAL_EPS, True),
        "rows": {name: {"seconds": secs[name], "per_s": per_s[name], "peak_mib": peaks[name]} for name in rows},
        "arch": args.arch, "device": device, "batch_size": bs, "batches": n, "reps": args.reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.arch}, {device}, batch {bs}, {n} batches a repetition, median of {args.reps}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'row':52s} {'seconds':>8s} {'per s':>10s} {'peak MiB':>9s}")
    for name in rows:
        unit = "queries" if name.startswith("Square") else "images"
        print(f"{name:52s} {secs[name]:8.3f} {per_s[name]:10.1f} {peaks[name]:9.0f}  {unit}/s")
    print(f"customized / PGD-AT time      {result['customized_over_at']:.3f}  (target <= 1.03)")
    print(f"calibrated / TRADES time      {result['calibrated_over_trades']:.3f}  (target <= 1.25; "
          f"pass-count limit in train_calibrated.train_step's docstring)")
    print(f"attacks.pgd / textbook time   {result['pgd_over_textbook']:.3f}  (target <= 1.0)")
    print(f"still-correct / all-points    {result['still_correct_over_all']:.3f}  "
          f"(robust share after the chain {result['robust_share']:.2f}, SmallCNN, eps {EVAL_EPS})")
    print(f"APGD-CE-100 / PGD-100 time    {result['apgd_over_pgd']:.3f}  (target ~1: 101 vs 100 forward-backward "
          "passes per image)")


if __name__ == "__main__":
    main()
