"""
What an ablation plan's runs show (ablate.py writes it beside them): its tables, in markdown, each judged by one
model for the plan (stats.PlanModel), and its plots: each cell's vision against its text stable score, every cell's
loss curves, and for a sweep both scores against the swept key. matplotlib is optional: without it the tables are
written and the plots are not.
"""

import json
import os

import numpy as np

import shapes
import stats
from eval import STABLE_SCORES
from runtime import format_time

# -----------------------------------------------------------------------------
# the tables

def fmt_p(p):
    return f'{p:.3f}' if p >= 0.001 else '<0.001'


def fmt_delta(est):
    """A contrast as 'Δ [95 % interval] (p)', or '' when there is none."""
    return '' if est is None else f'{est.value:+.3f} [{est.ci95[0]:+.3f}, {est.ci95[1]:+.3f}] (p={fmt_p(est.p)})'


def plan_models(results):
    """{stable score key: stats.PlanModel} over the cells that have it: one model per score for the whole plan."""
    models = {}
    for key, (_, modality, tasks) in STABLE_SCORES.items():
        scored = {cell: seeds for cell, seeds in results.items() if seeds and next(iter(seeds.values()))[key] is not None}
        if scored:
            models[key] = stats.PlanModel(scored, modality, tasks)
    return models


def contrast(models, key, cell, versus):
    """cell minus versus on one stable score, or None when either has no seed scored."""
    model = models.get(key)
    if model is None or cell == versus or not {cell, versus} <= set(model.results):
        return None
    return model.contrast({cell: 1, versus: -1})


def results_table(results, baseline_name, times=None):
    """
    results: {cell: {seed: eval.json}} -> markdown rows: each stable score's mean over the cell's seeds with its
    95 % interval (stats.cell_mean: seeds and questions), its vision and text differences from the baseline cell with
    their intervals, p and the exact 80 % minimum detectable effect (the plan's model, stats.PlanModel), where one
    more seed's scores will land (a prediction interval on the same questions) and the wall time per seed.
    """
    models, times = plan_models(results), times or {}
    header = ['cell', 'seeds', 'vision', 'blind vision', 'text', f'Δ vision vs {baseline_name} (p)', 'Δ text (p)',
              'detectable Δ: vision; text', 'a new seed: vision; text', 'time per seed']
    rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for cell, seeds in results.items():
        if not seeds:
            rows.append('| ' + ' | '.join([cell, '0', 'no seed finished'] + [''] * (len(header) - 3)) + ' |')
            continue
        evals = list(seeds.values())
        means = []
        for key, (_, modality, tasks) in STABLE_SCORES.items():
            est = stats.cell_mean(evals, modality, tasks) if evals[0][key] is not None else None
            means.append('n/a' if est is None else f'{est.value:.3f} [{est.ci95[0]:.3f}, {est.ci95[1]:.3f}]')
        deltas = [contrast(models, key, cell, baseline_name) for key in ('vision_stable_score', 'text_stable_score')]
        detectable = '; '.join('' if d is None else f'{d.mde:.3f}' for d in deltas) if any(deltas) else ''
        new_seed = []
        for key in ('vision_stable_score', 'text_stable_score'):
            ci = stats.new_seed_interval([e[key] for e in evals]) if evals[0][key] is not None else None
            new_seed.append('n/a' if ci is None else f'[{ci[0]:.3f}, {ci[1]:.3f}]')
        spent = [sum(t.values()) for t in times.get(cell, [])]
        rows.append('| ' + ' | '.join([cell, str(len(evals))] + means + [fmt_delta(d) for d in deltas] + [
            detectable, '; '.join(new_seed), format_time(np.mean(spent)) if spent else '']) + ' |')
    model = next(iter(models.values()), None)
    if model is not None:
        rows.append(f'\n(one model for the plan: {len(model.cells)} cells x seeds {model.seeds}, cells fixed and seeds '
                    f'random; a cell outside it is compared by a paired test over the seeds it shares)')
    return '\n'.join(rows)


def primary_table(results, primary):
    """
    The plan's primary contrasts, declared in its config before it ran ((cell, versus, modality): the paper's
    finding it tests): each estimate with its 95 % interval, raw and Holm-adjusted p over the family, the exact 80 %
    minimum detectable effect and the model and df it was judged with: one model over the cells they name (the cells
    ablate.py adds seeds to); and how many seeds' own differences are positive, with their range. Markdown and the
    rows as dicts.
    """
    cells = {c for entry in primary for c in entry[:2]}  # one model over the cells the contrasts name
    models = plan_models({cell: seeds for cell, seeds in results.items() if cell in cells})
    found = [((c, v, m), contrast(models, f'{m}_stable_score', c, v)) for c, v, m in primary]
    tested = [(c, e) for c, e in found if e is not None]
    adjusted = dict(zip(range(len(tested)), stats.holm([e.p for _, e in tested])))
    rows = ['| primary contrast | score | Δ [95 % interval] | p | Holm p | detectable Δ | model (df) | seeds: Δ > 0 |',
            '|---|---|---|---|---|---|---|---|']
    records = []
    for i, ((cell, versus, modality), est) in enumerate(tested):
        key = f'{modality}_stable_score'  # each seed's own difference: how often, and how far, the seeds agree
        per_seed = {s: results[cell][s][key] - results[versus][s][key] for s in sorted(results[cell])
                    if s in results[versus] and results[cell][s][key] is not None and results[versus][s][key] is not None}
        agree = (f'{sum(d > 0 for d in per_seed.values())} of {len(per_seed)} ({min(per_seed.values()):+.3f} to '
                 f'{max(per_seed.values()):+.3f})') if per_seed else ''
        # the model over the primary cells alone, not the plan's table of every cell (whose residual, df and so p differ)
        model = f'plan of {len(models[key].results)} cells' if est.model == 'plan' else est.model
        rows.append(f'| {cell} − {versus} | {modality} | {est.value:+.3f} [{est.ci95[0]:+.3f}, {est.ci95[1]:+.3f}] | '
                    f'{fmt_p(est.p)} | {fmt_p(adjusted[i])} | {est.mde:.3f} | {model} ({est.df:.1f}) | {agree} |')
        records.append(dict(cell=cell, versus=versus, modality=modality, estimate=est.value, ci95=list(est.ci95),
                            p=est.p, holm_p=adjusted[i], mde=est.mde, df=est.df, model=est.model, seeds=est.seeds,
                            per_seed=per_seed))
    rows += [f'| {c} − {v} | {m} | not scored yet | | | | | |' for (c, v, m), e in found if e is None]
    return '\n'.join(rows), records


def referent_table(results):
    """
    The shapes world's referents, per cell (mean over its seeds), for each vision task whose questions name a color
    or a shape: the accuracy on seen referents (fine-tuning named them) and on held-out ones (only captions did).
    '' when the runs hold no shapes vision tasks.
    """
    first = next((e for seeds in results.values() for e in seeds.values()), None)
    tasks = [t for t in shapes.VISION_TASKS if first and 'accuracy_held_out' in first['tasks'].get(t, {})]
    if not tasks:
        return ''
    header = ['cell', 'seeds'] + [f'{t}: seen / held out' for t in tasks]
    rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for cell, seeds in ((cell, seeds) for cell, seeds in results.items() if seeds):  # a cell no seed finished: none
        parts = [' / '.join(f"{np.mean([e['tasks'][t][f'accuracy_{part}'] for e in seeds.values()]):.3f}"
                            for part in ('seen', 'held_out')) for t in tasks]
        rows.append('| ' + ' | '.join([cell, str(len(seeds))] + parts) + ' |')
    return '\n'.join(rows)


def study_table(plan_dirs):
    """The primary contrasts of several plans (their results.json) as one family: raw and Holm-adjusted p over the
    whole study, beside each plan's own."""
    entries = []
    for folder in plan_dirs:
        with open(os.path.join(folder, 'results.json')) as f:
            entries += [(folder, c) for c in json.load(f).get('primary', [])]
    adjusted = stats.holm([c['p'] for _, c in entries])
    rows = ['| plan | primary contrast | score | Δ [95 % interval] | p | Holm p (study) | Holm p (plan) | detectable Δ |',
            '|---|---|---|---|---|---|---|---|']
    rows += [f'| {folder} | {c["cell"]} − {c["versus"]} | {c["modality"]} | {c["estimate"]:+.3f} [{c["ci95"][0]:+.3f}, '
             f'{c["ci95"][1]:+.3f}] | {fmt_p(c["p"])} | {fmt_p(holm)} | {fmt_p(c["holm_p"])} | {c["mde"]:.3f} |'
             for (folder, c), holm in zip(entries, adjusted)]
    return '\n'.join(rows)


# -----------------------------------------------------------------------------
# the plots

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
    """(steps, losses) of a stage's metrics.jsonl; empty when the file is missing. A torn line (a kill) is skipped."""
    if not os.path.exists(path):
        return [], []
    lines = []
    with open(path, errors='replace') as f:
        for line in f:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                lines.append(value)
    points = [(v['step'], v['loss']) for v in lines if 'loss' in v and 'step' in v]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(runs, path):
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


def plot_scores(results, path):
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


def plot_sweep(cells, results, path):
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
