"""Table 1 of the calibrated-AT paper (ACML 2021) on the whole MNIST (60,000 train / 10,000 test).

Every row is trained by its real CLI and evaluated by evaluate.py; results accumulate in
benchmarks/results/mnist_table1.json, one entry per row, and a row already there is skipped, so
the rows can be spread over several sessions: a half-trained row continues with --resume, from its
run directory or, on a fresh machine, from benchmarks/results/mnist_table1_partial/ROW_seedS/ (copy
model.pt, log.jsonl and commit.txt there and commit them when a session must stop mid-row).

Rows: AT(0.3), AT(0.4) (train_customized.py --fixed-eps --c 0 --loss ce: Madry et al.'s PGD-AT),
TRADES(0.3), TRADES(0.4) (train_calibrated.py --no-mask --no-weighted-ce --attack kl, beta 1 as
Table 1's footnote), calibrated_cent and calibrated_cw at 0.3 and 0.4 (the MNIST preset), and
customized(0.3), an extra row (paper 000 has no MNIST results).

Same for every row, where the papers leave it open or where our budget cannot follow them (the
paper trains each baseline with its authors' code and settings, 40 epochs for calibrated): SmallCNN
(the release's MNIST net), Adam lr 1e-3 (the calibrated MNIST release), weight decay 0, batch 100,
--epochs E with the lr x0.1 after round(0.75 E) epochs (the release: after 30 of 40), the training
attack 20 steps of eps/20 from a uniform random start (Sec. 5.1.1), the last epoch's model.pt (no
selection on the test set). Customized keeps paper 000's ratios to eps_max: c = 10 * (8/255) / eps
(c * eps = 0.31 as at 8/255; c = 10 at 0.3 is invalid), eta = eps / E so that eps_i can reach
eps_max within the run (paper: 0.005 = 0.16 eps_max per visit), kappa 10, the mixed loss.

Evaluation, paper 002's MNIST protocol (Sec. 5.1.1): eps 0.3 for every row, PGD-20 and PGD-100
(CE, step 0.015, no random start) and C&W-inf (30 steps of 0.015, kappa 50, no random start),
each attack alone on every naturally correct test image (evaluate.py --attack-all).

    ../shared/data/mnist/make_root.sh data              # once: the MNIST root, offline
    python benchmarks/mnist_table1.py --rows "AT(0.3)" "TRADES(0.3)"  # some rows; default: all
    python benchmarks/mnist_table1.py --quick           # a 2-minute smoke run into runs/, no JSON
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "mnist_table1.json")
# Half-trained rows carried from one session to the next (model.pt, log.jsonl, commit.txt of a run
# directory, committed by hand when a session must stop): a row found here resumes from it.
PARTIAL = os.path.join(REPO, "benchmarks", "results", "mnist_table1_partial")
# Table 1 of paper 002 (mean of 5 runs): natural, PGD-20, PGD-100; None = "-" (training failed).
PAPER = {"AT(0.3)": (99.2, 93.4, 92.3), "AT(0.4)": (None, None, None), "TRADES(0.3)": (99.3, 94.9, 92.9),
         "TRADES(0.4)": (99.1, 95.3, 91.6), "calibrated_cent(0.3)": (99.3, 95.4, 93.2),
         "calibrated_cent(0.4)": (99.2, 96.8, 95.8), "calibrated_cw(0.3)": (99.1, 96.2, 95.0),
         "calibrated_cw(0.4)": (99.1, 97.1, 96.2)}


def row_flags(name, epochs):
    """(script, flags) of a row: the method's flags on top of the settings every row shares."""
    method, eps = name[:-5], float(name[-4:-1])
    decay = str(max(1, round(0.75 * epochs)))
    sgd_script = ["--arch", "smallcnn", "--optimizer", "adam", "--lr", "1e-3", "--wd", "0", "--batch-size", "100",
                  "--milestones", decay, "--steps", "20", "--alpha", "0.05", "--eps-max", str(eps)]
    calibrated = ["--eps", str(eps), "--milestones", decay]  # the preset does the rest (checked by --help)
    return {"AT": ("train_customized.py", [*sgd_script, "--fixed-eps", "--c", "0", "--loss", "ce"]),
            "customized": ("train_customized.py", [*sgd_script, "--c", f"{10 * 8 / 255 / eps:.4g}",
                                                   "--eta", f"{eps / epochs:.4g}"]),
            "TRADES": ("train_calibrated.py", [*calibrated, "--no-mask", "--no-weighted-ce", "--attack", "kl"]),
            "calibrated_cent": ("train_calibrated.py", [*calibrated, "--attack", "pgd"]),
            "calibrated_cw": ("train_calibrated.py", [*calibrated, "--attack", "cw"])}[method]


ROWS = ["calibrated_cw(0.3)", "calibrated_cent(0.3)", "TRADES(0.3)", "AT(0.3)", "customized(0.3)",
        "calibrated_cw(0.4)", "calibrated_cent(0.4)", "TRADES(0.4)", "AT(0.4)"]
EVAL = ["--protocol", "calibrated", "--attacks", "pgd20,pgd100,cw", "--attack-all", "--eps", "0.3"]


def call(cmd, log):
    """Run a CLI of this project, one thread, output to `log`; returns (seconds, exit code)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.time() - t0, rc


def commit():
    """HEAD, with "-dirty" when a tracked file differs from it; the results this script writes do not count."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return (git("rev-parse", "--short=12", "HEAD") or "unknown") + ("-dirty" if dirty else "")


def run_row(name, args):
    """Train (or resume) and evaluate one row; returns its JSON entry, or None if a step failed."""
    script, flags = row_flags(name, args.epochs)
    out = os.path.join(args.out, f"{name}_seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    rel = lambda path: os.path.relpath(path, REPO)  # the commands run in the repository root
    train = [script, *flags, "--dataset", "mnist", "--data-dir", rel(args.data_dir), "--epochs", str(args.epochs),
             "--seed", str(args.seed), "--eval-size", "200", "--out", rel(out)]
    train += ["--train-size", str(args.train_size)] if args.train_size else []
    ckpt, carried = os.path.join(out, "model.pt"), os.path.join(PARTIAL, os.path.basename(out))
    if not os.path.exists(ckpt) and os.path.exists(os.path.join(carried, "model.pt")) and not args.quick:
        shutil.copytree(carried, out, dirs_exist_ok=True)
    done = lambda: [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))][-1:] == [args.epochs]
    if not (os.path.exists(ckpt) and done()):
        resume = ["--resume"] if os.path.exists(ckpt) else ["--overwrite"]
        print(f"{name}: training ({' '.join(resume)})", flush=True)
        with open(os.path.join(out, "commit.txt"), "a") as f:  # the code each (re)start of training ran
            f.write(commit() + "\n")
        _, rc = call([sys.executable, *train, *resume], os.path.join(out, "train.txt"))
        if rc:
            print(f"{name}: training exited {rc}, see {out}/train.txt", flush=True)
            return None
    evaluate = ["evaluate.py", "--ckpt", rel(ckpt), *EVAL, "--data-dir", rel(args.data_dir), "--out",
                rel(os.path.join(out, "eval.json"))] + (["--n-examples", str(args.n_test)] if args.n_test else [])
    print(f"{name}: evaluating", flush=True)
    eval_s, rc = call([sys.executable, *evaluate], os.path.join(out, "eval.txt"))
    if rc:
        print(f"{name}: evaluate.py exited {rc}, see {out}/eval.txt", flush=True)
        return None
    ev = json.load(open(os.path.join(out, "eval.json")))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    row = {"name": name, "command": "python " + " ".join(train), "eval_command": "python " + " ".join(evaluate),
           "commit": " ".join(dict.fromkeys(open(os.path.join(out, "commit.txt")).read().split())),
           "eval_commit": commit(), "seed": args.seed, "epochs": args.epochs, "seconds": sum(r["seconds"] for r in log),
           "eval_seconds": eval_s, "n_test": ev["n_examples"], "epoch_log": log,
           "acc": {"natural": ev["natural"], **{a["name"]: a["accuracy"] for a in ev["attacks"]}}}
    shutil.rmtree(carried, ignore_errors=True)  # the row is done: its carried checkpoint goes
    if "train_mask_mean" in log[0]:
        row["mask_mean_per_epoch"] = [r["train_mask_mean"] for r in log]
    print(f"{name}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in row["acc"].items()), flush=True)
    return row


def table(rows):
    """Markdown: ours [paper], accuracy (%) at eps 0.3."""
    lines = ["| row | natural | PGD-20 | PGD-100 | C&W-inf | train s | mean mask per epoch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(r["name"], (None,) * 3) + (None,)
        cells = [f"{100 * r['acc'][k]:.1f}" + ("" if r["name"] not in PAPER else f" [{'-' if p is None else p}]")
                 for k, p in zip(("natural", "pgd20", "pgd100", "cw"), paper)]
        mask = ", ".join(f"{m:.2f}" for m in r.get("mask_mean_per_epoch", [])) or "-"
        lines.append(f"| {r['name']} (seed {r['seed']}) | " + " | ".join(cells) + f" | {r['seconds']:.0f} | {mask} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--epochs", type=int, default=3, help="epochs of 60,000 for every row (paper: 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.path.join(REPO, "data"), help="a root written by make_root.sh")
    p.add_argument("--n-test", type=int, help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--train-size", type=int, help="train on N images (default: all 60,000)")
    p.add_argument("--jobs", type=int, default=2, help="rows in parallel, one thread each")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "mnist_table1"))
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--quick", action="store_true", help="1 epoch of 200 images, 100 test images, results in --out")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.train_size, args.n_test = 1, 200, 100
        args.out, args.results = args.out + "_quick", os.path.join(args.out + "_quick", "results.json")
    args.data_dir, args.out = os.path.abspath(args.data_dir), os.path.abspath(args.out)
    if not os.path.isdir(os.path.join(args.data_dir, "MNIST", "raw")):
        sys.exit(f"error: no MNIST root at {args.data_dir}; run ../shared/data/mnist/make_root.sh {args.data_dir}")
    results = json.load(open(args.results)) if os.path.exists(args.results) else {"rows": []}
    have = {(r["name"], r["seed"]) for r in results["rows"]}
    todo = [name for name in args.rows if (name, args.seed) not in have]
    print(f"{len(todo)} rows to run ({', '.join(todo)}); {len(have)} already in {args.results}", flush=True)

    lock = threading.Lock()

    def one(name):
        row = run_row(name, args)
        with lock:
            if row is None:
                return
            # written as each row lands: a session may end at any time
            results["rows"] = [r for r in results["rows"] if (r["name"], r["seed"]) != (name, args.seed)] + [row]
            results["rows"].sort(key=lambda r: (ROWS.index(r["name"]), r["seed"]))
            os.makedirs(os.path.dirname(args.results), exist_ok=True)
            with open(args.results + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.results + ".tmp", args.results)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    print(table(results["rows"]))


if __name__ == "__main__":
    main()
