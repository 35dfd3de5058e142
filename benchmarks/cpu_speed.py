"""How fast the MNIST recipes train on a CPU, and whether bf16 keeps the attacks' strength.

    python benchmarks/cpu_speed.py                    # step table + end-to-end epochs (~15 min, 2 cores)
    python benchmarks/cpu_speed.py --strength --data-dir data   # bf16 vs fp32 attacks, 3 kept models

Steps: images/s of one training step (batch 100, one thread, MNIST-shaped input) of the Table 1
recipes AT(0.3), TRADES(0.3) and calibrated_cw(0.3) (benchmarks/mnist_table1.py's flags, through
each trainer's own train_step), under each VARIANT in a process of its own (the kernels' ISA is
read when torch loads), rounds interleaved, the median of --reps; each as a ratio to the first, the
pinned fp32 protocol of the landed Table 1 rows. GFLOP/s counts the step's convolutions and matrix
products (forward and backward, by flop_counter's formulas) against one core's peak at the clock
/proc/cpuinfo reports, for the kernels the variant's oneDNN names (peak_flop_per_cycle): Intel, 64
FLOP/cycle in fp32 (AVX-512, 2 FMA ports), 128 in bf16 with AVX512_BF16, 1,024 with AMX (one
16x16x32 TDPBF16PS per 16 cycles); AMD Zen 4 (family 25) runs AVX-512 on 256-bit units, 32 and 64;
Zen 5 (family 26), 64 and 128. bf16 can thus at most double fp32 on Zen 4 and Zen 5. End to end:
each trainer's CLI, one epoch, the pinned fp32 protocol and the fast path side by side (two
processes, one thread each), images/s from log.jsonl. Results: benchmarks/results/cpu_speed.json.

Strength (--strength): PGD-20 (the calibrated protocol's: CE, step 0.015, no random start) and
APGD-CE (100 steps) at eps 0.3 on the first --n test images of three kept models, the model's
forward in fp32 and under bf16 autocast (evaluate.py's --amp: logits, loss and input gradient in
fp32), and the share of points whose input gradient is exactly zero (at x and at PGD-20's end),
into benchmarks/results/cpu_speed_strength.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_table1  # noqa: E402
import overhead  # noqa: E402
import runner as R  # noqa: E402

PIN_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
NO_AMX = {**mnist_table1.ISA_FAST, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
# name: (environment, trainer flags); the first is the baseline of every ratio
VARIANTS = {"fp32, AVX2 pinned (landed rows)": (PIN_AVX2, []),
            "fp32, native": (mnist_table1.ISA_FAST, []),
            "fp32 + channels-last": (mnist_table1.ISA_FAST, ["--channels-last"]),
            "bf16 + channels-last, no AMX (AVX512_CORE_BF16)": (NO_AMX, ["--amp", "bf16", "--channels-last"]),
            "bf16": (mnist_table1.ISA_FAST, ["--amp", "bf16"]),
            "bf16 + channels-last": (mnist_table1.ISA_FAST, ["--amp", "bf16", "--channels-last"]),
            "bf16 + channels-last + compile": (mnist_table1.ISA_FAST, ["--amp", "bf16", "--channels-last",
                                                                      "--compile"])}
RECIPES = ["AT(0.3)", "TRADES(0.3)", "calibrated_cw(0.3)"]


def peak_flop_per_cycle():
    """One core's FLOP/cycle by kind of kernel, for this CPU (module doc; vendor and family read from
    /proc/cpuinfo, which says nothing of the width of its units)."""
    info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"  # 256-bit datapaths
    return {"fp32": 32 if zen4 else 64, "bf16 AVX512_BF16": 64 if zen4 else 128, "bf16 AMX": 1024}


def add_peaks(result):
    """GFLOP/s and the share of the peak of each step in `result` (its steps, machine and variants'
    oneDNN ISA); a function of what was measured, so that an older result can be re-derived."""
    peak, ghz, base = result["peak_flop_per_cycle"], result["machine"]["nominal_ghz"], next(iter(result["steps"]))
    for v, rs in result["steps"].items():
        isa = result["variants"][v]["onednn_isa"] or ""
        kind = "fp32" if "bf16" not in v else "bf16 AMX" if "AMX" in isa else "bf16 AVX512_BF16"
        for r, s in rs.items():
            if "seconds_per_step" in s:
                flops = s["flops_per_step"] or result["steps"][base][r]["flops_per_step"]
                s.update(kind=kind, gflop_per_s=flops / s["seconds_per_step"] / 1e9)
                s["peak_share"] = s["gflop_per_s"] / (peak[kind] * ghz) if ghz else None
    return result
RESULTS = os.path.join(R.REPO, "benchmarks", "results", "cpu_speed.json")
STRENGTH = os.path.join(R.REPO, "benchmarks", "results", "cpu_speed_strength.json")


class CountFlops(TorchDispatchMode):
    """FLOPs of the convolutions and matrix products run inside it (torch.utils.flop_counter's
    formulas; its FlopCounterMode's module hooks break on the attacks' torch.autograd.grad)."""
    flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out


def step_fn(recipe, flags):
    """The recipe's real train_step on one MNIST-shaped batch of 100: (step(), FLOPs of one step)."""
    script, row = mnist_table1.row_flags(recipe, 3)
    common = ["--dataset", "fake-mnist", "--device", "cpu", "--batch-size", "100", *flags]
    build = overhead.customized_step if script == "train_customized.py" else overhead.calibrated_step
    step = build(row, (1, 28, 28), common)
    torch.manual_seed(0)
    fmt = torch.channels_last if "--channels-last" in flags else torch.contiguous_format
    x, y = torch.rand(100, 1, 28, 28).contiguous(memory_format=fmt), torch.randint(0, 10, (100,))
    run = lambda: step(x, y, torch.arange(100))
    run()  # warm-up: oneDNN primitives, torch.compile
    flops = None
    if "--compile" not in flags:  # the counter does not see inside compiled graphs; the FLOPs are the same
        with CountFlops() as counter:
            run()
        flops = counter.flops
    return run, flops


def child(variant, steps):
    """In this process (its ISA set by the parent): seconds of `steps` training steps of each recipe."""
    torch.set_num_threads(1)
    out = {}
    for recipe in RECIPES:
        try:
            run, flops = step_fn(recipe, VARIANTS[variant][1])
        except Exception as e:  # e.g. torch.compile without a working C++ toolchain
            out[recipe] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        out[recipe] = {"seconds_per_step": (time.perf_counter() - t0) / steps, "flops_per_step": flops}
    print(json.dumps(out))


def measure_steps(args):
    """{variant: {recipe: median seconds per step, FLOPs}}: every variant once per round, --reps rounds."""
    samples = {v: [] for v in VARIANTS}
    for rnd in range(args.reps):
        for v, (env, _) in VARIANTS.items():
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps)]
            proc = subprocess.run(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                  text=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                {r: {"error": proc.stderr.strip().splitlines()[-1][:200]} for r in RECIPES}
            samples[v].append(got)
            print(f"round {rnd + 1}, {v}: " + ", ".join(
                f"{r} {100 / g['seconds_per_step']:.1f} img/s" if "seconds_per_step" in g else f"{r} {g['error']}"
                for r, g in got.items()), flush=True)
    med = {}
    for v, runs in samples.items():
        med[v] = {}
        for r in RECIPES:
            ok = [s[r] for s in runs if "seconds_per_step" in s[r]]
            med[v][r] = {"seconds_per_step": statistics.median(s["seconds_per_step"] for s in ok),
                         "flops_per_step": ok[0]["flops_per_step"], "reps": len(ok)} if ok else runs[-1][r]
    return med


def end_to_end(args):
    """One epoch of each trainer's CLI, the pinned fp32 protocol beside the fast path: images/s."""
    out = {}
    for recipe in ("AT(0.3)", "calibrated_cw(0.3)"):
        script, row = mnist_table1.row_flags(recipe, 1)
        data = ["--dataset", "mnist", "--data-dir", args.data_dir] if os.path.isdir(
            os.path.join(args.data_dir, "MNIST", "raw")) else ["--dataset", "fake-mnist"]
        base = [sys.executable, script, *row, *data, "--train-size", str(args.e2e_images), "--eval-size", "100",
                "--test-size", "100", "--epochs", "1", "--device", "cpu", "--overwrite"]
        runs = {"fp32, AVX2 pinned (landed rows)": (PIN_AVX2, []),
                "bf16 + channels-last": (mnist_table1.ISA_FAST, ["--amp", "bf16", "--channels-last"])}
        procs = {}
        for v, (env, flags) in runs.items():  # side by side: the same machine load for both
            d = os.path.join(R.REPO, "runs", "cpu_speed", f"{recipe}_{'fast' if flags else 'pinned'}")
            procs[v] = (d, subprocess.Popen([*base, *flags, "--out", d], cwd=R.REPO, stdout=subprocess.DEVNULL,
                                            env={**os.environ, **env, "OMP_NUM_THREADS": "1"}))
        out[recipe] = {"command": " ".join(base[1:]), "images": args.e2e_images}
        for v, (d, proc) in procs.items():
            if proc.wait():
                sys.exit(f"error: {script} exited {proc.returncode} in {d}")
            rec = json.loads(open(os.path.join(d, "log.jsonl")).readlines()[-1])
            out[recipe][v] = {"images_per_s": rec["images_per_s"], "seconds": rec["seconds"]}
        slow, fast = (out[recipe][v]["images_per_s"] for v in runs)
        out[recipe]["ratio"] = fast / slow
        print(f"end to end, {recipe}: {slow:.1f} -> {fast:.1f} images/s, x{fast / slow:.2f}", flush=True)
    return out


def speed(args):
    steps, base = measure_steps(args), next(iter(VARIANTS))
    ghz = float(next((line.split(":")[1] for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")), "0")) / 1e3
    for v, rs in steps.items():
        for r, s in rs.items():
            if "seconds_per_step" in s:
                s.update(images_per_s=100 / s["seconds_per_step"],
                         ratio=steps[base][r]["seconds_per_step"] / s["seconds_per_step"])
    result = add_peaks({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": R.commit(),
                        "machine": {**R.machine(argparse.Namespace(device="cpu", threads=1)), "nominal_ghz": ghz},
                        "peak_flop_per_cycle": peak_flop_per_cycle(), "batch_size": 100, "threads": 1,
                        "reps": args.reps, "steps_per_rep": args.steps, "note": args.note,
                        "variants": {v: {"env": env, "flags": flags, "onednn_isa": R.onednn_isa(env)}
                                     for v, (env, flags) in VARIANTS.items()}, "steps": steps})
    print("\n| variant | " + " | ".join(f"{r} img/s (x)" for r in RECIPES) + " |\n|---|" + "---|" * len(RECIPES))
    for v, rs in steps.items():
        cells = [rs[r]["error"][:60] if "seconds_per_step" not in rs[r] else
                 f"{rs[r]['images_per_s']:.1f} (x{rs[r]['ratio']:.2f}; {rs[r]['gflop_per_s']:.0f} GFLOP/s"
                 + (f", {100 * rs[r]['peak_share']:.1f} % of {rs[r]['kind']} peak)" if ghz else ")") for r in RECIPES]
        print(f"| {v} | " + " | ".join(cells) + " |")
    result["end_to_end"] = end_to_end(args)
    with open(args.out or RESULTS, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {R.rel(args.out or RESULTS)}")


def zero_grad_share(model, x, y):
    """The share of points whose CE input gradient is exactly zero (the attack cannot move them)."""
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"), x)
    return (grad.flatten(1).abs().amax(1) == 0).float().mean().item()


def strength(args):
    """PGD-20 and APGD-CE, fp32 and under bf16 autocast, on three kept models: accuracies, zero gradients."""
    import attacks
    import evaluate
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        path = os.path.join(R.REPO, "benchmarks", "results", "checkpoints", f"{name}_seed0.pt")
        model, ck = evaluate.load_model(path)
        data = evaluate.load_test_set(ck, args.data_dir)
        x = torch.stack([data[i][0] for i in range(args.n)])
        y = torch.tensor([data[i][1] for i in range(args.n)])
        row = {"model": name, "checkpoint": R.rel(path), "sha256": R.sha256(path), "n": args.n}
        for dtype, amp in (("fp32", False), ("bf16", True)):
            net = evaluate.FastForward(model, amp, False).eval()
            t0, res = time.time(), {}
            with torch.no_grad():
                ok = net(x).argmax(1) == y
            res["natural"] = ok.float().mean().item()
            torch.manual_seed(0)
            x_pgd = torch.cat([attacks.pgd(net, x[i:i + 100], y[i:i + 100], 0.3, 0.015, 20, random_start=False)
                               for i in range(0, args.n, 100)])
            x_apgd = torch.cat([attacks.apgd(net, x[i:i + 100], y[i:i + 100], 0.3, 100, seed=i)
                                for i in range(0, args.n, 100)])
            with torch.no_grad():  # accuracy judged by the fp32 model: only the attack's arithmetic differs
                res["pgd20"] = (ok & (model(x_pgd).argmax(1) == y)).float().mean().item()
                res["apgd-ce"] = (ok & (model(x_apgd).argmax(1) == y)).float().mean().item()
            res["zero_grad_at_x"] = zero_grad_share(net, x, y)
            res["zero_grad_at_pgd20"] = zero_grad_share(net, x_pgd, y)
            res["seconds"] = time.time() - t0
            row[dtype] = res
            print(f"{name} {dtype}: " + " ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
        row["diff_points"] = {k: 100 * (row["bf16"][k] - row["fp32"][k]) for k in ("pgd20", "apgd-ce")}
        rows.append(row)
    print("\n| model | PGD-20 fp32 / bf16 | APGD-CE fp32 / bf16 | zero input gradients at x, at PGD-20's end "
          "(fp32 / bf16) |\n|---|---|---|---|")
    for r in rows:
        f, b = r["fp32"], r["bf16"]
        print(f"| {r['model']} | {100 * f['pgd20']:.1f} / {100 * b['pgd20']:.1f} | {100 * f['apgd-ce']:.1f} / "
              f"{100 * b['apgd-ce']:.1f} | {100 * f['zero_grad_at_x']:.1f} / {100 * b['zero_grad_at_x']:.1f} %, "
              f"{100 * f['zero_grad_at_pgd20']:.1f} / {100 * b['zero_grad_at_pgd20']:.1f} % |")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": R.commit(),
              "machine": R.machine(argparse.Namespace(device="cpu", threads=1)), "note": args.note, "rows": rows}
    with open(args.out or STRENGTH, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {R.rel(args.out or STRENGTH)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per recipe and round")
    p.add_argument("--e2e-images", type=int, default=2000, help="training images of the end-to-end epoch")
    p.add_argument("--strength", action="store_true", help="the attacks under bf16 against fp32 (module doc)")
    p.add_argument("--models", nargs="+", default=["AT(0.3)", "TRADES(0.3)", "calibrated_cw(0.3)"])
    p.add_argument("--n", type=int, default=1000, help="--strength: test images (a multiple of 100)")
    p.add_argument("--data-dir", default=os.path.join(R.REPO, "data"), help="a torchvision MNIST root (DIR/MNIST/raw)")
    p.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    p.add_argument("--out", help="the results file (default: benchmarks/results/cpu_speed[_strength].json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.steps)
    if args.strength:  # with the fast rows' kernels, set before torch loads: in a fresh process
        if any(os.environ.get(k) != v for k, v in mnist_table1.ISA_FAST.items()):
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **mnist_table1.ISA_FAST})
        return strength(args)
    speed(args)


if __name__ == "__main__":
    main()
