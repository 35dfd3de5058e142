"""Evaluate a checkpoint of train_customized.py or train_calibrated.py under either paper's protocol.

    python evaluate.py --ckpt runs/x/model.pt                        # the protocol of its method
    python evaluate.py --ckpt runs/x/model.pt --protocol customized --full
    python evaluate.py --ckpt runs/x/model.pt --transfer-from runs/natural/model.pt   # Table 5

The model is rebuilt from the checkpoint's arch and dataset and attacked in eval mode on the test
split; every eps is in pixel units. Attacks, by the names --attacks takes, in run order:

  calibrated  the calibrated paper, Sec. 5.1.1: pgd20, pgd100 (CE, step 0.003), cw (C&W-inf, eps
              0.031, step 0.003, 30 steps, kappa 50), fgsm, none with a random start (Sec. 5.1.1,
              footnote 2), [apgd-ce, apgd-t], square (5000 queries) at 8/255; on 1-channel
              (MNIST-like) data eps 0.3 and step 0.015 for all.
  customized  the customized paper, Sec. 5, Table 3: pgd100, cw100 (kappa 50), --full: pgd1000x20,
              cw1000x20 (20 restarts), all step eps/5 with random starts; deepfool, robust where its
              minimal L-inf perturbation exceeds eps, last as the costliest; [apgd-ce, apgd-t,
              square]. 8/255 (MNIST-like: 0.3).
  [added]     not in the paper's protocol, marked * in the table, dropped by --paper-only: apgd-ce
              and apgd-t (Croce & Hein 2020, AutoAttack's settings: 100 steps, 1 restart, APGD-T on
              the 9 most likely other classes), so that "any attack" is a worst case to quote:
              fixed-step PGD can be several points too weak; in the customized protocol also square
              (5000 queries, as the calibrated paper's), the black box that sees gradient masking.
  default     the protocol of the paper whose method trained the checkpoint (its "method");
              calibrated where it records none. Both: sanity, and with --autoattack (or autoattack
              in --attacks) autoattack, last: AutoAttack standard (Croce & Hein 2020: APGD-CE,
              APGD-T, FAB-T, Square 5000; 10 classes or more) from the optional pyautoattack (pip
              install pyautoattack), else fra31's autoattack. It attacks every naturally correct point in
              both modes: its column is AutoAttack's own robust accuracy, the number papers quote,
              and its JSON entry counts the points it breaks that every earlier attack missed
              ("newly_broken") and those an earlier attack broke that it leaves correct
              ("missed"): the per-sample agreement of AutoAttack with our chain.

Worst case per sample: each attack runs only on the points still correct after natural and every
earlier attack, so a column is the accuracy under that attack and those to its left, and the last,
"any attack", is what attacking every point with every attack gives, at a fraction of the cost
(exactly, for attacks without randomness; random starts and square's search draw per batch).
--attack-all attacks every naturally correct point with every attack: each column is then that
attack alone, as in the papers' tables.

Gradient-masking flags (Athalye et al. 2018), in shares of the examples that read the same with or
without --attack-all ("broke": made wrong a point that every earlier attack left correct):
  square_below_whitebox  square broke over 1% that every white-box attack missed
  fgsm_below_pgd         fgsm broke over 1% that every iterative attack missed
  more_steps_no_gain     pgd100 broke none that pgd20 missed (pgd1000x20: pgd100); on few
                         examples a pgd20 that has converged raises it too
  large_eps_not_zero     sanity (PGD at eps 0.5, margin loss, 20 steps of 0.05) leaves over 1% correct

An adversarial example outside its attack's L-inf eps-ball or the [0, 1] box is the attack's bug:
the run exits with one line naming the attack.

Output: a table on stdout, progress with images/s on stderr (and AutoAttack's warnings and accuracy
after each of its attacks), and a JSON file with every attack's settings (autoattack's: its package
and version), the checkpoint's path, sha256, arch and training args, n, seed and device.
"""
import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from fractions import Fraction

import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

import attacks
import models

CK_KEYS = ("model", "arch", "num_classes", "in_channels", "image_size", "dataset")
FAKE_SHAPES = {"fake-mnist": (1, 28, 28), "fake-cifar10": (3, 32, 32)}
WHITE_BOX = ("pgd20", "pgd100", "cw", "fgsm", "cw100", "pgd1000x20", "cw1000x20", "deepfool", "apgd-ce", "apgd-t")


def fail(msg):
    """Bad input or a result refused: one line on stderr and exit code 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def fraction(s):
    """A number or a fraction such as 8/255."""
    try:
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_model(path):
    """(classifier in eval mode, checkpoint dict); a bad checkpoint exits with one line."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # e.g. on a foreign pickle protocol: the error says enough
            warnings.simplefilter("ignore")
            # weights_only: a checkpoint is data; a pickle that would run code is refused, not run.
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        code = [line for line in str(e).splitlines() if "GLOBAL" in line]  # torch names the callable
        if code:
            fail(f"{path}: refused, the pickle carries code (weights_only=True): {code[0].strip()[:200]}")
        fail(f"{path} is not a readable checkpoint (torch.load, weights_only=True: {type(e).__name__})")
    if not isinstance(ck, dict) or not all(k in ck for k in CK_KEYS):
        fail(f"{path} is not a checkpoint of this project: it needs the keys {', '.join(CK_KEYS)}")
    if ck["arch"] not in models.ARCHS:
        fail(f"{path}: unknown arch {ck['arch']!r}; valid: {', '.join(models.ARCHS)}")
    try:
        model = models.get_model(ck["arch"], ck["num_classes"], ck["in_channels"], ck["image_size"])
        model.load_state_dict(ck["model"])
    except Exception as e:
        fail(f"{path}: the state dict does not fit arch {ck['arch']}: {' '.join(str(e).split())[:300]}")
    broken = next((k for k, v in ck["model"].items() if v.is_floating_point() and not v.isfinite().all()), None)
    if broken:  # a diverged run: its NaN logits would argmax to class 0 and read as a plausible 10 %
        fail(f"{path}: non-finite weights (NaN or inf) in {broken}; refused")
    return model.eval(), ck


class FastForward(torch.nn.Module):
    """--amp / --channels-last: the same model, its forward under bf16 autocast and/or in NHWC
    layout. Logits come back in fp32, so each attack's loss, input gradient and sign step stay fp32
    (fp16 is not offered: without loss scaling its input gradients underflow, and the attacks weaken)."""

    def __init__(self, model, amp, channels_last):
        super().__init__()
        self.model, self.amp, self.channels_last = model, amp, channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp):
            return self.model(x).float()


# Under --amp these run on the fp32 forward all the same: their step sizes and search follow loss
# comparisons, which bf16's rounding blurs (APGD-CE on 1,000 MNIST test images: 71.0 % in fp32, 80.0 %
# with a bf16 forward on calibrated_cw(0.3); benchmarks/cpu_speed.py --strength). PGD, C&W, FGSM: equal.
FP32_KINDS = ("apgd", "square", "autoattack")


def accelerate(model, args, amp=None):
    """The model as the attacks see it: unchanged by default; --amp (unless amp=False), --channels-last, --compile."""
    amp = args.amp if amp is None else amp
    if amp or args.channels_last:
        model = FastForward(model, amp, args.channels_last).eval()
    return torch.compile(model, dynamic=True) if args.compile else model  # batches shrink: dynamic


def load_test_set(ck, data_dir):
    """The test split the training scripts evaluate on, ToTensor only (models take [0, 1])."""
    train_args, name, V, to_tensor = ck.get("args") or {}, ck["dataset"], torchvision.datasets, T.ToTensor()
    if name in FAKE_SHAPES:  # built exactly as the training scripts build their fake test sets
        return V.FakeData(train_args.get("test_size") or 1000, FAKE_SHAPES[name], 10, to_tensor,
                          random_offset=1_000_000 + train_args.get("seed", 0))
    build = {"cifar10": lambda: V.CIFAR10(data_dir, False, to_tensor),
             "cifar100": lambda: V.CIFAR100(data_dir, False, to_tensor),
             "svhn": lambda: V.SVHN(data_dir, "test", to_tensor),
             "mnist": lambda: V.MNIST(data_dir, False, to_tensor),
             "imagefolder": lambda: V.ImageFolder(os.path.join(data_dir, "val"), to_tensor)}
    if name not in build:
        fail(f"unknown dataset {name!r} in the checkpoint; valid: {', '.join([*build, *FAKE_SHAPES])}")
    try:
        data = build[name]()
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted"
        fail(f"cannot load the {name} test set from {data_dir}: {str(e).splitlines()[0]}")
    if data[0][0].shape[0] != ck["in_channels"]:
        fail(f"the {name} test set has {data[0][0].shape[0]} channels, the model {ck['in_channels']}")
    return data


def autoattack_package():
    """(module, version) of the AutoAttack installed, PyPI's pyautoattack first; None if neither."""
    for name in ("pyautoattack", "autoattack"):
        if importlib.util.find_spec(name):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # on sys.path, not installed
                return name, importlib.metadata.version(name)
            return name, None


def show_autoattack_log():
    """pyautoattack logs to the "auto-attack" logger: its warnings (e.g. Square beating APGD) and its
    accuracy after each attack (DEBUG, per batch) to stderr, its other DEBUG lines nowhere."""
    log = logging.getLogger("auto-attack")
    if not log.handlers:  # main() in process more than once: one handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        handler.addFilter(lambda r: r.levelno >= logging.WARNING
                          or r.getMessage().startswith("robust accuracy after"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False  # not twice where the root logger has a handler


def protocol_attacks(args, mnist_like):
    """(attacks in run order, sanity check or None), each a dict of its exact settings."""
    def pgd(name, eps, alpha, steps, loss="ce", random_start=True, restarts=1, kappa=None):
        return dict(name=name, kind="pgd", eps=eps, alpha=alpha, steps=steps, loss=loss, kappa=kappa,
                    random_start=random_start, restarts=restarts)
    eps = args.eps if args.eps is not None else 0.3 if mnist_like else 8 / 255
    # Added, not the papers': AutoAttack's APGD-CE and APGD-T (100 steps, 1 restart, 9 targets).
    added = [] if args.paper_only else [
        dict(name="apgd-ce", kind="apgd", added=True, eps=eps, steps=100, loss="ce", targeted=False, n_targets=0,
             restarts=1, rho=0.75),
        dict(name="apgd-t", kind="apgd", added=True, eps=eps, steps=100, loss="dlr", targeted=True, n_targets=9,
             restarts=1, rho=0.75)]
    if args.protocol == "calibrated":  # the calibrated paper, Sec. 5.1.1 and its footnote 2: no random start
        alpha = 0.015 if mnist_like else 0.003
        cw_eps = args.eps if args.eps is not None else 0.3 if mnist_like else 0.031
        specs = [pgd("pgd20", eps, alpha, 20, random_start=False), pgd("pgd100", eps, alpha, 100, random_start=False),
                 pgd("cw", cw_eps, alpha, 30, "cw", random_start=False, kappa=50.0),
                 dict(name="fgsm", kind="fgsm", eps=eps), *added,  # the white-box worst case before Square
                 dict(name="square", kind="square", eps=eps, n_queries=args.square_queries, p_init=0.8)]
    else:  # the customized paper, Sec. 5: step eps/5; it gives no kappa, so the calibrated paper's 50
        specs = [pgd("pgd100", eps, eps / 5, 100), pgd("cw100", eps, eps / 5, 100, "cw", kappa=50.0)]
        if args.full:
            specs += [pgd("pgd1000x20", eps, eps / 5, 1000, restarts=20),
                      pgd("cw1000x20", eps, eps / 5, 1000, "cw", restarts=20, kappa=50.0)]
        specs += [dict(name="deepfool", kind="deepfool", eps=eps, steps=50, overshoot=0.02), *added]
        specs += [] if args.paper_only else [dict(name="square", kind="square", added=True, eps=eps,
                                                  n_queries=args.square_queries, p_init=0.8)]
    if args.autoattack:  # installed: main() checked
        package, version = autoattack_package() or (None, None)
        specs.append(dict(name="autoattack", kind="autoattack", eps=eps, version="standard", package=package,
                          package_version=version))
    for s in specs:  # --steps / --restarts for quick or stronger runs
        if s["kind"] in ("pgd", "apgd") and args.steps:
            s["steps"] = args.steps
        if s["kind"] == "pgd" and args.restarts:
            s["restarts"], s["random_start"] = args.restarts, s["random_start"] or args.restarts > 1
        if s["kind"] == "apgd" and args.restarts:
            s["restarts"] = args.restarts
    # At eps 0.5 an honest model falls to ~0; margin loss, as CE saturates; 2 eps of travel in all.
    steps = args.steps or 20
    specs.append(pgd("sanity", 0.5, 1.0 / steps, steps, "cw", random_start=False))
    valid = [s["name"] for s in specs]
    # --autoattack adds autoattack to an --attacks subset
    wanted = (args.attacks.split(",") if args.attacks else valid) + ["autoattack"] * args.autoattack
    if set(wanted) - set(valid):
        fail(f"--attacks: unknown {','.join(sorted(set(wanted) - set(valid)))}; "
             f"valid with --protocol {args.protocol}: {','.join(valid)}")
    specs = [s for s in specs if s["name"] in wanted]
    return [s for s in specs if s["name"] != "sanity"], next((s for s in specs if s["name"] == "sanity"), None)


def survives(spec, source, model, x, y, seed):
    """Per sample: is `model` still correct on spec's adversarial example crafted on `source`
    (the model itself, or the --transfer-from model)?"""
    kind = spec["kind"]
    if kind == "natural":
        x_adv = x
    elif kind == "pgd":
        x_adv = attacks.pgd(source, x, y, spec["eps"], spec["alpha"], spec["steps"], spec["loss"],
                            spec["random_start"], spec["restarts"],
                            float("inf") if spec["kappa"] is None else spec["kappa"])
    elif kind == "fgsm":
        x_adv = attacks.fgsm(source, x, y, spec["eps"])
    elif kind == "apgd":
        x_adv = attacks.apgd(source, x, y, spec["eps"], spec["steps"], spec["loss"], spec["targeted"],
                             spec["n_targets"], spec["restarts"], spec["rho"], seed)
    elif kind == "square":
        x_adv = attacks.square(source, x, y, spec["eps"], spec["n_queries"], spec["p_init"], seed)
    elif kind == "deepfool":  # one backward per class (retain_graph): the eager model, as
        # --compile's backward graphs free their buffers after one backward
        x_adv = attacks.deepfool(getattr(source, "_orig_mod", source), x, y, spec["steps"], spec["overshoot"])
        if source is model:  # Table 3: robust if the minimal perturbation exceeds eps, or none flips it
            with torch.no_grad():
                return (model(x_adv).argmax(1) == y) | ((x_adv - x).flatten(1).abs().amax(1) > spec["eps"])
        x_adv = x + (x_adv - x).clamp(-spec["eps"], spec["eps"])  # transfer: its direction, cut to eps
    elif spec["package"] == "pyautoattack":  # its log: show_autoattack_log()
        from pyautoattack import AutoAttack
        x_adv, _ = AutoAttack(source, eps=spec["eps"], norm="Linf", version="standard", device=x.device,
                              seed=seed).run_standard_evaluation(x, y, batch_size=len(x))
    else:  # fra31's autoattack prints its warnings: to stderr, off the table's stdout
        from autoattack import AutoAttack
        with contextlib.redirect_stdout(sys.stderr):
            x_adv = AutoAttack(source, norm="Linf", eps=spec["eps"], version="standard", device=x.device,
                               seed=seed, verbose=False).run_standard_evaluation(x, y, bs=len(x))
    if kind != "natural":
        check_threat_model(spec, x, x_adv)
    with torch.no_grad():
        logits = model(x_adv)
    if kind == "natural" and not logits.isfinite().all():  # once per batch, natural pass only: before any attack
        fail("non-finite logits (NaN or inf) on the clean test images; refused")
    return logits.argmax(1) == y


def check_threat_model(spec, x, x_adv, tol=1e-6):
    """An adversarial example outside the eps-ball around x or the [0, 1] box is an attack's bug:
    refused, not counted (nor projected, which would hide it); NaN too (`not over <= tol`)."""
    over = max((x_adv - x).abs().max().item() - spec["eps"], -x_adv.min().item(), x_adv.max().item() - 1)
    if not over <= tol:
        fail(f"{spec['name']}: adversarial examples outside the L-inf ball of eps {spec['eps']:g} or the "
             f"[0, 1] box, by up to {over:.3g}; not counted")


def run_attack(spec, source, model, data, points, args):
    """survives() for each example index in `points`, in batches; progress lines with images/s."""
    torch.manual_seed(args.seed)  # an attack's random starts do not depend on the attacks before it
    out, t0, last, shown = [torch.zeros(0, dtype=torch.bool)], time.time(), time.time(), None
    progress = lambda: print(f"{spec['name']:>10}: {sum(map(len, out))}/{len(points)} points, "
                             f"{sum(map(len, out)) / max(time.time() - t0, 1e-9):.1f} images/s",
                             file=sys.stderr, flush=True) or sum(map(len, out))
    loader = DataLoader(Subset(data, points.tolist()), args.batch_size, num_workers=args.workers,
                        pin_memory=args.device == "cuda")
    for b, (x, y) in enumerate(loader):
        out.append(survives(spec, source, model, x.to(args.device), y.to(args.device), args.seed + b).cpu())
        if time.time() - last > 30:  # a long attack is not silent
            shown, last = progress(), time.time()
    if shown != len(points):  # the last line, once
        progress()
    return torch.cat(out), time.time() - t0


def evaluate(model, data, specs, sanity, args, source=None, fp32=None):
    """(natural mask, any-attack mask, one result per attack, sanity result or None). Each attack
    attacks the points that survived every earlier one, or with --attack-all every natural-correct one.
    fp32: (model, source) without --amp's autocast, for the attacks of FP32_KINDS."""
    natural, _ = run_attack({"name": "natural", "kind": "natural"}, model, model, data, torch.arange(len(data)), args)
    robust, results = natural.clone(), []
    for spec in specs:
        alone = args.attack_all or spec["kind"] == "autoattack"  # AutoAttack: its own number, always
        points = (natural if alone else robust).nonzero().squeeze(1)
        on = fp32 if fp32 and spec["kind"] in FP32_KINDS else (model, source)
        ok, seconds = run_attack(spec, on[1] or on[0], on[0], data, points, args)
        mine = torch.zeros(len(data), dtype=torch.bool)
        mine[points] = ok
        results.append({"name": spec["name"], "settings": spec, "accuracy": mine.float().mean().item(),
                        "attacked": len(points), "correct_before": int(robust.sum()),
                        "newly_broken": int((robust & ~mine).sum()),  # the same in both modes
                        # an earlier attack broke it, this one leaves it correct (None: not attacked)
                        "missed": int((natural & ~robust & mine).sum()) if alone else None,
                        "forward": "bf16" if args.amp and on is not fp32 else "fp32",
                        "seconds": seconds, "images_per_s": len(points) / max(seconds, 1e-9)})
        robust &= mine
    if sanity:  # white-box on the evaluated model, every naturally correct point
        ok, seconds = run_attack(sanity, model, model, data, natural.nonzero().squeeze(1), args)
        sanity = {"settings": sanity, "accuracy": ok.sum().item() / len(data), "seconds": seconds}
    return natural, robust, results, sanity


def masking_flags(results, sanity, n):
    """The gradient-masking flags of the module docstring: {flag: {"raised": bool, or None where
    the attacks it needs did not run, "detail": str}}."""
    names, by = [r["name"] for r in results], {r["name"]: r for r in results}
    # The share of n that `name` broke among the survivors of the attacks before it; None: not run.
    broke = lambda name, earlier: by[name]["newly_broken"] / n \
        if name in by and set(earlier) & set(names[:names.index(name)]) else None
    flag = lambda share, raise_if, detail: {"raised": None, "detail": "not run"} if share is None \
        else {"raised": raise_if(share), "detail": detail.format(share)}
    short, long = next(((a, b) for a, b in (("pgd100", "pgd1000x20"), ("pgd20", "pgd100")) if a in by and b in by
                        and by[b]["settings"]["steps"] > by[a]["settings"]["steps"]), (None, None))
    return {"square_below_whitebox": flag(broke("square", WHITE_BOX), lambda s: s > 0.01,
                                          "square broke {:.1%} of the examples every white-box attack missed"),
            "fgsm_below_pgd": flag(broke("fgsm", ("pgd20", "pgd100", "cw")), lambda s: s > 0.01,
                                   "fgsm broke {:.1%} of the examples every iterative attack missed"),
            "more_steps_no_gain": flag(broke(long, [short]), lambda s: s == 0 and by[long]["correct_before"] > 0,
                                       f"{long} broke {{:.1%}} of the examples {','.join(names[:names.index(long)])} "
                                       "missed" if long else ""),
            "large_eps_not_zero": flag(sanity and sanity["accuracy"], lambda s: s > 0.01,
                                       "PGD at eps 0.5 leaves {:.1%} of the examples correct")}


def print_table(label, report):
    cols = ["natural", *[r["name"] + "*" * bool(r["settings"].get("added")) for r in report["attacks"]], "any attack"]
    accs = [report["natural"], *[r["accuracy"] for r in report["attacks"]], report["any_attack"]]
    widths = [max(len(c), 6) for c in cols]
    print(" " * len(label) + "".join(f"  {c:>{w}}" for c, w in zip(cols, widths)))
    print(label + "".join(f"  {100 * a:>{w}.2f}" for a, w in zip(accs, widths)))
    print("accuracy (%) under each attack alone" if report["attack_all"] else
          "accuracy (%) under each attack and every attack to its left (autoattack, and with --attack-all "
          "each: alone)",
          "; the forward in bf16 autocast (--amp), APGD, Square, AutoAttack's in fp32" if report.get("amp") else "; fp32", sep="")
    if any(r["settings"].get("added") for r in report["attacks"]):
        print("* added, not in the paper's protocol (--paper-only drops it)")
    aa = next((r for r in report["attacks"] if r["name"] == "autoattack"), None)
    if aa and len(report["attacks"]) > 1:
        print(f"autoattack (alone) breaks {aa['newly_broken']} examples the other attacks missed; they break "
              f"{aa['missed']} that it leaves correct")
    for name, f in report["flags"].items():
        print(f"  {'FLAG' if f['raised'] else 'ok' if f['raised'] is not None else '-':<4}  {name}: {f['detail']}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (see --help)\n")  # one line, no usage dump
    a = p.add_argument
    a("--ckpt", required=True, help="model.pt of train_customized.py or train_calibrated.py")
    a("--protocol", choices=["calibrated", "customized"], default=None, help="default: the checkpoint's method")
    a("--attacks", default=None, help="comma-separated subset of the protocol's attacks, e.g. pgd20,square,sanity")
    a("--full", action="store_true", help="customized: add Table 3's 20-restart x 1000-step PGD and C&W")
    a("--paper-only", action="store_true", help="drop the added attacks (apgd-ce, apgd-t; customized: square): "
      "the paper's protocol alone")
    a("--eps", type=fraction, default=None, help="every attack's eps (not the sanity check's), e.g. 8/255")
    a("--steps", type=int, default=None, help="the steps of every PGD, C&W and APGD attack and the sanity check")
    a("--restarts", type=int, default=None, help="the restarts of every PGD, C&W and APGD attack (> 1: random starts)")
    a("--square-queries", type=int, default=5000, help="Square's queries per point (the calibrated paper: 5000)")
    a("--n-examples", type=int, default=None, help="evaluate the first N test examples (default: all)")
    a("--batch-size", type=int, default=128)
    a("--attack-all", action="store_true", help="attack every naturally correct point with every attack")
    a("--transfer-from", default=None, help="craft on this checkpoint, test --ckpt's model (the customized paper, "
      "Table 5)")
    a("--autoattack", action="store_true", help="also run AutoAttack standard, last (pip install pyautoattack)")
    a("--data-dir", default=None, help="dataset root (default: the checkpoint's data_dir, else ./data)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int, default=0, help="seeds the random starts and Square")
    a("--workers", type=int, default=0, help="DataLoader worker processes (pinned memory on CUDA)")
    a("--amp", action="store_true", help="the forward in bf16 autocast (CUDA, or a CPU with native bf16); the "
      "attacks' gradients stay fp32 (published tables: fp32, no --amp)")
    a("--channels-last", action="store_true", help="NHWC memory format (CUDA tensor cores, CPU oneDNN kernels)")
    a("--compile", action="store_true", help="torch.compile the model the attacks query")
    a("--out", default=None, help="JSON results (default: CKPT_eval_PROTOCOL.json next to the checkpoint)")
    args = p.parse_args(argv)
    args.autoattack |= "autoattack" in (args.attacks or "").split(",")  # --attacks autoattack asks for it too
    for k in ("steps", "restarts", "square_queries", "n_examples", "batch_size"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.eps is not None and args.eps <= 0:
        p.error(f"--eps must be > 0, got {args.eps:g}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.out:  # its folder is made now, so that a finished evaluation is never lost on a missing one
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        except OSError as e:
            p.error(f"--out {args.out}: cannot make its folder: {e.strerror}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    native = torch.cpu._is_avx512_bf16_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # ISA unpinned
    if args.amp and args.device != "cuda" and not native:
        p.error("--amp needs CUDA or a CPU with native bf16 (AVX512_BF16 or AMX; elsewhere bf16 is emulated, ~7x "
                "slower than fp32: benchmarks/cpu_speed.py)")
    return args


def main(argv=None):
    args = get_args(argv)
    model, ck = load_model(args.ckpt)
    source, source_ck = load_model(args.transfer_from) if args.transfer_from else (None, None)
    if source_ck and any(source_ck[k] != ck[k] for k in ("num_classes", "in_channels", "image_size")):
        fail(f"--transfer-from {args.transfer_from} takes other inputs or classes than {args.ckpt}")
    args.protocol = args.protocol or ("customized" if ck.get("method") == "customized" else "calibrated")
    if args.full and args.protocol != "customized":
        fail("--full belongs to --protocol customized")
    if args.autoattack:  # optional, not a dependency; checked before any attack runs
        if not autoattack_package():
            fail("--autoattack: AutoAttack is not installed: pip install pyautoattack")
        if ck["num_classes"] < 10:  # its APGD-T and FAB-T index the 9 most likely other classes
            fail(f"--autoattack: AutoAttack standard needs 10 classes or more; the model has {ck['num_classes']}")
        show_autoattack_log()
    data = load_test_set(ck, args.data_dir or (ck.get("args") or {}).get("data_dir") or "./data")
    data = Subset(data, range(min(args.n_examples or len(data), len(data))))
    specs, sanity = protocol_attacks(args, ck["in_channels"] == 1)
    model, source = model.to(args.device), source.to(args.device) if source is not None else None
    fp32 = [accelerate(m, args, amp=False) if m is not None else None for m in (model, source)] if args.amp else None
    model, source = accelerate(model, args), accelerate(source, args) if source is not None else None
    natural, robust, results, sanity = evaluate(model, data, specs, sanity, args, source, fp32)
    describe = lambda path, c: {"path": os.path.abspath(path), "sha256": sha256(path), "arch": c["arch"],
                                "dataset": c["dataset"], "method": c.get("method"), "epoch": c.get("epoch"),
                                "args": c.get("args")}
    report = {"checkpoint": describe(args.ckpt, ck),
              "transfer_from": describe(args.transfer_from, source_ck) if source_ck else None,
              "protocol": args.protocol, "attack_all": args.attack_all, "n_examples": len(data),
              "seed": args.seed, "device": args.device, "batch_size": args.batch_size, "torch": torch.__version__,
              "amp": "bf16" if args.amp else None, "channels_last": args.channels_last, "compile": args.compile,
              "natural": natural.float().mean().item(), "attacks": results,
              "any_attack": robust.float().mean().item(), "sanity": sanity,
              # transfer examples say nothing about the target's gradients: only the sanity check
              "flags": masking_flags([] if source_ck else results, sanity, len(data))}
    print_table(f"{ck.get('method') or 'model'} {ck['arch']}" + (f" <- {source_ck['arch']}" if source_ck else ""),
                report)
    out = args.out or os.path.splitext(args.ckpt)[0] + f"_{'transfer' if source_ck else 'eval'}_{args.protocol}.json"
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
