"""Table 1 of the calibrated-AT paper (ACML 2021) on the whole MNIST (60,000 train / 10,000 test).

Every row is trained by its real CLI and evaluated by evaluate.py; results accumulate in
benchmarks/results/mnist_table1.json, one entry per (row, seed), written as each step lands, and
finished work is skipped, so the rows can be spread over several sessions. A job (row, seed) is:

  1. train (or --resume) in runs/mnist_table1/ROW_seedS/; on a fresh machine a half-trained row
     continues from benchmarks/results/mnist_table1_partial/ROW_seedS/ (copy model.pt, log.jsonl
     and commit.txt there and commit them when a session must stop mid-row);
  2. the paper's evaluation on the 10,000 test images. A row already in the results file without a
     kept model (trained before models were kept) is retrained: if its per-epoch log equals the
     landed one in every value but seconds and images/s, training reproduced it and its landed
     accuracies stand; otherwise it is re-evaluated and the landed numbers stay beside the new;
  3. the final classifier, weights only, to benchmarks/results/checkpoints/ROW_seedS.pt (committed;
     its sha256 in the row): `python evaluate.py --ckpt` re-checks any number without retraining;
  4. the strong evaluation of that file: evaluate.py's whole chain (the paper's attacks, APGD-CE,
     APGD-T, Square) on the first 1,000 test images, each attack alone, its per-sample worst case
     ("any") and the gradient-masking flags.

Rows: AT(0.3), AT(0.4) (train_customized.py --fixed-eps --c 0 --loss ce: Madry et al.'s PGD-AT),
TRADES(0.3), TRADES(0.4) (train_calibrated.py --no-mask --no-weighted-ce --attack kl, beta 1 as
Table 1's footnote), calibrated_cent and calibrated_cw at 0.3 and 0.4 (the MNIST preset), and
customized(0.3), an extra row (paper 000 has no MNIST results). AT(0.4) predicts one class (the
paper's "-"): it keeps its landed row and no model.

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
    python benchmarks/mnist_table1.py                   # every row, seed 0
    python benchmarks/mnist_table1.py --rows "AT(0.3)" "TRADES(0.3)" --seeds 0 1 2
    python benchmarks/mnist_table1.py --summary         # the mean +- std table and the verdicts
    python benchmarks/mnist_table1.py --quick           # a smoke run into runs/, not the results
"""
import argparse
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

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
LANDED_ONLY = {"AT(0.4)"}  # a constant predictor (train loss ln 10, 11.3 % on every column): nothing to keep
# Table 1's claims, (better, worse): the four at 0.3 over three seeds, eps 0.4 over 0.3 (seed 0).
CLAIMS = [("calibrated_cw(0.3)", "TRADES(0.3)"), ("calibrated_cw(0.3)", "AT(0.3)"),
          ("calibrated_cent(0.3)", "TRADES(0.3)"), ("calibrated_cent(0.3)", "AT(0.3)"),
          ("calibrated_cw(0.4)", "calibrated_cw(0.3)"), ("calibrated_cent(0.4)", "calibrated_cent(0.3)")]


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
STRONG = ["--protocol", "calibrated", "--attack-all", "--eps", "0.3"]  # every attack of the chain, sanity too
UNTIMED = lambda log: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in log]


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


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


rel = lambda path: os.path.relpath(path, REPO)  # the commands run in the repository root


def evaluate(ckpt, flags, out, args):
    """evaluate.py on `ckpt` with `flags`, its JSON to `out`: (command, seconds, report) or None."""
    cmd = ["evaluate.py", "--ckpt", rel(ckpt), *flags, "--data-dir", rel(args.data_dir), "--out", rel(out)]
    seconds, rc = call([sys.executable, *cmd], os.path.splitext(out)[0] + ".txt")
    if rc:
        print(f"{rel(ckpt)}: evaluate.py exited {rc}, see {os.path.splitext(out)[0]}.txt", flush=True)
        return None
    return "python " + " ".join(cmd), seconds, json.load(open(out))


def export(run_ckpt, path):
    """The final classifier alone, weights only (no optimizer, no mask net), with what evaluate.py
    needs to rebuild it; written atomically. Returns {"path", "sha256"}."""
    ck = torch.load(run_ckpt, map_location="cpu", weights_only=True)
    keep = {k: ck[k] for k in ("model", "arch", "num_classes", "in_channels", "image_size", "dataset", "method",
                               "epoch", "args")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(keep, path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"path": rel(path), "sha256": sha256(path)}


def train_and_evaluate(name, seed, args, landed):
    """Steps 1-3 of a job; returns its row, or None if a step failed."""
    script, flags = row_flags(name, args.epochs)
    out = os.path.join(args.out, f"{name}_seed{seed}")
    os.makedirs(out, exist_ok=True)
    train = [script, *flags, "--dataset", "mnist", "--data-dir", rel(args.data_dir), "--epochs", str(args.epochs),
             "--seed", str(seed), "--eval-size", "200", "--out", rel(out)]
    train += ["--train-size", str(args.train_size)] if args.train_size else []
    ckpt, carried = os.path.join(out, "model.pt"), os.path.join(PARTIAL, os.path.basename(out))
    if not os.path.exists(ckpt) and os.path.exists(os.path.join(carried, "model.pt")) and not args.quick:
        shutil.copytree(carried, out, dirs_exist_ok=True)
    done = lambda: [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))][-1:] == [args.epochs]
    if not (os.path.exists(ckpt) and done()):
        resume = ["--resume"] if os.path.exists(ckpt) else ["--overwrite"]
        print(f"{name} seed {seed}: training ({' '.join(resume)})", flush=True)
        with open(os.path.join(out, "commit.txt"), "a") as f:  # the code each (re)start of training ran
            f.write(commit() + "\n")
        _, rc = call([sys.executable, *train, *resume], os.path.join(out, "train.txt"))
        if rc:
            print(f"{name} seed {seed}: training exited {rc}, see {out}/train.txt", flush=True)
            return None
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    row = {"name": name, "seed": seed, "epochs": args.epochs, "command": "python " + " ".join(train),
           "commit": " ".join(dict.fromkeys(open(os.path.join(out, "commit.txt")).read().split())),
           "seconds": sum(r["seconds"] for r in log), "epoch_log": log}
    if "train_mask_mean" in log[0]:
        row["mask_mean_per_epoch"] = [r["train_mask_mean"] for r in log]
    if landed:  # trained before models were kept: the same command again
        row["reproduced"] = {"log_equal": UNTIMED(log) == UNTIMED(landed["epoch_log"]),
                             "landed_commit": landed["commit"], "landed_seconds": landed["seconds"]}
    if landed and row["reproduced"]["log_equal"]:  # the same model: its 10,000-image numbers stand
        row.update({k: landed[k] for k in ("eval_command", "eval_commit", "eval_seconds", "n_test", "acc")})
    else:
        print(f"{name} seed {seed}: evaluating", flush=True)
        n = ["--n-examples", str(args.n_test)] if args.n_test else []
        got = evaluate(ckpt, EVAL + n, os.path.join(out, "eval.json"), args)
        if got is None:
            return None
        cmd, seconds, ev = got
        row.update(eval_command=cmd, eval_commit=commit(), eval_seconds=seconds, n_test=ev["n_examples"],
                   acc={"natural": ev["natural"], **{a["name"]: a["accuracy"] for a in ev["attacks"]}})
        if landed:  # the difference is reported: the landed row's numbers and log stay beside
            row["reproduced"].update(landed_acc=landed["acc"], landed_epoch_log=landed["epoch_log"])
    row["checkpoint"] = export(ckpt, os.path.join(args.checkpoints, f"{name}_seed{seed}.pt"))
    shutil.rmtree(carried, ignore_errors=True)  # the row is trained and kept: its carried checkpoint goes
    print(f"{name} seed {seed}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in row["acc"].items()), flush=True)
    return row


def strong_evaluation(row, seed, args):
    """Step 4: the whole chain on the kept checkpoint, each attack alone: the row's new keys, or None."""
    queries = args.square_queries_later if seed > 0 and args.square_queries_later else args.square_queries
    out = os.path.join(args.out, f"{row['name']}_seed{seed}", "strong.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print(f"{row['name']} seed {seed}: strong evaluation ({queries} Square queries)", flush=True)
    flags = [*STRONG, "--n-examples", str(args.n_strong), "--square-queries", str(queries)]
    got = evaluate(os.path.join(REPO, row["checkpoint"]["path"]), flags + args.strong_extra, out, args)
    if got is None:
        return None
    cmd, seconds, ev = got
    if ev["checkpoint"]["sha256"] != row["checkpoint"]["sha256"]:
        print(f"{row['name']} seed {seed}: the evaluated file is not the kept checkpoint; not recorded", flush=True)
        return None
    acc = {"n": ev["n_examples"], "natural": ev["natural"], **{a["name"]: a["accuracy"] for a in ev["attacks"]},
           "any": ev["any_attack"], "sanity_eps0.5": ev["sanity"]["accuracy"]}
    print(f"{row['name']} seed {seed}: strong " + " ".join(f"{k} {100 * v:.1f}" for k, v in acc.items() if k != "n"),
          flush=True)
    return {"acc_strong": acc, "flags": [k for k, f in ev["flags"].items() if f["raised"]],
            "strong": {"command": cmd, "commit": commit(), "seconds": seconds, "square_queries": queries,
                       "flag_details": {k: f["detail"] for k, f in ev["flags"].items()},
                       "attack_seconds": {a["name"]: a["seconds"] for a in ev["attacks"]}}}


def load(path):
    return json.load(open(path)) if os.path.exists(path) else {"rows": []}


def save(row, path):
    """Put `row` into the results file, under a file lock: jobs and other invocations write it too."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load(path)
        results["rows"] = [r for r in results["rows"] if (r["name"], r["seed"]) != (row["name"], row["seed"])]
        results["rows"] = sorted(results["rows"] + [row], key=lambda r: (ROWS.index(r["name"]), r["seed"]))
        with open(path + ".tmp", "w") as f:  # written as each step lands: a session may end at any time
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


def run_job(name, seed, args):
    """Whatever of steps 1-4 the (row, seed) still lacks."""
    row = next((r for r in load(args.results)["rows"] if (r["name"], r["seed"]) == (name, seed)), None)
    if name in LANDED_ONLY:
        return
    if row and "checkpoint" in row:
        path = os.path.join(REPO, row["checkpoint"]["path"])
        if not os.path.exists(path) or sha256(path) != row["checkpoint"]["sha256"]:
            print(f"{name} seed {seed}: {row['checkpoint']['path']} is missing or not the file of its sha256; "
                  "skipped (restore it from git)", flush=True)
            return
    else:
        row = train_and_evaluate(name, seed, args, row)
        if row is None:
            return
        save(row, args.results)
    if "acc_strong" not in row and not args.no_strong:
        strong = strong_evaluation(row, seed, args)
        if strong is not None:
            save({**row, **strong}, args.results)


def table(rows):
    """Markdown, one line per (row, seed): ours [paper], accuracy (%) at eps 0.3."""
    lines = ["| row | seed | natural | PGD-20 | PGD-100 | C&W-inf | strong: APGD-CE / APGD-T / Square / any (n) "
             "| flags | train s | log reproduced |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(r["name"], (None,) * 3) + (None,)
        cells = [f"{100 * r['acc'][k]:.1f}" + ("" if r["name"] not in PAPER or p is None and k == "cw" else
                                               f" [{'-' if p is None else p}]")
                 for k, p in zip(("natural", "pgd20", "pgd100", "cw"), paper)]
        s = r.get("acc_strong")
        strong = " / ".join(f"{100 * s[k]:.1f}" for k in ("apgd-ce", "apgd-t", "square", "any")) + \
            f" ({s['n']})" if s else "-"
        rep = r.get("reproduced")
        rep = "-" if rep is None else "yes" if rep["log_equal"] else "no (re-evaluated)"
        lines.append(f"| {r['name']} | {r['seed']} | " + " | ".join(cells) + f" | {strong} | "
                     f"{', '.join(r.get('flags', [])) or '-'} | {r['seconds']:.0f} | {rep} |")
    return "\n".join(lines)


def summary(rows):
    """Markdown: mean +- std over seeds beside the paper, then each claim of Table 1 with its verdict."""
    by = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["seed"]] = r
    cols = [("natural", "acc", "natural"), ("PGD-20", "acc", "pgd20"), ("PGD-100", "acc", "pgd100"),
            ("C&W-inf", "acc", "cw"), ("any attack (1,000)", "acc_strong", "any")]
    get = lambda r, part, k: 100 * r[part][k] if part in r else None

    def cell(name, part, k):
        v = [x for x in (get(r, part, k) for r in by[name].values()) if x is not None]
        return "-" if not v else f"{v[0]:.1f}" if len(v) == 1 else f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"

    lines = ["| row | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name in [n for n in ROWS if n in by]:
        paper = dict(zip(("natural", "pgd20", "pgd100"), PAPER.get(name, ())))
        cells = [cell(name, part, k) + ("" if k not in paper else f" [{'-' if paper[k] is None else paper[k]}]")
                 for _, part, k in cols]
        lines.append(f"| {name} | {', '.join(map(str, sorted(by[name])))} | " + " | ".join(cells) + " |")
    n = lambda part: next((f"{r['n_test'] if part == 'acc' else r['acc_strong']['n']:,}" for r in rows if part in r), "")
    lines[0] = lines[0].replace("(1,000)", f"({n('acc_strong')})")
    lines += ["", f"| claim | PGD-20 ({n('acc')}) | PGD-100 ({n('acc')}) | any attack ({n('acc_strong')}) |",
              "|---|---|---|---|"]
    for a, b in CLAIMS:
        if a not in by or b not in by:
            continue
        cells = []
        for part, k in (("acc", "pgd20"), ("acc", "pgd100"), ("acc_strong", "any")):
            seeds = sorted(s for s in set(by[a]) & set(by[b]) if part in by[a][s] and part in by[b][s])
            d = [get(by[a][s], part, k) - get(by[b][s], part, k) for s in seeds]
            # one seed: the spread is that of the worse row over its seeds (all we measured)
            ref = [get(r, part, k) for r in by[b].values() if part in r]
            cells.append(verdict(d, seeds, ref))
        lines.append(f"| {a} > {b} | " + " | ".join(cells) + " |")
    if "AT(0.4)" in by:
        nat = [100 * r["acc"]["natural"] for r in by["AT(0.4)"].values()]
        lines.append(f"| AT(0.4) fails to train | {'holds' if max(nat) < 20 else 'does not hold'}: natural "
                     f"{', '.join(f'{v:.1f}' for v in nat)} % (one class: 11.3 %) | | |")
    return "\n".join(lines)


def verdict(d, seeds, ref):
    """'holds': the difference is positive in every seed and its mean exceeds the spread (the std of
    the paired differences; with one seed, the std of the worse row over its seeds); 'does not
    hold': the same, reversed; otherwise undecided."""
    if not d:
        return "-"
    spread = statistics.stdev(d) if len(d) > 1 else statistics.stdev(ref) if len(ref) > 1 else None
    mean = statistics.mean(d)
    word = "undecided" if spread is None else "holds" if min(d) > 0 and mean > spread else \
        "does not hold" if max(d) < 0 and -mean > spread else "undecided"
    what = ", ".join(f"{x:+.1f}" for x in d)
    return f"**{word}**: {what}" + (f" (mean {mean:+.1f}, sd {spread:.1f})" if len(d) > 1 else
                                   f" (seed {seeds[0]} only" + (f"; seed sd {spread:.1f})" if spread else ")"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, help="epochs of 60,000 for every row (default 3; paper: 40)")
    p.add_argument("--data-dir", default=os.path.join(REPO, "data"), help="a root written by make_root.sh")
    p.add_argument("--n-test", type=int, help="the paper's evaluation on the first N test images (default: all)")
    p.add_argument("--n-strong", type=int, help="the strong evaluation on the first N test images (default 1000)")
    p.add_argument("--square-queries", type=int, help="Square's queries (default: AutoAttack's 5000)")
    p.add_argument("--square-queries-later", type=int, help="Square's queries for seeds > 0 (default: the same)")
    p.add_argument("--no-strong", action="store_true", help="stop after the checkpoint (step 3)")
    p.add_argument("--train-size", type=int, help="train on N images (default: all 60,000)")
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel, one thread each")
    p.add_argument("--out", help="run directories (default: runs/mnist_table1)")
    p.add_argument("--results", help=f"the results file; checkpoints go beside it (default: {rel(RESULTS)})")
    p.add_argument("--summary", action="store_true", help="print the tables of the results file and exit")
    p.add_argument("--quick", action="store_true", help="defaults for a smoke run: 1 epoch of 200 images, 100 test "
                   "images, a weak strong evaluation of 50; results in runs/mnist_table1_quick")
    args = p.parse_args()
    unset = lambda k, full, quick: setattr(args, k, getattr(args, k) or (quick if args.quick else full))
    for k, full, quick in (("epochs", 3, 1), ("train_size", None, 200), ("n_test", None, 100),
                           ("n_strong", 1000, 50), ("square_queries", 5000, 20)):
        unset(k, full, quick)
    args.strong_extra = ["--steps", "5"] if args.quick else []
    quick = "_quick" if args.quick else ""
    args.out = os.path.abspath(args.out or os.path.join(REPO, "runs", "mnist_table1" + quick))
    args.results = os.path.abspath(args.results or (os.path.join(args.out, "results.json") if quick else RESULTS))
    args.checkpoints = os.path.join(os.path.dirname(args.results), "checkpoints")
    args.data_dir = os.path.abspath(args.data_dir)
    if args.summary:
        rows = load(args.results)["rows"]
        print(table(rows) + "\n\n" + summary(rows))
        return
    if not os.path.isdir(os.path.join(args.data_dir, "MNIST", "raw")):
        sys.exit(f"error: no MNIST root at {args.data_dir}; run ../shared/data/mnist/make_root.sh {args.data_dir}")
    jobs = [(name, seed) for seed in args.seeds for name in args.rows]
    print(f"{len(jobs)} jobs; {len(load(args.results)['rows'])} rows in {rel(args.results)}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run_job(*job, args), jobs))
    rows = load(args.results)["rows"]
    print(table(rows) + "\n\n" + summary(rows))


if __name__ == "__main__":
    main()
