"""
Compare training runs from their run folders (train.py's metrics.jsonl): one figure with val loss
and the worst layer's expert load (max/mean) over iterations, and a markdown table for
bench/RESULTS.md.

    python bench/plot_runs.py bench/moe_vs_dense.png out/moe_s1 out/dense_s1 out/moe_s2 out/dense_s2

A run is labelled by its folder name; runs named <name>_s<seed> are also averaged per name in the
table. The load is train.py's: the fraction of assignments per expert, averaged over each log
interval, so it shows the balance the experts see over a few steps, not within one step.
"""

import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from failsafe import check, fail, stop_on_signals, write_atomic  # noqa: E402

if __name__ == '__main__':  # before torch and matplotlib load: a stop while they do is one line too
    stop_on_signals(lambda: '; nothing was written')

from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from common import pyplot, read_metrics  # noqa: E402


def read_run(folder):
    """-> (eval iters, val losses, log iters, worst-layer load max/mean, mean dropped fraction)."""
    path = os.path.join(folder, 'metrics.jsonl')
    try:
        records = read_metrics(path)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} ({type(e).__name__}): pass run folders written by train.py")
    evals = [r for r in records if 'val_loss' in r]
    check([(evals, f"{path} holds no evaluations (no val_loss record): pass run folders that "
            "train.py evaluated at least once")])
    logs = [r for r in records if 'load' in r]
    imbalance = [max(max(layer) * len(layer) for layer in r['load']) for r in logs]
    dropped = [sum(r['dropped']) / len(r['dropped']) for r in logs]
    return ([r['iter'] for r in evals], [r['val_loss'] for r in evals], [r['iter'] for r in logs],
            imbalance, dropped)


def image_format(out_png):
    """The format out_png names by its extension, checked before any work: one that matplotlib
    writes, into a folder that exists."""
    kind = os.path.splitext(out_png)[1][1:].lower()
    kinds = FigureCanvasBase.get_supported_filetypes()
    folder = os.path.dirname(out_png) or '.'
    check([(kind in kinds, f"cannot draw {out_png}: matplotlib writes no '{kind}' files (it "
            f"writes {', '.join(sorted(kinds))})"),
           (os.path.isdir(folder), f"{folder} does not exist: create it, or draw into another "
            "folder")])
    return kind


def main(out_png, folders):
    kind = image_format(out_png)
    runs = {os.path.basename(os.path.normpath(f)): read_run(f) for f in folders}
    moe = any(run[3] for run in runs.values())
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(12 if moe else 6, 4), squeeze=False)
    print("| run | final val loss | worst-layer load max/mean, 2nd half | dropped |\n"
          "|---|---|---|---|")
    groups = defaultdict(list)
    for name, (eval_iters, val, log_iters, imbalance, dropped) in runs.items():
        axes[0, 0].plot(eval_iters[1:], val[1:], label=name)  # iteration 0 (ln V) would squash it
        half = imbalance[len(imbalance) // 2:]
        balance = f"{sum(half) / len(half):.3f}" if half else "dense"
        drop = f"{sum(dropped) / len(dropped):.2%}" if dropped else ""
        print(f"| {name} | {val[-1]:.4f} | {balance} | {drop} |")
        groups[re.sub(r'_s\d+$', '', name)].append(val[-1])
        if moe and imbalance:
            axes[0, 1].plot(log_iters, imbalance, label=name)
    for name, finals in groups.items():
        if len(finals) > 1:
            mean, spread = sum(finals) / len(finals), max(finals) - min(finals)
            print(f"| {name}: mean of {len(finals)} seeds | {mean:.4f} (spread {spread:.4f}) | | |")
    axes[0, 0].set(xlabel='iteration', ylabel='val loss (nats)', title='validation loss')
    if moe:
        axes[0, 1].set(xlabel='iteration', ylabel='max / mean', title='expert load, worst layer',
                       ylim=(0.95, None))
        axes[0, 1].legend(fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    write_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=90, format=kind))
    print(f"wrote {out_png}")


if __name__ == '__main__':
    if '-h' in sys.argv or '--help' in sys.argv:
        print(__doc__.strip())
    elif len(sys.argv) < 3:
        fail("usage: python bench/plot_runs.py OUT.png RUN_FOLDER [RUN_FOLDER ...]", code=2)
    else:
        main(sys.argv[1], sys.argv[2:])
