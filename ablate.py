"""
Run a plan of training cells and collect their stable scores: a table with intervals and paired significance
against a baseline cell, and a plot of vision vs text stable score.

    python ablate.py                                  # the encoder ablation: 4 encoders x frozen/unfrozen + patch
    python ablate.py config/ablate_injection.py       # a sweep of the paper's own axes (see config/ablate_*.py)
    python ablate.py --image_iters=100 --seeds=[1,2]  # any train.py key passes to every cell

Every cell is one `python train.py` run in its own process (one cell's crash cannot take down the others), writing
to {out_dir}/<cell>/seed<seed>; cells with the same text settings share one text stage. Finished cells (their
finetune/eval.json exists) are skipped on rerun, so an interrupted plan resumes where it stopped. Outputs in out_dir:
results.json (every cell's config and eval.json), results.md (the table) and results.png (needs matplotlib).
"""

import itertools
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from configurator import ConfigError, configure, script_config
from eval import paired_difference
import train

# -----------------------------------------------------------------------------
# config: ablate.py's own keys; every other --key=value is a train.py key applied to every cell
out_dir = 'out/ablate'  # each cell runs in {out_dir}/<cell>/seed<seed>; results.json, .md, .png here
# the grid: every combination of these train.py values is a cell. Default: the paper's encoder ablation, all injected
# at image_inject_frac. Combinations train.py rejects (patch has nothing to freeze) are skipped and reported.
grid = {'encoder': ['siglip', 'dino_siglip', 'vit', 'resnet', 'patch'], 'freeze_encoder': [True, False]}
baseline = ''  # the cell the others are compared with, by name ('encoder=siglip freeze_encoder=True'); '' = first
seeds = [1337]  # every cell runs once per seed; several seeds add mean +- std over seeds to the table
# -----------------------------------------------------------------------------
ABLATE_KEYS = ('out_dir', 'grid', 'baseline', 'seeds')
SCORES = ('vision_stable_score', 'vision_blind_stable_score', 'text_stable_score')


def cell_name(cell):
    return ' '.join(f'{k}={v}' for k, v in cell.items()) or 'default'


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
    grid = cfg['grid']
    if not grid or any(not isinstance(v, (list, tuple)) or not v for v in grid.values()):
        raise ConfigError(f'grid={grid!r}: it maps train.py keys to non-empty lists of values')
    runs, skipped = [], []
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        name = cell_name(cell)
        cell_args = [f'--{k}={v}' for k, v in cell.items()]
        try:
            cell_cfg = train.get_config(passed + cell_args)  # a bad key or value fails here, before anything runs
        except ConfigError as e:
            if any(str(e).startswith(p) for p in ('unknown config key', '--')):
                raise  # a typo in the grid is an error, not a skip
            skipped.append(f'{name}: {e}')
            continue
        # cells that differ only in keys the text stage does not read share one text stage (train.fingerprint)
        text_tag = '-'.join(f'{k}={getattr(cell_cfg, k)}' for k in cell
                            if k not in train.RUN_KEYS + train.IMAGE_KEYS + train.FINETUNE_KEYS + ('seed',))
        for seed in cfg['seeds']:
            out = os.path.join(cfg['out_dir'], folder_name(name), f'seed{seed}')
            text_out = os.path.join(cfg['out_dir'], 'text', folder_name(text_tag or 'shared'), f'seed{seed}')
            runs.append(dict(cell=name, seed=seed, out_dir=out, args=passed + cell_args + [
                f'--seed={seed}', f'--out_dir={out}', f'--text_out_dir={text_out}']))
    if not runs:
        raise ConfigError('no valid cell in the grid:\n' + '\n'.join(skipped))
    return runs, skipped


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


def run_plan(runs):
    """Run every unfinished cell; returns {index: error} for the cells that failed."""
    todo = [i for i, r in enumerate(runs) if not os.path.exists(eval_path(r))]
    print(f'{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run', flush=True)
    errors, durations = {}, []
    for n, i in enumerate(todo):
        r = runs[i]
        eta = f', ETA {train.format_time(np.mean(durations) * (len(todo) - n))}' if durations else ''
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
            print(f'    done in {train.format_time(durations[-1])}: ' + ', '.join(
                f'{k.replace("_stable_score", "")} {e[k]:.3f}' for k in SCORES if e[k] is not None), flush=True)
    return errors

# -----------------------------------------------------------------------------
# the table


def pooled_tasks(evals, blind=False):
    """The task results of one cell, items of all its seeds pooled (seed by seed, so two cells pair up)."""
    pooled = {}
    for e in evals:
        for name, t in (e['blind_tasks'] if blind else e['tasks']).items():
            p = pooled.setdefault(name, dict(modality=t['modality'], chance=t['chance'], scores=[]))
            p['scores'] = p['scores'] + t['scores']
    return pooled


def fmt(value, ci=None):
    if value is None:
        return 'n/a'
    return f'{value:.3f}' + (f' [{ci[0]:+.2f}, {ci[1]:+.2f}]' if ci else '')


def results_table(results, baseline_name, times=None):
    """
    results: {cell: [eval.json of each finished seed]} -> markdown rows, with differences to baseline_name; times:
    {cell: [times.json of each seed]}, each cell's wall time per seed (mean over its seeds).
    """
    base, times = results.get(baseline_name), times or {}
    header = ['cell', 'seeds', 'vision', 'blind vision', 'text', f'Δ vision vs {baseline_name} (p)', 'Δ text (p)',
              'time per seed']
    rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for cell, evals in results.items():
        if not evals:
            rows.append(f'| {cell} | 0 | failed | | | | | |')
            continue
        shown = []
        for key in SCORES:
            values = [e[key] for e in evals]
            if values[0] is None:
                shown.append('n/a')
            elif len(values) == 1:
                shown.append(fmt(values[0], evals[0][key + '_ci95']))
            else:
                shown.append(f'{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}')
        deltas = []
        for modality in ('vision', 'text'):
            if not base or cell == baseline_name or evals[0][f'{modality}_stable_score'] is None \
                    or base[0][f'{modality}_stable_score'] is None or len(base) != len(evals):
                deltas.append('')
                continue
            diff, p = paired_difference(pooled_tasks(evals), pooled_tasks(base), modality)
            deltas.append(f'{diff:+.3f} (p={p:.3f})' if p > 0 else f'{diff:+.3f} (p<0.001)')
        spent = [sum(t.values()) for t in times.get(cell, [])]
        rows.append(f'| {cell} | {len(evals)} | ' + ' | '.join(shown + deltas) + ' | ' +
                    (train.format_time(np.mean(spent)) if spent else '') + ' |')
    return '\n'.join(rows)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no results.png (pip install matplotlib); the table is written anyway')
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for cell, evals in results.items():
        if not evals or evals[0]['vision_stable_score'] is None:
            continue
        e = evals[0] if len(evals) == 1 else None
        x = np.mean([v['vision_stable_score'] for v in evals])
        y = np.mean([v['text_stable_score'] for v in evals])
        if e:  # one seed: the bootstrap interval; several: the spread over seeds
            xerr = [[x - e['vision_stable_score_ci95'][0]], [e['vision_stable_score_ci95'][1] - x]]
            yerr = [[y - e['text_stable_score_ci95'][0]], [e['text_stable_score_ci95'][1] - y]]
        else:
            xerr = np.std([v['vision_stable_score'] for v in evals], ddof=1)
            yerr = np.std([v['text_stable_score'] for v in evals], ddof=1)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt='o', capsize=3, label=cell)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), frameon=False)  # labels never overlap
    ax.set_xlabel('vision stable score')
    ax.set_ylabel('text stable score')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def collect(cfg, runs, errors, skipped=()):
    results, times, records = {}, {}, []
    for i, r in enumerate(runs):
        evals = results.setdefault(r['cell'], [])
        record = dict(cell=r['cell'], seed=r['seed'], args=r['args'])
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
    failed = [f'- {rec["cell"]} seed {rec["seed"]}: {rec["error"]}' for rec in records if 'error' in rec]
    with open(os.path.join(cfg['out_dir'], 'results.md'), 'w') as f:
        f.write(table + '\n' + ('\nfailed or missing:\n' + '\n'.join(failed) + '\n' if failed else '') +
                ('\nskipped (train.py rejects the combination):\n' + '\n'.join(f'- {s}' for s in skipped) + '\n'
                 if skipped else ''))
    plot(results, os.path.join(cfg['out_dir'], 'results.png'))
    return table, failed


def main(args):
    own, passed = split_args(args)
    cfg = configure(own, script_config(globals()), source=__file__)
    runs, skipped = expand(cfg, passed)
    for reason in skipped:
        print(f'skipped {reason}')
    t0 = time.time()
    errors = run_plan(runs)
    table, failed = collect(cfg, runs, errors, skipped)
    print(f'\n{table}\n' + ('\n'.join(['failed:'] + failed) + '\n' if failed else '') +
          f'\nwritten to {cfg["out_dir"]}/results.{{json,md,png}} in {train.format_time(time.time() - t0)}')
    return not failed


if __name__ == '__main__':
    try:
        ok = main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    sys.exit(0 if ok else 1)
