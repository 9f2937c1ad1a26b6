"""Draws the ring efficiency of ours and ring-flash-attn, per configuration and layout, from the
JSON files bench_ring.py writes.

    python3 benchmarks/plot_ring.py                         # every benchmarks/results/ring_*_w*.json
    python3 benchmarks/plot_ring.py results_a.json b.json --out eff.png --metric efficiency_own_kernel

One row of panels per file (GPU and world size), one panel per mode (fwd, fwd_bwd); in each panel a
group of bars per configuration: ours ring/zigzag/stripe, then ring-flash-attn's. The dashed line
at 1.0 is a perfect ring: N GPUs as fast as N times one GPU on one block. A configuration that an
implementation rejects or failed on is labelled instead of drawn.
"""
import argparse
import glob
import json
import os

import bench_common

IMPLS = (("ours", "ours", ("#08306b", "#2171b5", "#6baed6"), ""),
         ("rfa", "ring-flash-attn", ("#7f2704", "#d94801", "#fd8d3c"), "//"))
LAYOUTS = ("ring", "zigzag", "stripe")
MODES = (("fwd", "forward"), ("fwd_bwd", "forward + backward"))
METRICS = {"efficiency": "efficiency vs our 1-GPU kernel / N",
           "efficiency_own_kernel": "efficiency vs own 1-GPU kernel / N"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="ring JSON files (default: benchmarks/results/ring_*_w*.json)")
    p.add_argument("--out", default=os.path.join(bench_common.RESULTS_DIR, "ring_efficiency.png"))
    p.add_argument("--metric", choices=sorted(METRICS), default="efficiency",
                   help="efficiency: against our single-GPU kernel (default); efficiency_own_kernel: against "
                        "each implementation's own (ring-flash-attn's 'theoretic')")
    args = p.parse_args(argv)
    if not args.files:
        args.files = ring_result_files(bench_common.RESULTS_DIR)
    if not args.files:
        p.error(f"no ring_*_w*.json in {bench_common.RESULTS_DIR}; run bench_ring.py first or name the files")
    return args


def ring_result_files(directory):
    """bench_ring.py's results (ring_<gpu>_w<N>.json) in `directory`; bench_ring_loopback.py's
    ring_loopback_<gpu>.json have other rows and are left out."""
    return sorted(glob.glob(os.path.join(directory, "ring_*_w[0-9]*.json")))


def draw_panel(ax, rows, mode, metric):
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by_key = {(r["config"], r["mode"], r["impl"], r["layout"]): r for r in rows}
    series = [(impl, label, layout, color, hatch)
              for impl, label, colors, hatch in IMPLS for layout, color in zip(LAYOUTS, colors)]
    width = 0.8 / len(series)
    top = 1.0
    labelled = set()
    for s, (impl, label, layout, color, hatch) in enumerate(series):
        for c, config in enumerate(configs):
            x = c - 0.4 + (s + 0.5) * width
            row = by_key.get((config, mode, impl, layout))
            if row is not None and row["status"] == "ok" and metric in row:
                value = row[metric]
                top = max(top, value)
                name = f"{label} {layout}"
                ax.bar(x, value, width, color=color, hatch=hatch, edgecolor="white", linewidth=0.5,
                       label=None if name in labelled else name)
                labelled.add(name)
                ax.text(x, value, f"{100 * value:.0f}", ha="center", va="bottom", fontsize=6)
            elif row is not None:
                ax.text(x, 0.02, row["status"], rotation=90, ha="center", va="bottom", fontsize=6, color=color)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0, top * 1.15)
    ax.grid(axis="y", alpha=0.3)


def main(argv=None):
    args = parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    documents = []
    for path in args.files:
        with open(path) as f:
            documents.append(json.load(f))
    fig, axes = plt.subplots(len(documents), len(MODES), figsize=(7 * len(MODES), 4.2 * len(documents)),
                             squeeze=False)
    for row_axes, doc in zip(axes, documents):
        for ax, (mode, mode_title) in zip(row_axes, MODES):
            draw_panel(ax, doc["rows"], mode, args.metric)
            ax.set_title(f"{doc['gpu']} x{doc['world_size']}: {mode_title}", fontsize=9)
            ax.set_ylabel(METRICS[args.metric], fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) or 1, fontsize=8)
    fig.suptitle("ring attention efficiency (1.0 = N GPUs as fast as N x one GPU on one block)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
