"""The prepared check for a lent GPU: are the CUDA paths right, and how fast are they?

One command, about 8 minutes on one GPU; a table on stdout, JSON to benchmarks/results/gpu_check.json;
exit 1 if any check fails (each failure is named), 2 in one line without CUDA.

    python benchmarks/gpu_check.py                    # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu       # tiny mode: the script itself works (test_smoke.py)

Rows: the trainers' own train_step (their wrap, optimizers and schedules' lr) on PreActResNet-18,
CIFAR-shaped batches of 128 in GPU memory, the same weights and batches for every precision:
PGD-AT, customized, TRADES (beta 6) and calibrated (cw) under fp32, --amp bf16, --amp fp16,
bf16 + --channels-last and bf16 + --channels-last + --compile; then WRN-34-10 and VGG-16 rows.
Each row: images/s, peak memory, the mean training loss beside fp32's, host syncs per batch
(torch.cuda.set_sync_debug_mode), and the share of exactly-zero entries of the training attack's
input gradient (CE through the attack's forward at the row's precision) on a confident copy of
the model (its last layer scaled to a median margin of 20, as a trained model's clean points):
fp16 without the fix (attacks.unit_grad) beside it. Checks: the loader's images/s at the default
--workers (CIFAR-10-format uint8 images through the trainers' augmentation and batches());
evaluate.py on a just-trained checkpoint, plain and with --amp --channels-last --compile
--workers 4 (accuracies within 2 points); a run killed (SIGKILL) after its first epoch and
resumed to the end; torchrun with 2 processes when 2 GPUs exist. Last, the projected training
hours of each paper run from the measured images/s (50,000 images an epoch; evaluation apart).
Failures: an exception, a host sync in an fp32 / bf16 step (fp16's GradScaler reads its inf check
once per optimizer step), a loss more than 15 % from fp32's, fp16's zero-gradient share 0.05 above fp32's, an
evaluation differing by more than 2 points, a resume that does not finish.
"""
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_calibrated as TK  # noqa: E402
import train_customized as TC  # noqa: E402
from models import get_mask_net, get_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"PGD-AT": (TC, ["--fixed-eps", "--c", "0", "--loss", "ce"]), "customized": (TC, []),
           "TRADES": (TK, ["--no-mask", "--no-weighted-ce", "--attack", "kl", "--beta", "6"]),
           "calibrated_cw": (TK, ["--attack", "cw"])}
# (--amp, --channels-last, --compile)
PRECISIONS = {"fp32": ("off", False, False), "bf16": ("bf16", False, False), "fp16": ("fp16", False, False),
              "bf16+cl": ("bf16", True, False), "bf16+cl+compile": ("bf16", True, True)}
# Paper runs: (method, arch, epochs) -> projected from the row of that method and arch
PAPER_RUNS = {"002 Table 2 AT / TRADES / calibrated, PreActResNet-18": (("PGD-AT", "TRADES", "calibrated_cw"),
                                                                         "preact_resnet18", 140),
              "002 Table 3, WRN-34-10": (("PGD-AT", "TRADES", "calibrated_cw"), "wrn34_10", 140),
              "000 Table 3 PGD-AT / customized, VGG-16": (("PGD-AT", "customized"), "vgg16", 200),
              "000 Table 4 customized, WRN-34-10": (("customized",), "wrn34_10", 200)}


def trainer_step(method, precision, arch, a):
    """(step(x, y), model, attack_net, autocast, args): one training batch of `method` at `precision`."""
    module, flags = METHODS[method]
    amp, channels_last, compile_ = PRECISIONS[precision]
    device, batch, steps, (c, side) = a.device, a.batch, a.steps, a.shape[:2]
    argv = [*flags, "--dataset", a.dataset, "--arch", arch, "--batch-size", str(batch), "--device", device]
    argv += (["--steps", str(steps)] if steps else []) + ["--channels-last"] * channels_last + ["--compile"] * compile_
    args = module.get_args(argv)
    args.amp, args.device, args.num_classes, args.in_channels, args.image_size = amp, device, 10, c, side
    torch.manual_seed(0)  # the same weights for every precision
    model = get_model(arch, 10, c, side).to(device)
    net, attack_net, autocast, scaler = module.wrap(model, args, 1)
    if module is TC:
        opt = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
        table, idx = torch.zeros(batch, device=device), torch.arange(batch, device=device)
        step = lambda x, y: TC.train_step(model, net, attack_net, opt, scaler, autocast, x, y, idx, table, args)
    else:
        opt_f = TK.make_optimizer(model, args.optimizer, args.lr, [], args)[0]
        mask_net = g_net = opt_g = None
        if not args.no_mask:
            mask_net = get_mask_net(args.mask_arch, c).to(device)
            g_net, opt_g = TK.wrap(mask_net, args, 1)[0], TK.make_optimizer(mask_net, args.mask_optimizer,
                                                                           args.mask_lr, [], args)[0]
        step = lambda x, y: TK.train_step(model, mask_net, net, attack_net, g_net, opt_f, opt_g, scaler, autocast,
                                          x, y, args)
    return step, model, attack_net, autocast, args


def zero_grad_shares(model, module, args, x, y):
    """Share of exactly-zero entries of the CE input gradient through the training attack's forward,
    at the row's precision, on a confident copy of the model; for fp16 also without unit_grad."""
    confident = copy.deepcopy(model).eval()
    last = [m for m in confident.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        top = confident(x).float().topk(2, 1).values
        scale = 20 / (top[:, 0] - top[:, 1]).median().clamp(min=1e-6)
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    _, attack_net, autocast, _ = module.wrap(confident, args, 1)

    def share(net):
        x_in = x.clone().requires_grad_(True)
        with autocast():
            z = net(x_in)
        grad, = torch.autograd.grad(F.cross_entropy(z.float(), y, reduction="sum"), x_in)
        return (grad == 0).float().mean().item()
    out = {"zero_grad_share": share(attack_net)}
    if args.amp == "fp16":
        out["zero_grad_share_without_fix"] = share(confident)
    return out


def syncs_in(fn):
    """Host synchronisations torch reports during fn() (CUDA's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in seen)


def measure(method, precision, arch, a):
    """One row: images/s, peak memory, mean loss, syncs per batch, zero-gradient shares."""
    step, model, _, _, args = trainer_step(method, precision, arch, a)
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    data = [(torch.rand(a.batch, a.shape[0], a.shape[1], a.shape[1], generator=g).to(a.device, memory_format=fmt),
             torch.randint(0, 10, (a.batch,), generator=g).to(a.device)) for _ in range(a.warmup + a.timed)]
    for x, y in data[:a.warmup]:
        step(x, y)
    if a.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    losses = [step(x, y)["train_loss"] for x, y in data[a.warmup:]]
    if a.cuda:
        torch.cuda.synchronize()
    seconds = time.time() - t0
    row = {"method": method, "precision": precision, "arch": arch, "batch": a.batch,
           "images_per_s": a.batch * a.timed / seconds, "loss": sum(l.item() for l in losses) / (a.batch * a.timed),
           "peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if a.cuda else None,
           "syncs_per_batch": syncs_in(lambda: step(*data[0])) if a.cuda else None}
    if not args.compile:  # a confident copy would compile again: the same numerics as bf16+cl
        row.update(zero_grad_shares(model, METHODS[method][0], args, *data[0]))
    return row


class CIFAR10Shaped(torchvision.datasets.CIFAR10):
    """CIFAR-10's own __getitem__ (uint8 HWC array -> PIL -> the trainers' transform) on random
    images: CIFAR-10 cannot be downloaded here, and the loader's cost does not depend on the pixels."""

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        rng, n = np.random.default_rng(int(train)), 50_000 if train else 10_000
        self.data, self.targets = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        self.root, self.train, self.transform, self.target_transform = root, train, transform, target_transform
        self.classes = [str(k) for k in range(10)]


def loader_rate(a, workers):
    """images/s of the trainers' CIFAR-10 pipeline (get_data's augmentation, batches()) with `workers`."""
    torchvision.datasets.CIFAR10 = CIFAR10Shaped
    args = TC.get_args(["--dataset", "cifar10", "--device", a.device, "--batch-size", str(a.batch)] +
                       ([] if workers is None else ["--workers", str(workers)]))
    TC.setup(args)
    train, _, _ = TC.get_data(args)
    t0, n = None, 0
    for i, (x, y, idx) in enumerate(TC.batches(train, 0, args, 1, 0)):
        if i == 1:  # after the first batch: the workers have started
            t0 = time.time()
        elif i > 1:
            n += len(x)
        if i == a.loader_batches:
            break
    if a.cuda:
        torch.cuda.synchronize()
    return {"workers": args.workers, "images_per_s": n / (time.time() - t0)}


def cli(*argv, timeout=600):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:2])} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc


def check_evaluate(a, tmp):
    """evaluate.py on a just-trained checkpoint, plain and with its speed flags: every column."""
    mnist = a.cuda and os.path.isdir(os.path.join(a.data_dir, "MNIST", "raw"))  # learnable digits if a root is there
    data = ["--dataset", "mnist", "--data-dir", a.data_dir, "--train-size", "20000"] if mnist else \
        ["--dataset", "fake-mnist", "--train-size", "256"]
    arch = "preact_resnet18" if a.cuda else "smallcnn"
    cli("train_customized.py", *data, "--arch", arch, "--fixed-eps", "--c", "0", "--loss", "ce", "--eps-max", "0.3",
        "--optimizer", "adam", "--lr", "1e-3", "--wd", "0", "--epochs", "1", "--eval-size", "16", "--steps", a.steps_s,
        "--device", a.device, "--out", os.path.join(tmp, "ev"))
    speed = ["--amp", "--channels-last", "--compile", "--workers", "4"] if a.cuda else ["--channels-last", "--workers",
                                                                                      "1"]
    reports = []
    for flags in ([], speed):
        out = os.path.join(tmp, f"ev{len(reports)}.json")
        cli("evaluate.py", "--ckpt", os.path.join(tmp, "ev", "model.pt"), "--protocol", "calibrated", "--attacks",
            "pgd20,cw,apgd-ce,square",
            "--n-examples", str(a.eval_n), "--square-queries", "200", "--steps", a.steps_s, "--device", a.device,
            *flags, "--out", out, "--data-dir", a.data_dir)
        reports.append(json.load(open(out)))
    cols = lambda r: {"natural": r["natural"], **{x["name"]: x["accuracy"] for x in r["attacks"]},
                      "any": r["any_attack"]}
    plain, fast = map(cols, reports)
    return {"data": data[1], "arch": arch, "plain": plain, "speed_flags": " ".join(speed), "fast": fast,
            "max_diff": max(abs(plain[k] - fast[k]) for k in plain)}


def check_resume(a, tmp):
    """A 3-epoch run killed with SIGKILL after its first epoch, then --resume: it ends at epoch 3."""
    out = os.path.join(tmp, "kill")
    argv = ["train_customized.py", "--dataset", a.dataset, "--arch", "preact_resnet18" if a.cuda else "smallcnn",
            "--train-size", str(8 * a.batch), "--batch-size", str(a.batch), "--eval-size", "16", "--epochs", "3",
            "--steps", a.steps_s, "--device", a.device, "--out", out]
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, t0 = os.path.join(out, "log.jsonl"), time.time()
    saved = lambda: os.path.exists(os.path.join(out, "model.pt")) and open(log).read().strip()  # the log comes first
    while time.time() - t0 < 300 and proc.poll() is None and not saved():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(open(log).read().splitlines())
    if killed_at >= 3:
        raise RuntimeError("the run ended before it could be killed")
    cli(*argv, "--resume")
    epochs = [json.loads(line)["epoch"] for line in open(log)]
    if epochs != [1, 2, 3]:
        raise RuntimeError(f"resumed log has epochs {epochs}")
    return {"killed_after_epochs": killed_at, "epochs": epochs}


def check_torchrun(a, tmp):
    if not a.cuda or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 GPUs"}
    out = os.path.join(tmp, "ddp")
    cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_customized.py", "--dataset",
        "fake-cifar10", "--arch", "preact_resnet18", "--train-size", "1001", "--epochs", "1", "--eval-size", "16",
        "--device", "cuda", "--out", out)
    (rec,) = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return {"images_per_s": rec["images_per_s"], "eps_mean": rec["eps_mean"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the tiny mode")
    p.add_argument("--data-dir", default=os.path.join(REPO, "data"), help="an MNIST root, if any, for evaluate's "
                   "check (learnable digits; else FakeData)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gpu_check.json"))
    a = p.parse_args()
    a.cuda = a.device == "cuda"
    if a.cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here: gpu_check.py measures a GPU (--device cpu runs its tiny mode)")
    # tiny mode: SmallCNN on MNIST-shaped input, batches of 4, 1 attack step, no compile, no WRN or VGG
    a.batch, a.warmup, a.timed, a.steps = (128, 3, 10, None) if a.cuda else (4, 1, 1, 1)
    a.steps_s, a.loader_batches, a.eval_n = ("10", 40, 1000) if a.cuda else ("1", 4, 16)
    a.dataset, a.shape = ("fake-cifar10", (3, 32)) if a.cuda else ("fake-mnist", (1, 28))
    arch = "preact_resnet18" if a.cuda else "smallcnn"
    report = {"device": torch.cuda.get_device_name() if a.cuda else "cpu (tiny mode)", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": [], "checks": {}, "failures": []}
    t_start = time.time()

    def attempt(name, fn):
        try:
            return fn()
        except Exception as e:  # a failure is recorded and the check goes on
            report["failures"].append(f"{name}: {type(e).__name__}: {str(e).strip()[-300:]}")
            traceback.print_exc(file=sys.stderr)
        finally:
            if a.cuda:
                torch.cuda.empty_cache()

    plan = [(m, pr, arch) for pr in PRECISIONS for m in METHODS if a.cuda or pr != "bf16+cl+compile"]
    large = [(m, "bf16+cl", "wrn34_10") for m in METHODS] + [(m, "bf16+cl", "vgg16") for m in ("PGD-AT", "customized")]
    plan = [r for r in plan if "compile" not in r[1]] + large * a.cuda + [r for r in plan if "compile" in r[1]]
    for method, precision, net in plan:
        row = attempt(f"{method} {precision} {net}", lambda: measure(method, precision, net, a))
        if row:
            report["rows"].append(row)
            print(f"{net:>16} {method:>14} {precision:>16}: {row['images_per_s']:8.1f} images/s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cores = min(8, os.cpu_count() or 1)  # the default on CUDA
        report["checks"]["loader"] = attempt("loader", lambda: [loader_rate(a, w) for w in (0, cores)])
        report["checks"]["evaluate"] = attempt("evaluate", lambda: check_evaluate(a, tmp))
        report["checks"]["resume"] = attempt("resume", lambda: check_resume(a, tmp))
        report["checks"]["torchrun"] = attempt("torchrun", lambda: check_torchrun(a, tmp))
    judge(report, a)
    report["seconds"] = time.time() - t_start
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print_report(report)
    print(f"wrote {a.out}")
    sys.exit(1 if report["failures"] else 0)


def judge(report, a):
    """The failures the numbers show, and the projected hours of the paper runs."""
    fp32 = {(r["method"], r["arch"]): r for r in report["rows"] if r["precision"] == "fp32"}
    for r in report["rows"]:
        name, base = f"{r['method']} {r['precision']} {r['arch']}", fp32.get((r["method"], r["arch"]))
        allowed = (2 if METHODS[r["method"]][0] is TK and "--no-mask" not in METHODS[r["method"]][1] else 1) \
            if r["precision"] == "fp16" else 0  # GradScaler.step reads found_inf once per optimizer
        if r["syncs_per_batch"] is not None and r["syncs_per_batch"] > allowed:
            report["failures"].append(f"{name}: {r['syncs_per_batch']} host syncs per batch")
        if base and abs(r["loss"] - base["loss"]) > 0.15 * abs(base["loss"]) + 1e-3:
            report["failures"].append(f"{name}: loss {r['loss']:.4f}, fp32 {base['loss']:.4f}")
        if base and r.get("zero_grad_share", 0) > base["zero_grad_share"] + 0.05:
            report["failures"].append(f"{name}: {r['zero_grad_share']:.1%} zero input gradients, fp32 "
                                      f"{base['zero_grad_share']:.1%}")
    ev = report["checks"].get("evaluate")
    if ev and ev["max_diff"] > 0.02:
        report["failures"].append(f"evaluate: the speed flags moved an accuracy by {100 * ev['max_diff']:.1f} points")
    best = {}
    for r in report["rows"]:
        key = (r["method"], r["arch"])
        best[key] = max(best.get(key, 0), r["images_per_s"])
    report["projected_hours"] = {run: {m: round(epochs * 50_000 / best[(m, arch)] / 3600, 2) for m in methods
                                       if (m, arch) in best}
                                 for run, (methods, arch, epochs) in PAPER_RUNS.items()}


def print_report(report):
    print(f"{report['device']}, torch {report['torch']}, {report['date']}")
    print(f"{'arch':>16} {'method':>14} {'precision':>16} {'images/s':>9} {'peak MiB':>9} {'loss':>8} {'syncs':>6} "
          f"{'zero grad':>9} {'no fix':>7}")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in report["rows"]:
        print(f"{r['arch']:>16} {r['method']:>14} {r['precision']:>16} {r['images_per_s']:9.1f} "
              f"{fmt(r['peak_mib'], '9.0f'):>9} {r['loss']:8.4f} {fmt(r['syncs_per_batch'], '6d'):>6} "
              f"{fmt(r.get('zero_grad_share'), '9.3f'):>9} {fmt(r.get('zero_grad_share_without_fix'), '7.3f'):>7}")
    for name, value in report["checks"].items():
        print(f"{name}: {json.dumps(value)}")
    for run, hours in report["projected_hours"].items():
        if hours:
            print(f"projected training hours, {run}: " + ", ".join(f"{m} {h}" for m, h in hours.items()))
    for f in report["failures"]:
        print(f"FAILED {f}")
    print(f"{len(report['failures'])} failures, {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
