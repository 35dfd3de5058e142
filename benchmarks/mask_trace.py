"""The mask of calibrated AT on real MNIST, batch by batch, under two optimizers for g_phi.

The MNIST release trains g_phi with Adam 1e-3; re-run on real digits, its mean mask falls from
0.5 to ~0 within ten batches (README.md, Calibrated adversarial training), and calibrated AT
becomes natural training. This script reproduces that in our own train_step, beside SGD (momentum
0.9, lr 0.01; the CIFAR release's optimizer for g_phi), with every other setting the MNIST preset's.
It prints the mask's mean and 5 % / 95 % quantiles at chosen batches, then f's clean and PGD-20
accuracy (eps 0.3, step 0.015, no random start) on a validation split held out of the TRAINING set
(never the test set).

    python benchmarks/mask_trace.py --data-dir data     # torchvision downloads MNIST into data once
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attacks  # noqa: E402
import train_calibrated as cal  # noqa: E402
from models import get_mask_net, get_model  # noqa: E402

SHOW = (1, 2, 5, 10, 20, 50, 100, 200, 400)


def trace(opt, lr, a):
    args = cal.get_args(["--dataset", "mnist", "--data-dir", a.data_dir, "--attack", a.attack, "--seed", str(a.seed),
                         "--val-size", str(a.val_size), "--mask-optimizer", opt, "--mask-lr", str(lr), "--out", "/tmp"])
    world, rank = cal.setup(args)
    train, val, _ = cal.get_data(args)
    f = get_model(args.arch, 10, 1, 28)
    g = get_mask_net(args.mask_arch, 1)
    opt_f, _ = cal.make_optimizer(f, args.optimizer, args.lr, [10 ** 6], args)
    opt_g, _ = cal.make_optimizer(g, opt, lr, [10 ** 6], args)
    scaler, nullctx = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
    rows, t0 = [], time.time()
    for b, (x, y, _) in enumerate(cal.batches(train, 0, args, world, rank), 1):
        out = cal.train_step(f, g, f, f, g, opt_f, opt_g, scaler, lambda: nullctx, x, y, args)
        if b in SHOW or b == a.batches:
            row = {k.removeprefix("train_"): round(float(out[k]) / len(y), 4)
                   for k in ("train_mask_mean", "train_mask_q05", "train_mask_q95")}
            rows.append({"batch": b, **row})
            print(opt, lr, rows[-1], f"{time.time() - t0:.0f} s", flush=True)
        if b == a.batches:
            break
    f.eval()
    xs, ys = zip(*[val[i][:2] for i in range(len(val))])
    x, y = torch.stack(xs), torch.tensor(ys)
    x_adv = attacks.pgd(f, x, y, 0.3, 0.015, 20, random_start=False)
    with torch.no_grad():
        acc = {"val_clean": (f(x).argmax(1) == y).float().mean().item(),
               "val_pgd20": (f(x_adv).argmax(1) == y).float().mean().item()}
    return {"mask_optimizer": opt, "mask_lr": lr, "trace": rows, **acc, "seconds": time.time() - t0}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--attack", default="cw", choices=["pgd", "cw"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--configs", default="adam:0.001,sgd:0.01", help="optimizer:lr pairs for g_phi")
    p.add_argument("--out", help="write the results here as JSON")
    a = p.parse_args()
    res = [trace(c.split(":")[0], float(c.split(":")[1]), a) for c in a.configs.split(",")]
    for r in res:
        print(json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"argv": sys.argv[1:], "results": res}, f, indent=1)
