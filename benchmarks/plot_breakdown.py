"""Bar chart of minicvt's per-layer-type time in one training step, before and after, from
the JSON files that `step_vs_torch.py --breakdown --json OUT` writes.

    python3 benchmarks/plot_breakdown.py BEFORE.json AFTER.json --out docs/figures/speed.png

Each bar is a layer type's forward plus backward time (ms, batch 128); the title gives both
runs' training-step medians and their ratios to PyTorch measured in the same run.
"""
import argparse
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    """(per-layer-type total ms, minicvt step median, PyTorch step median) of the first run."""
    run = json.load(open(path))["runs"][0]
    totals = {}
    for row in run["breakdown"]["rows"]:
        if row.get("phase") in ("forward", "backward"):
            totals[row["layer"]] = totals.get(row["layer"], 0.0) + row["ms"]
    step = {side: statistics.median(ms) for side, ms in run["step_ms"].items()}
    return totals, step["minicvt"], step["torch"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=int, default=7, help="the layer types with the most time before")
    args = p.parse_args()
    (before, b_step, b_torch), (after, a_step, a_torch) = load(args.before), load(args.after)
    names = sorted(before, key=before.get, reverse=True)[:args.top]
    ys = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    ax.barh([y + 0.2 for y in ys], [before[n] for n in names], height=0.4, label="before", color="0.6")
    ax.barh([y - 0.2 for y in ys], [after.get(n, 0.0) for n in names], height=0.4, label="after",
            color="tab:blue")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (forward + backward), batch 128")
    ax.set_title(f"training step {b_step:.0f} ms ({b_step / b_torch:.2f}x PyTorch) -> "
                 f"{a_step:.0f} ms ({a_step / a_torch:.2f}x)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
