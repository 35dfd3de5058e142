"""Customized adversarial training (Cheng et al., arXiv 2002.06789), Algorithm 1 as written.

Each training sample i carries its own radius eps_i (Sec. 3.1) and a label smoothed in proportion
to it, y~_i = (1 - c eps_i) onehot(y_i) + c eps_i Dirichlet(beta) (Sec. 3.2, Eq. 4); the loss is
CE on y~ or the mixed CE + C&W margin loss (Eq. 6).

    python train_customized.py                                        # paper values, WRN-34-10
    python train_customized.py --dataset fake-mnist --arch smallcnn --eps-max 0.1 --epochs 2
Table 6 ablations: PGD-AT = --fixed-eps --c 0 --loss ce, Adv+LS = --fixed-eps, Adp-Adv = --c 0.
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
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms as T

import attacks
from models import ARCHS, get_model

METHOD = "customized"
PAPER_EPOCHS, PAPER_MILESTONES = 200, (80, 140, 180)  # Sec. 5, "Implementation details"


# ------------------------------------------------------------------ the method (Sec. 3, Alg. 1)

def adaptive_labels(y, eps, c, beta, num_classes):
    """Eq. (4): y~_i = (1 - c eps_i) onehot(y_i) + c eps_i Dirichlet(beta), one draw per sample."""
    onehot = F.one_hot(y, num_classes).float()
    if c == 0:  # no label adaptation (Table 6 "Adp-Adv"); skip the Dirichlet draw
        return onehot
    concentration = torch.full((len(y), num_classes), float(beta), device=y.device)
    w = (c * eps).float()[:, None]
    return (1 - w) * onehot + w * torch.distributions.Dirichlet(concentration).sample()


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


def train_step(model, net, optimizer, scaler, autocast, x, y, idx, eps_table, args):
    """One batch of Algorithm 1. `model` is the bare network (attacked in eval mode); `net` is
    what the training forward runs through (the same model, or its DDP / compiled wrapper).
    Passes: `steps` forward+backward for the attack, one forward+backward for the update; the
    success test reuses the update's logits, so the method costs what PGD-AT costs."""
    K = args.num_classes
    eps = torch.full_like(y, args.eps_max, dtype=torch.float) if args.fixed_eps else eps_table[idx]
    radius = eps if args.fixed_eps else eps + args.eta      # Alg. 1: eps_i <- eps_i + eta
    per_sample = (lambda z, ys, t: mixed_loss(z, ys, t, args.kappa)) if args.loss == "mix" \
        else (lambda z, ys, t: soft_ce(z, ys))
    y_soft = adaptive_labels(y, eps, args.c, args.beta, K)  # Eq. (4) with the current eps_i
    model.eval()  # attack the model as it is evaluated (BN running statistics), as TRADES does
    with autocast():
        x_adv = attacks.pgd(model, x, y, radius, args.alpha * radius, args.steps,
                            loss=lambda z, t: per_sample(z.float(), y_soft, t))
    model.train()
    with autocast():
        logits = net(x_adv).float()
    new_eps = eps
    if not args.fixed_eps:  # Alg. 1: f(x_i + delta_i) != y_i -> eps_i <- 0; then cap at eps_max
        new_eps = update_epsilons(eps, logits.argmax(1) != y, args.eta, args.eps_max)
        if dist.is_initialized():  # every rank holds the whole table: apply every rank's updates
            eps_table[all_gather(idx)] = all_gather(new_eps)
        else:
            eps_table[idx] = new_eps
    # Alg. 1 recomputes y~ with the updated eps_i (its line prints (1 - c eps_i) before the
    # Dirichlet term, a typo for Eq. (4)'s c eps_i), then takes one SGD step on l(f(x'), y~).
    y_soft = adaptive_labels(y, new_eps, args.c, args.beta, K)
    loss = per_sample(logits, y_soft, y).mean()             # Eq. (5) / (6), batch mean
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach() * len(y), "adv_correct": (logits.argmax(1) == y).sum()}


def method_stats(eps_table, args):
    """The eps table at the end of an epoch: mean, quantiles and share at eps_max."""
    if args.fixed_eps:
        return {}
    q = torch.quantile(eps_table.float().cpu(), torch.tensor([0.1, 0.5, 0.9]))
    at_max = (eps_table >= args.eps_max - 1e-9).float().mean().item()
    return {"eps_mean": eps_table.mean().item(), "eps_q10": q[0].item(), "eps_q50": q[1].item(),
            "eps_q90": q[2].item(), "eps_at_max": at_max}


def write_eps_histogram(eps_table, args, bins=40, height=120):
    """DIR/eps_hist.png: histogram of the final per-sample eps over [0, eps_max], one bar a bin."""
    counts = torch.histc(eps_table.float().cpu(), bins, 0, args.eps_max)
    bars = (counts / counts.max().clamp(min=1) * height).round().long()
    img = torch.full((1, height, bins * 6), 255, dtype=torch.uint8)
    for i, h in enumerate(bars.tolist()):
        img[0, height - h:, i * 6:i * 6 + 5] = 0
    torchvision.io.write_png(img, os.path.join(args.out, "eps_hist.png"))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Customized adversarial training (arXiv 2002.06789), Alg. 1.")
    a = p.add_argument
    a("--eta", type=fraction, default=0.005, help="eps_i increment per unfooled visit (Sec. 3.1; Sec. 5: 0.005)")
    a("--eps-max", type=fraction, default=8 / 255, help="cap on eps_i (Sec. 5: 8/255)")
    a("--c", type=float, default=10.0, help="label-smoothing weight, alpha = c eps_i (Eq. 4; Sec. 5: 10); "
      "0 = no label adaptation")
    a("--beta", type=float, default=1.0, help="Dirichlet concentration (Eq. 4; Sec. 5: 1 = uniform on the simplex)")
    a("--kappa", type=float, default=10.0, help="floor -kappa of the C&W margin in the mixed loss (Eq. 6; Sec. 5: 10)")
    a("--loss", choices=["ce", "mix"], default="mix", help="CE on y~ (Eq. 5) or CE + C&W margin (Eq. 6, Tables 3-4)")
    a("--steps", type=int, default=10, help="PGD steps in training (Sec. 5: 10)")
    a("--alpha", type=float, default=0.25, help="PGD step as a fraction of each sample's radius; the paper gives none: "
      "0.25 x 10 steps = 2.5 radii (Madry et al.'s rule), 2/255 at radius 8/255")
    a("--fixed-eps", action="store_true", help="every sample at eps_max, no eps adaptation "
      "(Table 6 'Adv train', 'Adv+LS')")
    a("--lr", type=float, default=None, help="SGD learning rate (Sec. 5: 0.1 for WRN, 0.01 for VGG-16; "
      "default by --arch)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Sec. 5: 0.9)")
    a("--wd", type=float, default=5e-4, help="weight decay (Sec. 5: 5e-4)")
    a("--epochs", type=int, default=PAPER_EPOCHS, help="epochs (Sec. 5: 200; lr x0.1 at 80/140/180, scaled to --epochs)")
    a("--batch-size", type=int, default=128, help="batch size per process (128, as Madry et al. and TRADES)")
    a("--arch", default="wrn34_10", help=f"one of {', '.join(ARCHS)} (Table 4: WRN-34-10; Table 3: VGG-16)")
    add_common_args(p)
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.eta < 0 or args.eps_max <= 0 or args.beta <= 0 or args.c < 0 or args.steps < 1:
        p.error("need eta >= 0, eps-max > 0, beta > 0, c >= 0, steps >= 1")
    if args.c * args.eps_max > 1:
        p.error(f"c * eps-max = {args.c * args.eps_max:.3g} > 1: Eq. (4)'s label would have negative mass")
    if args.lr is None:
        args.lr = 0.01 if args.arch == "vgg16" else 0.1
    return args


def main(argv=None):
    args = get_args(argv)
    world, rank = setup(args)
    train, val, test = get_data(args)
    model = get_model(args.arch, args.num_classes, args.in_channels, args.image_size).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    # Scaled to --epochs; never 0, where MultiStepLR would decay before the first epoch.
    milestones = [max(1, round(m * args.epochs / PAPER_EPOCHS)) for m in PAPER_MILESTONES]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
    eps_table = torch.zeros(len(train), device=args.device)  # Sec. 3.1: every eps_i starts at 0
    net, autocast, scaler = wrap(model, args, world)
    step = lambda x, y, idx: train_step(model, net, optimizer, scaler, autocast, x, y, idx, eps_table, args)
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    run(args, world, rank, (train, val, test), stateful, step, lambda: method_stats(eps_table, args),
        lambda: {"eps": eps_table}, args.eps_max)
    if is_main() and not args.fixed_eps:
        write_eps_histogram(eps_table, args)
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
