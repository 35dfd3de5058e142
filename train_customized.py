"""Customized adversarial training (Cheng et al., arXiv 2002.06789), Algorithm 1 as written.

Each training sample i carries its own radius eps_i (Sec. 3.1) and a label smoothed in proportion
to it, y~_i = (1 - c eps_i) onehot(y_i) + c eps_i Dirichlet(beta) (Sec. 3.2, Eq. 4); the loss is
CE on y~ or the mixed CE + C&W margin loss (Eq. 6).

    python train_customized.py                                        # paper values, WRN-34-10
    python train_customized.py --dataset fake-mnist --arch smallcnn --eps-max 0.1 --epochs 2
Table 6 (VGG-16): Adv train = --fixed-eps --c 0 --loss ce, Adv+LS = --fixed-eps --loss ce,
Adp-Adv (IAAT) = --c 0 --loss ce, CAT = the defaults (mixed loss, as in Table 3).
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
from models import ARCHS, get_model

METHOD = "customized"
PAPER_EPOCHS, PAPER_MILESTONES = 200, (80, 140, 180)  # Sec. 5, "Implementation details"


# ------------------------------------------------------------------ the method (Sec. 3, Alg. 1)

def adaptive_labels(y, eps, c, beta, num_classes):
    """Eq. (4): y~_i = (1 - c eps_i) onehot(y_i) + c eps_i Dirichlet(beta), one draw per sample
    (unvalidated: the argument check would cost a host sync every batch on CUDA)."""
    onehot = F.one_hot(y, num_classes).float()
    if c == 0:  # no label adaptation (Table 6 "Adp-Adv"); skip the Dirichlet draw
        return onehot
    concentration = torch.full((len(y), num_classes), float(beta), device=y.device)
    w = (c * eps).float()[:, None]
    return (1 - w) * onehot + w * torch.distributions.Dirichlet(concentration, validate_args=False).sample()


def update_epsilons(eps, attack_succeeded, eta, eps_max):
    """Sec. 3.1 and Alg. 1: the attack at radius eps_i + eta fooled the model -> eps_i = 0;
    it failed -> eps_i = eps_i + eta; then eps_i = min(eps_i, eps_max)."""
    return torch.where(attack_succeeded, torch.zeros_like(eps), eps + eta).clamp(max=eps_max)


def soft_ce(logits, y_soft):
    """Per-sample cross-entropy against a soft label: -sum_k y~_k log softmax(z)_k."""
    return -(y_soft * F.log_softmax(logits, 1)).sum(1)


def mixed_loss(logits, y_soft, y, kappa):
    """Eq. (6), per sample: CE(f(x'), y~) + max(max_{j != y} Z_j - Z_y, -kappa)."""
    return soft_ce(logits, y_soft) + attacks.cw_margin(logits, y, kappa)


def train_step(model, net, attack_net, optimizer, scaler, autocast, x, y, idx, eps_table, args):
    """One batch of Algorithm 1: `steps` forward+backward passes for the attack and one for the
    update, as PGD-AT. `net`, `attack_net`: `model` or its wrappers (`wrap`)."""
    eps = torch.full_like(y, args.eps_max, dtype=torch.float) if args.fixed_eps else eps_table[idx]
    radius = (eps if args.fixed_eps else eps + args.eta) * args.eps_scale  # Alg. 1: eps_i <- eps_i + eta
    per_sample = (lambda z, ys: mixed_loss(z, ys, y, args.kappa)) if args.loss == "mix" else soft_ce
    y_soft = adaptive_labels(y, eps, args.c, args.beta, args.num_classes)  # Eq. (4), current eps_i
    model.eval()  # attack the model as it is evaluated (BN running statistics), as TRADES does
    with autocast():
        x_adv = attacks.pgd(attack_net, x, y, radius, args.alpha * radius, args.steps,
                            loss=lambda z, _: per_sample(z.float(), y_soft))
    model.train()
    with autocast():
        logits = net(x_adv).float()
    new_eps = eps
    if not args.fixed_eps:  # Alg. 1: f(x_i + delta_i) != y_i -> eps_i <- 0; then cap at eps_max. The test reads
        # this training forward's logits (train mode), not one more pass: the paper's "negligible overhead".
        new_eps = update_epsilons(eps, logits.argmax(1) != y, args.eta, args.eps_max)
        eps_table[all_gather(idx)] = all_gather(new_eps)  # every rank holds the whole table
    # Alg. 1 recomputes y~ with the updated eps_i (its line prints (1 - c eps_i) before the
    # Dirichlet term, a typo for Eq. (4)'s c eps_i), then takes one SGD step on l(f(x'), y~).
    y_soft = adaptive_labels(y, new_eps, args.c, args.beta, args.num_classes)
    loss = per_sample(logits, y_soft).mean()                # Eq. (5) / (6), batch mean
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"train_loss": loss.detach() * len(y), "train_adv_acc": (logits.argmax(1) == y).sum()}


def all_gather(t):
    """t of every rank, concatenated (under torchrun; else t): every rank applies every rank's updates."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def eps_stats(eps_table, args):
    """The eps table at the end of an epoch: mean, quantiles and share at eps_max."""
    q = torch.quantile(eps_table.float().cpu(), torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"eps_mean": eps_table.mean().item(), "eps_q10": q[0], "eps_q50": q[1], "eps_q90": q[2],
            "eps_at_max": (eps_table >= args.eps_max - 1e-9).float().mean().item()}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Customized adversarial training (arXiv 2002.06789), Alg. 1.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--eta", type=fraction, default=0.005, help="eps_i increment per unfooled visit (Sec. 3.1; Sec. 5: 0.005)")
    a("--eps-max", type=fraction, default=8 / 255, help="cap on eps_i (Sec. 5: 8/255)")
    a("--c", type=float, default=10.0, help="label smoothing c eps_i (Eq. 4; Sec. 5: 10); 0 = no label adaptation")
    a("--beta", type=float, default=1.0, help="Dirichlet concentration (Eq. 4; Sec. 5: 1 = uniform on the simplex)")
    a("--kappa", type=float, default=10.0, help="floor -kappa of the C&W margin in the mixed loss (Eq. 6; Sec. 5: 10)")
    a("--loss", choices=["ce", "mix"], default="mix", help="CE on y~ (Eq. 5) or CE + C&W margin (Eq. 6, Tables 3-4)")
    a("--steps", type=int, default=10, help="PGD steps in training (Sec. 5: 10)")
    a("--alpha", type=float, default=0.25, help="PGD step as a fraction of each sample's radius; the paper gives none: "
      "0.25 x 10 steps = 2.5 radii (Madry et al.'s rule), 2/255 at radius 8/255")
    a("--fixed-eps", action="store_true", help="every eps_i = eps_max, no adaptation (Table 6 'Adv train', 'Adv+LS')")
    a("--optimizer", choices=["sgd", "adam"], default="sgd", help="Sec. 5: SGD (adam: benchmarks/mnist_table1.py)")
    a("--lr", type=float, help="learning rate (Sec. 5: 0.1 for WRN, 0.01 for VGG-16; None = by --arch)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Sec. 5: 0.9)")
    a("--wd", type=float, default=5e-4, help="weight decay (Sec. 5: 5e-4)")
    a("--epochs", type=int, default=PAPER_EPOCHS, help="epochs (Sec. 5: 200, lr x0.1 at 80/140/180; see --milestones)")
    a("--batch-size", type=int, default=128, help="batch size per process (128, as Madry et al. and TRADES)")
    a("--arch", default="wrn34_10", choices=ARCHS, help="classifier (Table 4: WRN-34-10; Table 3: VGG-16)")
    args = parse_args(p, argv)
    check_ranges(p, args, [("--eta", lambda v: v >= 0, ">= 0"), ("--eps-max --beta", lambda v: v > 0, "> 0"),
                           ("--c", lambda c: 0 <= c * args.eps_max <= 1, f"in [0, {args.eps_max and 1 / args.eps_max:g}]"),
                           ("--steps", lambda v: v >= 1, ">= 1")])
    args.lr = (0.01 if args.arch == "vgg16" else 0.1) if args.lr is None else args.lr
    return args


def main(argv=None):
    args = get_args(argv)
    world, rank = setup(args)
    train, val, test = get_data(args)
    model = get_model(args.arch, args.num_classes, args.in_channels, args.image_size).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.wd) if args.optimizer == "adam" \
        else torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(args, PAPER_EPOCHS, PAPER_MILESTONES))
    eps_table = torch.zeros(len(train), device=args.device)  # Sec. 3.1: every eps_i starts at 0
    net, attack_net, autocast, scaler = wrap(model, args, world)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "eps": eps_table}
    start, best = open_run(args, state)
    for epoch in range(start, args.epochs):
        torch.manual_seed(args.seed * 1_000_000 + epoch * 1000 + rank)  # by (seed, epoch, rank): exact --resume
        sums, t0 = Counter(), time.time()
        for x, y, idx in batches(train, epoch, args, world, rank):
            sums.update(train_step(model, net, attack_net, optimizer, scaler, autocast, x, y, idx, eps_table, args),
                        n=len(y))
        rec = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], **epoch_means(sums, args, world),
               **({} if args.fixed_eps else eps_stats(eps_table, args)), "seconds": time.time() - t0}
        scheduler.step()
        best = end_epoch(rec, model, (train, val, test), state, best, args.eps_max, args)
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
