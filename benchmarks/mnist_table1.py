"""Table 1 of the calibrated-AT paper (ACML 2021) on the whole MNIST (60,000 train / 10,000 test).

Every row is trained by its real CLI and evaluated by evaluate.py (benchmarks/runner.py: train, the
paper's evaluation on the 10,000 test images, the classifier kept in
benchmarks/results/checkpoints/ROW_seedS.pt with its sha256, the strong evaluation of that file on
the first 1,000); results accumulate in benchmarks/results/mnist_table1.json, one entry per (row,
seed), written as each step lands, and finished work is skipped, so a row can be stopped and resumed,
on another machine too. A row landed before models were kept is retrained by its command: a per-epoch log
equal to the landed one (every value but seconds and images/s) shows training reproduced it.

Rows: AT(0.3), AT(0.4) (train_customized.py --fixed-eps --c 0 --loss ce: Madry et al.'s PGD-AT),
TRADES(0.3), TRADES(0.4) (train_calibrated.py --no-mask --no-weighted-ce --attack kl, beta 1 as
Table 1's footnote), calibrated_cent and calibrated_cw at 0.3 and 0.4 (the MNIST preset), and
customized(0.3), with the customized paper's Table 6 ablations Adv+LS(0.3) (--fixed-eps --loss ce: label
smoothing at eps_max) and Adp-Adv(0.3) (--c 0 --loss ce: adaptive eps alone); the customized paper has no
MNIST results, so these rows test the method rather than reproduce a table. AT(0.4) predicts one class (the
paper's "-"): it keeps its landed row and no model.

Same for every row, where the papers leave it open or where our budget cannot follow them (the
paper trains each baseline with its authors' code and settings, 40 epochs for calibrated): SmallCNN
(the release's MNIST net), Adam lr 1e-3 (the calibrated MNIST release), weight decay 0, batch 100,
--epochs E with the lr x0.1 after round(0.75 E) epochs (the release: after 30 of 40), the training
attack 20 steps of eps/20 from a uniform random start (Sec. 5.1.1), the last epoch's model.pt (no
selection on the test set). Customized keeps the customized paper's ratios to eps_max (Sec. 5, at 8/255):
c = 10 * (8/255) / eps (c * eps_max = 0.31; c = 10 at 0.3 is invalid) and eta = 0.16 eps_max (0.005 at
8/255: eps_i reaches eps_max after ~7 unfooled visits; 0.0478 at 0.3), kappa 10, the mixed loss. Only where
a run is too short for that ratio does eta grow to eps / E (3 epochs: 0.1); eps / E at 40 epochs (0.0075)
would need 40 unfooled visits in a row, so the run would train far below the eps it is evaluated at.

Evaluation, the calibrated paper's MNIST protocol (Sec. 5.1.1): eps 0.3 for every row, PGD-20 and PGD-100
(CE, step 0.015, no random start) and C&W-inf (30 steps of 0.015, kappa 50, no random start),
each attack alone on every naturally correct test image (evaluate.py --attack-all).

    python -c "import torchvision; torchvision.datasets.MNIST('data', download=True)"   # once: the MNIST root
    python benchmarks/mnist_table1.py                   # every row, seed 0
    python benchmarks/mnist_table1.py --rows "AT(0.3)" "TRADES(0.3)" --seeds 0 1 2
    python benchmarks/mnist_table1.py --summary         # the mean +- std table and the verdicts
    python benchmarks/mnist_table1.py --epochs 40 --provenance   # where and from which commit each row trained
    python benchmarks/mnist_table1.py --quick           # a smoke run into runs/, not the results
    python benchmarks/mnist_table1.py --fast --rows "TRADES(0.3)"   # the CPU's fast path, its own results
    python benchmarks/mnist_table1.py --autoattack      # + AutoAttack standard (pip install pyautoattack)

--fast trains with bf16 autocast and channels-last (--amp bf16 --channels-last), evaluates in fp32
with channels-last, and pins the kernels to AVX-512 with oneDNN capped at AMX (ISA_FAST); its rows
go to benchmarks/results/mnist_table1_bf16.json, their models to checkpoints/ROW_seedS_bf16.pt. On a
CPU without AVX-512 the fast path keeps its AVX2 kernels (ISA), and without native bf16 it trains in
fp32 + channels-last (bf16 is emulated there, ~7x slower; the trainers refuse it); each training
segment records its precision and kernels in the row's training_machines.

The release's budget, --epochs 40 --fast: every setting as above (lr x0.1 after epoch 30, as the
release), bf16 autocast (where native) + channels-last training (budgets other than 3 epochs train only on the
fast path, so that a (row, seed, epochs) names one model), entries with "epochs": 40 in
mnist_table1.json beside the 3-epoch ones, models checkpoints/ROW_seedS_e40.pt. Seed 0 also keeps
its classifier at epochs 10, 20 and 30 (--budget-curve; ROW_seed0_e40_atK.pt, trained in segments
with --resume, the same run) and gives each the strong evaluation: the budget curve.

    python benchmarks/mnist_table1.py --epochs 40 --fast --autoattack --rows "calibrated_cw(0.3)" "TRADES(0.3)"

AT(0.3) stalls at chance at seeds 1 and 2 of the 3-epoch rows (train loss ln 10 throughout);
--at-warmup N gives the fixed-eps rows alone (AT, Adv+LS) the trainers' --eps-warmup N (the training attack's eps ramps
from 0 over N epochs); the rows record it in their command. With --epochs 40 it defaults to 1,
chosen on training data only: the first two epochs of the 40-epoch AT(0.3) command at seeds 1 and 2
leave ln 10 with it (train loss 0.45 in the ramp's epoch, 0.33 and 0.29 in the next, at full eps)
and stay at ln 10 without it (seed 1: 2.302; benchmarks/results/at_warmup_probe.json).

--autoattack adds AutoAttack standard on the strong evaluation's 1,000 images (eps 0.3; runner.py,
step 5) to each row that lacks it, in fp32 with channels-last and the fast path's kernels (no pin is
needed to reproduce an evaluation): acc_strong's "autoattack", and in "autoattack" the images only
it breaks and only our chain breaks. A row that has no strong evaluation yet (a new 40-epoch row)
gets both in one evaluate.py run, AutoAttack last and alone, with the strong evaluation's kernels.
"""
import argparse
import importlib.util
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_HALF_UP, Decimal

import runner as R

RESULTS = os.path.join(R.REPO, "benchmarks", "results", "mnist_table1.json")
# Half-trained rows carried in git from one machine to the next (model.pt, log.jsonl, commit.txt,
# machines.jsonl of a run directory, committed by hand): a row found here resumes from it.
PARTIAL = os.path.join(R.REPO, "benchmarks", "results", "mnist_table1_partial")
# Table 1 of the calibrated paper (mean of 5 runs): natural, PGD-20, PGD-100; None = "-" (training failed).
PAPER = {"AT(0.3)": (99.2, 93.4, 92.3), "AT(0.4)": (None, None, None), "TRADES(0.3)": (99.3, 94.9, 92.9),
         "TRADES(0.4)": (99.1, 95.3, 91.6), "calibrated_cent(0.3)": (99.3, 95.4, 93.2),
         "calibrated_cent(0.4)": (99.2, 96.8, 95.8), "calibrated_cw(0.3)": (99.1, 96.2, 95.0),
         "calibrated_cw(0.4)": (99.1, 97.1, 96.2)}
LANDED_ONLY = {"AT(0.4)"}  # a constant predictor (train loss ln 10, 11.35 % on every column): nothing to keep
# Table 1's claims, (better, worse): the four at 0.3 over three seeds, eps 0.4 over 0.3 (seed 0).
CLAIMS = [("calibrated_cw(0.3)", "TRADES(0.3)"), ("calibrated_cw(0.3)", "AT(0.3)"),
          ("calibrated_cent(0.3)", "TRADES(0.3)"), ("calibrated_cent(0.3)", "AT(0.3)"),
          ("calibrated_cw(0.4)", "calibrated_cw(0.3)"), ("calibrated_cent(0.4)", "calibrated_cent(0.3)"),
          # the customized paper claims robustness and natural accuracy over PGD-AT, and (Table 6) that each of
          # its two parts helps, label smoothing at eps_max (Adv+LS) and adaptive eps (Adp-Adv), but neither alone
          # gives it all
          ("customized(0.3)", "AT(0.3)"), ("Adv+LS(0.3)", "AT(0.3)"), ("Adp-Adv(0.3)", "AT(0.3)"),
          ("customized(0.3)", "Adv+LS(0.3)"), ("customized(0.3)", "Adp-Adv(0.3)")]


# The customized paper's eta / eps_max (Sec. 5: 0.005 at 8/255, ~0.16): eps_i reaches eps_max after ~7 unfooled visits.
ETA_RATIO = 0.005 / (8 / 255)


def row_flags(name, epochs):
    """(script, flags) of a row: the method's flags on top of the settings every row shares."""
    method, eps = name[:-5], float(name[-4:-1])
    decay = str(max(1, round(0.75 * epochs)))
    # customized: c * eps_max as at 8/255; eta at the paper's ratio, or eps / E where a run is too short for that
    # ratio to reach eps_max (3 epochs: 0.1). eps / E at 40 epochs (0.0075) would train at a fraction of eps_max.
    c, eta = f"{10 * 8 / 255 / eps:.4g}", f"{max(eps / epochs, ETA_RATIO * eps):.4g}"
    sgd_script = ["--arch", "smallcnn", "--optimizer", "adam", "--lr", "1e-3", "--wd", "0", "--batch-size", "100",
                  "--milestones", decay, "--steps", "20", "--alpha", "0.05", "--eps-max", str(eps)]
    calibrated = ["--eps", str(eps), "--milestones", decay]  # the preset does the rest (checked by --help)
    return {"AT": ("train_customized.py", [*sgd_script, "--fixed-eps", "--c", "0", "--loss", "ce"]),
            "customized": ("train_customized.py", [*sgd_script, "--c", c, "--eta", eta]),
            # Table 6 of the customized paper: label smoothing at eps_max alone, adaptive eps alone (CE loss)
            "Adv+LS": ("train_customized.py", [*sgd_script, "--fixed-eps", "--c", c, "--loss", "ce"]),
            "Adp-Adv": ("train_customized.py", [*sgd_script, "--c", "0", "--eta", eta, "--loss", "ce"]),
            "TRADES": ("train_calibrated.py", [*calibrated, "--no-mask", "--no-weighted-ce", "--attack", "kl"]),
            "calibrated_cent": ("train_calibrated.py", [*calibrated, "--attack", "pgd"]),
            "calibrated_cw": ("train_calibrated.py", [*calibrated, "--attack", "cw"])}[method]


ROWS = ["calibrated_cw(0.3)", "calibrated_cent(0.3)", "TRADES(0.3)", "AT(0.3)", "customized(0.3)", "Adv+LS(0.3)",
        "Adp-Adv(0.3)", "calibrated_cw(0.4)", "calibrated_cent(0.4)", "TRADES(0.4)", "AT(0.4)"]
EVAL = ["--protocol", "calibrated", "--attacks", "pgd20,pgd100,cw", "--attack-all", "--eps", "0.3"]
STRONG = ["--protocol", "calibrated", "--eps", "0.3"]  # every attack of the chain, each alone; the sanity check
# The CPU kernels of every row (oneDNN, ATen, MKL pick theirs by the CPU's ISA): the landed rows' machine had AVX2.
ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# --fast: AVX-512, oneDNN up to AMX. On this project's Intel Xeon bf16 gains nothing without AMX (capped at
# AVX512_CORE_BF16 a PGD step is no faster than fp32: benchmarks/cpu_speed.py); where the CPU has no AMX
# (AMD EPYC) the cap leaves its AVX512_BF16 kernels. Each row records the ISA oneDNN reports (onednn_isa).
ISA_FAST = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX",
            "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
RESULTS_FAST = os.path.join(R.REPO, "benchmarks", "results", "mnist_table1_bf16.json")
# A CPU without AVX-512 runs the fast path with its own best kernels (AVX2; AVX-512 pins are illegal there), and
# without native bf16 it trains in fp32 (emulated bf16 is ~7x slower; train_*.py refuses it). Each training
# segment records its precision and kernels (the row's training_machines): a row can span machines.
AVX512 = R.torch.cpu._is_avx512_supported()
NATIVE_BF16 = R.torch.cpu._is_avx512_bf16_supported() and R.torch.ops.mkldnn._is_mkldnn_bf16_supported()
FAST_ENV = ISA_FAST if AVX512 else ISA


def pct(x, sign=""):
    """An accuracy (a fraction of at most 10,000 images, stored as float32) in percent, one decimal, half away
    from 0: 0.9574999809 (9,575 images) prints 95.8, not the 95.7 that formatting the float32 value gives."""
    return f"{Decimal(f'{100 * x:.2f}').quantize(Decimal('0.1'), ROUND_HALF_UP):{sign}}"


def table(rows):
    """Markdown, one line per (row, seed): ours [paper], accuracy (%) at eps 0.3."""
    lines = ["| row | seed | natural | PGD-20 | PGD-100 | C&W-inf | strong: APGD-CE / APGD-T / Square / any / "
             "AutoAttack (n) "
             "| flags | train s | log reproduced |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(r["name"], (None,) * 3) + (None,)
        cells = [pct(r["acc"][k]) + ("" if r["name"] not in PAPER or p is None and k == "cw" else
                                     f" [{'-' if p is None else p}]")
                 for k, p in zip(("natural", "pgd20", "pgd100", "cw"), paper)]
        s = r.get("acc_strong")
        cols = ("apgd-ce", "apgd-t", "square", "any", "autoattack")
        strong = " / ".join(pct(s[k]) if k in s else "-" for k in cols) + f" ({s['n']})" if s else "-"
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
            ("C&W-inf", "acc", "cw"), ("any attack (1,000)", "acc_strong", "any"),
            ("AutoAttack (1,000)", "acc_strong", "autoattack")]
    get = lambda r, part, k: 100 * r[part][k] if k in r.get(part, {}) else None

    def cell(name, part, k):
        v = [x for x in (get(r, part, k) for r in by[name].values()) if x is not None]
        mean_sd = lambda: f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"
        return "-" if not v else pct(v[0] / 100) if len(v) == 1 else mean_sd()

    lines = ["| row | seeds | " + " | ".join(c[0] for c in cols) + " | masking flags (seeds raising / evaluated) |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for name in [n for n in ROWS if n in by]:
        paper = dict(zip(("natural", "pgd20", "pgd100"), PAPER.get(name, ())))
        cells = [cell(name, part, k) + ("" if k not in paper else f" [{'-' if paper[k] is None else paper[k]}]")
                 for _, part, k in cols]
        strong = [r for r in by[name].values() if "acc_strong" in r]
        raised = sorted({f for r in strong for f in r["flags"]})
        flags = ", ".join(f"{f} ({sum(f in r['flags'] for r in strong)}/{len(strong)})" for f in raised) or \
            ("none" if strong else "-")
        seeds = ", ".join(f"{s}" + "*" * at_chance(by[name][s]) for s in sorted(by[name]))
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {flags} |")
    n = lambda part: next((f"{r['n_test'] if part == 'acc' else r['acc_strong']['n']:,}" for r in rows if part in r),
                          "")
    lines[0] = lines[0].replace("(1,000)", f"({n('acc_strong')})")
    lines += ["", f"| claim | PGD-20 ({n('acc')}) | PGD-100 ({n('acc')}) | any attack ({n('acc_strong')}) | "
              f"AutoAttack ({n('acc_strong')}) | natural ({n('acc')}) |", "|---|---|---|---|---|---|"]
    for a, b in CLAIMS:
        if a not in by or b not in by:
            continue
        cells = []
        for part, k in (("acc", "pgd20"), ("acc", "pgd100"), ("acc_strong", "any"), ("acc_strong", "autoattack"),
                        ("acc", "natural")):
            has = lambda r: get(r, part, k) is not None
            seeds = sorted(s for s in set(by[a]) & set(by[b]) if has(by[a][s]) and has(by[b][s]))
            d = [get(by[a][s], part, k) - get(by[b][s], part, k) for s in seeds]
            # one seed: the spread is that of the worse row over its seeds (all we measured)
            ref = [get(r, part, k) for r in by[b].values() if has(r) and not at_chance(r)]
            cells.append(verdict(d, seeds, ref, [at_chance(by[a][s]) or at_chance(by[b][s]) for s in seeds]))
        lines.append(f"| {a} > {b} | " + " | ".join(cells) + " |")
    if "AT(0.4)" in by:
        nat = [r["acc"]["natural"] for r in by["AT(0.4)"].values()]
        word = "holds" if all(map(at_chance, by["AT(0.4)"].values())) else "does not hold"
        lines.append(f"| AT(0.4) fails to train | {word}: natural {', '.join(map(pct, nat))} % "
                     "(one class: 11.4 %) | | |")
    if any(map(at_chance, rows)):
        lines += ["", "\\* a run stuck at chance (natural accuracy under 20 %: it predicts one class); a difference "
                  "marked * is against, or from, such a run, and is not counted in the verdict."]
    return "\n".join(lines)


def at_chance(r):
    """A run that never left chance: natural accuracy under 20 % (one class is 9.8-11.35 % of MNIST's test set)."""
    return r["acc"]["natural"] < 0.2


def verdict(d, seeds, ref, marked):
    """'holds': the difference is positive in every seed and its mean exceeds the spread (the std of
    the paired differences; with one seed, the std of the worse row over its seeds); 'does not
    hold': the same, reversed; otherwise undecided. marked: per seed, a run at chance is in the pair;
    that difference is shown starred and not counted: it measures a constant predictor, not a method."""
    if not d:
        return "-"
    what = ", ".join(pct(x / 100, "+") + "*" * m for x, m in zip(d, marked))
    d, seeds = [x for x, m in zip(d, marked) if not m], [s for s, m in zip(seeds, marked) if not m]
    if not d:
        return f"**not a test**: {what} (a run at chance in every seed)"
    spread = statistics.stdev(d) if len(d) > 1 else statistics.stdev(ref) if len(ref) > 1 else None
    mean = statistics.mean(d)
    word = "undecided" if spread is None else "holds" if min(d) > 0 and mean > spread else \
        "does not hold" if max(d) < 0 and -mean > spread else "undecided"
    return f"**{word}**: {what}" + (f" (mean {mean:+.1f}, sd {spread:.1f})" if len(d) > 1 else
                                   f" (seed {seeds[0]} only" + (f"; seed sd {spread:.1f})" if spread else ")"))


def budget_curve(rows):
    """Markdown: the strong evaluation of each row's classifier at its kept epochs and at its last."""
    lines = ["| row | seed | epoch | natural | APGD-CE | APGD-T | Square | any attack (n) | flags |", "|---" * 9 + "|"]
    for r in (r for r in rows if r.get("budget_curve") and "acc_strong" in r):
        for at in [*r["budget_curve"], {"epoch": r["epochs"], **r}]:
            s = at.get("acc_strong")
            cells = [pct(s[k]) for k in ("natural", "apgd-ce", "apgd-t", "square", "any")] if s else ["-"] * 5
            lines.append(f"| {r['name']} | {r['seed']} | {at['epoch']} | " + " | ".join(cells[:4]) +
                         (f" | {cells[4]} ({s['n']}) | {', '.join(at['flags']) or 'none'} |" if s else " | - | - |"))
    return "\n".join(lines)


def provenance(rows):
    """Markdown, one line per (row, seed): the commits that trained it, where its epochs ran (CPU, oneDNN's
    kernels, training precision; consecutive segments on the same kind merged), single-thread hours."""
    short = lambda isa: next((k for k, w in (("AMX", "AMX"), ("AVX512_BF16", "bfloat16"), ("AVX-512", "AVX-512"),
                                             ("AVX2", "AVX2")) if w in (isa or "")), isa)
    lines = ["| row | seed | commits | epochs: CPU, kernels, precision | train h | eval h |", "|---|---|---|---|---|---|"]
    for r in rows:
        spans = []  # [first epoch, (cpu, kernels, precision)]
        for m in r.get("training_machines") or [{"from_epoch": 0, **r["machine"]}]:
            amp = m.get("amp", "bf16" if "--amp bf16" in r["command"] else "off").replace("off", "fp32")
            kind = (m["cpu"].replace("(R)", "").split(" Processor")[0], short(m.get("onednn_isa")), amp)
            spans += [] if spans and spans[-1][1] == kind else [[m["from_epoch"] + 1, kind]]
        ends = [s[0] - 1 for s in spans[1:]] + [r["epochs"]]
        where = "; ".join(f"{s[0]}-{e} {', '.join(s[1])}" for s, e in zip(spans, ends))
        aa = r.get("autoattack", {})
        evals = [r.get("eval_seconds", 0), r.get("strong", {}).get("seconds", 0),
                 0 if aa.get("with_step_4") else aa.get("seconds", 0),
                 *(at.get("strong", {}).get("seconds", 0) for at in r.get("budget_curve", []))]
        lines.append(f"| {r['name']} | {r['seed']} | {r['commit']} | {where} | {r['seconds'] / 3600:.1f} | "
                     f"{sum(evals) / 3600:.1f} |")
    return "\n".join(lines)


# Table 6 of the customized paper (VGG-16, CIFAR-10, 8/255): its rows here, and its clean / PGD accuracy.
TABLE6 = [("Adv train", "AT(0.3)", 80.32, 36.63), ("Adv+LS", "Adv+LS(0.3)", 80.25, 43.0),
          ("Adp-Adv", "Adp-Adv(0.3)", 87.91, 38.59), ("CAT", "customized(0.3)", 84.22, 75.54)]


def table6(rows, seed=0):
    """Markdown: the customized paper's Table 6 ablation on MNIST at eps 0.3, one seed, beside its CIFAR-10 numbers."""
    by = {r["name"]: r for r in rows if r["seed"] == seed}
    cell = lambda r, part, k: pct(r[part][k]) if k in r.get(part, {}) else "-"
    lines = [f"| Table 6 row | ours, seed {seed} | natural | PGD-20 | PGD-100 | any attack | AutoAttack | flags | "
             "paper (CIFAR-10): clean / PGD |", "|---|---|---|---|---|---|---|---|---|"]
    for paper_name, name, clean, pgd in TABLE6:
        r = by.get(name)
        cells = [cell(r, "acc", "natural"), cell(r, "acc", "pgd20"), cell(r, "acc", "pgd100"),
                 cell(r, "acc_strong", "any"), cell(r, "acc_strong", "autoattack"),
                 ", ".join(r.get("flags", [])) or ("none" if "acc_strong" in r else "-")] if r else \
            ["not trained yet"] + ["-"] * 5
        lines.append(f"| {paper_name} | {name} | " + " | ".join(cells) + f" | {clean} / {pgd} |")
    return "\n".join(lines)


def eps_trajectory(rows, epochs=(1, 2, 5, 10, 20, 30, 40)):
    """Markdown: the customized rows' eps table by epoch, its mean and share of samples at eps_max."""
    lines = ["| row | seed | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|---|" + "---|" * len(epochs)]
    for r in (r for r in rows if "eps_per_epoch" in r):
        eps = r["eps_per_epoch"]
        lines.append(f"| {r['name']} | {r['seed']} | " + " | ".join(
            f"{eps['mean'][e - 1]:.3f} ({100 * eps['at_max'][e - 1]:.0f} %)" if e <= len(eps["mean"]) else "-"
            for e in epochs) + " |")
    return "\n".join(lines)


def report(rows):
    """Each budget's tables, the longest first; its budget curve under it."""
    out = []
    for e in sorted({r["epochs"] for r in rows}, reverse=True):
        group = [r for r in rows if r["epochs"] == e]
        out += [f"## {e} epochs", table(group), summary(group)]
        out += ["budget curve:\n" + budget_curve(group)] if any(r.get("budget_curve") for r in group) else []
        out += ["Table 6 of the customized paper:\n" + table6(group)] if any(
            r["name"] in ("Adv+LS(0.3)", "Adp-Adv(0.3)") for r in group) else []
        out += ["eps_i by epoch, mean (share at eps_max):\n" + eps_trajectory(group)] if any(
            "eps_per_epoch" in r for r in group) else []
    return "\n\n".join(out)


def spec(name, seed, args):
    script, flags = row_flags(name, args.epochs)
    flags += ["--eps-warmup", f"{args.at_warmup:g}"] if args.at_warmup and "--fixed-eps" in flags else []
    flags += ["--dataset", "mnist", "--data-dir", R.rel(args.data_dir), "--eval-size", "200"]
    fast = ["--channels-last"] if args.fast else []  # evaluation: fp32 always
    bf16 = ["--amp", "bf16"] if args.fast and (NATIVE_BF16 or args.device == "cuda") else []
    return dict(name=name, seed=seed, script=script, epochs=args.epochs, flags=flags + bf16 + fast, eval=EVAL + fast,
                strong=STRONG + fast, keep=args.budget_curve if seed == 0 else [])


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    R.add_arguments(p, RESULTS, epochs=3)
    p.add_argument("--data-dir", default=os.path.join(R.REPO, "data"), help="a torchvision MNIST root (DIR/MNIST/raw)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the landed rows ran on the CPU, where "
                   "training is deterministic: a retrained row reproduces its log there")
    p.add_argument("--quick", action="store_true", help="defaults for a smoke run: 1 epoch of 200 images, 100 test "
                   "images, a weak strong evaluation of 50; results in runs/mnist_table1_quick")
    p.add_argument("--fast", action="store_true", help="train in bf16 autocast (fp32 where the CPU has no native bf16) "
                   "+ channels-last with the CPU's fastest kernels; evaluate in fp32; 3 epochs: results in "
                   "mnist_table1_bf16.json")
    p.add_argument("--provenance", action="store_true", help="print where and from which commit each row of "
                   "--epochs trained, and its hours, from the results file, and exit")
    p.add_argument("--budget-curve", type=int, nargs="*", help="seed 0: keep the classifier at these epochs too "
                   "and give each the strong evaluation (default with --epochs 40: 10 20 30)")
    p.add_argument("--at-warmup", type=float, help="the fixed-eps rows alone (AT, Adv+LS) train with --eps-warmup N "
                   "(PGD-AT at 0.3 stalls at chance at 2 of 3 seeds without; default with --epochs 40: 1, chosen on "
                   "training data, benchmarks/README.md; 3 epochs: none, as the landed rows)")
    p.add_argument("--threads", type=int, default=1, help="threads per job (default 1, as the landed rows ran, two "
                   "jobs side by side; a strong evaluation records its threads)")
    p.set_defaults(jobs=2)  # one thread each, as the landed rows ran
    args = p.parse_args()
    unset = lambda k, full, quick: setattr(args, k, getattr(args, k) or (quick if args.quick else full))
    for k, full, quick in (("epochs", 3, 1), ("train_size", None, 200), ("n_test", None, 100),
                           ("n_strong", 1000, 50), ("square_queries", 5000, 20)):
        unset(k, full, quick)
    if args.at_warmup is None and args.epochs == 40:
        args.at_warmup = 1.0
    if args.budget_curve is None:
        args.budget_curve = [10, 20, 30] if args.epochs == 40 else []
    if args.epochs != 3 and not (args.fast or args.quick or args.summary or args.provenance):  # so that one (row, seed, epochs) names one model
        sys.exit(f"error: --epochs {args.epochs}: budgets other than the landed 3 epochs train on the fast path; "
                 "add --fast")
    args.strong_extra = ["--steps", "5"] if args.quick else []
    if args.threads < 1:
        sys.exit(f"error: --threads {args.threads}: must be at least 1")
    args.autoattack_env = FAST_ENV if args.device == "cpu" else {}  # step 5 is fp32: the fastest fp32 kernels
    if args.autoattack and not any(map(importlib.util.find_spec, ("pyautoattack", "autoattack"))):
        sys.exit("error: --autoattack: AutoAttack is not installed: pip install pyautoattack")
    three = args.epochs == 3 or args.quick  # 3 epochs: the landed fp32 rows, or the --fast ones apart
    if args.fast and three and not args.quick and not NATIVE_BF16:
        sys.exit("error: --fast at 3 epochs is the bf16 comparison (mnist_table1_bf16.json): this CPU has no native bf16")
    R.paths(args, "mnist_table1", RESULTS_FAST if args.fast and three else RESULTS, "_quick" if args.quick else "",
            ("_bf16" if args.fast else "") if three else f"_e{args.epochs}")
    if args.summary or args.provenance:
        rows = R.load(args.results)["rows"]
        print(report(rows) if args.summary else provenance([r for r in rows if r["epochs"] == args.epochs]))
        return
    if args.device == "cpu":  # the landed rows ran with AVX2 kernels; with the same kernels a retrained row
        os.environ.update(FAST_ENV if args.fast else ISA)  # reproduces its landed log (AVX-512: not)
    if not os.path.isdir(os.path.join(args.data_dir, "MNIST", "raw")):
        sys.exit(f"error: no MNIST root at {args.data_dir}; download it once: python -c \"import torchvision; "
                 f"torchvision.datasets.MNIST('{args.data_dir}', download=True)\"")
    jobs = [spec(name, seed, args) for seed in args.seeds for name in args.rows if name not in LANDED_ONLY]
    print(f"{len(jobs)} jobs; {len(R.load(args.results)['rows'])} rows in {R.rel(args.results)}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: R.run_job(job, args, ROWS, PARTIAL + args.tag), jobs))
    print(report(R.load(args.results)["rows"]))

if __name__ == "__main__":
    main()
