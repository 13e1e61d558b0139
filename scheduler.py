"""
How a plan's runs are carried out (ablate.py makes the plan): each one `python train.py` process, only the
unfinished ones, in the plan's order or, with jobs > 1, groups that share no folder side by side after their inputs
are made once; a plan stopped (SIGINT, SIGTERM) stops every process it started, so none outlives it holding a lock.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import prepare
import runs
import train
from configurator import ConfigError
from eval import STABLE_SCORES
from runtime import format_time

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')  # what every cell runs
STOP_GRACE_S = 5.0  # a cell stopped with its plan (SIGTERM) has this long to end before it is killed
CHILDREN = set()  # the train.py processes running now (several with jobs > 1), stopped with the plan
STOPPING = threading.Event()  # the plan is stopping: no other cell starts
CHILDREN_LOCK = threading.Lock()


def run_cell(run):
    """
    One train.py process (with run['threads'] torch threads, if given); its output is appended to {out_dir}/log.txt.
    Returns None or the error's last lines. Stopped itself (SIGINT, SIGTERM: KeyboardInterrupt here), it stops the
    process first, SIGTERM and after STOP_GRACE_S SIGKILL, so no train.py outlives its plan holding a cell's locks.
    """
    os.makedirs(run['out_dir'], exist_ok=True)
    log_path = os.path.join(run['out_dir'], 'log.txt')
    with open(log_path, 'a') as log:  # an interrupted attempt's log is kept, above the next one's
        log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")}: python train.py {" ".join(run["args"])}\n')
        log.flush()
        with CHILDREN_LOCK:  # a plan that stops (stop_children) sees every child started, and no later one starts
            if STOPPING.is_set():
                return 'not started: the plan was stopped'
            env = dict(os.environ, OMP_NUM_THREADS=str(run['threads'])) if run.get('threads') else None
            child = subprocess.Popen([sys.executable, TRAIN] + run['args'], stdout=log, stderr=subprocess.STDOUT, env=env)
            CHILDREN.add(child)
        try:
            code = child.wait()
        except BaseException:
            stop_children()
            raise
        finally:
            with CHILDREN_LOCK:
                CHILDREN.discard(child)
    if code == 0 and os.path.exists(runs.eval_path(run)):
        return None
    with open(log_path, errors='replace') as f:
        tail = [line.rstrip() for line in f if line.strip()][-3:]
    return f'exit code {code}: ' + ' | '.join(tail) + f' (full log: {log_path})'


def cores():
    """The CPU cores this process may use (a container's or a taskset's, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def stop_children():
    """End every running train.py and start no other: SIGTERM to all (train.py releases its locks and exits), then
    SIGKILL to those still running STOP_GRACE_S later."""
    with CHILDREN_LOCK:
        STOPPING.set()
        children = list(CHILDREN)
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.time() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(signum)


def run_plan(plan_runs, jobs=1):
    """
    Run every unfinished cell; returns {index: error} for the cells that failed, or were not run because their
    results are stale (run_state). With jobs > 1, that many groups of runs at a time (folder_groups: in practice the
    seeds), each group's runs in order, after their inputs are made here (prepare_inputs: side by side, runs would
    race to make them). SIGINT or SIGTERM stops the plan and its running cells (run_cell) and exits.
    """
    errors, todo = {}, []
    for i, r in enumerate(plan_runs):
        state, why = runs.run_state(r)
        if state == 'stale':
            errors[i] = f'stale: {why}'
        elif state == 'todo':
            error = runs.claim_folder(r)
            if error:
                errors[i] = error
            else:
                todo.append(i)
    print(f'{len(plan_runs)} runs, {len(plan_runs) - len(todo) - len(errors)} already done, {len(todo)} to run' + ''.join(
        f'\n    cannot run {plan_runs[i]["cell"]} seed {plan_runs[i]["seed"]}: {e}' for i, e in errors.items()), flush=True)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm) if on_main else None
    durations, ran, threads, numbers, numbering = [], set(), [], itertools.count(1), threading.Lock()
    parallel, cell_threads = 1, 0  # cells running at once (the ETA's divisor) and each one's torch threads (0: its own
    # choice); jobs > 1 sets them below
    STOPPING.clear()

    def run_one(i):
        r = plan_runs[i]
        with numbering:
            n = next(numbers)
        if r['out_dir'] in ran and runs.run_state(r)[0] == 'done':  # the same experiment as a cell run just now
            print(f'[{n}/{len(todo)}] {r["cell"]} seed {r["seed"]}: done, as {r.get("same_as")}', flush=True)
            return
        extra, note = runs.resume_args(r)
        eta = f', ETA {format_time(np.mean(durations) * (len(todo) - n + 1) / parallel)}' if durations else ''
        print(f'[{n}/{len(todo)}] {r["cell"]} seed {r["seed"]}: running ({len(durations)} done, {len(errors)} failed'
              f'{eta})' + (f'; {note}' if note else ''), flush=True)
        t0 = time.time()
        ran.add(r['out_dir'])
        error = run_cell(dict(r, args=r['args'] + extra, threads=cell_threads))
        durations.append(time.time() - t0)
        e, why = (None, None) if error else runs.read_eval(runs.eval_path(r))
        if error or why:
            errors[i] = error or why
            print(f'    {r["cell"]} seed {r["seed"]} ' + ('stopped with the plan' if STOPPING.is_set() else
                                                         f'failed: {errors[i]}'), flush=True)
        else:
            print(f'    {r["cell"]} seed {r["seed"]} done in {format_time(durations[-1])}: ' + ', '.join(
                f'{name} {e[k]:.3f}' for k, (name, _, _) in STABLE_SCORES.items() if e[k] is not None), flush=True)

    try:
        if jobs <= 1:
            for i in todo:
                run_one(i)
        else:
            groups = folder_groups(plan_runs, todo)
            prepare_inputs([plan_runs[i] for i in todo])
            parallel = min(jobs, len(groups))
            if parallel > 1 and 'OMP_NUM_THREADS' not in os.environ:  # side by side, the cells share the cores
                cell_threads = max(1, cores() // parallel)
            print(f'{len(groups)} groups of runs that share no folder (seeds), {parallel} side by side', flush=True)

            def worker():
                while not STOPPING.is_set():
                    try:
                        group = groups.pop(0)  # atomic: each group goes to one worker
                    except IndexError:
                        return
                    for i in group:
                        if STOPPING.is_set():
                            return
                        try:
                            run_one(i)
                        except Exception as e:  # the cell's own failure, recorded as run_one records one
                            errors[i] = f'{type(e).__name__}: {e}'
                            print(f'    {plan_runs[i]["cell"]} seed {plan_runs[i]["seed"]} failed: {errors[i]}',
                                  flush=True)

            for _ in range(parallel):
                threads.append(threading.Thread(target=worker, daemon=True))
                threads[-1].start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)  # a timed join: the main thread stays free to take SIGINT / SIGTERM
    except KeyboardInterrupt as stop:
        stop_children()
        for t in threads:
            t.join(STOP_GRACE_S)  # their cells ended: each worker records its cell and starts no other
        signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
        print(f'\nstopped by {signal.Signals(signum).name}: the running cells were stopped with the plan. Run the same '
              f'command again to go on: finished runs are kept, and an interrupted one resumes from its last '
              f'periodic checkpoint', flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return errors


def folder_groups(plan_runs, todo):
    """
    The runs of todo in groups, each in todo's order, such that runs of two groups share no folder they write (out_dir,
    text_out_dir, image_out_dir): groups may run side by side, a group's runs one after another. The seeds of a plan
    are its groups, unless it fixes text_seed, which gives all of them one text stage.
    """
    parent = {}

    def root(folder):
        while parent.setdefault(folder, folder) != folder:
            folder = parent[folder]
        return folder

    for i in todo:
        r = plan_runs[i]
        for key in ('text_out_dir', 'image_out_dir'):
            if runs.arg(r, key):
                parent[root(runs.arg(r, key))] = root(r['out_dir'])
    groups = {}
    for i in todo:
        groups.setdefault(root(plan_runs[i]['out_dir']), []).append(i)
    return list(groups.values())


def prepare_inputs(plan_runs):
    """Make what the runs read (data, shapes encoders, feature caches: prepare.prepare_run, as train.py calls it) once
    a setting, before runs start side by side; a run whose inputs fail is left to its train.py, which says why."""
    done = set()
    for r in plan_runs:
        try:
            cfg = runs.run_config(r)
            reads_images = any(train.STAGES[name].reads_images for name in cfg.stages.split(','))
            key = json.dumps([reads_images, {k: v for k, v in sorted(vars(cfg).items()) if 'out_dir' not in k}])
            if key not in done:
                done.add(key)
                prepare.prepare_run(cfg, reads_images)
        except (ConfigError, OSError, ValueError) as e:
            print(f'    {r["cell"]} seed {r["seed"]}: its inputs were not made here ({e}); its train.py will say why',
                  flush=True)
