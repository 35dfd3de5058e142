"""Both papers' CIFAR-10 tables in one command, on one GPU, every row through the real CLIs.

  the calibrated paper, Table 2  PreActResNet-18, eps 8/255: AT, TRADES (beta 6), calibrated_cent and
                      calibrated_cw at beta1 0.05 and 0.1; Table 4's Square column beside them
  the calibrated paper, Table 3  the same six on WRN-34-10 (--wrn)
  the customized paper, Table 3  VGG-16: PGD-AT and customized (the mixed loss of Eq. 6)
  the customized paper, Table 4  WRN-34-10: customized (--wrn); its PGD-AT baseline is Table 3's AT row (the
                      paper quotes Madry et al.'s number there rather than train one)

Built like mnist_table1.py (benchmarks/runner.py): train, the paper's protocol on the whole test
set (the calibrated paper: FGSM, PGD-20, PGD-100, C&W-inf, no random start; the customized paper: PGD-100, C&W-100,
DeepFool, step eps/5), the classifier kept in benchmarks/results/checkpoints/ROW_seedS.pt with its
sha256, then the strong worst case (the whole chain with APGD-CE, APGD-T and Square 5,000, each
attack alone) on the first 1,000 test images; results in benchmarks/results/cifar10_tables.json as
each step lands, finished rows skipped, a killed row resumed. Before it trains, it measures each
row's training throughput on a few batches and prints the estimated hours per row.

Schedules are the papers': the calibrated paper's rows: 140 epochs with lr x0.1 at 100 and 120 (WRN: 100 and
110), AT among them (train_customized.py --fixed-eps --c 0 --loss ce, 10 steps of 2/255 from a
random start); the customized paper's 200 epochs at 80/140/180, lr 0.01 for VGG-16. --epochs E trains every
row E epochs, the milestones scaled; --speed adds bf16 autocast and channels-last (gpu_check.py).

    python benchmarks/cifar10_tables.py --data-dir data                  # Table 2 + the customized paper's Table 3
    python benchmarks/cifar10_tables.py --data-dir data --wrn            # + the WRN-34-10 tables
    python benchmarks/cifar10_tables.py --data-dir data --estimate       # the time estimate alone
    python benchmarks/cifar10_tables.py --smoke --rows AT_prn18 customized_vgg16   # the pipeline, offline
"""
import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

import runner as R

RESULTS = os.path.join(R.REPO, "benchmarks", "results", "cifar10_tables.json")
PARTIAL = os.path.join(R.REPO, "benchmarks", "results", "cifar10_tables_partial")
CAL_EVAL = ["--protocol", "calibrated", "--paper-only", "--attacks", "fgsm,pgd20,pgd100,cw", "--attack-all"]
CUS_EVAL = ["--protocol", "customized", "--paper-only", "--attack-all"]
# name: (paper and table, script, arch, method flags, the calibrated paper schedule?)
ROWS = {}
for arch, short in (("preact_resnet18", "prn18"), ("wrn34_10", "wrn")):
    table = "002 T3" if short == "wrn" else "002 T2"
    ROWS[f"AT_{short}"] = (table, "train_customized.py", arch, ["--fixed-eps", "--c", "0", "--loss", "ce"], True)
    ROWS[f"TRADES_{short}"] = (table, "train_calibrated.py", arch, ["--no-mask", "--no-weighted-ce", "--attack", "kl",
                                                                    "--beta", "6"], True)
    for attack, name in (("pgd", "calibrated_cent"), ("cw", "calibrated_cw")):
        for beta1 in ("0.05", "0.1"):
            ROWS[f"{name}({beta1})_{short}"] = (table, "train_calibrated.py", arch, ["--attack", attack, "--beta1",
                                                                                     beta1], True)
ROWS["AT_vgg16"] = ("000 T3", "train_customized.py", "vgg16", ["--fixed-eps", "--c", "0", "--loss", "ce"], False)
ROWS["customized_vgg16"] = ("000 T3", "train_customized.py", "vgg16", [], False)
ROWS["customized_wrn"] = ("000 T4", "train_customized.py", "wrn34_10", [], False)
# The papers' numbers (%): the calibrated paper Tables 2-4 (calibrated rows: mean of 5 runs), the customized paper Tables 3-4.
# The customized paper's Table 4 gives PGD-20 with random restarts and C&W: shown beside our PGD-100 and C&W-100.
COLS_002 = ("natural", "fgsm", "pgd20", "pgd100", "cw", "square")
COLS_000 = ("natural", "deepfool", "pgd100", "cw100")
PAPER = {"AT_prn18": (83.0, 57.3, 52.9, 51.9, 50.9, 55.12), "TRADES_prn18": (82.8, 57.6, 52.8, 51.7, 50.9, 54.85),
         "calibrated_cent(0.05)_prn18": (84.1, 59.5, 55.6, 54.9, 50.8, 56.4),
         "calibrated_cent(0.1)_prn18": (85.9, 58.5, 54.1, 53.4, 50.44, 56.4),
         "calibrated_cw(0.05)_prn18": (84.2, 58.9, 55.3, 54.5, 51.3, 56.3),
         "calibrated_cw(0.1)_prn18": (85.1, 58.9, 54.9, 54.1, 51.2, 56.5),
         "AT_wrn": (86.1, 61.8, 56.1, 55.8, 54.2, 59.19), "TRADES_wrn": (84.9, 60.9, 56.2, 55.1, 54.5, 59.0),
         "calibrated_cent(0.05)_wrn": (86.6, 60.9, 57.7, 57.2, 53.9, 59.1),
         "calibrated_cent(0.1)_wrn": (87.5, 61.5, 57.2, 56.6, 54.0, 59.6),
         "calibrated_cw(0.05)_wrn": (86.4, 62.7, 59.7, 58.7, 56.0, 60.9),
         "calibrated_cw(0.1)_wrn": (87.4, 62.3, 58.6, 57.3, 55.6, 60.9),
         "AT_vgg16": (80.32, 44.65, 36.36, 37.89), "customized_vgg16": (85.44, 70.19, 75.54, 51.81),
         "customized_wrn": (89.61, None, 73.16, 71.67)}
# Network passes per training image (forward + backward, K = 10 attack steps; calibrated: f's K+4
# forwards and K+3 backwards plus g's pass), to turn a measured training throughput into attack time.
PASSES = {"train_customized.py": 11, "TRADES": 12.5, "train_calibrated.py": 15.5}


def spec(name, seed, args):
    table, script, arch, flags, calibrated_row = ROWS[name]
    epochs = args.epochs or (140 if calibrated_row else 200)
    flags = [*flags, "--arch", arch, "--dataset", args.dataset, "--data-dir", R.rel(args.data_dir)] + args.speed
    if calibrated_row:  # the calibrated release's schedule for every row of the calibrated paper, AT's too
        flags += ["--milestones", *[str(max(1, round(m * epochs / 140))) for m in ((100, 110) if arch == "wrn34_10"
                                                                                   else (100, 120))]]
    evaluate = CAL_EVAL if calibrated_row else CUS_EVAL + (["--full"] if args.full else [])
    strong = ["--protocol", "calibrated" if calibrated_row else "customized"]
    if args.smoke:  # last: they override the row's arch and attack
        flags += ["--arch", "smallcnn", "--steps", "1", "--eval-size", "8", "--test-size", "32", "--batch-size", "16"]
        flags += ["--mask-arch", "small"] if script == "train_calibrated.py" and "--no-mask" not in flags else []
    return dict(name=name, seed=seed, script=script, epochs=epochs, flags=flags, eval=evaluate + args.eval_speed,
                strong=strong + args.eval_speed + args.attack_steps)


def estimate(specs, args):
    """Hours per row: training measured on --estimate-batches batches of the row's own command,
    attacks from the same throughput and their pass counts (Square: every point robust, a bound)."""
    lines, total = ["| row | images/s (measured) | train h | paper eval h | strong eval h | total h |",
                    "|---|---|---|---|---|---|"], 0.0
    n_train = args.train_size or 50_000
    for s in specs:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [s["script"], *s["flags"], "--epochs", "1", "--device", args.device, "--out", tmp, "--eval-size",
                   "1", "--train-size", str(min(args.estimate_batches * 128, args.train_size or 50_000))]
            _, rc = R.call([sys.executable, *cmd], os.path.join(tmp, "out.txt"), args.threads)
            if rc:
                why = (open(os.path.join(tmp, "out.txt")).read().strip().splitlines() or ["?"])[-1]
                sys.exit(f"error: the estimate run of {s['name']} failed: {why}")
            rate = json.loads(open(os.path.join(tmp, "log.jsonl")).readline())["images_per_s"]
        passes = PASSES["TRADES" if "--attack" in s["flags"] and "kl" in s["flags"] else s["script"]]
        per_pass = 1 / (rate * passes)  # seconds per image and forward + backward pass
        # fgsm + pgd20 + pgd100 + cw30; or pgd100 + cw100 + DeepFool (50 steps, a forward and 10 backwards each)
        paper = 151 if "calibrated" in s["eval"] else 200 + 275 + 40_000 * ("--full" in s["eval"])
        strong = paper + 1000 + args.square_queries / 3  # + APGD-CE 100 + APGD-T 9 x 100; Square: forwards
        hours = [s["epochs"] * n_train / rate / 3600, (args.n_test or 10_000) * paper * per_pass / 3600,
                 args.n_strong * strong * per_pass / 3600]
        total += sum(hours)
        cells = " | ".join(f"{h:.2f}" for h in [*hours, sum(hours)])
        lines.append(f"| {s['name']} | {rate:.0f} | {cells} |")
    return "\n".join(lines + [f"| all | | | | | {total:.2f} |"])


def table(rows):
    """Markdown per paper table: ours [paper] in %, the strong any-attack worst case, seconds."""
    out = []
    for which, cols in (("002", COLS_002), ("000", COLS_000)):
        mine = [r for r in rows if ROWS[r["name"]][0].startswith(which)]
        if not mine:
            continue
        head = " | ".join(cols) + " | any attack (strong, n) | flags | train h |"
        out += [f"| paper {which} row | seed | " + head,
                "|---|---|" + "---|" * (len(cols) + 3)]
        for r in mine:
            acc = {**r["acc"], **({"square": r["acc_strong"]["square"]} if "acc_strong" in r else {})}
            paper = dict(zip(cols, PAPER.get(r["name"], ())))
            cells = [("-" if k not in acc else f"{100 * acc[k]:.1f}") + (f" [{paper[k]}]" if paper.get(k) else "")
                     for k in cols]
            s = r.get("acc_strong")
            strong = f"{100 * s['any']:.1f} ({s['n']})" if s else "-"
            out.append(f"| {r['name']} ({ROWS[r['name']][0]}) | {r['seed']} | " + " | ".join(cells) +
                       f" | {strong} | {', '.join(r.get('flags', [])) or '-'} | {r['seconds'] / 3600:.2f} |")
        out.append("")
    return "\n".join(out) + "Square: the strong evaluation's (first n test images), beside Table 4's (10,000)."


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: Table 2 and the customized paper's VGG-16 rows; "
                   "with --wrn every row")
    p.add_argument("--wrn", action="store_true", help="the WRN-34-10 rows too (the calibrated paper Table 3, the customized paper Table 4)")
    R.add_arguments(p, RESULTS, epochs="the paper's: 140, the customized paper's rows 200")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "fake-cifar10"])
    p.add_argument("--data-dir", default=os.path.join(R.REPO, "data"), help="torchvision's CIFAR-10 root")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--speed", action="store_true", help="--amp (bf16) and --channels-last for training and evaluation")
    p.add_argument("--full", action="store_true", help="the customized paper's rows: Table 3's 20 x 1000-step PGD and C&W too")
    p.add_argument("--estimate", action="store_true", help="print the time estimate and stop")
    p.add_argument("--estimate-batches", type=int, default=40, help="batches of 128 the estimate trains per row")
    p.add_argument("--attack-steps", type=int, help="every attack's steps in the strong evaluation (smoke runs)")
    p.add_argument("--smoke", action="store_true", help="a smoke run of the pipeline on FakeData: SmallCNN, 1 attack "
                   "step, 64 images, 1 epoch, tiny evaluations, into runs/cifar10_tables_smoke")
    args = p.parse_args()
    if args.smoke:
        args.dataset, args.epochs, args.train_size, args.n_test, args.n_strong = "fake-cifar10", 1, 64, 32, 8
        args.square_queries, args.attack_steps, args.estimate_batches = 10, 1, 1
    args.rows = args.rows or [n for n in ROWS if args.wrn or not n.endswith("_wrn")]
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.n_strong, args.square_queries = args.n_strong or 1000, args.square_queries or 5000
    args.speed, args.eval_speed = (["--amp", "--channels-last"],) * 2 if args.speed else ([], [])
    args.attack_steps = ["--steps", str(args.attack_steps)] if args.attack_steps else []
    args.quick, args.strong_extra, args.threads = False, [], os.cpu_count() or 1
    R.paths(args, "cifar10_tables", RESULTS, "_smoke" if args.smoke else "")
    if args.summary:
        print(table(R.load(args.results)["rows"]))
        return
    specs = [spec(name, seed, args) for seed in args.seeds for name in args.rows]
    have = {(r["name"], r["seed"]) for r in R.load(args.results)["rows"] if "acc_strong" in r or args.no_strong}
    todo = [s for s in specs if (s["name"], s["seed"]) not in have]
    print(f"{len(todo)} of {len(specs)} jobs to run; estimated on {args.device} before training:", flush=True)
    print(estimate([s for s in todo if s["seed"] == todo[0]["seed"]] if todo else [], args), flush=True)
    if args.estimate:
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda s: R.run_job(s, args, list(ROWS), PARTIAL), todo))
    print(table(R.load(args.results)["rows"]))


if __name__ == "__main__":
    main()
