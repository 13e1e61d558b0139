"""
Run a plan of training cells over seeds and say what they show: each cell's stable scores over its seeds, its
differences from a baseline cell and the plan's primary contrasts, judged by one model for the plan (stats.py: cells
fixed, seeds random, seeds and questions crossed), with Holm-adjusted p and the smallest difference each detects.

    python ablate.py                                  # the encoder ablation: 4 encoders x frozen/trained + patch
    python ablate.py config/ablate_injection.py       # a sweep of the paper's own axes (see config/ablate_*.py)
    python ablate.py --image_iters=100 --seeds=[1,2,3,4,5]  # any train.py key passes to every cell
    python ablate.py config/ablate_check.py --seeds=[3,4,5,6,7,8,9,10] --jobs=8  # on a GPU: 8 seeds side by side
    python ablate.py --recipe=config/check.py         # the encoder ablation on the check's recipe

The plan is checked whole first (cells, baseline, primary contrasts). Every cell is one `python train.py` process
(scheduler.py runs them), in {runs_dir}/<cell>/seed<seed>; cells with the same text settings share a text stage.
Finished runs are skipped, so an interrupted plan resumes; plans sharing a runs_dir run an experiment they have in
common once. Outputs in out_dir: results.json, results.md (the tables), results.png (vision against text), curves.png
(loss curves) and, for a grid with one numeric key, sweep.png (both scores against it); the plots need matplotlib.
"""

import glob
import hashlib
import itertools
import json
import os
import re
import sys
import time

import prepare
import report
import runs
import scheduler
import train
from configurator import ConfigError, configure, script_config
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
recipe = ''  # a train.py config file every cell reads before its own: the plan on that recipe ('config/check.py': the
# one whose image-text stage teaches vision, docs/results.md); cells equal to another plan's runs in runs_dir are them

# the plan's primary contrasts, declared before it runs: (cell, versus, modality) for each finding of the paper it
# tests, corrected together (Holm); every other comparison is exploratory. A grid of your own has none unless it
# names its own
primary = [('siglip_frozen', 'patch', 'vision'), ('siglip_unfrozen', 'siglip_frozen', 'vision'),
           ('dino_siglip_frozen', 'siglip_frozen', 'vision')]
report_only = False  # True: run nothing, write the table and plots of the runs finished so far (while a plan runs)
study = []  # plans' out_dirs: run nothing, Holm-correct all their primary contrasts together into {out_dir}/study.md
seeds = [1, 2, 3]  # every cell runs once per seed (each seed reseeds every stage and the shapes encoders)
target = {'vision': 0.05, 'text': 0.03}  # the detectable effect (exact, 80 % power) the primary contrasts should reach
max_seeds = 0  # > len(seeds): add seeds to the primary contrasts' cells, `jobs` at a time, until they reach the target
jobs = 1  # > 1: runs that share no folder (the seeds) side by side, this many at a time, each seed's cells in order,
# each with its share of the CPU cores as torch threads (unless OMP_NUM_THREADS is set; a seed left to run alone
# keeps its share, so give seeds in multiples of jobs). Worth most on a GPU, where one demo-sized process is bound by
# its own CPU thread (docs/performance.md: an H200 gave 3.7x with 8 side by side)
# -----------------------------------------------------------------------------
ABLATE_KEYS = tuple(script_config(globals()))
WHERE = ('out_dir', 'text_out_dir', 'image_out_dir', 'data_dir')  # where a run reads and writes, not what it is


def cell_name(cell):
    return ' '.join(os.path.splitext(os.path.basename(v))[0] if k == 'config' else f'{k}={v}'
                    for k, v in cell.items()) or 'default'


def config_path(path):
    """A train.py config file as named, or beside ablate.py (config/check.py from any folder)."""
    return path if os.path.exists(path) else os.path.join(os.path.dirname(os.path.abspath(__file__)), path)


def cell_args(cell, recipe=''):
    """A cell's train.py arguments: its config files (the plan's recipe, then the cell's own), then its --key=value
    flags, as two lists."""
    files = [config_path(p) for p in (recipe, cell.get('config', '')) if p]
    return files, [f'--{k}={v}' for k, v in cell.items() if k != 'config']


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
    """text as a folder name: other characters become _, and a long one is cut and given a hash of the whole."""
    name = re.sub(r'[^A-Za-z0-9_.=-]+', '_', text)
    return name if len(name) <= 100 else name[:80] + '-' + hashlib.sha1(text.encode()).hexdigest()[:12]


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
    if cfg['recipe'] and not os.path.isfile(config_path(cfg['recipe'])):
        raise ConfigError(f'recipe={cfg["recipe"]!r}: no such train.py config file')
    for cell in grid_cells(cfg['grid']):
        (files, flags), name = cell_args(cell, cfg['recipe']), cell_name(cell)
        # the config files first, then the plan's flags (passed to every cell), then the cell's own flags; each cell
        # scores only its last stage, the one the tables read, unless the plan's flags say otherwise
        args = files + ['--evaluate=finetune'] + passed + flags
        try:
            cells.append((name, args, train.get_config(args)))
        except ConfigError as e:
            if any(str(e).startswith(p) for p in ('unknown config key', '--')):
                raise  # a typo in the grid is an error, not a skip
            skipped.append(f'{name}: {e}')
    if not cells:
        raise ConfigError('no valid cell in the grid:\n' + '\n'.join(skipped))
    # cells that differ only in keys the text stage does not read share one text stage (train.fingerprint), and
    # cells that differ only in fine-tuning keys one image stage; each shared folder is named by the keys that define
    # it set away from train.py's defaults ('default' when none is), so that plans sharing a runs_dir share it too
    defaults, seeds = vars(train.get_config([])), ('seed', 'text_seed', 'encoder_seed')
    tag = lambda c, stage: '-'.join(f'{k}={v}' for k, v in prepare.defining_keys(c, train.STAGES, stage).items()
                                    if k not in seeds and v != defaults[k]) or 'default'
    runs_dir = cfg['runs_dir'] or cfg['out_dir']
    plan_runs = []
    for name, args, _ in cells:
        for seed in cfg['seeds']:
            c = vars(train.get_config(args + [f'--seed={seed}']))  # the seeds resolved: text_seed, encoder_seed
            by_seed = f'seed{seed}' + ''.join(f'-{k}={c[k]}' for k in seeds[1:] if c[k] != seed)
            out = os.path.join(runs_dir, folder_name(name), by_seed)
            text_out = os.path.join(runs_dir, 'text', folder_name(tag(c, 'text')), f'seed{c["text_seed"]}')
            image_out = os.path.join(runs_dir, 'image', folder_name(tag(c, 'image')), by_seed)
            identity = {k: v for k, v in c.items() if k not in WHERE}
            plan_runs.append(dict(cell=name, seed=seed, out_dir=out, identity=json.loads(json.dumps(identity)),
                             args=args + [f'--seed={seed}', f'--out_dir={out}', f'--text_out_dir={text_out}',
                                          f'--image_out_dir={image_out}']))
    return same_runs_once(plan_runs, runs_dir), skipped


def same_runs_once(plan_runs, runs_dir):
    """
    Point every run at the folder of the same experiment (an equal cell.json: the resolved config but for where it
    reads and writes) that runs_dir already holds under another cell's name, or that an earlier run of this plan
    has: one experiment, one run. A finished folder is preferred, then the run's own.
    """
    folders = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(runs_dir), '*', 'seed*', 'cell.json'))):
        held, _ = runs.read_json(path)  # one that cannot be read matches nothing (claim_folder names it to its run)
        if isinstance(held, dict):
            folders.setdefault(json.dumps(runs.experiment(held), sort_keys=True), []).append(os.path.dirname(path))
    for r in plan_runs:
        same = folders.setdefault(json.dumps(runs.experiment(r['identity']), sort_keys=True), [])
        finished = [d for d in same if runs.read_eval(os.path.join(d, 'finetune', 'eval.json'))[0] is not None]
        folder = (finished or [d for d in same if d == r['out_dir']] or same or [r['out_dir']])[0]
        if folder not in same:
            same.append(folder)
        if folder != r['out_dir']:
            r['args'] = [f'--out_dir={folder}' if a == f'--out_dir={r["out_dir"]}' else a for a in r['args']]
            r['out_dir'], r['same_as'] = folder, os.path.basename(os.path.dirname(folder))
    return plan_runs


def check_plan(cfg, plan_runs):
    """The plan whole, before a cell runs: its baseline and primary contrasts name its cells; returns the baseline."""
    cells = list(dict.fromkeys(r['cell'] for r in plan_runs))
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


def gather(plan_runs, errors):
    """The finished runs' eval.json by cell and seed, their times by cell, and a record of every run."""
    results, times, records = {}, {}, []
    for i, r in enumerate(plan_runs):
        seeds = results.setdefault(r['cell'], {})
        record = dict(cell=r['cell'], seed=r['seed'], out_dir=r['out_dir'], args=r['args'])
        state, why = runs.run_state(r)  # finished: its cell.json, its eval.json and current checkpoints (runs.run_state)
        if state == 'done':
            record['eval'] = seeds[r['seed']] = runs.read_eval(runs.eval_path(r))[0]
            times_path = os.path.join(r['out_dir'], 'times.json')  # where the cell's run spent its time
            spent, why = runs.read_json(times_path)
            if isinstance(spent, dict) and all(isinstance(t, (int, float)) for t in spent.values()):
                record['times'] = spent
                times.setdefault(r['cell'], []).append(spent)
            elif os.path.lexists(times_path):
                print(f'warning: {why or times_path + " holds no part: seconds"}; the time of {r["cell"]} seed '
                      f'{r["seed"]} is left out of the table', flush=True)
        else:
            record['error'] = errors.get(i) or (f'stale: {why}' if state == 'stale' else 'not run')
        records.append(record)
    return results, times, records


def add_seeds(cfg, passed, plan_runs, errors):
    """
    With max_seeds and a target: while a primary contrast's detectable effect is above its modality's target, run
    more seeds of every cell the primary contrasts name (so they keep one seed set, and one model), `jobs` at a time
    (side by side), up to max_seeds seeds. The rule reads each contrast's precision, never its estimate, so its
    looks spend no alpha.
    """
    seeds = list(cfg['seeds'])
    cells = {c for entry in cfg['primary'] for c in entry[:2]}
    while len(seeds) < cfg['max_seeds']:
        _, contrasts = report.primary_table(gather(plan_runs, errors)[0], cfg['primary'])
        wide = [f'{c["cell"]} − {c["versus"]} ({c["modality"]}: {c["mde"]:.3f})' for c in contrasts
                if c['mde'] > cfg['target'].get(c['modality'], float('inf'))]
        if not wide:
            break
        added = list(range(max(seeds) + 1, max(seeds) + 1 + min(cfg['jobs'], cfg['max_seeds'] - len(seeds))))
        seeds += added
        print(f'seed{"s" if len(added) > 1 else ""} {", ".join(map(str, added))} for {", ".join(sorted(cells))}: '
              f'detectable effects above the target {cfg["target"]}: {"; ".join(wide)}', flush=True)
        more = [r for r in expand(dict(cfg, seeds=added), passed)[0] if r['cell'] in cells]
        errors.update({len(plan_runs) + i: e for i, e in scheduler.run_plan(more, cfg['jobs']).items()})
        plan_runs += more
    return plan_runs


def collect(cfg, plan_runs, errors, baseline_name, skipped=()):
    results, times, records = gather(plan_runs, errors)
    table = report.results_table(results, baseline_name, times)
    primary, contrasts = report.primary_table(results, cfg['primary']) if cfg['primary'] else ('', [])
    if primary:  # declared before the plan ran: the paper's findings it tests, corrected together (Holm)
        table = primary + '\n\n' + table
    referents = report.referent_table(results)
    if referents:  # the shapes world: what fine-tuning named (seen) against what only captions did (held out)
        table += '\n\n' + referents
    os.makedirs(cfg['out_dir'], exist_ok=True)
    with open(os.path.join(cfg['out_dir'], 'results.json'), 'w') as f:
        json.dump({'runs': records, 'primary': contrasts, 'baseline': baseline_name}, f)
    failed = [f'- {rec["cell"]} seed {rec["seed"]}: {rec["error"]}' for rec in records if 'error' in rec]
    with open(os.path.join(cfg['out_dir'], 'results.md'), 'w') as f:
        f.write(table + '\n' + ('\nfailed or not run:\n' + '\n'.join(failed) + '\n' if failed else '') +
                ('\nskipped (train.py rejects the combination):\n' + '\n'.join(f'- {s}' for s in skipped) + '\n'
                 if skipped else ''))
    report.plot_scores(results, os.path.join(cfg['out_dir'], 'results.png'))
    report.plot_curves(plan_runs, os.path.join(cfg['out_dir'], 'curves.png'))
    report.plot_sweep({cell_name(c): c for c in grid_cells(cfg['grid'])}, results, os.path.join(cfg['out_dir'], 'sweep.png'))
    return table, failed


def main(args):
    own, passed = split_args(args)
    cfg = configure(own, script_config(globals()), source=__file__)
    if cfg['study']:
        missing = [d for d in cfg['study'] if not os.path.isfile(os.path.join(d, 'results.json'))]
        if missing:
            raise ConfigError(f'study: no results.json in {", ".join(missing)} (run or report those plans first)')
        table = report.study_table(cfg['study'])
        os.makedirs(cfg['out_dir'], exist_ok=True)
        with open(os.path.join(cfg['out_dir'], 'study.md'), 'w') as f:
            f.write(table + '\n')
        print(f'{table}\n\nwritten to {cfg["out_dir"]}/study.md')
        return True
    if not isinstance(cfg['jobs'], int) or cfg['jobs'] < 1:
        raise ConfigError(f'jobs={cfg["jobs"]!r}: how many seeds run side by side, 1 or more')
    plan_runs, skipped = expand(cfg, passed)
    baseline_name = check_plan(cfg, plan_runs)
    for reason in skipped:
        print(f'skipped {reason}')
    t0 = time.time()
    errors = {} if cfg['report_only'] else scheduler.run_plan(plan_runs, cfg['jobs'])
    if cfg['max_seeds'] and not cfg['report_only']:
        plan_runs = add_seeds(cfg, passed, plan_runs, errors)
    table, failed = collect(cfg, plan_runs, errors, baseline_name, skipped)
    print(f'\n{table}\n' + ('\n'.join(['failed or not run:'] + failed) + '\n' if failed else '') +
          f'\nwritten to {cfg["out_dir"]}/results.{{json,md,png}} in {format_time(time.time() - t0)}')
    return cfg['report_only'] or not failed


if __name__ == '__main__':
    try:
        ok = main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    sys.exit(0 if ok else 1)
