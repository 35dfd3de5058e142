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
import os
import pickle
import random
import signal
import sys
import time
import warnings
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms as T

import attacks
from models import ARCHS, MASK_NETS, get_mask_net, get_model

METHOD = "calibrated"
# Sec. 5.1.1 and the authors' release (NOTES.md), for every flag left unset; fake-mnist = mnist.
PRESETS = {
    "cifar": dict(beta=5.0, beta1=0.05, eps=8 / 255, alpha=2 / 255, steps=10, optimizer="sgd", lr=0.1,
                  wd=5e-4, batch_size=128, epochs=140, arch="preact_resnet18", mask_arch="resnet18"),
    "mnist": dict(beta=1.0, beta1=0.3, eps=0.3, alpha=None, steps=20, optimizer="adam", lr=1e-3,
                  wd=0.0, batch_size=100, epochs=40, arch="smallcnn", mask_arch="small"),
}
PAPER_SCHEDULE = {"cifar": (140, (100, 120)), "mnist": (40, (30,))}  # (epochs, lr x0.1 milestones)


# ------------------------------------------------------------------ the method (Sec. 4.4)

def attack(model, x, y, args):
    """Eq. (9): delta = argmax_{||delta||_inf <= eps} phi(f(x + delta), y), by PGD with random start
    (Sec. 5.1.1). phi: CE ("CAT_cent"), C&W-inf margin ("CAT_cw") or TRADES' KL (Sec. 5.2.3).
    The caller puts f in eval mode. Returns delta, detached."""
    loss = {"pgd": "ce", "cw": "cw"}.get(args.attack)
    if args.attack == "kl":  # TRADES: KL(P(.|x) || P(.|x')) per sample, P(.|x) fixed
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), 1)
        loss = lambda z, t: F.kl_div(F.log_softmax(z.float(), 1), p_nat, reduction="none").sum(1)
    x_adv = attacks.pgd(model, x, y, args.eps, args.alpha, args.steps, loss=loss,
                        random_start=True, kappa=args.kappa)
    return (x_adv - x).detach()


def calibrate(x, delta, mask):
    """Eq. (10): x_cali = x + M * delta, in the image box. M in (0, 1) keeps it in the eps-ball."""
    return (x + mask * delta).clamp(0, 1)


# KL convention. The paper writes KL(P(Y|X'_cali) || P(Y|X)) in Eq. (13) and
# KL(P(Y|X'_cali) || P(Y|X')) in Eq. (14). Like the authors' release and TRADES we compute
# F.kl_div(log P(.|x_cali), P(.|ref), "batchmean") = KL(P(.|ref) || P(.|x_cali)), reference first:
# the release's numbers are the paper's, and only this order makes --no-mask --no-weighted-ce
# --attack kl the TRADES loss. Read literally, the paper's notation is the reverse KL.
def kl(logits_cali, logits_ref):
    """KL(P(.|ref) || P(.|x_cali)), batch mean."""
    return F.kl_div(F.log_softmax(logits_cali, 1), F.softmax(logits_ref, 1), reduction="batchmean")


def calibrated_loss(logits_nat, logits_cali, y, beta, weighted_ce=True):
    """Eq. (13): CE(f(x), y) (1 - p_y(x)) + beta KL, batch mean. p_y is not detached (release).
    weighted_ce=False: plain CE(f(x), y) (Sec. 5.2.3, ablation A1; TRADES)."""
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    if weighted_ce:                                                         # Eq. (8)
        ce = ce * (1 - F.softmax(logits_nat, 1).gather(1, y[:, None]).squeeze(1))
    return ce.mean() + beta * kl(logits_cali, logits_nat)                   # Eq. (13)


def mask_loss(logits_cali, logits_adv, y, beta1):
    """Eq. (14): KL to the prediction on x' (x_cali stays close to x') + beta1 CE(f(x_cali), y)
    (x_cali keeps the label y), batch mean."""
    return kl(logits_cali, logits_adv) + beta1 * F.cross_entropy(logits_cali, y)   # Eq. (14)


class NatAndCali(nn.Module):
    """f on x and on x_cali in one call, so that DDP sees one forward per backward. Two calls of
    f, not one on the concatenation: BatchNorm keeps separate batch statistics, as in TRADES."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, x_cali):
        return self.model(x), self.model(x_cali)


def train_step(model, mask_net, f_pair, g_net, opt_f, opt_g, scaler, autocast, x, y, args):
    """One batch of Sec. 4.4: attack -> step f on Eq. (13) -> step g_phi on Eq. (14) with the
    updated f. `model`, `mask_net` are the bare networks; `f_pair`, `g_net` what the training
    forwards run through (NatAndCali(model) and mask_net, or their DDP / compiled wrappers).
    Passes for a batch, K = --steps:
      attack   K forward+backward of f (input gradient only); +1 forward for --attack kl
      g        1 forward; its graph serves g's step too (M depends on g alone, which f's step
               leaves unchanged), so the mask is not recomputed
      f step   2 forwards (x, x_cali), 1 backward
      g step   2 forwards of the updated f (x' without graph, x_cali), 1 backward through f
               (input gradient only) into g
    f: K+4 forwards, K+2 backwards; g: 1 and 1. TRADES (--no-mask --no-weighted-ce --attack kl):
    K+3 forwards, K+1 backwards of f, and no g."""
    model.eval()  # attack f as it is evaluated (BN running statistics), as TRADES does
    with autocast():
        delta = attack(model, x, y, args)                                  # Eq. (9)
        mask = None if args.no_mask else g_net(x, delta)                   # Eq. (11)
    # f's step; g frozen: its mask enters detached. --no-mask: M = 1, x_cali = x' (A2).
    x_cali = calibrate(x, delta, 1.0 if mask is None else mask.detach())   # Eq. (10)
    model.train()
    with autocast():
        logits_nat, logits_cali = (z.float() for z in f_pair(x, x_cali))
    loss = calibrated_loss(logits_nat, logits_cali, y, args.beta, not args.no_weighted_ce)  # Eq. (13)
    opt_f.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_f)
    # Per-batch sums for run(). nat and cali accuracy: f as it steps (train mode); adv: the updated f
    # on x' (eval mode), the same as cali under --no-mask.
    out = {"loss": loss.detach() * len(y), "nat_correct": (logits_nat.argmax(1) == y).sum(),
           "cali_correct": (logits_cali.argmax(1) == y).sum()}
    if mask is None:
        scaler.update()
        return {**out, "adv_correct": out["cali_correct"]}
    # g's step against the updated f, frozen: eval mode leaves its BN buffers alone and gives
    # the predictions f is attacked and evaluated with (the release's mode is not recorded in
    # NOTES.md); backward(inputs=...) accumulates gradients into g's parameters only.
    model.eval()
    with autocast():
        with torch.no_grad():
            logits_adv = model(x + delta).float()
        logits_cali = model(calibrate(x, delta, mask)).float()
    loss_g = mask_loss(logits_cali, logits_adv, y, args.beta1)                        # Eq. (14)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward(inputs=list(mask_net.parameters()))
    scaler.step(opt_g)
    scaler.update()
    return {**out, "adv_correct": (logits_adv.argmax(1) == y).sum(), "mask_loss": loss_g.detach() * len(y),
            "mask_mean": mask.detach().float().flatten(1).mean(1).sum()}


def method_stats(mask_optimizer, mask_scheduler):
    """Called once an epoch, right after run() steps f's scheduler: steps g's in lockstep."""
    if mask_scheduler is None:
        return {}
    lr = mask_optimizer.param_groups[0]["lr"]
    mask_scheduler.step()
    return {"mask_lr": lr}


def write_masks_png(model, mask_net, test, args, n=8):
    """DIR/masks.png, the paper's Fig. 2: rows x, x', M and x_cali for n test images, in eval mode
    under the training attack."""
    x, y, _ = next(iter(DataLoader(test, n)))
    x, y = x.to(args.device), y.to(args.device)
    model.eval()
    mask_net.eval()
    delta = attack(model, x, y, args)
    with torch.no_grad():
        mask = mask_net(x, delta)
    torchvision.utils.save_image(torch.cat([x, x + delta, mask, calibrate(x, delta, mask)]),
                                 os.path.join(args.out, "masks.png"), nrow=len(x))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Calibrated adversarial training (ACML 2021), Sec. 4.4.")
    a = p.add_argument
    a("--beta", type=float, help="weight of the KL term (Eq. 13; Sec. 5.1.1: 5 on CIFAR-10, 1 on MNIST)")
    a("--beta1", type=float, help="weight of CE(f(x_cali), y) in g_phi's loss (Eq. 14; Sec. 5.1.1: "
      "0.05, 0.1 or 0.3 on CIFAR-10, default 0.05; 0.3 on MNIST)")
    a("--attack", choices=["pgd", "cw", "kl"], default="cw", help="phi of Eq. (9): CE (CAT_cent), "
      "C&W-inf margin (CAT_cw, Sec. 4.4) or TRADES' KL (Sec. 5.2.3)")
    a("--eps", type=fraction, help="training attack radius (Sec. 5.1.1: 8/255 on CIFAR-10, 0.3 on MNIST)")
    a("--alpha", type=fraction, help="training attack step (Sec. 5.1.1: 2/255 on CIFAR-10, eps/20 on MNIST)")
    a("--steps", type=int, help="training attack steps T (Sec. 5.1.1: 10 on CIFAR-10, 20 on MNIST)")
    a("--kappa", type=float, default=50.0, help="C&W-inf confidence for --attack cw: the attack ascends "
      "min(margin, kappa) (Sec. 5.1.1: 50)")
    a("--no-mask", action="store_true", help="train on x' instead of x_cali, no g_phi (Sec. 5.2.3, A2)")
    a("--no-weighted-ce", action="store_true", help="plain CE on x in Eq. (13) (Sec. 5.2.3; with --no-mask, A1)")
    a("--mask-arch", choices=MASK_NETS, help="g_phi (Sec. 5.1.1, App. C as released): small on MNIST, "
      "resnet18 otherwise")
    a("--optimizer", choices=["sgd", "adam"], help="for f and g_phi (App. C as released: SGD on CIFAR-10, "
      "Adam on MNIST)")
    a("--lr", type=float, help="learning rate of both nets (release: 0.1 with SGD, 1e-3 with Adam)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (release: 0.9)")
    a("--wd", type=float, help="weight decay (release: 5e-4 with SGD; 0 with Adam, none stated)")
    a("--epochs", type=int, help="epochs (release: 140 on CIFAR-10, lr x0.1 at 100 and 120; 40 on MNIST, "
      "x0.1 at 30; milestones scaled to --epochs)")
    a("--batch-size", type=int, help="batch size per process (release: 128 on CIFAR-10, 100 on MNIST)")
    a("--arch", help=f"one of {', '.join(ARCHS)} (Sec. 5.1.1: preact_resnet18 or wrn34_10; MNIST: smallcnn)")
    add_common_args(p)
    args = p.parse_args(argv)
    args.preset = "mnist" if args.dataset in ("mnist", "fake-mnist") else "cifar"
    if args.no_mask and args.mask_arch:
        p.error("--mask-arch: --no-mask trains no mask network")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None and not (k == "mask_arch" and args.no_mask):
            setattr(args, k, v)
    if args.alpha is None:
        args.alpha = args.eps / 20  # MNIST: alpha = eps / T with T = 20 (Sec. 5.1.1)
    check_common_args(p, args)
    if min(args.beta, args.beta1, args.kappa, args.wd) < 0 or args.eps <= 0 or not 0 < args.alpha <= args.eps \
            or args.steps < 1 or args.lr <= 0:
        p.error("need beta, beta1, kappa, wd >= 0, eps > 0, 0 < alpha <= eps, steps >= 1, lr > 0")
    return args


def main(argv=None):
    args = get_args(argv)
    world, rank = setup(args)
    train, val, test = get_data(args)
    model = get_model(args.arch, args.num_classes, args.in_channels, args.image_size).to(args.device)
    mask_net = None if args.no_mask else get_mask_net(args.mask_arch, args.in_channels).to(args.device)
    paper_epochs, paper_milestones = PAPER_SCHEDULE[args.preset]
    milestones = [max(1, round(m * args.epochs / paper_epochs)) for m in paper_milestones]  # never 0

    def optimizer_and_scheduler(net):  # the same optimizer and schedule for f and g_phi (release)
        opt = torch.optim.Adam(net.parameters(), args.lr, weight_decay=args.wd) if args.optimizer == "adam" \
            else torch.optim.SGD(net.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)

    optimizer, scheduler = optimizer_and_scheduler(model)
    f_pair, autocast, scaler = wrap(NatAndCali(model), args, world)  # one GradScaler for both nets
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    mask_optimizer = mask_scheduler = g_net = None
    if mask_net is not None:
        mask_optimizer, mask_scheduler = optimizer_and_scheduler(mask_net)
        g_net = wrap(mask_net, args, world)[0]
        stateful.update(mask_net=mask_net, mask_optimizer=mask_optimizer, mask_scheduler=mask_scheduler)
    step = lambda x, y, idx: train_step(model, mask_net, f_pair, g_net, optimizer, mask_optimizer, scaler,
                                        autocast, x, y, args)
    run(args, world, rank, (train, val, test), stateful, step,
        lambda: method_stats(mask_optimizer, mask_scheduler), lambda: {}, args.eps)
    if is_main() and mask_net is not None:
        write_masks_png(model, mask_net, test, args)
    if world > 1:
        dist.destroy_process_group()


# ================================================================== shared boilerplate
# Identical in train_customized.py and train_calibrated.py (each script stands alone):
# command line, data, evaluation, checkpoints, log, the epoch loop.

# ------------------------------------------------------------------ command line

def fraction(s):
    """A number or a fraction such as 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def add_common_args(p):
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (see --help)\n")  # one line, no usage dump
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}; fake-* are torchvision FakeData, offline")
    a("--data-dir", default="./data", help="dataset root (torchvision downloads CIFAR/SVHN/MNIST here)")
    a("--train-size", type=int, default=None, help="use this many training images (seeded subset)")
    a("--test-size", type=int, default=None, help="use this many test images")
    a("--val-size", type=int, default=0, help="hold out this many training images; best.pt is chosen on them")
    a("--eval-size", type=int, default=1000, help="test points for the per-epoch clean / PGD-10 accuracy")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int, default=0, help="seeds torch, numpy, Python and the data order")
    a("--out", default=None, help="output directory (model.pt, best.pt, log.jsonl)")
    a("--resume", nargs="?", const="", default=None, help="resume OUT/model.pt, or the checkpoint given")
    a("--overwrite", action="store_true", help="start over in an --out that holds a run")
    a("--save-every", type=int, default=0, help="also keep model_epochN.pt every N epochs")
    a("--workers", type=int, default=0, help="DataLoader worker processes")
    a("--amp", nargs="?", const="bf16", default="off", choices=["off", "bf16", "fp16"],
      help="CUDA autocast: --amp is bf16, --amp fp16 adds a GradScaler")
    a("--channels-last", action="store_true", help="NHWC memory format (CUDA tensor cores)")
    a("--compile", action="store_true", help="torch.compile the training forward")


def check_common_args(p, args):
    if args.dataset not in DATASETS:
        p.error(f"unknown dataset {args.dataset!r}; valid: {', '.join(DATASETS)}")
    if args.arch not in ARCHS:
        p.error(f"unknown arch {args.arch!r}; valid: {', '.join(ARCHS)}")
    for k in ("train_size", "test_size", "epochs", "batch_size", "eval_size"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.val_size < 0 or args.workers < 0 or args.save_every < 0:
        p.error("--val-size, --workers and --save-every must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.amp != "off" and not (args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()):
        p.error("--amp needs CUDA (bf16 autocast on the CPU is ~17x slower than fp32)")
    args.out = args.out or os.path.join("runs", os.path.basename(sys.argv[0]).removesuffix(".py"))


# ------------------------------------------------------------------ data

DATASETS = ("cifar10", "cifar100", "mnist", "svhn", "imagefolder", "fake-cifar10", "fake-mnist")


class Indexed(Dataset):
    """Items (x, y, i) with i the position in the training set: the key of per-sample state."""

    def __init__(self, data, positions):
        self.data, self.positions = data, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        x, y = self.data[self.positions[i]]
        return x, y, i


def get_data(args):
    """(train, val, test) as Indexed datasets. CIFAR gets pad-4 crop + flip; imagefolder: one size."""
    V, root, plain = torchvision.datasets, args.data_dir, T.ToTensor()
    aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    fake = lambda shape, n, offset: V.FakeData(n, shape, 10, plain, random_offset=offset)
    build = {
        "cifar10": lambda tr, t: V.CIFAR10(root, tr, t, download=True),
        "cifar100": lambda tr, t: V.CIFAR100(root, tr, t, download=True),
        "svhn": lambda tr, t: V.SVHN(root, "train" if tr else "test", t, download=True),
        "mnist": lambda tr, t: V.MNIST(root, tr, plain, download=True),
        "imagefolder": lambda tr, t: V.ImageFolder(os.path.join(root, "train" if tr else "val"), t),
        "fake-cifar10": lambda tr, t: fake((3, 32, 32), args.train_size or 1000, args.seed) if tr
        else fake((3, 32, 32), args.test_size or 1000, 1_000_000 + args.seed),
        "fake-mnist": lambda tr, t: fake((1, 28, 28), args.train_size or 1000, args.seed) if tr
        else fake((1, 28, 28), args.test_size or 1000, 1_000_000 + args.seed),
    }[args.dataset]
    cifar_like = args.dataset in ("cifar10", "cifar100")  # SVHN digits: no flips
    try:
        train, test = build(True, aug if cifar_like else plain), build(False, plain)
        train_plain = build(True, plain) if cifar_like and args.val_size else train
    except (RuntimeError, OSError) as e:  # torchvision's download error spans lines; the last says why
        why = (str(e).strip().splitlines() or [repr(e)])[-1]
        sys.exit(f"error: cannot load {args.dataset} from {root}: {why}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_train = args.train_size or len(train) - args.val_size
    if args.val_size + n_train > len(train):
        sys.exit(f"error: --val-size + --train-size = {args.val_size + n_train} > {len(train)} training images")
    val = Indexed(train_plain, perm[:args.val_size])
    train = Indexed(train, perm[args.val_size:args.val_size + n_train])
    test = Indexed(test, list(range(min(args.test_size or len(test), len(test)))))
    x, _, _ = test[0]
    args.num_classes = 100 if args.dataset == "cifar100" else len(getattr(test.data, "classes", range(10)))
    args.in_channels, args.image_size = x.shape[0], x.shape[-1]
    return train, val, test


def epoch_loader(data, args, epoch, world, rank, skip_batches=0):
    """This epoch's shuffled shard, a pure function of (seed, epoch), so that a resumed run sees
    the same batches; `skip_batches` drops those an interrupted epoch already trained on."""
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    order = list(sampler)[skip_batches * args.batch_size:]
    return DataLoader(data, args.batch_size, sampler=order, num_workers=args.workers,
                      pin_memory=args.device.startswith("cuda"),
                      generator=torch.Generator().manual_seed(args.seed + epoch))


# ------------------------------------------------------------------ evaluation, checkpoints, log

def accuracy(model, data, eps, args, n):
    """Clean and PGD-10 accuracy (eval mode, CE, step eps/4, random start) on the first n points:
    a cheap progress signal; the papers' evaluation is evaluate.py."""
    model.eval()
    clean = robust = 0
    for x, y, _ in DataLoader(data, args.batch_size, sampler=range(min(n, len(data)))):
        x, y = x.to(args.device), y.to(args.device)
        x_adv = attacks.pgd(model, x, y, eps, eps / 4, 10)
        with torch.no_grad():
            clean += (model(x).argmax(1) == y).sum().item()
            robust += (model(x_adv).argmax(1) == y).sum().item()
    model.train()
    return clean / min(n, len(data)), robust / min(n, len(data))


def all_gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"][0].numpy().astype(np.uint32), *s["numpy"][1:]))


def save_checkpoint(state, path):
    """Atomic: a temporary file in the same directory, fsync, then rename over the old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """weights_only=True: a checkpoint is data; a pickle that would run code is refused."""
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning would break the one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        sys.exit(f"error: {path} is not a loadable checkpoint: not weights-only data (refused, nothing run)")
    except Exception as e:  # a directory, a truncated or foreign file
        sys.exit(f"error: {path} is not a loadable checkpoint ({type(e).__name__})")


# Arguments that may change when a run is resumed; any other difference is refused.
RUNTIME_ARGS = {"resume", "overwrite", "device", "workers", "out", "save_every", "compile",
                "channels_last", "amp", "eval_size"}


def open_run(args, stateful):
    """Start, or resume, the run in args.out. Returns (checkpoint or None, log file)."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.pt")
    if args.resume is None and os.path.exists(path) and not args.overwrite:
        sys.exit(f"error: {args.out} holds a run; --resume to continue it, --overwrite to start over")
    ck = None
    if args.resume is not None:
        src = args.resume or path
        if not os.path.exists(src):
            sys.exit(f"error: --resume: no checkpoint at {src}")
        ck = load_checkpoint(src)
        diff = sorted(k for k, v in ck.get("args", {}).items()
                      if k not in RUNTIME_ARGS and getattr(args, k, v) != v)
        if diff:
            sys.exit(f"error: {src} was trained with other settings: {', '.join(diff)}")
        for k, obj in stateful.items():
            obj.load_state_dict(ck[k])
    log_path = os.path.join(args.out, "log.jsonl")
    lines = []
    if ck is not None and os.path.exists(log_path):  # drop epochs the checkpoint does not hold
        lines = [l for l in open(log_path) if json.loads(l)["epoch"] <= ck["epoch"]]
    if is_main():
        with open(log_path, "w") as f:
            f.writelines(lines)
    return ck, log_path


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def setup(args):
    """Resolve the device, join the process group under torchrun, seed. Returns (world, rank)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(args.device)
    seed = args.seed + rank  # each rank draws its own random starts and Dirichlet noise
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    return world, rank


def wrap(model, args, world):
    """(net, autocast, scaler): what the training forward runs through (DDP under torchrun,
    torch.compile if asked), the --amp autocast context and its GradScaler (fp16 only)."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(model) if world > 1 else model
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    autocast = lambda: torch.autocast(args.device.split(":")[0], dtype, enabled=args.amp != "off")
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.amp == "fp16")
    return torch.compile(net) if args.compile else net, autocast, scaler


def run(args, world, rank, data, stateful, step, stats, extra, eval_eps):
    """The epoch loop both trainers share: resume, train, evaluate, log, checkpoint.
    step(x, y, idx) trains on one batch and returns per-batch sums; stats() and extra() give
    the method's log fields and checkpoint tensors."""
    train_set, val_set, test_set = data
    ck, log_path = open_run(args, stateful)
    path, model = os.path.join(args.out, "model.pt"), stateful["model"]
    epoch, skip, best, sums, n = 0, 0, None, {}, 0
    if ck is not None:
        epoch, skip, best, n = ck["epoch"], ck["batch"], ck["best"], ck["n"]
        sums = {k: v.to(args.device) for k, v in ck["sums"].items()}
        for k, v in extra().items():
            v.copy_(ck[k])
        if world == 1:  # exact continuation; under torchrun each rank re-seeds from (seed, rank, epoch)
            set_rng_state(ck["rng"])
        else:
            torch.manual_seed(args.seed + rank + 1000 * epoch)
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))

    def save(p, epoch, batch):
        if is_main():
            save_checkpoint({"arch": args.arch, "num_classes": args.num_classes, "in_channels": args.in_channels,
                             "image_size": args.image_size, "dataset": args.dataset, "method": METHOD,
                             "args": vars(args), "epoch": epoch, "batch": batch, "best": best, "sums": sums,
                             "n": n, "rng": rng_state(), **{k: v.state_dict() for k, v in stateful.items()},
                             **{k: v.cpu() for k, v in extra().items()}}, p)

    while epoch < args.epochs:
        t0 = time.time()
        for b, (x, y, idx) in enumerate(epoch_loader(train_set, args, epoch, world, rank, skip), skip):
            x, y, idx = x.to(args.device, non_blocking=True), y.to(args.device), idx.to(args.device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for k, v in step(x, y, idx).items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n += len(y)
            flags = torch.tensor([len(interrupted), not torch.isfinite(sums["loss"])], device=args.device)
            if world > 1:
                dist.all_reduce(flags, dist.ReduceOp.MAX)
            if flags[1]:
                sys.exit(f"error: non-finite loss at epoch {epoch + 1}, batch {b + 1}; "
                         f"{path} keeps the last good state (epoch {epoch})")
            if flags[0]:
                save(path, epoch, b + 1)
                sys.exit(f"interrupted at epoch {epoch + 1}, batch {b + 1}; saved {path}, --resume continues")
        seconds = time.time() - t0
        if world > 1:  # log the whole epoch, every rank's batches
            for v in sums.values():
                dist.all_reduce(v)
            n *= world
        rec = {"epoch": epoch + 1, "lr": stateful["optimizer"].param_groups[0]["lr"]}
        stateful["scheduler"].step()
        rec.update({f"train_{k.removesuffix('_correct')}_acc" if k.endswith("_correct") else f"train_{k}":
                    v.item() / n for k, v in sums.items()})  # step() returns per-batch sums
        if is_main():
            rec["train_clean_acc"], rec["train_pgd_acc"] = accuracy(model, train_set, eval_eps, args, args.eval_size)
            rec["test_clean_acc"], rec["test_pgd_acc"] = accuracy(model, test_set, eval_eps, args, args.eval_size)
            if len(val_set):
                rec["val_clean_acc"], rec["val_pgd_acc"] = accuracy(model, val_set, eval_eps, args, len(val_set))
        rec.update(stats())
        rec.update({"seconds": seconds, "images_per_s": n / seconds})
        epoch, skip, sums, n = epoch + 1, 0, {}, 0
        if is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)
            if len(val_set) and (best is None or [rec["val_pgd_acc"], rec["val_clean_acc"]] > best):
                best = [rec["val_pgd_acc"], rec["val_clean_acc"]]  # PGD accuracy first, clean breaks ties
                save(os.path.join(args.out, "best.pt"), epoch, 0)
            save(path, epoch, 0)
            if args.save_every and epoch % args.save_every == 0:
                save(os.path.join(args.out, f"model_epoch{epoch}.pt"), epoch, 0)


if __name__ == "__main__":
    main()
