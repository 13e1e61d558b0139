"""
Run a plan of training cells over seeds and collect their stable scores: a table of means over seeds with intervals
and significance against a baseline cell (Student's t over seeds, the questions' error added: stats.py), how many
seeds and questions a difference needs, and plots of vision against text and of the loss curves.

    python ablate.py                                  # the encoder ablation: 4 encoders x frozen/trained + patch
    python ablate.py config/ablate_injection.py       # a sweep of the paper's own axes (see config/ablate_*.py)
    python ablate.py --image_iters=100 --seeds=[1,2,3,4,5]  # any train.py key passes to every cell

Every cell is one `python train.py` run in its own process (one cell's crash cannot take down the others), writing
to {runs_dir}/<cell>/seed<seed>; cells with the same text settings share one text stage. Finished cells (their
finetune/eval.json exists) are skipped on rerun, so an interrupted plan resumes where it stopped; plans that share a
runs_dir run an experiment they have in common once, whatever its name in each. Outputs in out_dir: results.json
(every run's cell, seed, folder, arguments, eval.json and times), results.md (the table), results.png (vision
against text), curves.png (every cell's loss curves) and, for a grid with one numeric key, sweep.png (both scores
against it); the plots need matplotlib.

    python ablate.py config/ablate_encoder_lr.py --runs_dir=out/runs --out_dir=out/encoder_lr  # reuses the
                                                   # frozen cells `--runs_dir=out/runs --out_dir=out/encoder` ran
"""

import glob
import itertools
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

import stats
import train
from configurator import ConfigError, configure, script_config
from eval import STABLE_SCORES
from runtime import format_time

# -----------------------------------------------------------------------------
# config: ablate.py's own keys; every other --key=value is a train.py key applied to every cell
out_dir = 'out/ablate'  # results.json, .md, .png, curves.png and, for a sweep, sweep.png
runs_dir = ''  # each cell runs in {runs_dir}/<cell>/seed<seed> ('' = out_dir), beside its cell.json (its resolved
# config); a run whose cell.json equals that of a run already in runs_dir, under any name, is that run
# the grid: every combination of its values is a cell; a list of such dicts is the union of their products. The key
# 'config' takes train.py config files: the cell is that file, exactly what `python train.py FILE` runs (a test
# checks it), and is named by it; every other key is a train.py key. Combinations train.py rejects are skipped and
# reported. Default: the paper's encoder ablation, one config file per cell (config/ablate_encoder_lr.py: its curve)
grid = [{'config': ['config/siglip_frozen.py', 'config/siglip_unfrozen.py', 'config/dino_siglip_frozen.py',
                    'config/dino_siglip_unfrozen.py', 'config/vit_frozen.py', 'config/vit_unfrozen.py',
                    'config/resnet_frozen.py', 'config/resnet_unfrozen.py', 'config/patch.py']}]
baseline = ''  # the cell the others are compared with, by name ('siglip_frozen'); '' = the first
report_only = False  # True: run nothing, write the table and plots of the runs finished so far (while a plan runs)
seeds = [1, 2, 3]  # every cell runs once per seed (each seed reseeds every stage and the shapes encoders); 3 detect a
# text difference of about 0.06 and a vision one of about 0.19, 5 seeds 0.03 and 0.10 (docs/results.md, "What 3
# seeds can detect")
# -----------------------------------------------------------------------------
ABLATE_KEYS = ('out_dir', 'runs_dir', 'grid', 'baseline', 'report_only', 'seeds')
WHERE = ('out_dir', 'text_out_dir', 'data_dir')  # where a run reads and writes: not what experiment it is


def cell_name(cell):
    return ' '.join(os.path.splitext(os.path.basename(v))[0] if k == 'config' else f'{k}={v}'
                    for k, v in cell.items()) or 'default'


def cell_args(cell):
    """A cell's train.py arguments: its config file first (found beside ablate.py too), then its --key=value flags."""
    args = [f'--{k}={v}' for k, v in cell.items() if k != 'config']
    if 'config' in cell:
        path = cell['config']
        args.insert(0, path if os.path.exists(path) else os.path.join(os.path.dirname(os.path.abspath(__file__)), path))
    return args


def grid_cells(grid):
    """The cells of a grid (a dict of value lists, or a list of them: the union of their products), in order."""
    grids = grid if isinstance(grid, list) else [grid]
    if not grids or any(not isinstance(g, dict) or not g or any(not isinstance(v, (list, tuple)) or not v
                                                                 for v in g.values()) for g in grids):
        raise ConfigError(f'grid={grid!r}: it maps keys to non-empty lists of values (or is a list of such dicts)')
    cells = [dict(zip(g, values)) for g in grids for values in itertools.product(*g.values())]
    names = [cell_name(c) for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f'grid={grid!r}: the cells {", ".join(twice)} occur more than once')
    return cells


def folder_name(text):
    return re.sub(r'[^A-Za-z0-9_.=-]+', '_', text)


def split_args(args):
    """ablate.py's own settings (config files and its keys) apart from the train.py flags passed to every cell."""
    own, passed = [], []
    for arg in args:
        key = arg[2:].partition('=')[0] if arg.startswith('--') else None
        (passed if key is not None and key not in ABLATE_KEYS and arg not in ('-h', '--help') else own).append(arg)
    return own, passed


def expand(cfg, passed):
    """The runs of the plan, one per valid cell of the grid and seed, with their train.py arguments and folders;
    and the cells skipped because train.py rejects them, with the reason."""
    cells, skipped = [], []
    for cell in grid_cells(cfg['grid']):
        name, args = cell_name(cell), cell_args(cell)
        # the cell's config file first, then the plan's flags (passed to every cell), then the cell's own flags
        args = args[:1] + passed + args[1:] if 'config' in cell else passed + args
        try:
            cells.append((name, args, vars(train.get_config(args))))
        except ConfigError as e:
            if any(str(e).startswith(p) for p in ('unknown config key', '--')):
                raise  # a typo in the grid is an error, not a skip
            skipped.append(f'{name}: {e}')
    if not cells:
        raise ConfigError('no valid cell in the grid:\n' + '\n'.join(skipped))
    # cells that differ only in keys the text stage does not read share one text stage (train.fingerprint); its
    # folder is named by the text keys set away from train.py's defaults ('default' when none is), so that plans
    # sharing a runs_dir share it too
    defaults = vars(train.get_config([]))
    text_keys = [k for k in train.defining_keys(defaults, 'text') if k != 'seed']
    runs_dir = cfg['runs_dir'] or cfg['out_dir']
    runs = []
    for name, args, cell_cfg in cells:
        text_tag = '-'.join(f'{k}={cell_cfg[k]}' for k in text_keys if cell_cfg[k] != defaults[k]) or 'default'
        for seed in cfg['seeds']:
            out = os.path.join(runs_dir, folder_name(name), f'seed{seed}')
            text_out = os.path.join(runs_dir, 'text', folder_name(text_tag), f'seed{seed}')
            identity = {k: v for k, v in cell_cfg.items() if k not in WHERE} | {'seed': seed}
            runs.append(dict(cell=name, seed=seed, out_dir=out, identity=json.loads(json.dumps(identity)),
                             args=args + [f'--seed={seed}', f'--out_dir={out}', f'--text_out_dir={text_out}']))
    return same_runs_once(runs, runs_dir), skipped


def same_runs_once(runs, runs_dir):
    """
    Point every run at the folder of the same experiment (an equal cell.json: the resolved config but for where it
    reads and writes) that runs_dir already holds under another cell's name, or that an earlier run of this plan
    has: one experiment, one run. A finished folder is preferred, then the run's own.
    """
    folders = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(runs_dir), '*', 'seed*', 'cell.json'))):
        with open(path) as f:
            folders.setdefault(json.dumps(json.load(f), sort_keys=True), []).append(os.path.dirname(path))
    for r in runs:
        same = folders.setdefault(json.dumps(r['identity'], sort_keys=True), [])
        finished = [d for d in same if os.path.exists(os.path.join(d, 'finetune', 'eval.json'))]
        folder = (finished or [d for d in same if d == r['out_dir']] or same or [r['out_dir']])[0]
        if folder not in same:
            same.append(folder)
        if folder != r['out_dir']:
            r['args'] = [f'--out_dir={folder}' if a == f'--out_dir={r["out_dir"]}' else a for a in r['args']]
            r['out_dir'], r['same_as'] = folder, os.path.basename(os.path.dirname(folder))
    return runs


def eval_path(run):
    return os.path.join(run['out_dir'], 'finetune', 'eval.json')


def run_cell(run):
    """One train.py process; its output goes to {out_dir}/log.txt. Returns None or the error's last lines."""
    os.makedirs(run['out_dir'], exist_ok=True)
    log_path = os.path.join(run['out_dir'], 'log.txt')
    with open(log_path, 'w') as log:
        code = subprocess.call([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')]
                               + run['args'], stdout=log, stderr=subprocess.STDOUT)
    if code == 0 and os.path.exists(eval_path(run)):
        return None
    with open(log_path) as f:
        tail = [line.rstrip() for line in f if line.strip()][-3:]
    return f'exit code {code}: ' + ' | '.join(tail) + f' (full log: {log_path})'


def claim_folder(run):
    """
    Write the run's cell.json into its folder, or say why the folder holds another experiment: a cell.json that
    differs from the run's (a key train.py gained since that run is not compared). Returns None or the error.
    """
    path = os.path.join(run['out_dir'], 'cell.json')
    if os.path.exists(path):
        with open(path) as f:
            held = json.load(f)
        differ = sorted(k for k in held if held[k] != run['identity'].get(k))
        return (f'{run["out_dir"]} holds another experiment: its cell.json differs in {", ".join(differ)} (move the '
                f'folder away, or give the plan another runs_dir)') if differ else None
    os.makedirs(run['out_dir'], exist_ok=True)
    with open(path, 'w') as f:
        json.dump(run['identity'], f, indent=1, sort_keys=True)
    return None


def run_plan(runs):
    """Run every unfinished cell; returns {index: error} for the cells that failed."""
    errors = {i: e for i, e in ((i, claim_folder(r)) for i, r in enumerate(runs)) if e}
    todo = [i for i, r in enumerate(runs) if i not in errors and not os.path.exists(eval_path(r))]
    print(f'{len(runs)} runs, {len(runs) - len(todo) - len(errors)} already done, {len(todo)} to run' + ''.join(
        f'\n    cannot run {runs[i]["cell"]} seed {runs[i]["seed"]}: {e}' for i, e in errors.items()), flush=True)
    durations = []
    for n, i in enumerate(todo):
        r = runs[i]
        if os.path.exists(eval_path(r)):  # the same experiment as a cell this plan ran already
            print(f'[{n + 1}/{len(todo)}] {r["cell"]} seed {r["seed"]}: done, as {r.get("same_as")}', flush=True)
            continue
        eta = f', ETA {format_time(np.mean(durations) * (len(todo) - n))}' if durations else ''
        print(f'[{n + 1}/{len(todo)}] {r["cell"]} seed {r["seed"]}: running ({n} done, {len(errors)} failed{eta})',
              flush=True)
        t0 = time.time()
        error = run_cell(r)
        durations.append(time.time() - t0)
        if error:
            errors[i] = error
            print(f'    failed: {error}', flush=True)
        else:
            with open(eval_path(r)) as f:
                e = json.load(f)
            print(f'    done in {format_time(durations[-1])}: ' + ', '.join(
                f'{name} {e[k]:.3f}' for k, (name, _, _) in STABLE_SCORES.items() if e[k] is not None), flush=True)
    return errors

# -----------------------------------------------------------------------------
# the table


def score_columns(evals, base):
    """A cell's three scores (mean over its seeds [95% interval]) and its vision and text differences from the
    baseline cell (p), all by Student's t over seeds with the questions' own error added (stats.over_seeds)."""
    shown, deltas = [], []
    for key, tasks, modality in (('vision_stable_score', 'tasks', 'vision'),
                                 ('vision_blind_stable_score', 'blind_tasks', 'vision'),
                                 ('text_stable_score', 'tasks', 'text')):
        if evals[0][key] is None:
            shown.append('n/a')
            deltas += [''] if tasks == 'tasks' else []  # every row keeps its columns
            continue
        runs = [{'tasks': e[tasks]} for e in evals]
        mean, ci, _ = stats.over_seeds(runs, modality)
        shown.append(f'{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]')
        if tasks == 'tasks':
            if not base or base is evals or base[0][key] is None or len(base) != len(evals):
                deltas.append('')
                continue
            diff, _, p = stats.over_seeds(runs, modality, baseline=base)
            deltas.append(f'{diff:+.3f} (p={p:.3f})' if p >= 0.001 else f'{diff:+.3f} (p<0.001)')
    return shown + deltas


def new_seed_columns(evals):
    """Where one more seed's vision and text stable scores will land (stats.new_seed_interval), or 'n/a'."""
    shown = []
    for key in ('vision_stable_score', 'text_stable_score'):
        scores = [e[key] for e in evals if e[key] is not None]
        ci = stats.new_seed_interval(scores) if len(scores) == len(evals) else None
        shown.append('n/a' if ci is None else f'[{ci[0]:.3f}, {ci[1]:.3f}]')
    return '; '.join(shown)


def results_table(results, baseline_name, times=None):
    """
    results: {cell: [eval.json of each finished seed]} -> markdown rows: each score's mean over seeds with a 95%
    interval, and the differences to baseline_name with p, both by Student's t over seeds with the questions' error
    added (stats.over_seeds), so they include the spread between seeds (a cell with one seed: items only); where one more seed will land (a
    prediction interval, wider than the mean's); times: {cell: [times.json of each seed]}, each cell's wall time per
    seed (mean over its seeds).
    """
    base, times = results.get(baseline_name), times or {}
    header = ['cell', 'seeds', 'vision', 'blind vision', 'text', f'Δ vision vs {baseline_name} (p)', 'Δ text (p)',
              'a new seed: vision; text', 'time per seed']
    rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for cell, evals in results.items():
        if not evals:
            rows.append('| ' + ' | '.join([cell, '0', 'no seed finished'] + [''] * (len(header) - 3)) + ' |')
            continue
        spent = [sum(t.values()) for t in times.get(cell, [])]
        rows.append('| ' + ' | '.join([cell, str(len(evals))] + score_columns(evals, base) + [
            new_seed_columns(evals), format_time(np.mean(spent)) if spent else '']) + ' |')
    return '\n'.join(rows)


def power_table(results, baseline_name, sizes=(100, 200, 500, 1000), seeds=(3, 5)):
    """
    How the spread between seeds falls as the questions per task grow, and the smallest difference from the
    baseline that a plan of 3 or 5 (`seeds`) seeds per cell detects (stats.detectable: the table's own t test,
    two-sided 5 %, 80 % power). Spreads are pooled over the cells with 2 or more seeds: of one seed's score (sd), and
    of a cell's difference from the baseline seed by seed (sd Δ: seed s of both cells shares its text stage and
    encoders, which pairing cancels); the questions add their own error (stats.item_se). Markdown, or '' when no
    cell has 2 seeds.
    """
    cells = {c: e for c, e in results.items() if len(e) >= 2 and stats.scored(e)}
    if not cells:
        return ''
    base = cells.get(baseline_name)
    paired = [c for c in cells if base and c != baseline_name and len(cells[c]) == len(base)]
    most = min(len(t['scores']) for evals in cells.values() for e in evals for t in e['tasks'].values())
    pooled = lambda groups: float(np.sqrt(sum(np.sum((np.array(g) - np.mean(g)) ** 2) for g in groups) /
                                          sum(len(g) - 1 for g in groups)))
    each = ' / '.join(str(k) for k in seeds)
    rows = [f'| questions per task | sd vision | sd text | sd Δ vision | sd Δ text | detectable Δ vision ({each} '
            f'seeds) | detectable Δ text ({each} seeds) |', '|---|---|---|---|---|---|---|']
    for n in [n for n in sizes if n <= most]:
        sds = [pooled([[stats.seed_score(e, m, n) for e in evals] for evals in cells.values()])
               for m in ('vision', 'text')]
        shown, detectable = [f'{v:.3f}' for v in sds], []
        for m in ('vision', 'text'):
            if not paired:
                shown.append('n/a')
                detectable.append('n/a')
                continue
            sd_delta = pooled([[stats.seed_score(a, m, n) - stats.seed_score(b, m, n)
                                for a, b in zip(cells[c], base)] for c in paired])
            se_items = np.sqrt(np.mean([stats.item_se(cells[c], m, base, n) ** 2 for c in paired]))
            shown.append(f'{sd_delta:.3f}')
            detectable.append(' / '.join(f'{stats.detectable(sd_delta, se_items, k):.3f}' for k in seeds))
        rows.append(f'| {n} | ' + ' | '.join(shown + detectable) + ' |')
    return '\n'.join(rows) + '\n\n(detectable: with that many seeds per cell, paired with the baseline\'s)'


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


def plot(results, path):
    """Each cell's text against its vision score, mean over seeds with 95 % intervals."""
    plt = pyplot(path)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for cell, evals in results.items():
        if not stats.scored(evals):
            continue
        # the mean over seeds and its 95% interval over seeds and items, as in the table
        (x, (x0, x1), _), (y, (y0, y1), _) = (stats.over_seeds(evals, m) for m in ('vision', 'text'))
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
    keys = {k for c in cells for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return keys.pop() if len(keys) == 1 else None


def sweep_lines(cells, results, key):
    """{label: [(value, evals), ...]}: the scored cells that set `key`, by their other keys, in the key's order;
    and {label: evals}: the scored cells that leave it unset (the LR plan's frozen ones)."""
    lines, levels = {}, {}
    for cell in cells:
        evals = results.get(cell_name(cell))
        if not stats.scored(evals):
            continue
        rest = cell_name({k: v for k, v in cell.items() if k != key})
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
            means = [stats.over_seeds(evals, modality) for _, evals in points]
            xs, ys = [x for x, _ in points], [m for m, _, _ in means]
            yerr = [[m - lo for m, (lo, _), _ in means], [hi - m for m, (_, hi), _ in means]]
            ax.errorbar(xs, ys, yerr=yerr, fmt='o-', capsize=3, label=label)
        for i, (label, evals) in enumerate(levels.items()):  # a cell off the axis (frozen): a level to compare with;
            # the i-th level takes the i-th line's color, as a plan lists its families in one order on and off the axis
            ax.axhline(stats.over_seeds(evals, modality)[0], color=f'C{i % 10}', ls='--', lw=1, label=label)
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


def collect(cfg, runs, errors, skipped=()):
    results, times, records = {}, {}, []
    for i, r in enumerate(runs):
        evals = results.setdefault(r['cell'], [])
        record = dict(cell=r['cell'], seed=r['seed'], out_dir=r['out_dir'], args=r['args'])
        if os.path.exists(eval_path(r)):
            with open(eval_path(r)) as f:
                record['eval'] = json.load(f)
            evals.append(record['eval'])
            times_path = os.path.join(r['out_dir'], 'times.json')  # where the cell's run spent its time
            if os.path.exists(times_path):
                with open(times_path) as f:
                    record['times'] = json.load(f)
                times.setdefault(r['cell'], []).append(record['times'])
        else:
            record['error'] = errors.get(i, 'not run')
        records.append(record)
    baseline_name = cfg['baseline'] or runs[0]['cell']
    if baseline_name not in results:
        raise ConfigError(f'baseline={baseline_name!r} is not a cell; the cells are: {", ".join(results)}')
    os.makedirs(cfg['out_dir'], exist_ok=True)
    with open(os.path.join(cfg['out_dir'], 'results.json'), 'w') as f:
        json.dump(records, f)
    table = results_table(results, baseline_name, times)
    power = power_table(results, baseline_name)
    if power:  # how many questions and seeds it takes: docs/results.md, "How many questions"
        table += '\n\nseed-to-seed spread by questions per task, pooled over the cells:\n\n' + power
    failed = [f'- {rec["cell"]} seed {rec["seed"]}: {rec["error"]}' for rec in records if 'error' in rec]
    with open(os.path.join(cfg['out_dir'], 'results.md'), 'w') as f:
        f.write(table + '\n' + ('\nfailed or not run:\n' + '\n'.join(failed) + '\n' if failed else '') +
                ('\nskipped (train.py rejects the combination):\n' + '\n'.join(f'- {s}' for s in skipped) + '\n'
                 if skipped else ''))
    plot(results, os.path.join(cfg['out_dir'], 'results.png'))
    plot_curves(runs, os.path.join(cfg['out_dir'], 'curves.png'))
    plot_sweep(grid_cells(cfg['grid']), results, os.path.join(cfg['out_dir'], 'sweep.png'))
    return table, failed


def main(args):
    own, passed = split_args(args)
    cfg = configure(own, script_config(globals()), source=__file__)
    runs, skipped = expand(cfg, passed)
    for reason in skipped:
        print(f'skipped {reason}')
    t0 = time.time()
    errors = {} if cfg['report_only'] else run_plan(runs)
    table, failed = collect(cfg, runs, errors, skipped)
    print(f'\n{table}\n' + ('\n'.join(['failed or not run:'] + failed) + '\n' if failed else '') +
          f'\nwritten to {cfg["out_dir"]}/results.{{json,md,png}} in {format_time(time.time() - t0)}')
    return cfg['report_only'] or not failed


if __name__ == '__main__':
    try:
        ok = main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    sys.exit(0 if ok else 1)
