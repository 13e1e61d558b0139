"""
The plots of an ablation plan (ablate.py writes them beside its tables): each cell's vision against its text stable
score, every cell's loss curves, and for a sweep both scores against the swept key. matplotlib is optional: without
it the tables are written and the plots are not.
"""

import json
import os

import numpy as np

import stats


def pyplot(path):
    """matplotlib's pyplot, or None (it is optional: the tables are written without it)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f'matplotlib is not installed: no {os.path.basename(path)} (pip install matplotlib)')
        return None


def read_curve(path):
    """(steps, losses) of a stage's metrics.jsonl; empty when the file is missing."""
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    points = [(v['step'], v['loss']) for v in lines if 'loss' in v]
    return [p[0] for p in points], [p[1] for p in points]


def curves(runs, path):
    """The training loss of every cell's image and finetune stages (mean over its seeds), one panel per stage."""
    plt = pyplot(path)
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, stage in zip(axes, ('image', 'finetune')):
        for cell in dict.fromkeys(r['cell'] for r in runs):
            curves = [read_curve(os.path.join(r['out_dir'], stage, 'metrics.jsonl')) for r in runs if r['cell'] == cell]
            curves = [c for c in curves if c[0]]
            if curves:
                n = min(len(c[0]) for c in curves)  # seeds of a cell log at the same steps
                ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), label=cell, lw=1.2)
        ax.set_title(f'{stage} stage')
        ax.set_xlabel('step')
        ax.set_ylabel('training loss (mean over seeds)')
        ax.grid(alpha=0.3)
    if axes[1].lines:  # cells that logged no curve (failed, or runs from before metrics.jsonl) draw nothing
        axes[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def scores(results, path):
    """Each cell's text against its vision score, mean over seeds with 95 % intervals."""
    plt = pyplot(path)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for cell, seeds in results.items():
        evals = list(seeds.values())
        if not stats.scored(evals):
            continue
        # the mean over seeds and its 95% interval over seeds and items, as in the table
        (x, (x0, x1)), (y, (y0, y1)) = ((e.value, e.ci95) for e in (stats.cell_mean(evals, m) for m in ('vision', 'text')))
        xerr, yerr = [[x - x0], [x1 - x]], [[y - y0], [y1 - y]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt='o', capsize=3, label=cell)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), frameon=False)  # labels never overlap
    ax.set_xlabel('vision stable score')
    ax.set_ylabel('text stable score')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def swept_key(cells):
    """The one grid key whose values are numbers (the axis of a sweep: image_inject_frac, encoder_lr), or None."""
    keys = {k for c in cells.values() for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return keys.pop() if len(keys) == 1 else None


def sweep_lines(cells, results, key):
    """{label: [(value, evals), ...]}: the scored cells that set `key`, by their other keys, in the key's order;
    and {label: evals}: the scored cells that leave it unset (the LR plan's frozen ones). cells: {name: cell}."""
    lines, levels = {}, {}
    for name, cell in cells.items():
        evals = list(results.get(name, {}).values())
        if not stats.scored(evals):
            continue
        rest = ' '.join(part for part in name.split(' ') if not part.startswith(f'{key}=')) or 'default'
        if key in cell:
            lines.setdefault(rest, []).append((cell[key], evals))
        else:
            levels[rest] = evals
    return {label: sorted(points, key=lambda p: p[0]) for label, points in lines.items()}, levels


def sweep(cells, results, path):
    """Both stable scores against the swept key, mean over seeds with 95 % intervals: the paper's own figures."""
    key = swept_key(cells)
    lines, levels = sweep_lines(cells, results, key) if key else ({}, {})  # no numeric key: the encoder plan
    plt = pyplot(path) if lines else None
    if plt is None:
        return False
    values = sorted({x for points in lines.values() for x, _ in points})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, modality in zip(axes, ('vision', 'text')):
        for label, points in lines.items():
            means = [stats.cell_mean(evals, modality) for _, evals in points]
            xs, ys = [x for x, _ in points], [m.value for m in means]
            yerr = [[m.value - m.ci95[0] for m in means], [m.ci95[1] - m.value for m in means]]
            ax.errorbar(xs, ys, yerr=yerr, fmt='o-', capsize=3, label=label)
        for i, (label, evals) in enumerate(levels.items()):  # a cell off the axis (frozen): a level to compare with;
            # the i-th level takes the i-th line's color, as a plan lists its families in one order on and off the axis
            ax.axhline(stats.cell_mean(evals, modality).value, color=f'C{i % 10}', ls='--', lw=1, label=label)
        if values[0] > 0 and values[-1] / values[0] >= 100:  # LRs: equal ratios, equal steps
            ax.set_xscale('log')
        ax.set_xticks(values, [f'{x:g}' for x in values])  # the values the plan ran
        ax.set_xlabel(key)
        ax.set_ylabel(f'{modality} stable score (mean over seeds, 95 % interval)')
        ax.grid(alpha=0.3)
    if len(lines) + len(levels) > 1:  # one line needs no legend
        axes[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
