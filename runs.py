"""
One run of an ablation plan on disk (ablate.py runs them): its folder and cell.json, the experiment it holds, and
whether it is finished and current by train.py's own rule (each stage's checkpoints carry the fingerprint train.py
would write now), or can be resumed from its last periodic checkpoint.
"""

import glob
import json
import os

import checkpoint
import prepare
import pretrain_encoders
import train
from configurator import ConfigError
from encoders import ENCODERS
from eval import STABLE_SCORES


def eval_path(run):
    return os.path.join(run['out_dir'], 'finetune', 'eval.json')


# train.py keys that say how a cell is run, not what it is: a cell.json is compared without them
HOW = ('init_from', 'allow_stale')


def experiment(identity):
    return {k: v for k, v in identity.items() if k not in HOW}


def read_json(path):
    """(the JSON value in path, None), or (None, why not: missing, not a regular file, truncated...)."""
    try:
        return checkpoint.read_json(path), None
    except FileNotFoundError:
        return None, f'{path} is missing'
    except (ValueError, OSError) as e:
        return None, str(e)


def read_eval(path):
    """(a whole eval.json, None), or (None, what is wrong with it): one missing, truncated or without its scores."""
    e, why = read_json(path)
    if why is None and not (isinstance(e, dict) and all(k in e for k in STABLE_SCORES) and isinstance(
            e.get('tasks'), dict)):
        why = f'{path} lacks the stable scores: not an eval.json of eval.py, or a damaged one'
    return (e, None) if why is None else (None, why)


def write_json(path, value):
    """value into path atomically: written beside it, flushed, renamed over it; a crash leaves the old or the new."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


def claim_folder(run):
    """
    Write the run's cell.json into its folder (atomically), or say why the folder holds another experiment: a
    cell.json that differs from the run's, or one that is not a JSON object (truncated, a list, a folder). One that
    holds only some of the run's keys ({}, a key train.py gained since) is completed. Returns None or the error.
    """
    path = os.path.join(run['out_dir'], 'cell.json')
    held, why = read_json(path)
    if why is not None and os.path.lexists(path):
        return f'{why}; move the folder away, or delete {path} if the folder is this cell\'s'
    if held is not None and not isinstance(held, dict):
        return f'{path} is not a JSON object but {type(held).__name__}: move the folder away, or delete {path}'
    if held is not None:
        differ = sorted(k for k in held if k not in HOW and held[k] != run['identity'].get(k))
        if differ:
            return (f'{run["out_dir"]} holds another experiment: its cell.json differs in {", ".join(differ)} (move '
                    f'the folder away, or give the plan another runs_dir)')
        if not missing_keys(held, run):
            return None
    write_json(path, run['identity'])
    return None


def missing_keys(held, run):
    """The keys that define the run's experiment (all but where and how it runs) that a cell.json lacks."""
    return sorted(k for k in run['identity'] if k not in prepare.RUN_KEYS and k not in HOW and k not in held)


def run_state(run):
    """
    ('done', None) for a finished run: its cell.json complete and this run's, its eval.json whole, and every
    checkpoint of its stages what train.py would write now (stale_checkpoints); else ('stale', what differs), which
    train.py would refuse too, or ('todo', why not done).
    """
    held, why = read_json(os.path.join(run['out_dir'], 'cell.json'))
    if why is not None:
        return 'todo', why
    if not isinstance(held, dict) or missing_keys(held, run) or \
            any(k not in HOW and held[k] != run['identity'].get(k) for k in held):
        return 'todo', f'{run["out_dir"]}/cell.json is not complete, or not this run\'s'
    _, why = read_eval(eval_path(run))
    if why is not None:
        return 'todo', why
    try:
        stale = stale_checkpoints(run)
    except ConfigError as e:  # train.py refuses the run's config now (a file it names is gone): it will say so
        return 'todo', str(e)
    if stale and run['identity'].get('allow_stale'):
        print(f'warning: {run["cell"]} seed {run["seed"]}: counted although {stale[0]} (allow_stale=True)')
    elif stale:
        return 'stale', (f'its checkpoints were made by other code, data or settings: {"; ".join(stale)}. train.py '
                         f'refuses them too: move the folders named (and {run["out_dir"]}) away, or delete them, to '
                         f'run the cell again, or pass --allow_stale=True to count it knowingly')
    return 'done', None


_configs = {}


def run_config(run):
    """train.py's config of the run (its arguments as train.py resolves them), once per process."""
    key = tuple(run['args'])
    if key not in _configs:
        _configs[key] = train.get_config(run['args'])
    return _configs[key]


def arg(run, key):
    """The value the run's train.py arguments give key last, or None."""
    return next((a.split('=', 1)[1] for a in reversed(run['args']) if a.startswith(f'--{key}=')), None)


def expected_inputs(cfg):
    """
    The prepare.Prepared that train.fingerprint reads (the dataset's folder and the encoder weights' paths), found
    as prepare_run finds them but without making anything: a shapes encoder not pre-trained yet is not pre-trained.
    """
    folder = os.path.join(cfg.data_dir, 'shapes') if cfg.dataset == 'shapes' else cfg.dataset
    weights = cfg.encoder_weights
    if weights == 'shapes':  # as pretrain_encoders.shapes_weights resolves it
        spec = ENCODERS[cfg.encoder]
        where = lambda family: pretrain_encoders.weights_path(family, cfg.data_dir, cfg.encoder_seed)
        weights = 'random' if not spec.pretrained else \
            {p: where(p) for p in spec.parts} if spec.parts else where(cfg.encoder)
    return prepare.Prepared(folder, None, weights)


def stage_names(cfg):
    names = cfg.stages.split(',')
    return [n for n in names if not (n == 'text' and 'image' in names and train.from_scratch(cfg, 'image'))]


def stale_checkpoints(run, periodic=False):
    """
    The checkpoints of the run's stages whose fingerprint is not the one train.py would write now, each with what
    differs (train.py's own rule: train.fingerprint against checkpoint.fingerprint_differences); [] when every one
    that exists is current. periodic: the newest periodic checkpoint of each stage instead, which init_from=resume
    would continue. Inputs that are missing (the data, a shapes encoder) leave it to train.py, which makes them.
    """
    folders = [os.path.join(run['out_dir'], 'finetune'), os.path.join(arg(run, 'image_out_dir') or run['out_dir'],
                                                                         'image')]
    if not periodic and not any(checkpoint.is_checkpoint(f) for f in folders) and \
            not glob.glob(os.path.join(glob.escape(arg(run, 'text_out_dir') or ''), 'ckpt_*', 'config.json')):
        return []  # nothing on disk to be stale (and no config to resolve)
    cfg = run_config(run)
    prep, stale = expected_inputs(cfg), []
    for name in stage_names(cfg):
        if periodic:
            found = checkpoint.finished_checkpoints(prepare.steps_dir(cfg, name))
            there = [max(found)[1]] if found else []
        else:
            there = [f for f in prepare.stage_outputs(cfg, name).values() if checkpoint.is_checkpoint(f)]
        if not there:
            continue
        try:
            made_by = train.fingerprint(cfg, name, prep)
        except (OSError, ValueError):
            continue  # an input is missing: train.py makes it, then judges
        for folder in there:
            try:
                made = checkpoint.read_checkpoint_info(folder).get('fingerprint')
            except (OSError, ValueError) as e:
                stale.append(str(e))
                continue
            differences = checkpoint.fingerprint_differences(made, made_by) if isinstance(made, dict) else \
                ['it records no fingerprint']
            if differences:
                stale.append(f'{folder}: {"; ".join(differences[:3])}')
    return stale


def resume_args(run):
    """
    ['--init_from=resume'] for a run with periodic checkpoints on disk that train.py can continue (each stage's
    newest has the fingerprint this run would write), so an interrupted cell goes on from its last checkpoint, not
    from step 0; and the line that says which, or why a stage restarts at step 0 instead.
    """
    try:
        cfg = run_config(run)
    except ConfigError:  # train.py will say so
        return [], None
    # a stage is interrupted when it has periodic checkpoints and not all of its outputs; a finished stage keeps its
    # last periodic ones (keep_last), which a new cell sharing it must not take for an interruption of its own
    interrupted = [n for n in stage_names(cfg) if checkpoint.finished_checkpoints(prepare.steps_dir(cfg, n))
                   and not all(checkpoint.is_checkpoint(f) for f in prepare.stage_outputs(cfg, n).values())]
    if arg(run, 'init_from') == 'resume' or not interrupted:
        return [], None
    try:
        stale = stale_checkpoints(run, periodic=True)
    except ConfigError:  # train.py will say so
        return [], None
    if stale:
        return [], (f'starts from step 0: its last periodic checkpoint cannot be continued, made by other code, data '
                    f'or settings ({"; ".join(stale)[:300]})')
    return ['--init_from=resume'], 'resumes from its last periodic checkpoint (init_from=resume)'
