"""
Run a plan of training cells over seeds and say what they show: each cell's stable scores over its seeds, its
differences from a baseline cell and the plan's primary contrasts, judged by one model for the plan (stats.py: cells
fixed, seeds random, seeds and questions crossed), with Holm-adjusted p and the smallest difference each detects.

    python ablate.py                                  # the encoder ablation: 4 encoders x frozen/trained + patch
    python ablate.py config/ablate_injection.py       # a sweep of the paper's own axes (see config/ablate_*.py)
    python ablate.py --image_iters=100 --seeds=[1,2,3,4,5]  # any train.py key passes to every cell

The plan is checked whole first (its cells, baseline, primary contrasts). Every cell is one `python train.py` run in
its own process, in {runs_dir}/<cell>/seed<seed>; cells with the same text settings share one text stage. Finished
runs are skipped, so an interrupted plan resumes; plans that share a runs_dir run an experiment they have in common
once. Outputs in out_dir: results.json, results.md (the tables), results.png (vision against text), curves.png (loss
curves) and, for a grid with one numeric key, sweep.png (both scores against it); the plots need matplotlib.
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

import plots
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

# the plan's primary contrasts, declared before it runs: (cell, versus, modality) for each finding of the paper it
# tests, corrected together (Holm); every other comparison is exploratory. A grid of your own has none unless it
# names its own
primary = [('siglip_frozen', 'patch', 'vision'), ('siglip_unfrozen', 'siglip_frozen', 'vision'),
           ('dino_siglip_frozen', 'siglip_frozen', 'vision')]
report_only = False  # True: run nothing, write the table and plots of the runs finished so far (while a plan runs)
study = []  # plans' out_dirs: run nothing, Holm-correct all their primary contrasts together into {out_dir}/study.md
seeds = [1, 2, 3]  # every cell runs once per seed (each seed reseeds every stage and the shapes encoders)
# -----------------------------------------------------------------------------
ABLATE_KEYS = tuple(script_config(globals()))
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
# the tables: one model per plan (stats.PlanModel), each score's mean over seeds and each contrast's test


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
    minimum detectable effect and the model and df it was judged with. Markdown and the rows as dicts.
    """
    models = plan_models(results)
    found = [((c, v, m), contrast(models, f'{m}_stable_score', c, v)) for c, v, m in primary]
    tested = [(c, e) for c, e in found if e is not None]
    adjusted = dict(zip(range(len(tested)), stats.holm([e.p for _, e in tested])))
    rows = ['| primary contrast | score | Δ [95 % interval] | p | Holm p | detectable Δ | model (df) |',
            '|---|---|---|---|---|---|---|']
    records = []
    for i, ((cell, versus, modality), est) in enumerate(tested):
        rows.append(f'| {cell} − {versus} | {modality} | {est.value:+.3f} [{est.ci95[0]:+.3f}, {est.ci95[1]:+.3f}] | '
                    f'{fmt_p(est.p)} | {fmt_p(adjusted[i])} | {est.mde:.3f} | {est.model} ({est.df:.1f}) |')
        records.append(dict(cell=cell, versus=versus, modality=modality, estimate=est.value, ci95=list(est.ci95),
                            p=est.p, holm_p=adjusted[i], mde=est.mde, df=est.df, model=est.model, seeds=est.seeds))
    rows += [f'| {c} − {v} | {m} | not scored yet | | | | |' for (c, v, m), e in found if e is None]
    return '\n'.join(rows), records


def check_plan(cfg, runs):
    """The plan as a whole, before its first cell runs: its baseline and its primary contrasts name cells it has,
    each on a score it measures. Returns the baseline's name."""
    cells = list(dict.fromkeys(r['cell'] for r in runs))
    if cfg['grid'] != grid and cfg['primary'] == primary:  # a grid of one's own: the default plan's contrasts go
        cfg['primary'] = []
    baseline_name = cfg['baseline'] or cells[0]
    if baseline_name not in cells:
        raise ConfigError(f'baseline={baseline_name!r} is not a cell of the plan; its cells are: {", ".join(cells)}')
    for entry in cfg['primary']:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and entry[2] in ('vision', 'text')):
            raise ConfigError(f'primary: {entry!r} is not (cell, versus, modality) with modality vision or text')
        missing = [c for c in entry[:2] if c not in cells]
        if missing:
            raise ConfigError(f'primary: {entry!r} names {", ".join(map(repr, missing))}, not a cell of the plan '
                              f'(its cells: {", ".join(cells)}); name its cells, or --primary=[]')
    return baseline_name


def collect(cfg, runs, errors, baseline_name, skipped=()):
    results, times, records = {}, {}, []
    for i, r in enumerate(runs):
        seeds = results.setdefault(r['cell'], {})
        record = dict(cell=r['cell'], seed=r['seed'], out_dir=r['out_dir'], args=r['args'])
        if os.path.exists(eval_path(r)):
            with open(eval_path(r)) as f:
                record['eval'] = seeds[r['seed']] = json.load(f)
            times_path = os.path.join(r['out_dir'], 'times.json')  # where the cell's run spent its time
            if os.path.exists(times_path):
                with open(times_path) as f:
                    record['times'] = json.load(f)
                times.setdefault(r['cell'], []).append(record['times'])
        else:
            record['error'] = errors.get(i, 'not run')
        records.append(record)
    table = results_table(results, baseline_name, times)
    primary, contrasts = primary_table(results, cfg['primary']) if cfg['primary'] else ('', [])
    if primary:  # declared before the plan ran: the paper's findings it tests, corrected together (Holm)
        table = primary + '\n\n' + table
    os.makedirs(cfg['out_dir'], exist_ok=True)
    with open(os.path.join(cfg['out_dir'], 'results.json'), 'w') as f:
        json.dump({'runs': records, 'primary': contrasts, 'baseline': baseline_name}, f)
    failed = [f'- {rec["cell"]} seed {rec["seed"]}: {rec["error"]}' for rec in records if 'error' in rec]
    with open(os.path.join(cfg['out_dir'], 'results.md'), 'w') as f:
        f.write(table + '\n' + ('\nfailed or not run:\n' + '\n'.join(failed) + '\n' if failed else '') +
                ('\nskipped (train.py rejects the combination):\n' + '\n'.join(f'- {s}' for s in skipped) + '\n'
                 if skipped else ''))
    plots.scores(results, os.path.join(cfg['out_dir'], 'results.png'))
    plots.curves(runs, os.path.join(cfg['out_dir'], 'curves.png'))
    plots.sweep({cell_name(c): c for c in grid_cells(cfg['grid'])}, results, os.path.join(cfg['out_dir'], 'sweep.png'))
    return table, failed


def study_table(plan_dirs):
    """The primary contrasts of several plans (their results.json) as one family: raw and Holm-adjusted p over the
    whole study, beside each plan's own."""
    entries = []
    for folder in plan_dirs:
        path = os.path.join(folder, 'results.json')
        if not os.path.isfile(path):
            raise ConfigError(f'study: no results.json in {folder} (run or report that plan first)')
        with open(path) as f:
            entries += [(folder, c) for c in json.load(f).get('primary', [])]
    adjusted = stats.holm([c['p'] for _, c in entries])
    rows = ['| plan | primary contrast | score | Δ [95 % interval] | p | Holm p (study) | Holm p (plan) | detectable Δ |',
            '|---|---|---|---|---|---|---|---|']
    rows += [f'| {folder} | {c["cell"]} − {c["versus"]} | {c["modality"]} | {c["estimate"]:+.3f} [{c["ci95"][0]:+.3f}, '
             f'{c["ci95"][1]:+.3f}] | {fmt_p(c["p"])} | {fmt_p(holm)} | {fmt_p(c["holm_p"])} | {c["mde"]:.3f} |'
             for (folder, c), holm in zip(entries, adjusted)]
    return '\n'.join(rows)


def main(args):
    own, passed = split_args(args)
    cfg = configure(own, script_config(globals()), source=__file__)
    if cfg['study']:
        table = study_table(cfg['study'])
        os.makedirs(cfg['out_dir'], exist_ok=True)
        with open(os.path.join(cfg['out_dir'], 'study.md'), 'w') as f:
            f.write(table + '\n')
        print(f'{table}\n\nwritten to {cfg["out_dir"]}/study.md')
        return True
    runs, skipped = expand(cfg, passed)
    baseline_name = check_plan(cfg, runs)
    for reason in skipped:
        print(f'skipped {reason}')
    t0 = time.time()
    errors = {} if cfg['report_only'] else run_plan(runs)
    table, failed = collect(cfg, runs, errors, baseline_name, skipped)
    print(f'\n{table}\n' + ('\n'.join(['failed or not run:'] + failed) + '\n' if failed else '') +
          f'\nwritten to {cfg["out_dir"]}/results.{{json,md,png}} in {format_time(time.time() - t0)}')
    return cfg['report_only'] or not failed


if __name__ == '__main__':
    try:
        ok = main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    sys.exit(0 if ok else 1)
