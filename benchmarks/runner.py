"""What mnist_table1.py and cifar10_tables.py share: a table row, run by the project's real CLIs.

A job is one (row, seed, epochs), its steps skipped where their result is already in the results
file (a row of another budget is another entry):

  1. train (or --resume) the row's command in OUT/ROW_seedS/; a half-trained row carried in git
     from another machine in benchmarks/results/<table>_partial/ROW_seedS/ (model.pt, log.jsonl,
     commit.txt, machines.jsonl) continues from there. With spec["keep"] (the budget curve) it trains in segments,
     --epochs k then --resume --epochs of the next k (the same run bit for bit: the trainers seed
     each epoch and keep their milestones), and keeps the classifier at each k as
     ROW_seedS{tag}_at{k}.pt;
  2. the paper's evaluation (evaluate.py). A row already in the results file without a kept model
     (trained before models were kept) is retrained: if its per-epoch log equals the landed one in
     every value but seconds and images/s, training reproduced it and its landed accuracies stand;
     otherwise it is re-evaluated and the landed numbers stay beside the new ones;
  3. the final classifier, weights only, kept as RESULTS_DIR/checkpoints/ROW_seedS.pt (its sha256 in
     the row): `python evaluate.py --ckpt` re-checks any number without retraining;
  4. the strong evaluation of that file: evaluate.py's whole chain (the paper's attacks, APGD-CE,
     APGD-T, Square), each attack alone, its per-sample worst case ("any") and the masking flags;
  4b. the same strong evaluation of each kept snapshot, into row["budget_curve"];
  5. with --autoattack: AutoAttack standard on the same images, with the chain of step 4 again (on
     its survivors, the cheap way to its per-sample "any"): AutoAttack's robust accuracy, and how many
     points only it breaks and only the chain breaks. A row that still lacks step 4 gets steps 4 and
     5 in one evaluate.py run (AutoAttack after the chain, each alone): the same numbers, without
     the chain's second run.

The results file is written as each step lands, under a file lock (jobs run in threads, and two
invocations may share the file), so a run can be stopped at any time.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTIMED = lambda log: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in log]
rel = lambda path: os.path.relpath(path, REPO)  # the commands run in the repository root


def call(cmd, log, threads=1, env=None):
    """Run a CLI of this project (on the CPU: `threads` threads; `env` on top of ours), output to `log`;
    (seconds, exit code)."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.time() - t0, rc


def commit():
    """HEAD, with "-dirty" when a tracked file differs from it; the results the tables write do not count."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return (git("rev-parse", "--short=12", "HEAD") or "unknown") + ("-dirty" if dirty else "")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def onednn_isa(env=None):
    """The ISA oneDNN's kernels run with in this environment (`env` on top; its ISA cap, if any, and
    the CPU's), as oneDNN's verbose mode names it."""
    conv = "import torch; torch.nn.functional.conv2d(torch.rand(8, 16, 16, 16), torch.rand(16, 16, 3, 3))"
    out = subprocess.run([sys.executable, "-c", conv], env={**os.environ, **(env or {}), "ONEDNN_VERBOSE": "1"},
                         capture_output=True, text=True).stdout
    return next((line.split("isa:", 1)[1].strip() for line in out.splitlines() if "isa:" in line), None)


def machine(args):
    """Where a row ran: bit-exact CPU training depends on the CPU's kernels (oneDNN, MKL pick them by ISA)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    isa = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
           if k in os.environ}
    return {"device": args.device, "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_isa": onednn_isa(),
            "torch": torch.__version__, **isa}


def load(path):
    return json.load(open(path)) if os.path.exists(path) else {"rows": []}


key = lambda r: (r["name"], r["seed"], r.get("epochs"))


def save(row, path, order):
    """Put `row` into the results file under a file lock, in place of the entry of its (name, seed,
    epochs), rows sorted by (epochs, order.index(name), seed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load(path)
        results["rows"] = [r for r in results["rows"] if key(r) != key(row)]
        results["rows"] = sorted(results["rows"] + [row], key=lambda r: (r.get("epochs") or 0, order.index(r["name"]),
                                                                          r["seed"]))
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


def evaluate(ckpt, flags, out, args, env=None):
    """evaluate.py on `ckpt` with `flags`, its JSON to `out`: (command, seconds, report), or None."""
    cmd = ["evaluate.py", "--ckpt", rel(ckpt), *flags, "--data-dir", rel(args.data_dir), "--device", args.device,
           "--out", rel(out)]
    seconds, rc = call([sys.executable, *cmd], os.path.splitext(out)[0] + ".txt", args.threads, env)
    if rc:
        print(f"{rel(ckpt)}: evaluate.py exited {rc}, see {os.path.splitext(out)[0]}.txt", flush=True)
        return None
    return "python " + " ".join(cmd), seconds, json.load(open(out))


def accuracies(report):
    """{"natural", attack name: accuracy, ...} of an evaluate.py report."""
    return {"natural": report["natural"], **{a["name"]: a["accuracy"] for a in report["attacks"]}}


def export(run_ckpt, path):
    """The final classifier alone, weights only (no optimizer, no mask net, no eps table), with what
    evaluate.py needs to rebuild it; written atomically. Returns {"path", "sha256"}."""
    ck = torch.load(run_ckpt, map_location="cpu", weights_only=True)
    keep = {k: ck[k] for k in ("model", "arch", "num_classes", "in_channels", "image_size", "dataset", "method",
                               "epoch", "args")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(keep, path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"path": rel(path), "sha256": sha256(path)}


def eps_counts(run_ckpt):
    """{eps_i: number of training samples} of a customized run's final eps table. eps_i takes few values
    (multiples of eta, capped at eps_max), so the counts are the whole distribution, small enough for JSON."""
    eps = torch.load(run_ckpt, map_location="cpu", weights_only=True)["eps"]
    values, counts = torch.unique(eps.double().round(decimals=6), return_counts=True)
    return {f"{v:g}": c for v, c in zip(values.tolist(), counts.tolist())}


def train_command(spec, args, out):
    return [spec["script"], *spec["flags"], "--epochs", str(spec["epochs"]), "--seed", str(spec["seed"]),
            "--device", args.device, "--out", rel(out)] + (["--train-size", str(args.train_size)] if args.train_size
                                                          else [])


def snapshot_path(spec, args, k):
    return os.path.join(args.checkpoints, f"{spec['name']}_seed{spec['seed']}{args.tag}_at{k}.pt")


def train(spec, args, out, partial):
    """Step 1; returns the command, or None if training failed."""
    cmd, ckpt = train_command(spec, args, out), os.path.join(out, "model.pt")
    carried = os.path.join(partial, os.path.basename(out))
    if not os.path.exists(ckpt) and os.path.exists(os.path.join(carried, "model.pt")) and not args.quick:
        shutil.copytree(carried, out, dirs_exist_ok=True)
    trained = lambda: os.path.exists(ckpt) and [json.loads(line)["epoch"] for line in
                                                open(os.path.join(out, "log.jsonl"))][-1:] or [0]
    for k in [k for k in spec.get("keep", []) if k < spec["epochs"]] + [spec["epochs"]]:
        if trained()[0] < k:
            resume = ["--resume"] if os.path.exists(ckpt) else ["--overwrite"]
            print(f"{spec['name']} seed {spec['seed']}: training to epoch {k} ({' '.join(resume)})", flush=True)
            with open(os.path.join(out, "commit.txt"), "a") as f:  # the code each (re)start of training ran
                f.write(commit() + "\n")
            with open(os.path.join(out, "machines.jsonl"), "a") as f:  # and where: a row can span machines
                amp = cmd[cmd.index("--amp") + 1] if "--amp" in cmd else "off"
                f.write(json.dumps({"from_epoch": trained()[0], "amp": amp, **machine(args)}) + "\n")
            segment = cmd[:cmd.index("--epochs") + 1] + [str(k)] + cmd[cmd.index("--epochs") + 2:]
            _, rc = call([sys.executable, *segment, *resume], os.path.join(out, "train.txt"), args.threads)
            if rc:
                print(f"{spec['name']} seed {spec['seed']}: training exited {rc}, see {out}/train.txt", flush=True)
                return None
        if k < spec["epochs"] and not os.path.exists(snapshot_path(spec, args, k)):
            if trained()[0] != k:  # carried past k by a run that did not keep it: not recoverable
                print(f"{spec['name']} seed {spec['seed']}: no classifier of epoch {k} kept", flush=True)
                continue
            export(ckpt, snapshot_path(spec, args, k))
    return "python " + " ".join(cmd)


def train_and_evaluate(spec, args, landed, partial):
    """Steps 1-3 of a job; returns its row, or None if a step failed."""
    name, seed = spec["name"], spec["seed"]
    out = os.path.join(args.out, f"{name}_seed{seed}")
    os.makedirs(out, exist_ok=True)
    command = train(spec, args, out, partial)
    if command is None:
        return None
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    row = {"name": name, "seed": seed, "epochs": spec["epochs"], "command": command,
           "commit": " ".join(dict.fromkeys(open(os.path.join(out, "commit.txt")).read().split())),
           "seconds": sum(r["seconds"] for r in log), "machine": machine(args), "epoch_log": log}
    if "train_mask_mean" in log[0]:
        row["mask_mean_per_epoch"] = [r["train_mask_mean"] for r in log]
    if "eps_mean" in log[0]:  # customized: where the eps table went, epoch by epoch, and where it ended
        row["eps_per_epoch"] = {"mean": [r["eps_mean"] for r in log], "at_max": [r["eps_at_max"] for r in log]}
        row["eps_final_counts"] = eps_counts(os.path.join(out, "model.pt"))
    if os.path.exists(where := os.path.join(out, "machines.jsonl")):  # each (re)start: its first epoch, its CPU;
        # a restart stopped before its first epoch ended is superseded by the next one from that epoch
        row["training_machines"] = list({m["from_epoch"]: m for m in map(json.loads, open(where))}.values())
    if landed:  # trained before models were kept: the same command again
        row["reproduced"] = {"log_equal": UNTIMED(log) == UNTIMED(landed["epoch_log"]),
                             "landed_commit": landed["commit"], "landed_seconds": landed["seconds"]}
    if landed and row["reproduced"]["log_equal"]:  # the same model: its numbers stand
        row.update({k: landed[k] for k in ("eval_command", "eval_commit", "eval_seconds", "n_test", "acc")})
    else:
        print(f"{name} seed {seed}: evaluating", flush=True)
        n = ["--n-examples", str(args.n_test)] if args.n_test else []
        got = evaluate(os.path.join(out, "model.pt"), spec["eval"] + n, os.path.join(out, "eval.json"), args)
        if got is None:
            return None
        cmd, seconds, ev = got
        row.update(eval_command=cmd, eval_commit=commit(), eval_seconds=seconds, n_test=ev["n_examples"],
                   acc=accuracies(ev))
        if landed:  # the difference is reported: the landed row's numbers and log stay beside
            row["reproduced"].update(landed_acc=landed["acc"], landed_epoch_log=landed["epoch_log"])
    row["checkpoint"] = export(os.path.join(out, "model.pt"),
                               os.path.join(args.checkpoints, f"{name}_seed{seed}{args.tag}.pt"))
    row["budget_curve"] = [{"epoch": k, "checkpoint": {"path": rel(p), "sha256": sha256(p)}}
                           for k in spec.get("keep", []) if os.path.exists(p := snapshot_path(spec, args, k))]
    if not row["budget_curve"]:
        del row["budget_curve"]
    shutil.rmtree(os.path.join(partial, os.path.basename(out)), ignore_errors=True)  # trained and kept
    print(f"{name} seed {seed}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in row["acc"].items()), flush=True)
    return row


def strong_evaluation(spec, row, args, at=None):
    """Step 4 (4b: `at`, the budget curve's entry of that epoch): the whole chain on the kept
    checkpoint, each attack alone: the row's (the entry's) new keys, or None. With --autoattack
    (not 4b) AutoAttack runs last, alone too, and this is also step 5."""
    name, seed, checkpoint = spec["name"], spec["seed"], (at or row)["checkpoint"]
    with_aa = args.autoattack and at is None
    queries = args.square_queries_later if seed > 0 and args.square_queries_later else args.square_queries
    out = os.path.join(args.out, f"{name}_seed{seed}", f"strong_at{at['epoch']}.json" if at else "strong.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    when = f" at epoch {at['epoch']}" if at else ""
    print(f"{name} seed {seed}: strong evaluation{when} ({queries} Square queries)", flush=True)
    flags = [*spec["strong"], "--attack-all", "--n-examples", str(args.n_strong), "--square-queries", str(queries)]
    got = evaluate(os.path.join(REPO, checkpoint["path"]), flags + ["--autoattack"] * with_aa + args.strong_extra,
                   out, args)
    if got is None:
        return None
    cmd, seconds, ev = got
    if ev["checkpoint"]["sha256"] != checkpoint["sha256"]:
        print(f"{name} seed {seed}: the evaluated file is not the kept checkpoint; not recorded", flush=True)
        return None
    n, aa = ev["n_examples"], ev["attacks"][-1] if with_aa else None
    acc = {"n": n, **{k: v for k, v in accuracies(ev).items() if k != "autoattack"},
           # the chain's worst case: the union of all drops only the points AutoAttack alone breaks
           "any": (torch.tensor(round(n * ev["any_attack"]) + aa["newly_broken"], dtype=torch.float32) / n).item()
           if aa else ev["any_attack"],  # float32, as evaluate.py's mean
           "sanity_eps0.5": ev["sanity"]["accuracy"] if ev["sanity"] else None}
    print(f"{name} seed {seed}: strong " + " ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()
                                                     if k != "n" and v is not None), flush=True)
    new = {"acc_strong": acc, "flags": [k for k, f in ev["flags"].items() if f["raised"]],
           "strong": {"command": cmd, "commit": commit(), "seconds": seconds, "threads": args.threads,
                      "square_queries": queries,
                      "flag_details": {k: f["detail"] for k, f in ev["flags"].items()},
                      "attack_seconds": {a["name"]: a["seconds"] for a in ev["attacks"]}}}
    if aa:
        print(f"{name} seed {seed}: AutoAttack {100 * aa['accuracy']:.1f} (the chain {100 * acc['any']:.1f}); "
              f"only AutoAttack breaks {aa['newly_broken']}, only the chain {aa['missed']}", flush=True)
        acc.update(autoattack=aa["accuracy"], any_with_autoattack=ev["any_attack"])
        new["autoattack"] = {"command": cmd, "commit": new["strong"]["commit"], "seconds": aa["seconds"],
                             "with_step_4": True, "package": aa["settings"]["package"],
                             "package_version": aa["settings"]["package_version"], "onednn_isa": onednn_isa(),
                             "only_autoattack": aa["newly_broken"], "only_chain": aa["missed"]}
    return new


def autoattack_evaluation(spec, row, args):
    """Step 5: AutoAttack standard on step 4's images and eps, after step 4's chain run on its
    survivors (evaluate.py attacks every naturally correct point with AutoAttack all the same), with
    the kernels of args.autoattack_env (evaluation is fp32: no pin needed to reproduce training).
    The row's new keys, or None."""
    name, seed, strong = spec["name"], spec["seed"], row["acc_strong"]
    chain = [k for k in strong if k not in ("n", "natural", "any", "sanity_eps0.5")]
    out = os.path.join(args.out, f"{name}_seed{seed}", "autoattack.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print(f"{name} seed {seed}: AutoAttack standard after the chain {','.join(chain)}", flush=True)
    flags = [*spec["strong"], "--attacks", ",".join(chain + ["autoattack"]), "--n-examples", str(strong["n"]),
             "--square-queries", str(row["strong"]["square_queries"])]
    flags += [] if "--channels-last" in flags else ["--channels-last"]  # fp32, the faster layout on a CPU
    got = evaluate(os.path.join(REPO, row["checkpoint"]["path"]), flags + args.strong_extra, out, args,
                   args.autoattack_env)
    if got is None:
        return None
    cmd, seconds, ev = got
    if ev["checkpoint"]["sha256"] != row["checkpoint"]["sha256"]:
        print(f"{name} seed {seed}: the evaluated file is not the kept checkpoint; not recorded", flush=True)
        return None
    *ours, aa = ev["attacks"]
    entry = {"command": cmd, "commit": commit(), "seconds": seconds, "package": aa["settings"]["package"],
             "package_version": aa["settings"]["package_version"], "onednn_isa": onednn_isa(args.autoattack_env),
             **args.autoattack_env, "chain_any_again": ours[-1]["accuracy"], "only_autoattack": aa["newly_broken"],
             "only_chain": aa["missed"], "attack_seconds": {a["name"]: a["seconds"] for a in ev["attacks"]}}
    print(f"{name} seed {seed}: AutoAttack {100 * aa['accuracy']:.1f}, the chain again "
          f"{100 * ours[-1]['accuracy']:.1f} "
          f"(landed {100 * strong['any']:.1f}); only AutoAttack breaks {aa['newly_broken']}, only the chain "
          f"{aa['missed']}", flush=True)
    return {"acc_strong": {**strong, "autoattack": aa["accuracy"], "any_with_autoattack": ev["any_attack"]},
            "autoattack": entry}


def run_job(spec, args, order, partial):
    """Whatever of steps 1-4 the (row, seed) still lacks, unless another invocation is running it.
    spec: name, seed, script, epochs, flags (training, without --epochs, --seed, --device, --out),
    eval and strong (evaluate.py's flags)."""
    out = os.path.join(args.out, f"{spec['name']}_seed{spec['seed']}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "job.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{spec['name']} seed {spec['seed']}: another invocation runs it; skipped", flush=True)
            return
        job(spec, args, order, partial)


def job(spec, args, order, partial):
    name, seed = spec["name"], spec["seed"]
    row = next((r for r in load(args.results)["rows"] if key(r) == (name, seed, spec["epochs"])), None)
    if row and "checkpoint" in row:
        path = os.path.join(REPO, row["checkpoint"]["path"])
        if not os.path.exists(path) or sha256(path) != row["checkpoint"]["sha256"]:
            print(f"{name} seed {seed}: {row['checkpoint']['path']} is missing or not the file of its sha256; "
                  "skipped (restore it from git)", flush=True)
            return
    else:
        row = train_and_evaluate(spec, args, row, partial)
        if row is None:
            return
        save(row, args.results, order)
    if "acc_strong" not in row and not args.no_strong:
        strong = strong_evaluation(spec, row, args)
        if strong is None:
            return
        row = {**row, **strong}
        save(row, args.results, order)
    for at in [] if args.no_strong else [at for at in row.get("budget_curve", []) if "acc_strong" not in at]:
        strong = strong_evaluation(spec, row, args, at)
        if strong is not None:
            at.update(strong)
            save(row, args.results, order)
    if args.autoattack and "acc_strong" in row and "autoattack" not in row["acc_strong"]:
        aa = autoattack_evaluation(spec, row, args)
        if aa is not None:
            save({**row, **aa}, args.results, order)


def paths(args, table, results, trial="", tag=""):
    """Absolute --out, --results, the checkpoints beside the results and --data-dir; a trial run
    (`trial`: its suffix) keeps its results in its own run directory, never in benchmarks/results.
    `tag`: a suffix of the run directories and of the kept checkpoints' names (ROW_seedS{tag}.pt)."""
    args.tag = tag
    args.out = os.path.abspath(args.out or os.path.join(REPO, "runs", table + tag + trial))
    args.results = os.path.abspath(args.results or (os.path.join(args.out, "results.json") if trial else results))
    args.checkpoints = os.path.join(os.path.dirname(args.results), "checkpoints")
    args.data_dir = os.path.abspath(args.data_dir)


def add_arguments(p, results, epochs):
    """The flags every table takes; `results`: the default results file, `epochs`: the default budget."""
    a = p.add_argument
    a("--seeds", type=int, nargs="+", default=[0])
    a("--epochs", type=int, help=f"epochs of every row (default {epochs})")
    a("--n-test", type=int, help="the paper's evaluation on the first N test images (default: all)")
    a("--n-strong", type=int, help="the strong evaluation on the first N test images (default 1000)")
    a("--square-queries", type=int, help="Square's queries (default: AutoAttack's 5000)")
    a("--square-queries-later", type=int, help="Square's queries for seeds > 0 (default: the same)")
    a("--no-strong", action="store_true", help="stop after the checkpoint (step 3)")
    a("--autoattack", action="store_true", help="step 5: AutoAttack standard on the strong evaluation's images "
      "(pip install pyautoattack)")
    a("--train-size", type=int, help="train on N images (default: all)")
    a("--jobs", type=int, default=1, help="jobs in parallel")
    a("--out", help="run directories (default: runs/TABLE)")
    a("--results", help=f"the results file; checkpoints go beside it (default: {rel(results)})")
    a("--summary", action="store_true", help="print the tables of the results file and exit")
