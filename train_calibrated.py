"""Calibrated adversarial training (Huang et al., ACML 2021), Sec. 4.4 as written.

Per batch: an attack gives x' = x + delta (Eq. 9); a mask network g_phi gives M = g_phi(x, delta)
(Eq. 11) and the calibrated example x_cali = x + M * delta (Eq. 10); the classifier f takes one
step on Eq. (13), then g_phi takes one step on Eq. (14) against the updated f.

    python train_calibrated.py --beta1 0.1 --attack cw       # CAT_cw, PreActResNet-18, CIFAR-10
    python train_calibrated.py --dataset mnist               # MNIST preset (Sec. 5.1.1, Table 1)
    python train_calibrated.py --dataset fake-mnist --epochs 2 --train-size 256   # offline smoke run
Sec. 5.2.3 ablations: A2 = --attack pgd --no-mask, A1 = --attack pgd --no-mask --no-weighted-ce;
TRADES = --no-mask --no-weighted-ce --attack kl (TRADES' own beta is 6); Fig. 3 = --eps 12/255.
"""
import argparse
import json
import math
import os
import pickle
import sys
import time
import warnings
from collections import Counter
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms as T

import attacks
from models import ARCHS, MASK_NETS, get_mask_net, get_model

METHOD = "calibrated"
# Sec. 5.1.1 and the authors' release (README.md, Calibrated adversarial training): the defaults of
# every flag below that has one per dataset; --dataset mnist or fake-mnist takes the MNIST column.
PRESETS = {
    "cifar": dict(beta=5.0, beta1=0.05, eps=8 / 255, alpha=2 / 255, steps=10, kappa=50.0, optimizer="sgd", lr=0.1,
                  wd=5e-4, mask_optimizer="sgd", mask_lr=0.1, batch_size=128, epochs=140, arch="preact_resnet18",
                  mask_arch="resnet18"),
    "mnist": dict(beta=1.0, beta1=0.3, eps=0.3, alpha=None, steps=20, kappa=150.0, optimizer="adam", lr=1e-3,
                  wd=0.0, mask_optimizer="sgd", mask_lr=0.01, batch_size=100, epochs=40, arch="smallcnn",
                  mask_arch="small"),
}
# The release's (epochs, lr x0.1 milestones): CIFAR-10 PreActResNet-18, WRN-34-10, MNIST.
PAPER_SCHEDULE = {"cifar": (140, (100, 120)), "wrn34_10": (140, (100, 110)), "mnist": (40, (30,))}


# ------------------------------------------------------------------ the method (Sec. 4.4)

def attack(model, x, y, args):
    """Eq. (9): delta = argmax_{||delta||_inf <= eps} phi(f(x + delta), y), by PGD with random start
    (Sec. 5.1.1). phi: CE ("CAT_cent"), C&W-inf margin ("CAT_cw") or TRADES' KL (Sec. 5.2.3), which
    starts at x + 0.001 N(0, 1) as TRADES does. The caller puts f in eval mode. Returns delta, detached."""
    loss, start = {"pgd": "ce", "cw": "cw"}.get(args.attack), True
    if args.attack == "kl":  # TRADES: KL(P(.|x) || P(.|x')) per sample, P(.|x) fixed
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), 1)
        loss, start = lambda z, t: F.kl_div(F.log_softmax(z.float(), 1), p_nat, reduction="none").sum(1), 0.001
    x_adv = attacks.pgd(model, x, y, args.eps * args.eps_scale, args.alpha * args.eps_scale, args.steps, loss=loss,
                        random_start=start, kappa=args.kappa)  # eps_scale < 1: --eps-warmup's first epochs
    return (x_adv - x).detach()


def calibrate(x, delta, mask):
    """Eq. (10): x_cali = x + M * delta, in the image box. M in (0, 1) keeps it in the eps-ball."""
    return (x + mask * delta).clamp(0, 1)


# KL convention. The paper writes KL(P(Y|X'_cali) || P(Y|X)) in Eq. (13) and KL(P(Y|X'_cali) || P(Y|X')) in Eq. (14).
# Like the authors' release and TRADES we compute F.kl_div(log P(.|x_cali), P(.|ref), "batchmean"), that is
# KL(P(.|ref) || P(.|x_cali)), reference first: the release's numbers are the paper's, and only this order makes
# --no-mask --no-weighted-ce --attack kl the TRADES loss. Read literally, the paper's notation is the reverse KL.
def kl(logits_cali, logits_ref):
    return F.kl_div(F.log_softmax(logits_cali, 1), F.softmax(logits_ref, 1), reduction="batchmean")


def calibrated_loss(logits_nat, logits_cali, y, beta, weighted_ce=True):
    """Eq. (13): CE(f(x), y) (1 - p_y(x)) + beta KL, batch mean. p_y is not detached (release).
    weighted_ce=False: plain CE(f(x), y) (Sec. 5.2.3, ablation A1; TRADES)."""
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    if weighted_ce:                                                         # Eq. (8)
        ce = ce * (1 - F.softmax(logits_nat, 1).gather(1, y[:, None]).squeeze(1))
    return ce.mean() + beta * kl(logits_cali, logits_nat)                   # Eq. (13)


def mask_loss(logits_cali, logits_adv, y, beta1):
    """Eq. (14): KL to f(x') (x_cali stays close to x') + beta1 CE(f(x_cali), y) (x_cali keeps y), batch mean."""
    return kl(logits_cali, logits_adv) + beta1 * F.cross_entropy(logits_cali, y)   # Eq. (14)


def train_step(model, mask_net, f_net, attack_net, g_net, opt_f, opt_g, scaler, autocast, x, y, args):
    """One batch of Sec. 4.4: attack -> step f on Eq. (13) -> step g_phi on Eq. (14) against the updated f.
    `f_net`, `attack_net`, `g_net`: model and mask_net, or their wrappers (`wrap`). Passes (K = --steps):
    f K+4 forwards, K+3 backwards; g 1 and 1 (one forward serves both steps); TRADES: f K+3 and K+2."""
    model.eval()  # attack f as it is evaluated (BN running statistics), as TRADES does
    with autocast():
        delta = attack(attack_net, x, y, args)                             # Eq. (9)
        mask = None if args.no_mask else g_net(x, delta)                   # Eq. (11)
    # f's step; g frozen: its mask enters detached. --no-mask: M = 1, x_cali = x' (A2).
    x_cali = calibrate(x, delta, 1.0 if mask is None else mask.detach())   # Eq. (10)
    model.train()
    with autocast():  # two calls, not one on the concatenation: BN statistics apart, as TRADES
        logits_nat, logits_cali = f_net(x).float(), f_net(x_cali).float()
    loss = calibrated_loss(logits_nat, logits_cali, y, args.beta, not args.no_weighted_ce)  # Eq. (13)
    opt_f.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_f)
    out = {"train_loss": loss.detach() * len(y), "train_nat_acc": (logits_nat.argmax(1) == y).sum(),
           "train_cali_acc": (logits_cali.argmax(1) == y).sum()}  # f as it stepped (train mode)
    if mask is None:  # x_cali = x': the adversarial accuracy is the calibrated one
        out["train_adv_acc"] = out["train_cali_acc"]
    else:  # g's step against the updated f, frozen: eval mode leaves its BN buffers alone, and
        model.eval()  # backward(inputs=...) puts gradients into g's parameters only
        with autocast():
            with torch.no_grad():
                logits_adv = model(x + delta).float()
            logits_cali = model(calibrate(x, delta, mask)).float()
        loss_g = mask_loss(logits_cali, logits_adv, y, args.beta1)                        # Eq. (14)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward(inputs=list(mask_net.parameters()))
        scaler.step(opt_g)
        ranked = (m := mask.detach().float().flatten()).sort().values  # M's mean, 5 % / 95 % quantiles: no sync
        q05, q95 = (ranked[max(1, round(q * len(m))) - 1] for q in (0.05, 0.95))
        out.update(train_adv_acc=(logits_adv.argmax(1) == y).sum(), train_mask_loss=loss_g.detach() * len(y),
                   train_mask_mean=m.mean() * len(y), train_mask_q05=q05 * len(y), train_mask_q95=q95 * len(y))
    scaler.update()
    return out


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Calibrated adversarial training (ACML 2021), Sec. 4.4. Defaults "
                                "shown are --dataset's preset (CIFAR-10 or MNIST); help names both.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--beta", type=float, help="weight of the KL term (Eq. 13; Sec. 5.1.1: 5 on CIFAR-10, 1 on MNIST)")
    a("--beta1", type=float, help="weight of CE(f(x_cali), y) in g_phi's loss (Eq. 14; Sec. 5.1.1: "
      "0.05, 0.1 or 0.3 on CIFAR-10, 0.05 here; 0.3 on MNIST)")
    a("--attack", choices=["pgd", "cw", "kl"], default="cw", help="phi of Eq. (9): CE (CAT_cent), "
      "C&W-inf margin (CAT_cw, Sec. 4.4) or TRADES' KL (Sec. 5.2.3)")
    a("--eps", type=fraction, help="training attack radius (Sec. 5.1.1: 8/255 on CIFAR-10, 0.3 on MNIST)")
    a("--alpha", type=fraction, help="attack step (Sec. 5.1.1: 2/255 on CIFAR-10; eps/20 on MNIST, shown as None)")
    a("--steps", type=int, help="training attack steps T (Sec. 5.1.1: 10 on CIFAR-10, 20 on MNIST)")
    a("--kappa", type=float, help="C&W-inf confidence of --attack cw, which ascends min(margin, kappa) "
      "(release: 50 on CIFAR-10, 150 on MNIST)")
    a("--no-mask", action="store_true", help="train on x' instead of x_cali, no g_phi (Sec. 5.2.3, A2)")
    a("--no-weighted-ce", action="store_true", help="plain CE on x in Eq. (13) (Sec. 5.2.3; with --no-mask, A1)")
    a("--optimizer", choices=["sgd", "adam"], help="f's optimizer (release: SGD on CIFAR-10, Adam on MNIST)")
    a("--lr", type=float, help="f's learning rate (release: 0.1 with SGD, 1e-3 with Adam)")
    a("--mask-arch", choices=MASK_NETS, help="g_phi (App. C as released: resnet18 on CIFAR-10, small on MNIST)")
    a("--mask-optimizer", choices=["sgd", "adam"], help="g_phi's optimizer (release: SGD on CIFAR-10, Adam on "
      "MNIST, whose mask collapses to 0 in ten batches: SGD here, README)")
    a("--mask-lr", type=float, help="g_phi's learning rate (release: 0.1 on CIFAR-10, Adam 1e-3 on MNIST; "
      "SGD 0.01 on MNIST here, README)")
    a("--momentum", type=float, default=0.9, help="SGD momentum, both nets (release: 0.9)")
    a("--wd", type=float, help="weight decay, both nets (release: 5e-4 with SGD on CIFAR-10; 0 on MNIST)")
    a("--epochs", type=int, help="epochs (release: 140 on CIFAR-10, lr x0.1 at 100 and 120, WRN-34-10 at 100 "
      "and 110; 40 on MNIST, x0.1 at 30)")
    a("--batch-size", type=int, help="batch size per process (release: 128 on CIFAR-10, 100 on MNIST)")
    a("--arch", choices=ARCHS, help="classifier f (Sec. 5.1.1: preact_resnet18 or wrn34_10; MNIST: smallcnn)")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --dataset picks the defaults
    pre.add_argument("--dataset", default="cifar10")
    preset = "mnist" if pre.parse_known_args(argv)[0].dataset in ("mnist", "fake-mnist") else "cifar"
    p.set_defaults(preset=preset, **PRESETS[preset])
    args = parse_args(p, argv)
    args.alpha = args.eps / 20 if args.alpha is None else args.alpha  # MNIST: alpha = eps / T (Sec. 5.1.1)
    args.mask_arch = None if args.no_mask else args.mask_arch
    check_ranges(p, args, [("--beta --beta1 --kappa --wd", lambda v: v >= 0, ">= 0"),
                           ("--eps --lr --mask-lr", lambda v: v > 0, "> 0"),  # --eps first: --alpha's rule reads it
                           ("--alpha", lambda v: 0 < v <= args.eps, f"in (0, --eps] = (0, {args.eps:g}]"),
                           ("--steps", lambda v: v >= 1, ">= 1")])
    return args


def make_optimizer(net, name, lr, schedule, args):
    opt = torch.optim.Adam(net.parameters(), lr, weight_decay=args.wd) if name == "adam" \
        else torch.optim.SGD(net.parameters(), lr, momentum=args.momentum, weight_decay=args.wd)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, schedule)


def main(argv=None):
    args = get_args(argv)
    world, rank = setup(args)
    train, val, test = get_data(args)
    model = get_model(args.arch, args.num_classes, args.in_channels, args.image_size).to(args.device)
    schedule = milestones(args, *PAPER_SCHEDULE["wrn34_10" if args.arch == "wrn34_10" else args.preset])
    optimizer, scheduler = make_optimizer(model, args.optimizer, args.lr, schedule, args)
    f_net, attack_net, autocast, scaler = wrap(model, args, world)  # one GradScaler for both nets
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    mask_net = g_net = mask_optimizer = mask_scheduler = None
    if not args.no_mask:  # g_phi: its own optimizer, f's lr schedule
        mask_net = get_mask_net(args.mask_arch, args.in_channels).to(args.device)
        mask_optimizer, mask_scheduler = make_optimizer(mask_net, args.mask_optimizer, args.mask_lr, schedule, args)
        g_net = wrap(mask_net, args, world)[0]
        state.update(mask_net=mask_net, mask_optimizer=mask_optimizer, mask_scheduler=mask_scheduler)
    start, best = open_run(args, state)
    for epoch in range(start, args.epochs):
        torch.manual_seed(args.seed * 1_000_000 + epoch * 1000 + rank)  # by (seed, epoch, rank): exact --resume
        sums, t0 = Counter(), time.time()
        for x, y, _ in batches(train, epoch, args, world, rank):
            sums.update(train_step(model, mask_net, f_net, attack_net, g_net, optimizer, mask_optimizer, scaler,
                                   autocast, x, y, args), n=len(y))
        rec = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], **epoch_means(sums, args, world),
               "seconds": time.time() - t0}
        scheduler.step()
        if mask_net is not None:
            rec["mask_lr"] = mask_scheduler.get_last_lr()[0]
            mask_scheduler.step()
            if is_main() and not 0.02 < (m := rec["train_mask_mean"]) < 0.98:  # M ~ 0: x_cali ~ x; M ~ 1: ~ x'
                print(f"warning: epoch {epoch + 1}: mean mask {m:.4f} is outside (0.02, 0.98): the run has become "
                      + ("natural training" if m <= 0.02 else "TRADES (A2 with the weighted CE)"), file=sys.stderr)
        best = end_epoch(rec, model, (train, val, test), state, best, args.eps, args)
    if world > 1:
        dist.destroy_process_group()


# ================================================================== shared boilerplate
# Byte-identical in both trainers (test_smoke.py checks it): command line, data, checkpoints, log; no method.

def fraction(s):
    """A number or a fraction such as 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def parse_args(p, argv):
    """Add the flags both trainers share to parser p, parse argv, check; errors in one line."""
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (see --help)\n")  # no usage dump
    a = p.add_argument
    a("--milestones", type=int, nargs="+", help="lr x0.1 after these epochs (None = the schedule in --epochs' help, scaled)")
    a("--dataset", default="cifar10", help="fake-*: torchvision FakeData, offline",
      choices=["cifar10", "cifar100", "mnist", "svhn", "imagefolder", "fake-cifar10", "fake-mnist"])
    a("--data-dir", default="./data", help="dataset root (torchvision downloads CIFAR/SVHN/MNIST here)")
    a("--train-size", type=int, help="use this many training images, a seeded subset (None = all)")
    a("--test-size", type=int, help="use this many test images (None = all)")
    a("--val-size", type=int, default=0, help="hold out this many training images; best.pt is chosen on them")
    a("--eval-size", type=int, default=1000, help="test points for the per-epoch clean / PGD-10 accuracy")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    a("--seed", type=int, default=0, help="seeds the weights, each epoch (with the epoch) and the data order")
    a("--out", help="output directory: model.pt, best.pt, log.jsonl (None = runs/SCRIPT)")
    a("--resume", nargs="?", const="", help="continue from OUT/model.pt, or from the checkpoint given")
    a("--overwrite", action="store_true", help="start over in an --out that holds a run")
    a("--workers", type=int, help="DataLoader processes (None: 0 on the CPU, min(8, cores per process) on CUDA)")
    a("--amp", nargs="?", const="bf16", default="off", choices=["off", "bf16", "fp16"], help="autocast: --amp is "
      "bf16 (CUDA, or a CPU with native bf16), --amp fp16 (CUDA) adds a GradScaler (its attack: attacks.unit_grad)")
    a("--channels-last", action="store_true", help="NHWC memory format (CUDA tensor cores, CPU oneDNN kernels)")
    a("--compile", action="store_true", help="torch.compile the training forward and the attack's")
    a("--eps-warmup", type=float, default=0, help="epochs over which the training attack's eps (and step) grows "
      "linearly from 0, per batch; not in the papers (PGD-AT on MNIST at 0.3 can stall at chance without); 0 = off")
    args = p.parse_args(argv)
    check_ranges(p, args, [("--epochs --batch-size --eval-size --train-size --test-size", lambda v: v >= 1, ">= 1"),
                           ("--milestones", lambda m: min(m) >= 1, ">= 1 each"),
                           ("--val-size --workers --eps-warmup", lambda v: v >= 0, ">= 0")])
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cpu = not (args.device == "cuda" or args.device == "auto" and torch.cuda.is_available())
    native = torch.cpu._is_avx512_bf16_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # ISA unpinned
    if cpu and (args.amp == "fp16" or args.amp == "bf16" and not native):
        p.error(f"--amp {args.amp} needs CUDA" + " or a CPU with native bf16 (AVX512_BF16 or AMX; elsewhere bf16 "
                "is emulated, ~7x slower than fp32: benchmarks/cpu_speed.py)" * (args.amp == "bf16"))
    args.out = args.out or os.path.join("runs", os.path.basename(sys.argv[0]).removesuffix(".py"))
    args.eps_scale = 1.0  # the training attack's eps factor: batches() sets it per batch under --eps-warmup
    return args


def check_ranges(p, args, rules):
    """p.error at the first flag that breaks its rule, in one line naming the flag, the rule and the value it got.
    rules: (flags, ok, rule): space-separated flags, a test of one value, the test in words; unset (None) passes."""
    for flags, ok, rule in rules:
        for flag in flags.split():
            value = getattr(args, flag[2:].replace("-", "_"))
            if value is not None and not ok(value):
                p.error(f"{flag} must be {rule}, got {format(value, 'g') if isinstance(value, float) else value}")


def milestones(args, paper_epochs, paper_milestones):
    """--milestones, or the paper's scaled to --epochs; never 0, where MultiStepLR would decay at once."""
    return args.milestones or [max(1, round(m * args.epochs / paper_epochs)) for m in paper_milestones]


class Indexed(Subset):
    """Items (x, y, i), i the position in the split: the key of per-sample state."""

    def __getitem__(self, i):
        return *super().__getitem__(i), i

    def __getitems__(self, indices):  # DataLoader's batched path
        return [self[i] for i in indices]


def get_data(args):
    """(train, val, test) as Indexed datasets. CIFAR gets pad-4 crop + flip; imagefolder: one size."""
    V, root, plain = torchvision.datasets, args.data_dir, T.ToTensor()
    aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    fake = lambda shape, tr: V.FakeData((args.train_size if tr else args.test_size) or 1000, shape, 10, plain,
                                        random_offset=args.seed + (0 if tr else 1_000_000))
    build = {"cifar10": lambda tr, t: V.CIFAR10(root, tr, t, download=True),
             "cifar100": lambda tr, t: V.CIFAR100(root, tr, t, download=True),
             "svhn": lambda tr, t: V.SVHN(root, "train" if tr else "test", t, download=True),
             "mnist": lambda tr, t: V.MNIST(root, tr, plain, download=True),
             "imagefolder": lambda tr, t: V.ImageFolder(os.path.join(root, "train" if tr else "val"), t),
             "fake-cifar10": lambda tr, t: fake((3, 32, 32), tr), "fake-mnist": lambda tr, t: fake((1, 28, 28), tr),
             }[args.dataset]
    cifar_like = args.dataset in ("cifar10", "cifar100")  # SVHN digits: no flips
    try:
        train, test = build(True, aug if cifar_like else plain), build(False, plain)
        train_plain = build(True, plain) if cifar_like and args.val_size else train
    except (RuntimeError, OSError) as e:  # torchvision's download error spans lines; the last says why
        sys.exit(f"error: cannot load {args.dataset} from {root}: {(str(e).strip().splitlines() or [repr(e)])[-1]}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_train = args.train_size or len(train) - args.val_size
    if args.val_size + n_train > len(train):
        sys.exit(f"error: --val-size + --train-size = {args.val_size + n_train} > {len(train)} training images")
    val, train = Indexed(train_plain, perm[:args.val_size]), Indexed(train, perm[args.val_size:][:n_train])
    test = Indexed(test, range(min(args.test_size or len(test), len(test))))
    args.num_classes = 100 if args.dataset == "cifar100" else len(getattr(test.dataset, "classes", range(10)))
    args.in_channels, args.image_size = test[0][0].shape[0], test[0][0].shape[-1]
    return train, val, test


def batches(data, epoch, args, world, rank):
    """The epoch's shuffled shard on the device, by (seed, epoch); a progress line on a terminal."""
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)  # no index twice
    sampler.set_epoch(epoch)
    loader = DataLoader(data, args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=args.device.startswith("cuda"))
    t0, tty = time.time(), sys.stderr.isatty() and rank == 0
    for i, (x, y, idx) in enumerate(loader):
        x = x.to(args.device, non_blocking=True,
                 memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        args.eps_scale = min(1.0, (epoch + i / len(loader)) / args.eps_warmup) if args.eps_warmup else 1.0
        yield x, y.to(args.device, non_blocking=True), idx.to(args.device, non_blocking=True)
        if tty:  # images/s is in the epoch's log line
            left = (time.time() - t0) / (i + 1) * (len(loader) - i - 1)
            print(f"\repoch {epoch + 1}: batch {i + 1}/{len(loader)}, {left:.0f} s left ", end="", file=sys.stderr)
    if tty:
        print("\r\033[K", end="", file=sys.stderr)  # clear the progress line


def epoch_means(sums, args, world):
    """The step's per-batch sums (and the image count n) as epoch means over every rank's images."""
    t = torch.tensor([float(v) for v in sums.values()], dtype=torch.float64, device=args.device)
    if world > 1:
        dist.all_reduce(t)
    means = dict(zip(sums, t.tolist()))
    return {k: v / means["n"] for k, v in means.items() if k != "n"}


def accuracy(model, data, eps, args, n):
    """Clean and PGD-10 accuracy on the first n points: a progress signal; the papers' evaluation is evaluate.py."""
    model.eval()
    n, clean, robust = min(n, len(data)), 0, 0
    for x, y, _ in DataLoader(data, args.batch_size, sampler=range(n)):
        x, y = x.to(args.device), y.to(args.device)
        x_adv = attacks.pgd(model, x, y, eps, eps / 4, 10)
        with torch.no_grad():
            clean += (model(x).argmax(1) == y).sum().item()
            robust += (model(x_adv).argmax(1) == y).sum().item()
    model.train()
    return clean / n, robust / n


def end_epoch(rec, model, data, state, best, eval_eps, args):
    """Add clean / PGD-10 accuracies to the epoch's record and log it; save model.pt and, when the
    validation PGD accuracy (clean breaks ties) improves, best.pt. Returns the best so far."""
    if not math.isfinite(rec["train_loss"]):  # the all-reduced epoch mean: every rank stops, no per-batch sync
        sys.exit(f"error: non-finite loss in epoch {rec['epoch']}; {args.out}/model.pt keeps epoch {rec['epoch'] - 1}")
    if not is_main():
        return best
    train, val, test = data
    rec["train_clean_acc"], rec["train_pgd_acc"] = accuracy(model, train, eval_eps, args, args.eval_size)
    rec["test_clean_acc"], rec["test_pgd_acc"] = accuracy(model, test, eval_eps, args, args.eval_size)
    if len(val):
        rec["val_clean_acc"], rec["val_pgd_acc"] = accuracy(model, val, eval_eps, args, len(val))
    rec["images_per_s"] = len(train) / rec["seconds"]
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)
    names = ["model.pt"]
    if len(val) and (best is None or [rec["val_pgd_acc"], rec["val_clean_acc"]] > best):
        best, names = [rec["val_pgd_acc"], rec["val_clean_acc"]], ["best.pt", "model.pt"]
    ck = {"arch": args.arch, "num_classes": args.num_classes, "in_channels": args.in_channels, "best": best,
          "image_size": args.image_size, "dataset": args.dataset, "method": METHOD, "epoch": rec["epoch"],
          "args": vars(args), **{k: v.cpu() if torch.is_tensor(v) else v.state_dict() for k, v in state.items()}}
    for name in names:  # atomic: a temporary file in the same directory, fsync, rename over the old one
        with open(tmp := os.path.join(args.out, f"{name}.tmp{os.getpid()}"), "wb") as f:
            torch.save(ck, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(args.out, name))
    return best


def open_run(args, state):
    """Start, or resume at its last finished epoch, the run in args.out: (first epoch, best so far).
    `state`: what the checkpoint holds (objects with a state_dict, and tensors), restored in place."""
    os.makedirs(args.out, exist_ok=True)
    log_path, src = os.path.join(args.out, "log.jsonl"), args.resume or os.path.join(args.out, "model.pt")
    if args.resume is None:
        if os.path.exists(src) and not args.overwrite:
            sys.exit(f"error: {args.out} holds a run; --resume to continue it, --overwrite to start over")
        if is_main():
            open(log_path, "w").close()
        return 0, None
    if not os.path.isfile(src):
        sys.exit(f"error: --resume: no checkpoint at {src}")
    try:  # weights_only: a checkpoint is data; a pickle that would run code is refused
        with warnings.catch_warnings(action="ignore"):  # torch's pickle-protocol warning would break the line
            ck = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that would run code, or a truncated or foreign file
        why = "not weights-only data, refused" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        sys.exit(f"error: {src} is not a loadable checkpoint: {why}")
    # may change on --resume (--epochs: extends a run whose --milestones are given, not scaled); any other is refused
    runtime = {"resume", "overwrite", "device", "workers", "out", "compile", "channels_last", "amp", "eval_size",
               "eps_scale"} | ({"epochs"} if args.milestones else set())
    diff = sorted(k for k, v in ck.get("args", {}).items() if k not in runtime and getattr(args, k, v) != v)
    if diff:
        sys.exit(f"error: {src} was trained with other settings: {', '.join(diff)}")
    for k, obj in state.items():
        if torch.is_tensor(obj):
            obj.copy_(ck[k])
        elif ck[k]:  # {}: a GradScaler saved disabled (--amp off or bf16); under --amp fp16 a fresh one
            obj.load_state_dict(ck[k])
    if is_main() and os.path.exists(log_path):  # keep the log lines of the epochs the checkpoint holds
        lines = [line for line in open(log_path) if json.loads(line)["epoch"] <= ck["epoch"]]
        with open(log_path, "w") as f:
            f.writelines(lines)
    return ck["epoch"], ck["best"]


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def setup(args):
    """Resolve the device and workers, join the process group under torchrun, seed the weights: (world, rank)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device == "cuda" and local >= torch.cuda.device_count():
        sys.exit(f"error: LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA device(s): lower --nproc_per_node")
    if args.device == "cuda":  # this rank's GPU before the process group, so NCCL binds it; cuDNN picks its kernels
        args.device, torch.backends.cudnn.benchmark = f"cuda:{local}", True
        torch.cuda.set_device(args.device)
    cores = (os.cpu_count() or 1) // world  # on CUDA, workers load and augment while the GPU computes
    args.workers = args.workers if args.workers is not None else 0 if args.device == "cpu" else min(8, cores)
    if world > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    torch.manual_seed(args.seed)
    return world, rank


def wrap(model, args, world):
    """(net, attack_net, autocast, scaler): the training forward (DDP under torchrun, compiled if asked), what the
    attack queries (compiled; never DDP: no parameter gradient), the --amp autocast, its GradScaler (fp16 only)."""
    model.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    net = DistributedDataParallel(model) if world > 1 else model
    attack_net = torch.compile(model) if args.compile else model
    if args.amp == "fp16":  # else confidently classified points' input gradients underflow to 0 and never move
        attack_net = lambda x, fast=attack_net: attacks.unit_grad(fast(x).float())
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    autocast = lambda: torch.autocast(args.device.split(":")[0], dtype, enabled=args.amp != "off")
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.amp == "fp16")
    return torch.compile(net) if args.compile else net, attack_net, autocast, scaler


if __name__ == "__main__":
    main()
