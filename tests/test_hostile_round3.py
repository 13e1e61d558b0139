"""
Hostile round 3: a study that runs for hours in the background, resumed after crashes and edits. Each attack ends in
the correct result or a one-line error naming the file or the key: no traceback, no hang, nothing of the user's lost.
"""
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import ablate
import checkpoint
import corpora
import encoders
import locks
import prepare
import runtime
import sample
import scheduler
import train
from runs import claim_folder, eval_path, expected_inputs, run_config, run_state, stage_names
from configurator import ConfigError, configure, script_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dead_pid():
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def stale_lock(path, kind, pid):
    """A LOCK its run left when it died: nanoVLP's record (old or new), or an empty file (it died before writing)."""
    record = {'pid': pid, 'host': socket.gethostname(), 'started': 'yesterday'}
    path.write_text('' if kind == 2 else json.dumps(dict(record, lock='flock') if kind else record))


# 1. the lock: one atomic takeover, held however slow the holder

def test_300_simultaneous_takeovers_of_a_stale_lock_leave_exactly_one_holder(tmp_path, monkeypatch):
    folder, gone = tmp_path / 'out', dead_pid()
    folder.mkdir()
    record = locks.lock_record

    def paused(text):  # the scheduler pauses a run between reading the holder and taking the lock
        time.sleep(random.random() * 0.0005)
        return record(text)

    monkeypatch.setattr(locks, 'lock_record', paused)
    contenders, rounds = 3, 300
    start, end = threading.Barrier(contenders + 1), threading.Barrier(contenders + 1)
    won, refused = [], []

    def take():
        for _ in range(rounds):
            start.wait()
            try:
                won.append(locks.acquire_lock(str(folder)))
            except locks.FolderLocked as e:
                refused.append(str(e))
            end.wait()

    threads = [threading.Thread(target=take) for _ in range(contenders)]
    for t in threads:
        t.start()
    try:
        for round_ in range(rounds):
            stale_lock(folder / 'LOCK', round_ % 3, gone)
            start.wait()  # all at once
            end.wait()
            assert len(won) == 1 and len(refused) == contenders - 1, (round_, won, refused)
            assert all('being written by another run' in e for e in refused)
            assert json.loads((folder / 'LOCK').read_text())['pid'] == os.getpid()
            locks.release_lock(won.pop())
            assert not (folder / 'LOCK').exists()
            refused.clear()
    finally:
        start.abort(), end.abort()
        for t in threads:
            t.join()


def test_locks_taken_and_given_back_never_have_two_holders(tmp_path):
    folder, holders, seen, stop = str(tmp_path), [], [], time.time() + 0.6

    def churn():
        while time.time() < stop:
            try:
                path = locks.acquire_lock(folder)
            except locks.FolderLocked:
                continue
            holders.append(1)
            seen.append(len(holders))
            time.sleep(0.0005)
            holders.pop()
            locks.release_lock(path)  # removed while held, then unlocked: a waiting run opens the new file

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and max(seen) == 1


def test_a_slow_holder_keeps_its_lock_and_a_killed_one_loses_it_at_once(tmp_path):
    folder = str(tmp_path / 'out')
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(ready_w)  # a holder that dies early ends the read below
    if pid == 0:  # the holder: takes the lock, then a step that takes long (it never refreshes anything)
        try:
            locks.acquire_lock(folder)
            os.write(ready_w, b'1')
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b'1'
        for _ in range(20):
            with pytest.raises(locks.FolderLocked, match=f'being written by another run \\(pid {pid} '):
                locks.acquire_lock(folder)
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    path = locks.acquire_lock(folder)  # the kernel dropped the dead holder's flock: no wait, no guess
    assert json.loads(open(path).read())['pid'] == os.getpid()
    locks.release_lock(path)


def make_lock(path, kind):
    if kind == 'folder':
        path.mkdir()
    elif kind == 'fifo':
        os.mkfifo(path)
    elif kind == 'dangling symlink':
        os.symlink(path.parent / 'nowhere', path)
    else:
        path.write_bytes({'JSON list': b'[1, 2]', 'huge pid': b'{"pid": 100000000000000000000000, "host": "h"}',
                          '{}': b'{}', 'binary': b'\x00\xff\xfe' * 50}[kind])


@pytest.mark.parametrize('kind,says', [('JSON list', 'holds something nanoVLP did not write'),
                                       ('huge pid', 'holds something nanoVLP did not write'),
                                       ('{}', 'holds something nanoVLP did not write'),
                                       ('binary', 'holds something nanoVLP did not write'),
                                       ('folder', 'is a folder, not the lock file'),
                                       ('fifo', 'is a FIFO, not the lock file'),
                                       ('dangling symlink', 'is a symlink, not the lock file')])
def test_odd_lock_contents_are_named_with_what_to_do(tmp_path, kind, says):
    lock = tmp_path / 'LOCK'
    make_lock(lock, kind)
    t0 = time.time()
    with pytest.raises(locks.FolderLocked) as e:
        locks.acquire_lock(str(tmp_path))
    assert time.time() - t0 < 2 and says in str(e.value) and str(lock) in str(e.value), str(e.value)
    assert 'delete' in str(e.value) and os.path.lexists(lock)  # said, never removed behind the user's back


def test_a_sigterm_ends_a_run_through_its_finally_and_gives_its_locks_back(tmp_path, shapes_dir, monkeypatch):
    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    monkeypatch.setattr(train.prepare, 'prepare_run', terminated)
    cfg = train.get_config(['--stages=text', f'--data_dir={shapes_dir}', f'--text_out_dir={tmp_path}/text',
                            f'--out_dir={tmp_path}', '--device=cpu'])
    t0 = time.time()
    with pytest.raises(SystemExit) as e, runtime.sigterm_exits():  # as `python train.py` runs main
        train.main(cfg)
    assert e.value.code == 128 + signal.SIGTERM and time.time() - t0 < 4
    assert not os.path.exists(tmp_path / 'LOCK') and not os.path.exists(tmp_path / 'text' / 'LOCK')
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


# 2. the feature cache is keyed by the code that computes the features

def test_an_edit_to_encoders_py_makes_a_new_feature_cache(tmp_path, monkeypatch):
    code = tmp_path / 'code'
    code.mkdir()
    source = open(os.path.join(ROOT, 'encoders.py')).read()
    (code / 'encoders.py').write_text(source)
    monkeypatch.setattr(prepare, 'HERE', str(code))
    pictures = np.lib.format.open_memmap(str(tmp_path / 'pictures.npy'), mode='w+', dtype=np.uint8,
                                         shape=(6, 48, 48, 3))
    pictures[:] = np.random.default_rng(0).integers(0, 255, pictures.shape)
    pictures.flush()
    cfg = SimpleNamespace(cache_features=True, freeze_encoder=True, image_data='', instruct_data='', scene_size=48,
                          caption_scenes=4, conversations=2, data_dir=str(tmp_path / 'data'))
    prep = SimpleNamespace(source=SimpleNamespace(images=np.load(tmp_path / 'pictures.npy', mmap_mode='r')))
    encoder = encoders.build_encoder('siglip', 'tiny', 'random', freeze=True)
    first = prepare.feature_cache(cfg, prep, encoder, create=True)
    assert np.array_equal(first, prepare.feature_cache(cfg, prep, encoder))  # read back
    (code / 'encoders.py').write_text(source + '\n# a comment: the same code\n')
    assert np.array_equal(first, prepare.feature_cache(cfg, prep, encoder))
    (code / 'encoders.py').write_text(source + '\nSCALE = 2.0  # a line of code\n')
    with pytest.raises(FileNotFoundError, match='feature cache .* is missing'):  # never the old features
        prepare.feature_cache(cfg, prep, encoder)
    prepare.feature_cache(cfg, prep, encoder, create=True)
    assert len(os.listdir(tmp_path / 'data' / 'features')) == 2


# 3, 4, 8. ablate.py: a cell is finished only when train.py would reuse it; bad files named; resumed, not restarted

def plan(tmp_path, shapes_dir, *extra, grid="{'image_ratio': [0.1, 0.2]}"):
    args = [f'--out_dir={tmp_path}/plan', f'--grid={grid}', '--seeds=[1]', f'--data_dir={shapes_dir}',
            '--encoder_weights=random', *extra]
    own, passed = ablate.split_args(args)
    cfg = configure(own, {k: getattr(ablate, k) for k in ablate.ABLATE_KEYS})
    runs, _ = ablate.expand(cfg, passed)
    return cfg, runs


def fake_checkpoint(run, folder, name, step=1, **differ):
    """A checkpoint's config.json as train.py would write it now for stage `name` of run (differ: edits to it)."""
    cfg = run_config(run)
    made_by = train.fingerprint(cfg, name, expected_inputs(cfg))
    for section, values in differ.items():
        made_by[section].update(values)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'stage': name, 'step': step, 'model_args': {}, 'fingerprint': made_by}, f)


def fake_eval(n=40):
    """An eval.json of eval.py's shape: a vision task half right, a text task all right."""
    task = lambda modality, scores, chance: dict(modality=modality, chance=chance, scores=scores, n=len(scores),
                                                 accuracy=float(np.mean(scores)))
    e = {'tasks': {'color': task('vision', [1.0, 0.0] * (n // 2), 1 / 6), 'facts': task('text', [1.0] * n, 1 / 4)},
         'blind_tasks': {'color': task('vision', [0.0] * n, 1 / 6)}}
    for key, t in (('vision_stable_score', e['tasks']['color']), ('text_stable_score', e['tasks']['facts']),
                   ('vision_blind_stable_score', e['blind_tasks']['color'])):
        e[key] = (t['accuracy'] - t['chance']) / (1 - t['chance'])
        e[key + '_ci95'] = [e[key] - 0.1, e[key] + 0.1]
    return e


def finish_for_real(run, **differ):
    """What a finished cell leaves: cell.json, every stage's checkpoint (fingerprinted) and finetune/eval.json."""
    assert claim_folder(run) is None
    cfg = run_config(run)
    for name in stage_names(cfg):
        for folder in prepare.stage_outputs(cfg, name).values():
            fake_checkpoint(run, folder, name, **(differ if name == 'finetune' else {}))
    with open(eval_path(run), 'w') as f:
        json.dump(fake_eval(), f)


def test_a_finished_cell_that_train_py_would_refuse_is_not_counted(tmp_path, shapes_dir, monkeypatch, capsys):
    cfg, runs = plan(tmp_path, shapes_dir)
    finish_for_real(runs[0])
    finish_for_real(runs[1], code={'model.py': 'an older model.py'})  # made before an edit to model.py
    assert run_state(runs[0]) == ('done', None)
    state, why = run_state(runs[1])
    assert state == 'stale' and 'code model.py differs' in why and '--allow_stale=True' in why
    monkeypatch.setattr(scheduler, 'run_cell', lambda run: pytest.fail('ran a cell'))
    errors = scheduler.run_plan(runs)  # refused as train.py refuses it: not run, not counted
    assert list(errors) == [1] and errors[1].startswith('stale: ') and 'finetune' in errors[1]
    ablate.collect(cfg, runs, errors, ablate.check_plan(cfg, runs))
    records = json.load(open(tmp_path / 'plan' / 'results.json'))['runs']
    assert 'eval' in records[0] and 'eval' not in records[1] and 'code model.py differs' in records[1]['error']
    _, knowingly = plan(tmp_path, shapes_dir, '--allow_stale=True')  # the same experiment, reused knowingly
    assert [r['out_dir'] for r in knowingly] == [r['out_dir'] for r in runs]
    assert run_state(knowingly[1]) == ('done', None) and 'counted although' in capsys.readouterr().out


def test_a_cell_json_missing_partial_or_broken_is_never_adopted_as_finished(tmp_path, shapes_dir, monkeypatch):
    cfg, runs = plan(tmp_path, shapes_dir)
    finish_for_real(runs[0])
    finish_for_real(runs[1])
    path, calls = os.path.join(runs[1]['out_dir'], 'cell.json'), []
    monkeypatch.setattr(scheduler, 'run_cell', lambda run: calls.append(run['out_dir']))  # train.py decides
    for cell_json, claimed in ((None, True), (b'{}', True), (b'{"seed": 1}', True), (b'{"seed": 1, "image_ra', False),
                               (b'[1, 2]', False), ('folder', False)):
        os.rmdir(path) if os.path.isdir(path) else os.remove(path)
        if cell_json == 'folder':
            os.mkdir(path)
        elif cell_json is not None:
            open(path, 'wb').write(cell_json)
        assert run_state(runs[1])[0] == 'todo', cell_json
        calls.clear()
        errors = scheduler.run_plan(runs)
        if claimed:  # completed (atomically) and run: train.py reuses what is current, or refuses what is not
            assert errors == {} and calls == [runs[1]['out_dir']], cell_json
            assert json.load(open(path)) == runs[1]['identity'] and not os.path.exists(path + '.tmp')
        else:  # named, with what to do; the other runs go on
            assert list(errors) == [1] and 'cell.json' in errors[1] and calls == [], cell_json
            assert any(w in errors[1] for w in ('not valid JSON', 'not a JSON object', 'is a folder')), errors[1]


def test_truncated_times_and_eval_json_are_named_not_a_traceback(tmp_path, shapes_dir, capsys):
    cfg, runs = plan(tmp_path, shapes_dir)
    for run in runs:
        finish_for_real(run)
    open(os.path.join(runs[0]['out_dir'], 'times.json'), 'w').write('{"text steps": 12.')
    open(eval_path(runs[1]), 'w').write('{"vision_stable_score": 0.')
    ablate.collect(cfg, runs, {}, ablate.check_plan(cfg, runs))
    out = capsys.readouterr().out
    assert 'times.json is not valid JSON' in out and 'left out of the table' in out
    records = json.load(open(tmp_path / 'plan' / 'results.json'))['runs']
    assert 'eval' in records[0] and 'times' not in records[0] and records[1]['error'] == 'not run'
    state, why = run_state(runs[1])
    assert state == 'todo' and why.startswith(f'{eval_path(runs[1])} is not valid JSON')


def test_an_interrupted_cell_resumes_from_its_last_periodic_checkpoint(tmp_path, shapes_dir, monkeypatch, capsys):
    cfg, runs = plan(tmp_path, shapes_dir, grid="{'image_ratio': [0.1]}")
    run, calls = runs[0], []
    assert claim_folder(run) is None
    c = run_config(run)
    for folder in prepare.stage_outputs(c, 'text').values():  # the text stage finished, the image stage stopped
        fake_checkpoint(run, folder, 'text')
    # a finished text stage keeps its last periodic checkpoints: a new cell that shares it was not interrupted
    fake_checkpoint(run, os.path.join(prepare.steps_dir(c, 'text'), 'step_000400'), 'text', step=400)
    monkeypatch.setattr(scheduler, 'run_cell', lambda r: calls.append(r['args']) or 'exit code 1: stopped')
    scheduler.run_plan(runs)
    assert '--init_from=resume' not in calls[-1] and 'resumes' not in capsys.readouterr().out
    fake_checkpoint(run, os.path.join(prepare.steps_dir(c, 'image'), 'step_000150'), 'image', step=150)
    scheduler.run_plan(runs)
    assert calls[-1][-1] == '--init_from=resume' and 'resumes from its last periodic checkpoint' in \
        capsys.readouterr().out
    # made by other code: train.py could not continue it, so the stage starts again, and the line says why
    fake_checkpoint(run, os.path.join(prepare.steps_dir(c, 'image'), 'step_000150'), 'image', step=150,
                    code={'encoders.py': 'an older encoders.py'})
    scheduler.run_plan(runs)
    assert '--init_from=resume' not in calls[-1]
    assert 'starts from step 0: its last periodic checkpoint cannot be continued' in capsys.readouterr().out


STUBBORN = '''
import fcntl, json, os, signal, socket, sys, time
out = sys.argv[1].split('=', 1)[1]
fd = os.open(os.path.join(out, 'LOCK'), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'lock': 'flock'}).encode())
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a cell that does not stop when asked
open(os.path.join(out, 'locked'), 'w').close()
time.sleep(60)
'''


# the plan runs in a fresh interpreter, not a fork of this (threaded) pytest worker: a fork can inherit a lock that
# another thread held at that moment, and hang before its cells start
PLAN = '''
import signal, sys
import scheduler
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where this worker's SIGINT is ignored, and inherited
fake, jobs, outs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
scheduler.TRAIN, scheduler.STOP_GRACE_S, scheduler.prepare_inputs = fake, 0.3, lambda runs: None
scheduler.run_plan([dict(cell='c', seed=s, out_dir=out, identity={'seed': s}, args=[f'--out_dir={out}'])
                    for s, out in enumerate(outs, 1)], jobs)
'''


@pytest.mark.parametrize('jobs', [1, 2])
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_ablate_ends_its_cells_and_frees_their_locks(tmp_path, signum, jobs):
    outs, fake, log = [str(tmp_path / f'cell{s}') for s in range(1, jobs + 1)], tmp_path / 'stubborn_train.py', \
        tmp_path / 'plan.log'
    fake.write_text(STUBBORN)
    with open(log, 'w') as out:  # a plan of one cell a seed, its output to plan.log, in a session of its own
        plan = subprocess.Popen([sys.executable, '-c', PLAN, str(fake), str(jobs)] + outs, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    try:
        deadline = time.time() + 60
        while not all(os.path.exists(os.path.join(out, 'locked')) for out in outs):  # every cell running
            assert plan.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.02)
        children = [json.load(open(os.path.join(out, 'LOCK')))['pid'] for out in outs]
        t0 = time.time()
        plan.send_signal(signum)  # to the plan only: its cells ignore SIGTERM, and hear of no SIGINT
        code = plan.wait(30)
    except BaseException:
        os.killpg(plan.pid, signal.SIGKILL)  # the plan and its stubborn cells, which would hold their locks for 60 s
        plan.wait()
        raise
    printed = log.read_text()
    assert code == 128 + signum and time.time() - t0 < 5, printed
    assert f'stopped by {signal.Signals(signum).name}' in printed and 'Traceback' not in printed
    assert ' failed:' not in printed  # a cell the plan stopped did not fail
    for child, out in zip(children, outs):
        with pytest.raises(ProcessLookupError):  # no orphan left running
            os.kill(child, 0)
        locks.release_lock(locks.acquire_lock(out))  # and the cell's folder is free


# 5, 6. checkpoint names cannot collide; pruning keeps what this run wrote

def periodic(folder, step):
    path = os.path.join(folder, f'step_{step:06d}')
    os.makedirs(path)
    json.dump({'stage': 'text', 'step': step, 'model_args': {}}, open(os.path.join(path, 'config.json'), 'w'))
    return path


def test_pruning_keeps_what_this_run_wrote(tmp_path):
    folder = str(tmp_path / 'steps')
    periodic(folder, 400), periodic(folder, 500)  # an older, longer run's
    checkpoint.prune(folder, 2, written=periodic(folder, 100))  # a fresh run's first
    assert [s for s, _ in checkpoint.finished_checkpoints(folder)] == [100]
    checkpoint.prune(folder, 2, written=periodic(folder, 200))
    checkpoint.prune(folder, 2, written=periodic(folder, 300))
    assert [s for s, _ in checkpoint.finished_checkpoints(folder)] == [200, 300]


def test_save_fracs_that_share_a_folder_name_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r'save_fracs: 0.5 and 0.503 are both saved as ckpt_050'):
        train.get_config(['--save_fracs=[0.5,0.503,1.0]', '--image_inject_frac=0.5'])


# 10. the corpus builder: one bad file skipped and counted; the user's files never touched

def build(inputs, out):
    return corpora.prepare_text([str(p) for p in inputs], str(out), workers=1, val_fraction=0.0, verbose=False)


def test_a_truncated_gz_or_a_fifo_is_skipped_counted_and_named(tmp_path, capsys):
    good = tmp_path / 'good.jsonl'
    good.write_text('{"text": "the cup is red"}\n' * 3)
    raw = gzip.compress(''.join(json.dumps({'text': f'line {i} ' * 20}) + '\n' for i in range(2000)).encode())
    (tmp_path / 'cut.jsonl.gz').write_bytes(raw[:len(raw) // 2])
    os.mkfifo(tmp_path / 'pipe.jsonl')
    t0 = time.time()
    meta = build([good, tmp_path / 'cut.jsonl.gz', tmp_path / 'pipe.jsonl'], tmp_path / 'ds')
    assert time.time() - t0 < 10 and meta['skipped']['unreadable file'] == 2
    assert [f.split(':')[0] for f in meta['unreadable_files']] == [str(tmp_path / 'cut.jsonl.gz'),
                                                                    str(tmp_path / 'pipe.jsonl')]
    assert 'EOFError' in meta['unreadable_files'][0] and 'not a regular file' in meta['unreadable_files'][1]
    assert meta['tokens']['train'] > 3 * 15  # the good file, and what the .gz held before it broke
    assert 'skipped the rest of' in capsys.readouterr().err


def test_the_builder_never_moves_or_deletes_what_is_not_its_own(tmp_path):
    docs = tmp_path / 'docs.jsonl'
    docs.write_text('{"text": "the cup is red"}\n' * 3)
    build([docs], f'{tmp_path}/ds/')  # a trailing slash
    first = open(tmp_path / 'ds' / 'train.bin', 'rb').read()
    build([docs], f'{tmp_path}/ds/')  # rebuilt in place: no ds/.old inside ds
    assert open(tmp_path / 'ds' / 'train.bin', 'rb').read() == first and sorted(os.listdir(tmp_path)) == \
        ['docs.jsonl', 'ds']
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='notes.txt exists and is not a folder'):
        build([docs], tmp_path / 'notes.txt')
    assert (tmp_path / 'notes.txt').read_text() == 'mine' and not os.path.exists(tmp_path / 'notes.txt.old')
    (tmp_path / 'mine.tmp').mkdir()
    (tmp_path / 'mine.tmp' / 'keep.txt').write_text('mine')
    with pytest.raises(ValueError, match='mine.tmp exists and is not a build of corpora.py'):
        build([docs], tmp_path / 'mine')
    assert (tmp_path / 'mine.tmp' / 'keep.txt').read_text() == 'mine'


def test_a_kill_between_the_renames_is_named_and_recovered(tmp_path, capsys):
    docs = tmp_path / 'docs.jsonl'
    docs.write_text('{"text": "the cup is red"}\n' * 3)
    build([docs], tmp_path / 'ds')
    os.rename(tmp_path / 'ds', tmp_path / 'ds.old')  # the old dataset moved aside, the new one not yet in place
    with pytest.raises(ConfigError, match=r"dataset='.*ds' is missing, and .*ds.old holds the dataset it was: "
                                          r"corpora.py was stopped .* rename .*ds.old to .*ds"):
        train.get_config([f'--dataset={tmp_path}/ds', '--stages=text'])
    build([docs], tmp_path / 'ds')  # the same command again: put back, then rebuilt
    assert 'put back' in capsys.readouterr().out and sorted(os.listdir(tmp_path)) == ['docs.jsonl', 'ds']
    assert train.get_config([f'--dataset={tmp_path}/ds', '--stages=text']).dataset == f'{tmp_path}/ds'


# 11, 12. values and files: a config error before compute, naming the key or the file

@pytest.mark.parametrize('flag,error', [
    ('--seed=100000000000000000000', r'seed=100000000000000000000: must be >= 0 and <= 4294967295'),
    ('--batch_size=1000000000', r'batch_size=1000000000: must be > 0 and <= 1048576'),
    ('--block_size=10000000', r'block_size=10000000: must be > 0 and <= 131072'),
    ('--text_iters=' + '9' * 500, r'text_iters=9+\.\.\.: must be > 0 and <= 1000000000'),
    ('--finetune_epochs=100000', r'finetune_epochs=100000: must be > 0 and <= 1000'),
    ('--image_inject_layer=4', r'image_inject_layer=4: the demo LM has blocks')])
def test_out_of_range_numbers_are_config_errors_before_any_allocation(flag, error):
    with pytest.raises(ConfigError, match=error):
        train.get_config([flag])


def tiny_checkpoint(folder, **model_args):
    from test_hostile import tiny_checkpoint as make
    path = make(folder)
    info = json.load(open(os.path.join(path, 'config.json')))
    info['model_args'].update(model_args)
    json.dump(info, open(os.path.join(path, 'config.json'), 'w'))
    return path


@pytest.mark.parametrize('edit,error', [({'n_head': 0}, r'n_head=0 must be an int in \[1, 1024\]'),
                                        ({'n_embd': -128}, r'n_embd=-128 must be an int in \[1, 65536\]'),
                                        ({'n_layer': 2.5}, r'n_layer=2.5 must be an int'),
                                        ({'block_size': 10 ** 7}, r'block_size=10000000 must be an int in'),
                                        ({'n_embd': 24, 'n_head': 16}, r'n_embd=24 is not n_head=16 heads of an even')])
def test_a_config_json_with_impossible_model_args_is_named(tmp_path, edit, error):
    path = tiny_checkpoint(tmp_path / 'ck', **edit)
    with pytest.raises(ValueError, match=f'{path}/config.json: model_args {error}'):
        checkpoint.load_model(path)


def test_checksums_null_and_a_fifo_for_weights_are_named(tmp_path):
    path = tiny_checkpoint(tmp_path / 'ck')
    info = json.load(open(os.path.join(path, 'config.json')))
    json.dump(dict(info, checksums=None), open(os.path.join(path, 'config.json'), 'w'))
    with pytest.raises(ValueError, match=r'config.json: checksums=None, expected \{file: digest\}'):
        checkpoint.load_model(path)
    del info['checksums']
    json.dump(info, open(os.path.join(path, 'config.json'), 'w'))
    os.remove(os.path.join(path, 'model.safetensors'))
    os.mkfifo(os.path.join(path, 'model.safetensors'))
    with pytest.raises(ValueError, match=r'model.safetensors is not a regular file'):
        checkpoint.load_model(path)
    os.remove(os.path.join(path, 'config.json'))
    os.mkfifo(os.path.join(path, 'config.json'))  # read without O_NONBLOCK, it would wait for a writer forever
    with pytest.raises(ValueError, match=r'config.json is a FIFO, not a regular file'):
        checkpoint.load_model(path)


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2, 3)) + '{"step": 4, "lo')
    metrics = runtime.Metrics(SimpleNamespace(master=True), str(path), first=3)
    metrics.record(stage='text', step=4, loss=0.5)
    assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_sample_refuses_devices_fifos_and_out_of_range_values_at_once(tmp_path):
    os.mkfifo(tmp_path / 'pipe.png')
    t0 = time.time()
    for path, reason in (('/dev/zero', 'not a regular file'), (str(tmp_path / 'pipe.png'), 'not a regular file'),
                         (str(tmp_path / 'missing.png'), 'missing file')):
        with pytest.raises(SystemExit, match=f'--image={path}: {reason}'):
            sample.read_image(path, 48)
    assert time.time() - t0 < 2
    config = script_config(vars(sample))
    with pytest.raises(ConfigError, match=r'max_new_tokens=1000000000: must be in'):  # before the checkpoint is read
        sample.main(dict(config, ckpt=str(tmp_path / 'nowhere'), max_new_tokens=10 ** 9))


def test_a_config_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / 'cell.py')
    with pytest.raises(ConfigError, match='cell.py is not a regular file'):
        train.get_config([str(tmp_path / 'cell.py')])
