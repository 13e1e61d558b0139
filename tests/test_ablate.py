"""Tests for ablate.py: the plan expands to the right runs, finished cells are skipped, a failing cell does not stop
the others, the paired bootstrap behaves, and the table holds every cell."""

import _thread
import json
import os
import re
import signal
import time

import numpy as np
import pytest

import ablate
import report
import scheduler
import stats
import eval as ev
import train
from runs import claim_folder, eval_path
from configurator import ConfigError, configure

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'config')


def plan(args):
    """ablate.py's plan for args, with one seed unless args say otherwise."""
    args = args if any(a.startswith('--seeds=') for a in args) else args + ['--seeds=[1]']
    own, passed = ablate.split_args(args)
    cfg = configure(own, {k: getattr(ablate, k) for k in ablate.ABLATE_KEYS})
    runs, skipped = ablate.expand(cfg, passed)
    ablate.check_plan(cfg, runs)
    return cfg, runs, skipped


def test_default_plan_expands_to_the_encoder_grid(tmp_path):
    cfg, runs, skipped = plan([f'--out_dir={tmp_path}', '--seeds=[1,2]', '--image_iters=7'])
    names = list(dict.fromkeys(r['cell'] for r in runs))
    assert not skipped and len(names) == 9 and len(runs) == 18
    assert names[0] == 'siglip_frozen' and names[-1] == 'patch' and sum('unfrozen' in n for n in names) == 4
    assert all('--image_iters=7' in r['args'] for r in runs)  # a train.py key reaches every cell
    text_dirs = {r['seed']: {a for a in r['args'] if a.startswith('--text_out_dir=')} for r in runs}
    assert all(len(d) == 1 for d in text_dirs.values()) and text_dirs[1] != text_dirs[2]  # shared per seed
    assert len({r['out_dir'] for r in runs}) == 18


def test_encoder_lr_plan_is_a_curve_against_frozen(tmp_path):
    _, runs, skipped = plan([os.path.join(CONFIG, 'ablate_encoder_lr.py'), f'--out_dir={tmp_path}', '--seeds=[1]'])
    names = [r['cell'] for r in runs]
    assert not skipped and len(names) == 4 + 4 * 3 and names[:4] == [f'{e}_frozen' for e in
                                                                      ('siglip', 'dino_siglip', 'vit', 'resnet')]
    assert [n for n in names if n.startswith('siglip_unfrozen')] == \
        [f'siglip_unfrozen encoder_lr={lr}' for lr in (1e-5, 1e-4, 1e-3)]


def test_a_cell_is_exactly_its_config_file(tmp_path):
    """ablate.py's cell and `python train.py FILE [the cell's other flags]` resolve to the same config, but for
    where they write and the seed; and two cells' files never write to one folder."""
    _, runs, _ = plan([os.path.join(CONFIG, 'ablate_encoder_lr.py'), f'--out_dir={tmp_path}'])
    for run in runs:
        recipe, path = run['args'][:2]  # the plan's recipe, config/check.py, then the cell's own file
        assert recipe.endswith(os.path.join('config', 'check.py')) and path.endswith('.py') and os.path.exists(path)
        flags = [a for a in run['args'] if a.startswith('--encoder_lr=')]
        by_ablate, by_hand = vars(train.get_config(run['args'])), vars(train.get_config([recipe, path] + flags))
        assert by_ablate.pop('out_dir') == run['out_dir'] and by_hand.pop('out_dir') == f'out/{run["cell"].split()[0]}'
        by_ablate.pop('text_out_dir'), by_hand.pop('text_out_dir'), by_ablate.pop('image_out_dir'), by_hand.pop('image_out_dir')
        assert by_ablate.pop('evaluate') == 'finetune' and by_hand.pop('evaluate') == 'all'  # the tables read finetune
        for key in ('seed', 'text_seed'):  # a plan sets each seed, and by default the others follow it
            assert by_ablate.pop(key) == run['seed'] and by_hand.pop(key) == train.seed
        assert by_ablate.pop('encoder_seed') == by_hand.pop('encoder_seed') == 1  # the recipe holds it
        assert by_ablate == by_hand
    cells = [f for f in os.listdir(CONFIG) if f.endswith(('frozen.py', 'patch.py'))]
    assert len(cells) == 9 and len({train.get_config([os.path.join(CONFIG, f)]).out_dir for f in cells}) == 9


def test_cells_share_a_text_stage_exactly_when_their_text_settings_agree(tmp_path):
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'learning_rate': [1e-3, 3e-3], 'image_ratio': [0.1, 0.2]}",
                       '--text_iters=50'])  # the text stage's folder is named by its keys away from the defaults
    text = {r['cell']: next(a for a in r['args'] if a.startswith('--text_out_dir=')) for r in runs}
    assert text['learning_rate=0.001 image_ratio=0.2'].endswith('/text/text_iters=50-learning_rate=0.001/seed1')
    assert text['learning_rate=0.003 image_ratio=0.1'] == text['learning_rate=0.003 image_ratio=0.2']
    assert text['learning_rate=0.003 image_ratio=0.2'].endswith('/text/text_iters=50/seed1')  # 3e-3 is the default
    _, runs, _ = plan([f'--out_dir={tmp_path}'])
    assert {a for r in runs for a in r['args'] if a.startswith('--text_out_dir=')} == \
        {f'--text_out_dir={tmp_path}/text/default/seed1'}


def test_cells_share_an_image_stage_exactly_when_only_fine_tuning_differs(tmp_path):
    arg = lambda r, key: next(a.split('=', 1)[1] for a in r['args'] if a.startswith(f'--{key}='))
    _, runs, _ = plan([os.path.join(CONFIG, 'ablate_finetune_epochs.py'), f'--out_dir={tmp_path}', '--seeds=[1,2]'])
    check = f'{tmp_path}/image/image_iters=12000-image_ratio_of=tokens-caption_form=questions'  # on its recipe
    assert {arg(r, 'image_out_dir') for r in runs} == {f'{check}/seed1', f'{check}/seed2-encoder_seed=1'}
    assert len({r['out_dir'] for r in runs}) == 10  # each cell and seed fine-tunes on its own
    _, runs, _ = plan([os.path.join(CONFIG, 'ablate_finetune_epochs.py'), f'--out_dir={tmp_path}', '--recipe='])
    assert {arg(r, 'image_out_dir') for r in runs} == {f'{tmp_path}/image/default/seed1'}  # train.py's own recipe
    _, runs, _ = plan([f'--out_dir={tmp_path}'])  # the encoders: an image stage each
    images = {r['cell']: arg(r, 'image_out_dir') for r in runs}
    assert len(set(images.values())) == 9
    assert images['dino_siglip_unfrozen'].endswith('/image/encoder=dino_siglip-freeze_encoder=False-projector=fused_mlp/seed1')
    # the seeds apart: one text stage and one encoder pre-training for every seed of the plan
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1]}", '--seeds=[1,2]', '--text_seed=7',
                       '--encoder_seed=7'])
    assert {arg(r, 'text_out_dir') for r in runs} == {f'{tmp_path}/text/default/seed7'}
    assert [r['out_dir'] for r in runs] == [f'{tmp_path}/image_ratio=0.1/seed{s}-text_seed=7-encoder_seed=7' for s in (1, 2)]
    assert [r['identity']['text_seed'] for r in runs] == [7, 7] and [r['identity']['seed'] for r in runs] == [1, 2]


def finish(run, vision=(1.0, 0.0)):
    """What a finished run leaves: its finetune/eval.json."""
    os.makedirs(os.path.join(run['out_dir'], 'finetune'), exist_ok=True)
    with open(eval_path(run), 'w') as f:
        json.dump(fake_eval(list(vision) * 20, [1.0] * 40), f)


def test_plans_sharing_a_runs_dir_run_an_experiment_once(tmp_path, monkeypatch):
    """The encoder plan's cells (on the check's recipe, as the plan files are) are, under other names, the encoder LR
    plan's frozen and 1e-5 cells and the injection sweep's 0.8 cell: with one runs_dir they run once; a cell of
    another config does not match."""
    calls = []
    monkeypatch.setattr(scheduler, 'run_cell', lambda run: calls.append(run['cell']) or finish(run))
    runs_dir = str(tmp_path / 'runs')
    cfg, runs, _ = plan([f'--runs_dir={runs_dir}', f'--out_dir={tmp_path}/encoder', '--recipe=config/check.py'])
    scheduler.run_plan(runs)
    assert len(calls) == 9 and all(r['out_dir'].startswith(runs_dir) for r in runs)
    _, lr_runs, _ = plan([os.path.join(CONFIG, 'ablate_encoder_lr.py'), f'--runs_dir={runs_dir}',
                          f'--out_dir={tmp_path}/lr'])
    reused = {r['cell']: os.path.basename(os.path.dirname(r['out_dir'])) for r in lr_runs}
    assert reused['siglip_frozen'] == 'siglip_frozen'
    assert reused['siglip_unfrozen encoder_lr=1e-05'] == 'siglip_unfrozen'
    assert reused['siglip_unfrozen encoder_lr=0.0001'] == 'siglip_unfrozen_encoder_lr=0.0001'  # a new experiment
    calls.clear()
    scheduler.run_plan(lr_runs)
    assert len(calls) == 8 and not any(c.endswith('=1e-05') or c.endswith('_frozen') for c in calls)
    _, sweep, _ = plan([os.path.join(CONFIG, 'ablate_injection.py'), f'--runs_dir={runs_dir}',
                        f'--out_dir={tmp_path}/injection'])
    by_cell = {r['cell']: r for r in sweep}
    assert by_cell['image_inject_frac=0.8']['out_dir'] == os.path.join(runs_dir, 'siglip_frozen', 'seed1')
    assert f'--out_dir={runs_dir}/siglip_frozen/seed1' in by_cell['image_inject_frac=0.8']['args']
    assert by_cell['image_inject_frac=0.6']['out_dir'] == os.path.join(runs_dir, 'image_inject_frac=0.6', 'seed1')


def test_a_folder_holding_another_experiment_is_not_taken_for_the_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, 'run_cell', finish)
    cfg, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}"])
    assert scheduler.run_plan(runs) == {}
    with open(os.path.join(runs[1]['out_dir'], 'cell.json')) as f:
        assert json.load(f)['image_ratio'] == 0.2
    _, changed, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}", '--finetune_epochs=1'])
    errors = scheduler.run_plan(changed)  # the same cell names, another experiment: not silently the old results
    assert sorted(errors) == [0, 1] and 'cell.json differs in finetune_epochs' in errors[1]


def test_report_only_tables_the_finished_runs_and_runs_nothing(tmp_path, monkeypatch):
    grid = "--grid={'image_ratio': [0.1, 0.2, 0.5]}"
    _, runs, _ = plan([f'--out_dir={tmp_path}', grid, '--seeds=[1,2]'])
    assert claim_folder(runs[2]) is None  # a finished run has its cell.json
    finish(runs[2])  # image_ratio=0.2 seed 1 only; the baseline has no finished seed
    monkeypatch.setattr(scheduler, 'run_cell', lambda run: pytest.fail('report_only ran a cell'))
    assert ablate.main([f'--out_dir={tmp_path}', grid, '--seeds=[1,2]', '--report_only=True'])
    with open(tmp_path / 'results.md') as f:
        md = f.read()
    assert '| image_ratio=0.1 | 0 | no seed finished |' in md and '| image_ratio=0.2 | 1 | ' in md
    assert md.count(': not run') == 5 and not os.path.exists(os.path.join(runs[0]['out_dir'], 'cell.json'))


def test_identical_cells_of_one_plan_run_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scheduler, 'run_cell', lambda run: calls.append(run['cell']) or finish(run))
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid=[{'image_ratio': [0.1]}, {'image_inject_frac': [0.8]}]"])
    assert runs[0]['out_dir'] == runs[1]['out_dir'] and scheduler.run_plan(runs) == {}
    assert calls == ['image_ratio=0.1']


def test_grid_cells_are_a_union_of_products():
    cells = ablate.grid_cells([{'image_ratio': [0.1, 0.2]}, {'finetune_epochs': [1], 'image_ratio': [0.5]}])
    assert [ablate.cell_name(c) for c in cells] == ['image_ratio=0.1', 'image_ratio=0.2',
                                                     'finetune_epochs=1 image_ratio=0.5']
    with pytest.raises(ConfigError, match='occur more than once'):
        ablate.grid_cells([{'image_ratio': [0.1]}, {'image_ratio': [0.1, 0.2]}])
    with pytest.raises(ConfigError, match='non-empty lists'):
        ablate.grid_cells([])


@pytest.mark.parametrize('path', sorted(p for p in os.listdir(CONFIG) if p.startswith('ablate_')))
def test_sweep_configs_expand(path, tmp_path):
    cfg, runs, skipped = plan([os.path.join(CONFIG, path), f'--out_dir={tmp_path}'])
    assert len(runs) >= 2 and not skipped and cfg['baseline'] in {r['cell'] for r in runs}


def test_grid_is_a_product(tmp_path):
    grid = "{'image_ratio': [0.1, 0.2], 'finetune_epochs': [1, 2, 3]}"
    _, runs, _ = plan([f'--out_dir={tmp_path}', f'--grid={grid}'])
    assert [r['cell'] for r in runs][:2] == ['image_ratio=0.1 finetune_epochs=1', 'image_ratio=0.1 finetune_epochs=2']
    assert len(runs) == 6


def test_a_recipe_comes_before_each_cells_file_and_its_cells_are_other_plans_runs(tmp_path):
    """With a recipe, a cell is `python train.py RECIPE CELL_FILE [flags]`; config/ablate_no_encoder.py's SigLIP cells are
    the check's captions cells (one experiment, so one run in a shared runs_dir), its patch cells the check's recipe
    with no encoder; a recipe that is not a file is a config error before anything runs."""
    _, patch_runs, _ = plan([os.path.join(CONFIG, 'ablate_no_encoder.py'), f'--runs_dir={tmp_path}', '--seeds=[2]'])
    _, check_runs, _ = plan([os.path.join(CONFIG, 'ablate_check.py'), f'--runs_dir={tmp_path}', '--seeds=[2]'])
    for run in patch_runs:
        recipe, own, flags = run['args'][0], run['args'][1], [a for a in run['args'] if a.startswith('--finetune_')]
        assert recipe.endswith(os.path.join('config', 'check.py')) and own.endswith(('siglip_frozen.py', 'patch.py'))
        by_hand = vars(train.get_config([recipe, own] + flags + ['--evaluate=finetune', '--seed=2']))
        assert json.loads(json.dumps({k: v for k, v in by_hand.items() if k not in ablate.WHERE})) == run['identity']
        assert (run['identity']['caption_form'], run['identity']['image_iters']) == ('questions', 12000)
    check = {r['cell']: r for r in check_runs}
    for epochs in (1, 3):
        siglip, patch = (next(r for r in patch_runs if r['cell'] == f'{c} finetune_epochs={epochs}')
                         for c in ('siglip_frozen', 'patch'))
        captions = check[f'check image_ratio=0.1 finetune_epochs={epochs}']
        assert siglip['identity'] == captions['identity'] and siglip['out_dir'] != captions['out_dir']
        assert patch['identity']['encoder'] == 'patch' and patch['identity']['image_ratio'] == 0.1
    assert claim_folder(check_runs[0]) is None  # the check's run exists: the plan points at it
    _, patch_runs, _ = plan([os.path.join(CONFIG, 'ablate_no_encoder.py'), f'--runs_dir={tmp_path}', '--seeds=[2]'])
    assert patch_runs[0]['out_dir'] == check_runs[0]['out_dir'] and patch_runs[0]['cell'] == 'siglip_frozen finetune_epochs=1'
    with pytest.raises(ConfigError, match="recipe='config/nope.py': no such"):
        plan([f'--out_dir={tmp_path}', '--recipe=config/nope.py'])


def test_bad_plans_fail_before_running(tmp_path):
    with pytest.raises(ConfigError, match='unknown config key'):
        plan([f'--out_dir={tmp_path}', '--image_itres=5'])
    with pytest.raises(ConfigError, match='non-empty lists'):
        plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': []}"])
    with pytest.raises(ConfigError, match='unknown config key'):  # a typo inside the grid is not a skipped cell
        plan([f'--out_dir={tmp_path}', "--grid={'image_ration': [0.1]}"])
    with pytest.raises(ConfigError, match='no valid cell'):
        plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [1.5, 2.0]}"])


def fake_eval(vision_scores, text_scores):
    task = lambda modality, scores, chance: dict(modality=modality, chance=chance, scores=scores, n=len(scores),
                                                 accuracy=float(np.mean(scores)))
    tasks = {'color': task('vision', vision_scores, 1 / 6), 'facts': task('text', text_scores, 1 / 4)}
    e = {'tasks': tasks, 'blind_tasks': {'color': task('vision', [0.0] * len(vision_scores), 1 / 6)}}
    for key, t in (('vision_stable_score', tasks['color']), ('text_stable_score', tasks['facts']),
                   ('vision_blind_stable_score', e['blind_tasks']['color'])):
        e[key] = ev.centered(t['accuracy'], t['chance'])
        e[key + '_ci95'] = [e[key] - 0.1, e[key] + 0.1]
    return e


def test_table_gives_the_mean_over_seeds_with_an_interval():
    rng = np.random.default_rng(2)
    seeds = [fake_eval(list((rng.random(100) < p).astype(float)), [1.0] * 40) for p in (0.5, 0.7)]
    row = report.results_table({'image_inject_frac=0': dict(enumerate(seeds))}, 'image_inject_frac=0').splitlines()[2]
    cells = row.split(' | ')
    mean = np.mean([ev.centered(np.mean(e['tasks']['color']['scores']), 1 / 6) for e in seeds])
    assert cells[0] == '| image_inject_frac=0' and cells[1] == '2'
    low, high = (float(x) for x in re.match(r'(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]', cells[2]).groups()[1:])
    assert cells[2].startswith(f'{mean:.3f} [') and low < mean < high


def test_the_table_states_where_a_new_seed_lands():
    seeds = [fake_eval([1.0] * k + [0.0] * (60 - k), [1.0] * 40) for k in (20, 30, 40)]
    table = report.results_table({'cell': dict(enumerate(seeds))}, 'cell').splitlines()
    row = table[2].split(' | ')
    lo, hi = stats.new_seed_interval([ev.centered(k / 60, 1 / 6) for k in (20, 30, 40)])
    assert row[-2] == f'[{lo:.3f}, {hi:.3f}]; [1.000, 1.000]'  # text: every seed scores 1.0, no spread
    assert len(row) == len(table[0].split(' | '))


def test_a_sweep_plot_draws_each_family_against_its_numeric_key(tmp_path):
    """The LR plan: one line per trained encoder over encoder_lr, in LR order whatever the grid's, and the frozen
    cells as levels; a cell without scores is left out. The encoder plan has no numeric key: no sweep plot."""
    cfg, _, _ = plan([os.path.join(CONFIG, 'ablate_encoder_lr.py'), f'--out_dir={tmp_path}'])
    cells = ablate.grid_cells(cfg['grid'])
    cells = {ablate.cell_name(c): c for c in cells[:4] + cells[4:][::-1]}  # the grid's order is not the axis's
    seeds = {1: fake_eval([1.0] * 30 + [0.0] * 30, [1.0] * 40)}
    results = {name: seeds for name in cells if name != 'vit_unfrozen encoder_lr=0.0001'}
    key = report.swept_key(cells)
    lines, levels = report.sweep_lines(cells, results, key)
    assert key == 'encoder_lr' and list(levels) == [f'{e}_frozen' for e in ('siglip', 'dino_siglip', 'vit', 'resnet')]
    assert {label: [x for x, _ in points] for label, points in lines.items()} == {
        'resnet_unfrozen': [1e-5, 1e-4, 1e-3], 'vit_unfrozen': [1e-5, 1e-3], 'dino_siglip_unfrozen': [1e-5, 1e-4, 1e-3],
        'siglip_unfrozen': [1e-5, 1e-4, 1e-3]}
    names = lambda grid: {ablate.cell_name(c): c for c in ablate.grid_cells(grid)}
    assert report.swept_key(names(ablate.grid)) is None
    injection, _, _ = plan([os.path.join(CONFIG, 'ablate_injection.py'), f'--out_dir={tmp_path}'])
    assert report.swept_key(names(injection['grid'])) == 'image_inject_frac'


def test_resume_skips_finished_and_survives_failures(tmp_path, monkeypatch):
    cfg, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2, 0.5]}"])
    calls = []

    def fake_run(run):
        calls.append(run['cell'])
        if run['cell'] == 'image_ratio=0.2':
            return 'exit code 1: boom'
        finish(run)
        return None

    monkeypatch.setattr(scheduler, 'run_cell', fake_run)
    errors = scheduler.run_plan(runs)
    assert calls == ['image_ratio=0.1', 'image_ratio=0.2', 'image_ratio=0.5']  # the failure did not stop the plan
    assert list(errors) == [1] and 'boom' in errors[1]
    table, failed = ablate.collect(cfg, runs, errors, ablate.check_plan(cfg, runs))
    with open(tmp_path / 'results.md') as f:
        md = f.read()
    assert all(f'| image_ratio={r} |' in md for r in (0.1, 0.2, 0.5)) and 'boom' in md
    assert len(failed) == 1
    with open(tmp_path / 'results.json') as f:
        assert [('error' in r) for r in json.load(f)['runs']] == [False, True, False]
    calls.clear()
    scheduler.run_plan(runs)  # a rerun runs only the cell that has no eval.json yet
    assert calls == ['image_ratio=0.2']


def test_the_tables_judge_every_contrast_by_one_model_for_the_plan():
    rng = np.random.default_rng(1)
    make = lambda p, q: fake_eval(list((rng.random(300) < p).astype(float)), list((rng.random(300) < q).astype(float)))
    levels = ((0.5, 0.8), (0.6, 0.9), (0.7, 0.85))
    results = {'base': {s: make(p, q) for s, (p, q) in enumerate(levels)},
               'better': {s: make(p + 0.15, q) for s, (p, q) in enumerate(levels)},
               'same': {s: make(p, q) for s, (p, q) in enumerate(levels)},
               'partial': {0: make(0.5, 0.8), 1: make(0.6, 0.9)}}  # a seed short: outside the plan's model
    table = report.results_table(results, 'base')
    model = stats.PlanModel(results, 'vision')
    assert model.cells == ['base', 'better', 'same'] and model.seeds == [0, 1, 2]
    est = model.contrast({'better': 1, 'base': -1})
    row = next(line for line in table.splitlines() if line.startswith('| better |'))
    assert f'{est.value:+.3f} [{est.ci95[0]:+.3f}, {est.ci95[1]:+.3f}] (p={report.fmt_p(est.p)})' in row
    assert f'{est.mde:.3f}; ' in row and est.model == 'plan' and est.df > 2  # the plan's df, not one pair's
    assert est.p < 0.05 and model.contrast({'same': 1, 'base': -1}).p > 0.05
    assert stats.PlanModel(results, 'vision').contrast({'partial': 1, 'base': -1}).model == 'paired'
    primary, records = report.primary_table(results, [('better', 'base', 'vision'), ('same', 'base', 'vision'),
                                                      ('better', 'base', 'text')])
    assert [r['model'] for r in records] == ['plan'] * 3
    holm = stats.holm([r['p'] for r in records])
    assert [r['holm_p'] for r in records] == holm and records[0]['p'] == pytest.approx(est.p)
    assert primary.count('\n') == 4 and 'better − base | vision |' in primary
    assert f'| plan of 3 cells ({est.df:.1f}) |' in primary  # the model names the cells it spans
    diffs = [results['better'][s]['vision_stable_score'] - results['base'][s]['vision_stable_score'] for s in range(3)]
    assert records[0]['per_seed'] == {s: pytest.approx(d) for s, d in enumerate(diffs)}  # each seed's own difference
    agree = f'| {sum(d > 0 for d in diffs)} of 3 ({min(diffs):+.3f} to {max(diffs):+.3f}) |'
    assert primary.splitlines()[2].endswith(agree)


def test_a_plan_is_checked_whole_before_any_cell_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, 'run_cell', lambda run: pytest.fail('a cell ran'))
    with pytest.raises(ConfigError, match=r"baseline='image_inject_frac=1.0' is not a cell of the plan"):
        ablate.main([os.path.join(CONFIG, 'ablate_injection.py'), "--grid={'image_inject_frac': [0, 0.8]}",
                     '--seeds=[5]', f'--out_dir={tmp_path}'])
    with pytest.raises(ConfigError, match=r"primary: .*names 'vit_frozen'"):
        ablate.main([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}",
                     "--primary=[('vit_frozen', 'image_ratio=0.1', 'vision')]"])
    with pytest.raises(ConfigError, match=r'primary: .*not \(cell, versus, modality\)'):
        ablate.main([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}",
                     "--primary=[('image_ratio=0.2', 'image_ratio=0.1', 'sound')]"])
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.slow
def test_a_real_cell_runs_and_a_broken_one_is_reported(tmp_path, shapes_dir, capsys):
    (tmp_path / 'broken.safetensors').write_bytes(b'not a safetensors file')
    # images from scratch; a cell train.py rejects before any compute (skipped, with the reason); a cell that fails
    # as it runs (an LR that makes the loss overflow)
    grid = (f"[{{'image_inject_frac': [0]}}, {{'image_inject_frac': [0.5], "
            f"'encoder_weights': ['{tmp_path}/broken.safetensors']}}, {{'image_inject_frac': [0.5], "
            f"'learning_rate': [1e30]}}]")
    ok = ablate.main([f'--out_dir={tmp_path}', f'--grid={grid}', f'--data_dir={shapes_dir}', '--text_iters=10',
                      '--save_fracs=[0.5,1.0]', '--warmup_iters=2', '--batch_size=4', '--seeds=[1]',
                      '--image_iters=4', '--image_ratio=0.5', '--caption_scenes=40', '--conversations=40',
                      '--finetune_epochs=1', '--rewarm_iters=1', '--device=cpu', '--compile=False',
                      '--cache_features=False', '--encoder_weights=random', '--eval_items=20'])
    assert not ok
    assert 'broken.safetensors is not a readable .safetensors file' in capsys.readouterr().out
    with open(tmp_path / 'results.json') as f:
        records = json.load(f)['runs']
    assert [r['cell'] for r in records] == ['image_inject_frac=0', 'image_inject_frac=0.5 learning_rate=1e+30']
    assert records[0]['eval']['vision_stable_score'] is not None
    assert 'the loss or its gradient is not finite' in records[1]['error']


def test_the_study_corrects_every_plans_primary_contrasts_together(tmp_path, capsys):
    for plan_dir, ps in (('a', [0.01, 0.04]), ('b', [0.03])):
        os.makedirs(tmp_path / plan_dir)
        with open(tmp_path / plan_dir / 'results.json', 'w') as f:
            json.dump({'primary': [dict(cell=f'c{i}', versus='base', modality='vision', estimate=0.1, ci95=[0.0, 0.2],
                                        p=p, holm_p=0.0, mde=0.1, df=6.0, model='plan', seeds=3)
                                   for i, p in enumerate(ps)]}, f)
    assert ablate.main([f'--study=[\'{tmp_path}/a\', \'{tmp_path}/b\']', f'--out_dir={tmp_path}/study'])
    with open(tmp_path / 'study' / 'study.md') as f:
        rows = f.read().splitlines()[2:]
    assert [r.split(' | ')[5] for r in rows] == ['0.030', '0.060', '0.060']  # Holm over all three: 3p, 2p, then max
    with pytest.raises(ConfigError, match='no results.json'):
        ablate.main([f'--study=[\'{tmp_path}/nowhere\']', f'--out_dir={tmp_path}/study'])


def test_seeds_are_added_to_the_primary_cells_until_their_contrasts_reach_the_target(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    ran = []

    def fake_run(run):
        ran.append((run['cell'], run['seed']))
        p = 0.5 + (0.15 if run['cell'] == 'image_ratio=0.2' else 0.0) + rng.normal(0, 0.05)
        os.makedirs(os.path.join(run['out_dir'], 'finetune'), exist_ok=True)
        with open(eval_path(run), 'w') as f:
            json.dump(fake_eval(list((rng.random(200) < p).astype(float)), [1.0] * 40), f)

    monkeypatch.setattr(scheduler, 'run_cell', fake_run)
    common = [f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2, 0.5]}", '--seeds=[1,2]',
              "--primary=[('image_ratio=0.2', 'image_ratio=0.1', 'vision')]", '--max_seeds=5']
    assert ablate.main(common + ["--target={'vision': 10.0}"])
    assert len(ran) == 6  # the target is met at once: no seed added
    assert ablate.main(common + ["--target={'vision': 1e-4}"])  # never met: up to max_seeds, the primary cells only
    assert sorted(ran[6:]) == [(f'image_ratio={r}', s) for r in (0.1, 0.2) for s in (3, 4, 5)]
    assert 'seed 3 for image_ratio=0.1, image_ratio=0.2: detectable effects above the target' in capsys.readouterr().out
    with open(tmp_path / 'results.json') as f:
        assert json.load(f)['primary'][0]['seeds'] == 5
    monkeypatch.setattr(scheduler, 'prepare_inputs', lambda runs: None)
    del ran[:]
    assert ablate.main(common + ["--target={'vision': 1e-4}", f'--out_dir={tmp_path}/jobs', '--max_seeds=6', '--jobs=3'])
    assert sorted(s for _, s in ran[6:12]) == [3, 3, 4, 4, 5, 5]  # jobs seeds at a time, side by side ...
    assert sorted(s for _, s in ran[12:]) == [6, 6]  # ... then what is left to max_seeds
    assert 'seeds 3, 4, 5 for image_ratio=0.1, image_ratio=0.2' in capsys.readouterr().out


def test_the_referent_table_gives_each_task_seen_and_held_out_accuracy_over_seeds():
    tasks = {1: dict(accuracy_seen=1.0, accuracy_held_out=0.5), 2: dict(accuracy_seen=0.8, accuracy_held_out=0.3)}
    runs = {seed: {'tasks': {'shape': dict(modality='vision', **t), 'count': dict(modality='vision', accuracy_seen=1.0)}}
            for seed, t in tasks.items()}
    lines = report.referent_table({'cell': runs}).splitlines()
    assert lines[0] == '| cell | seeds | shape: seen / held out |'  # count names nothing: not a column
    assert lines[2] == '| cell | 2 | 0.900 / 0.400 |'
    assert report.referent_table({'cell': {1: fake_eval([1.0] * 4, [1.0] * 4)}}) == ''  # no referents: no table


def test_jobs_run_the_seeds_side_by_side_each_seeds_cells_in_order(tmp_path, monkeypatch):
    events, active, most = [], set(), []

    def fake_run(run):
        key = (run['cell'], run['seed'])
        events.append(('start', key))
        active.add(key)
        most.append(len(active))
        time.sleep(0.2)
        active.discard(key)
        events.append(('end', key))
        finish(run)

    monkeypatch.setattr(scheduler, 'run_cell', fake_run)
    monkeypatch.setattr(scheduler, 'prepare_inputs', lambda runs: events.append(('prepare', len(runs))))
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}", '--seeds=[1,2,3]'])
    assert [len(g) for g in scheduler.folder_groups(runs, range(6))] == [2, 2, 2]  # a text stage per seed
    assert scheduler.run_plan(runs, jobs=2) == {}
    assert events[0] == ('prepare', 6) and max(most) == 2 and len(events) == 13
    for seed in (1, 2, 3):  # a seed's cells one after another, in the plan's order (they share its text stage)
        mine = [e for e in events[1:] if e[1][1] == seed]
        assert [e[0] for e in mine] == ['start', 'end', 'start', 'end']
        assert [e[1][0] for e in mine[::2]] == ['image_ratio=0.1', 'image_ratio=0.2']
    _, shared, _ = plan([f'--out_dir={tmp_path}/b', "--grid={'image_ratio': [0.1]}", '--seeds=[1,2]', '--text_seed=7'])
    assert scheduler.folder_groups(shared, range(2)) == [[0, 1]]  # one text stage for both seeds: never side by side


def test_a_stopped_plan_with_jobs_starts_no_other_cell(tmp_path, monkeypatch):
    calls = []

    def fake_run(run):
        calls.append(run['seed'])
        if len(calls) == 2:
            _thread.interrupt_main()  # ctrl-C while two cells run (taken by the main thread within its 0.5 s join)
        time.sleep(1.0)
        finish(run)

    monkeypatch.setattr(scheduler, 'run_cell', fake_run)
    monkeypatch.setattr(scheduler, 'prepare_inputs', lambda runs: None)
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}", '--seeds=[1,2,3]'])
    # interrupt_main does nothing where SIGINT is ignored, as in a pytest started in the background (`cmd &`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            scheduler.run_plan(runs, jobs=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 128 + 2
    time.sleep(1.5)  # the two running cells end; their workers start nothing after the stop
    assert sorted(calls) == [1, 2]


def test_inputs_are_made_once_a_setting_and_a_failure_is_left_to_the_cell(tmp_path, monkeypatch, capsys):
    made = []

    def fake_prepare(cfg, reads_images, verbose=True):
        made.append((cfg.seed, cfg.image_ratio, reads_images))
        if cfg.seed == 2:
            raise OSError(f'{cfg.data_dir}/shapes/meta.json: disk full')

    monkeypatch.setattr(scheduler.prepare, 'prepare_run', fake_prepare)
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}", '--seeds=[1,2]'])
    scheduler.prepare_inputs(runs + runs)  # each run's setting once, however often it comes
    assert sorted(made) == [(1, 0.1, True), (1, 0.2, True), (2, 0.1, True), (2, 0.2, True)]
    assert capsys.readouterr().out.count('disk full') == 2  # named, and left to those cells' train.py


def test_jobs_must_be_a_positive_count(tmp_path):
    with pytest.raises(ConfigError, match='jobs=0'):
        ablate.main([f'--out_dir={tmp_path}', '--jobs=0'])


def test_a_cell_that_raises_beside_others_is_recorded_as_failed(tmp_path, monkeypatch):
    def fake_run(run):
        if run['seed'] == 2 and run['cell'] == 'image_ratio=0.1':
            raise RuntimeError('eval.json holds a list')
        finish(run)

    monkeypatch.setattr(scheduler, 'run_cell', fake_run)
    monkeypatch.setattr(scheduler, 'prepare_inputs', lambda runs: None)
    _, runs, _ = plan([f'--out_dir={tmp_path}', "--grid={'image_ratio': [0.1, 0.2]}", '--seeds=[1,2]'])
    errors = scheduler.run_plan(runs, jobs=2)
    failed = next(i for i, r in enumerate(runs) if r['seed'] == 2 and r['cell'] == 'image_ratio=0.1')
    assert errors == {failed: 'RuntimeError: eval.json holds a list'}
    assert sum(os.path.exists(eval_path(r)) for r in runs) == 3


THREADS_TRAIN = '''
import os, sys
out = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--out_dir='))
open(os.path.join(out, 'threads'), 'w').write(os.environ.get('OMP_NUM_THREADS', 'unset'))
'''


@pytest.mark.parametrize('jobs,user,text_seed,expected', [
    (1, None, '', 'unset'), (2, None, '', str(max(1, scheduler.cores() // 2))), (2, '3', '', '3'),
    (2, None, '--text_seed=7', 'unset')])  # one text stage for both seeds: one group, run alone with every core
def test_cells_side_by_side_share_the_cores_unless_the_user_says(tmp_path, monkeypatch, jobs, user, text_seed, expected):
    fake = tmp_path / 'train.py'
    fake.write_text(THREADS_TRAIN)
    monkeypatch.setattr(scheduler, 'TRAIN', str(fake))
    monkeypatch.setattr(scheduler, 'prepare_inputs', lambda runs: None)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    if user:
        monkeypatch.setenv('OMP_NUM_THREADS', user)
    _, runs, _ = plan([f'--out_dir={tmp_path}/plan', '--seeds=[1,2]', "--grid={'image_ratio': [0.1]}"] +
                      ([text_seed] if text_seed else []))
    errors = scheduler.run_plan(runs, jobs=jobs)
    assert len(errors) == 2  # the fake writes no eval.json
    assert [open(os.path.join(r['out_dir'], 'threads')).read() for r in runs] == [expected] * 2
