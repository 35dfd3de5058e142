"""Every figure of the project, drawn with matplotlib (an optional dependency of benchmarks/ only).

The default redraw takes seconds and uses committed data only; a redraw is byte-identical:
  toy_margin.png      the customized paper's Fig. 1 toy: benchmarks/toy_margin.py's four linear models, seed 0
  table1_e40.png      the 40-epoch Table 1 (benchmarks/results/mnist_table1.json): each seed, the mean, the paper
  budget_curve.png    seed 0's strong "any attack" accuracy at epochs 10, 20, 30 and 40, masking flags marked
  customized_eps.png  the 40-epoch customized(0.3) seed 0 run's eps_i per epoch (skipped until that row lands)
--run DIR draws a training run's own figures from DIR/model.pt into DIR: eps_hist.png (customized: the
final eps_i) and masks.png (calibrated with a mask net: the calibrated paper's Fig. 2, rows x, x', M, x_cali).

    python benchmarks/figures.py                                # into benchmarks/figures/
    python benchmarks/figures.py --run runs/train_customized    # DIR/eps_hist.png
    python benchmarks/figures.py --run runs/train_calibrated    # DIR/masks.png
"""
import argparse
import json
import os
import pickle
import sys
import warnings

try:
    import matplotlib
except ImportError:
    sys.exit("error: figures.py needs matplotlib: pip install matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist_table1  # noqa: E402
import toy_margin  # noqa: E402
from models import get_mask_net, get_model  # noqa: E402
from train_calibrated import attack, calibrate, get_data  # noqa: E402

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
DPI = 150  # 8-inch figures: 1200 px, sharp when a README shows them at ~800
# Table 1's columns: (label, row key, accuracy key, index in mnist_table1.PAPER or None)
NATURAL = [("natural\n10k test", "acc", "natural", 0)]
ROBUST = [("PGD-20\n10k test", "acc", "pgd20", 1), ("PGD-100\n10k test", "acc", "pgd100", 2),
          ("any attack\n1k test", "acc_strong", "any", None), ("AutoAttack\n1k test", "acc_strong", "autoattack", None)]


def save(fig, path):
    """Fixed dpi and no Software tag (it names the matplotlib version): a redraw is byte-identical."""
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path}")


def row_color(name):
    """One colour per Table 1 row name, the same in every figure and whichever rows have landed."""
    order = mnist_table1.ROWS + [name]
    return f"C{order.index(name) % 10}"


def draw_toy_margin(path, seed=0):
    """The four learned boundaries of toy_margin.run over the training points and the true boundary."""
    res, (x, y) = toy_margin.run(seed)
    half = 20.0  # toy_margin.panel's window
    ticks = torch.linspace(-half, half, 201)
    gx, gy = torch.meshgrid(ticks, ticks, indexing="xy")
    true_line = torch.stack([-1.5 * half * toy_margin.TANGENT, 1.5 * half * toy_margin.TANGENT]).numpy()
    fig, axes = plt.subplots(2, 2, figsize=(8, 8.6), sharex=True, sharey=True, layout="constrained")
    for ax, (name, (model, acc)) in zip(axes.flat, res.items()):
        tilt = toy_margin.tilt(model)
        with torch.no_grad():
            logits = model(torch.stack([gx, gy], -1).view(-1, 2))
        score = (logits[:, 1] - logits[:, 0]).view(gx.shape).numpy()  # > 0: class 1
        ax.contourf(gx.numpy(), gy.numpy(), score, levels=[-1e9, 0, 1e9], colors=["#ffd7aa", "#afcdff"])
        ax.contour(gx.numpy(), gy.numpy(), score, levels=[0], colors="#7b2d8e", linewidths=2.5, linestyles="--")
        ax.plot(*true_line.T, color="k", lw=1.5)
        for cls, color in ((0, "#c8281e"), (1, "#1e3cc8")):
            ax.scatter(*x[y == cls].T.numpy(), s=6, color=color)
        ax.set(xlim=(-half, half), ylim=(-half, half), aspect="equal",
               title=f"{name}: test accuracy {100 * acc:.2f} %\ntilt {tilt[0]:4.1f} °  |w|_1 {tilt[1]:.2f}")
    for ax in axes[1]:
        ax.set_xlabel("$x_1$")
    for ax in axes[:, 0]:
        ax.set_ylabel("$x_2$")
    handles = [Line2D([], [], ls="", marker="o", color="#c8281e", label="class 0 (training)"),
               Line2D([], [], ls="", marker="o", color="#1e3cc8", label="class 1 (training)"),
               Line2D([], [], color="k", lw=1.5, label="true boundary"),
               Line2D([], [], color="#7b2d8e", lw=2.5, ls="--", label="learned boundary")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4)
    fig.suptitle(f"Customized AT paper, Fig. 1 toy: linear models, L-inf margin {toy_margin.MARGIN} (seed {seed})\n"
                 f"customized = Alg. 1 with eps_max {toy_margin.EPS_MAX:g}; shading = predicted class")
    save(fig, path)


def strip(ax, rows, names, columns):
    """Per column, per row name: each seed a dot and, over several, their mean a short line, the paper's value
    a star to the right."""
    width = 0.8 / len(names)
    for j, (_, key, acc, paper) in enumerate(columns):
        for i, name in enumerate(names):
            x0 = j + (i - (len(names) - 1) / 2) * width  # the middle of this row's slot
            values = [100 * r[key][acc] for r in rows if r["name"] == name and acc in r.get(key, {})]
            if len(values) > 1:  # one seed has no mean to draw
                ax.hlines(sum(values) / len(values), x0 - 0.45 * width, x0 + 0.1 * width, color=row_color(name), lw=2.5)
            for k, v in enumerate(values):  # side by side: equal values stay visible
                ax.plot(x0 - 0.35 * width + 0.35 * width * k / max(1, len(values) - 1), v, "o", ms=4,
                        color=row_color(name), mec="k", mew=0.3, zorder=3)
            value = None if paper is None else mnist_table1.PAPER.get(name, (None,) * 3)[paper]
            if value is not None:
                ax.plot(x0 + 0.3 * width, value, "*", ms=11, color=row_color(name), mec="k", mew=0.8)
    ax.set_xticks(range(len(columns)), [c[0] for c in columns])
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.grid(axis="y", alpha=0.4)


def draw_table1(rows, path):
    """The 40-epoch rows: natural accuracy in a small panel of its own (~99 for every row), the attacks beside."""
    landed = {r["name"] for r in rows}
    names = [n for n in mnist_table1.ROWS if n in landed] + sorted(landed - set(mnist_table1.ROWS))
    seeds = {n: sorted(r["seed"] for r in rows if r["name"] == n) for n in names}
    uniform = len({tuple(s) for s in seeds.values()}) == 1  # else each row names its seeds in the legend
    fig, (ax_nat, ax_rob) = plt.subplots(1, 2, figsize=(9, 5), width_ratios=[1, 4], layout="constrained")
    strip(ax_nat, rows, names, NATURAL)
    strip(ax_rob, rows, names, ROBUST)
    ax_nat.set(ylabel="accuracy (%)", title="natural")
    ax_rob.set(title="robust at eps 0.3")
    handles = [Line2D([], [], color=row_color(n), lw=6, label=n if uniform else
                      f"{n}, seed{'s' * (len(seeds[n]) > 1)} {', '.join(map(str, seeds[n]))}") for n in names] + [
        Line2D([], [], ls="", marker="o", ms=4, color="gray", mec="k", mew=0.3, label="one seed"),
        Line2D([], [], color="gray", lw=2.5, label="mean of seeds"),
        Line2D([], [], ls="", marker="*", ms=11, color="gray", mec="k", label="paper's Table 1 (mean of 5 runs)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3)
    ours = any(n not in mnist_table1.PAPER for n in names)  # customized AT and its ablations
    fig.suptitle("MNIST Table 1 at the release's 40 epochs" + (f", seeds {', '.join(map(str, seeds[names[0]]))}"
                 if uniform else "") + "\nPGD: the paper's evaluation; any attack: the strong chain's per-sample worst case"
                 + ("\ncustomized AT's rows: our test (its paper has no MNIST table)" if ours else ""))
    save(fig, path)


def draw_budget_curve(rows, path):
    """Seed 0's kept snapshots and final model: strong "any attack" accuracy against epochs trained."""
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    for row in rows:
        points = sorted([(b["epoch"], b["acc_strong"]["any"], b["flags"]) for b in row["budget_curve"]
                         if "acc_strong" in b]  # a snapshot not evaluated yet is not drawn
                        + [(row["epochs"], row["acc_strong"]["any"], row["flags"])])
        epochs, acc = [p[0] for p in points], [100 * p[1] for p in points]
        ax.plot(epochs, acc, "o-", color=row_color(row["name"]), label=row["name"])
        for e, a, (_, _, flags) in zip(epochs, acc, points):
            if flags:  # black: red is a row's colour
                ax.plot(e, a, "o", ms=15, mfc="none", mec="k", mew=1.5)
    ax.plot([], [], "o", ms=15, mfc="none", mec="k", mew=1.5, label="masking flag raised")
    ax.set_xticks(sorted({b["epoch"] for r in rows for b in r["budget_curve"]} | {r["epochs"] for r in rows}))
    ax.set(xlabel="epochs trained", ylabel='strong "any attack" accuracy (%)',
           title='Budget curve, seed 0: the strong chain\'s per-sample worst case\n'
                 '(first 1,000 MNIST test images, eps 0.3; lr x0.1 after epoch 30)')
    ax.grid(alpha=0.4)
    ax.legend()
    save(fig, path)


def draw_customized_eps(row, path):
    """A customized row's eps_i per epoch (mean, share at eps_max) and, where recorded, the final eps_i counts."""
    eps_max = float(row["name"][-4:-1])  # "customized(0.3)", as mnist_table1.row_flags reads it
    counts = row.get("eps_final_counts")
    fig, axes = plt.subplots(1, 2 if counts else 1, figsize=(8, 4.2), layout="constrained", squeeze=False)
    ax = axes[0, 0]
    log = row["epoch_log"]
    epochs = [r["epoch"] for r in log]
    ax.plot(epochs, [r["eps_mean"] for r in log], "o-", ms=3, color="C0", label="mean eps_i (left)")
    ax.axhline(eps_max, color="C0", ls=":", label=f"eps_max {eps_max:g}")
    ax.set(xlabel="epoch", ylabel="mean eps_i", ylim=(0, 1.05 * eps_max), title="eps_i during training")
    share = ax.twinx()
    share.plot(epochs, [100 * r["eps_at_max"] for r in log], "s-", ms=3, color="C3", label="at eps_max (right)")
    share.set(ylabel="training samples at eps_max (%)", ylim=(0, 105))
    fig.legend(handles=ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0],
               loc="outside lower center", ncol=3)
    if counts:
        values = sorted(counts, key=float)
        eps = [float(v) for v in values]
        gap = min((b - a for a, b in zip(eps, eps[1:])), default=eps_max / 10)
        axes[0, 1].bar(eps, [counts[v] for v in values], width=0.8 * gap, color="C0")
        axes[0, 1].set(xlabel="final eps_i", ylabel="training samples", title="final eps_i")
    fig.suptitle(f"{row['name']}, seed {row['seed']}, {row['epochs']} epochs: the customized paper's per-sample eps")
    save(fig, path)


def draw_eps_hist(ck, path):
    """A customized run's final per-sample eps table: x = eps_i, y = training samples, over [0, eps_max]."""
    eps, args = ck["eps"].float(), ck["args"]
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    ax.hist(eps.numpy(), bins=40, range=(0, args["eps_max"]), color="C0")
    ax.axvline(eps.mean().item(), color="k", ls="--", label=f"mean {eps.mean().item():.3g}")
    at_max = (eps >= args["eps_max"] - 1e-9).float().mean().item()
    ax.plot([], [], ls="", label=f"{100 * at_max:.1f} % at eps_max {args['eps_max']:.4g}")
    ax.set(xlabel="final eps_i", ylabel="training samples", xlim=(0, args["eps_max"] * 1.02),
           title=f"Customized AT, {args['dataset']}, epoch {ck['epoch']}: final eps_i of {len(eps)} training "
                 f"samples\n(eta {args['eta']:.4g}, c {args['c']:g}, seed {args['seed']})")
    ax.legend()
    save(fig, path)


def draw_masks(ck, path, n=8):
    """The calibrated paper's Fig. 2: x, x' = x + delta, M and x_cali for the first n test images, with the
    nets, data and seeded training attack of the run (as train_calibrated.py drew masks.png)."""
    args = argparse.Namespace(**ck["args"])
    args.device, args.eps_scale = "cpu", 1.0  # the full training attack of the finished run
    test = get_data(args)[2]
    model = get_model(ck["arch"], ck["num_classes"], ck["in_channels"], ck["image_size"])
    mask_net = get_mask_net(args.mask_arch, ck["in_channels"])
    model.load_state_dict(ck["model"])
    mask_net.load_state_dict(ck["mask_net"])
    x, y = next(iter(DataLoader(test, n)))[:2]
    torch.manual_seed(args.seed)  # the picture is a function of the checkpoint
    model.eval()
    mask_net.eval()
    delta = attack(model, x, y, args)
    with torch.no_grad():
        mask = mask_net(x, delta)
    images = [("$x$", x), ("$x' = x + \\delta$", x + delta), ("$M = g_\\phi(x, \\delta)$", mask),
              ("$x_{cali} = x + M\\delta$", calibrate(x, delta, mask))]
    fig = plt.figure(figsize=(8, 4.9), layout="constrained")
    grid = fig.add_gridspec(4, n + 1, width_ratios=[1] * n + [0.12])
    for i, (label, batch) in enumerate(images):
        for j, img in enumerate(batch.numpy()):
            ax = fig.add_subplot(grid[i, j])
            if i == 2:  # M in (0, 1) on one scale; several channels: their mean
                shown = ax.imshow(img.mean(0), cmap="viridis", vmin=0, vmax=1)
            else:
                ax.imshow(img[0] if len(img) == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"label {y[j].item()}", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.colorbar(shown, cax=fig.add_subplot(grid[2, n]), label="M")
    fig.suptitle(f"Calibrated AT (Fig. 2): {args.dataset}, epoch {ck['epoch']}, training attack {args.attack}, "
                 f"eps {args.eps:.4g}")
    save(fig, path)


def draw_run(run, out):
    """--run: eps_hist.png for a customized run with adaptive eps, masks.png for a calibrated run with a mask net."""
    src = os.path.join(run, "model.pt")
    if not os.path.isfile(src):
        sys.exit(f"error: --run: no model.pt in {run}")
    try:  # weights_only: a checkpoint is data; a pickle that would run code is refused
        with warnings.catch_warnings(action="ignore"):
            ck = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        why = "not weights-only data, refused" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        sys.exit(f"error: {src} is not a loadable checkpoint: {why}")
    draws = []
    if "eps" in ck and not ck["args"].get("fixed_eps"):  # --fixed-eps never updates the table (all 0)
        draws.append((draw_eps_hist, "eps_hist.png"))
    if "mask_net" in ck:
        draws.append((draw_masks, "masks.png"))
    if not draws:
        sys.exit(f"error: {src} has neither an adaptive eps table (customized) nor a mask net (calibrated)")
    os.makedirs(out, exist_ok=True)
    for draw, name in draws:
        draw(ck, os.path.join(out, name))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--run", metavar="DIR", help="draw a training run's eps_hist.png / masks.png from DIR/model.pt")
    p.add_argument("--out", metavar="DIR", help="write here (default: benchmarks/figures/, with --run its DIR)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the toy's training and the masks' attack: the same numbers on every redraw
    plt.style.use("default")  # no matplotlibrc of the machine's
    if args.run:
        return draw_run(args.run, args.out or args.run)
    out = args.out or FIGURES
    os.makedirs(out, exist_ok=True)
    with open(mnist_table1.RESULTS) as f:
        e40 = [r for r in json.load(f)["rows"] if r["epochs"] == 40 and "acc" in r]
    draw_toy_margin(os.path.join(out, "toy_margin.png"))
    draw_table1(e40, os.path.join(out, "table1_e40.png"))
    draw_budget_curve([r for r in e40 if r["seed"] == 0 and "budget_curve" in r and "acc_strong" in r],
                      os.path.join(out, "budget_curve.png"))
    customized = [r for r in e40 if r["name"] == "customized(0.3)" and r["seed"] == 0]
    if customized:
        draw_customized_eps(customized[0], os.path.join(out, "customized_eps.png"))
    else:
        print("skipped customized_eps.png: no 40-epoch customized(0.3) seed 0 row in mnist_table1.json yet")


if __name__ == "__main__":
    main()
