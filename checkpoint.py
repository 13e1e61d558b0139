"""
Checkpoints of nanoVLP: one folder each, holding

    model.safetensors   the weights, named without compile / DDP / FSDP prefixes
    state.pt            the optimizer state keyed by parameter name, the step, the RNG states (weights_only tensors)
    config.json         the run's config, the model's shape, the tokenizer, for a VLM the encoder, and the
                        fingerprint of what made it (its stage's config keys, code, data and encoder weights)

A checkpoint is written to {folder}.tmp, flushed to disk, and swapped in by two renames (the old one to
{folder}.old, the new one in place), so a crash at any moment leaves a loadable checkpoint: the new one, the old one,
or the old one as {folder}.old, which recover() puts back. Nothing here unpickles code: weights are safetensors and
state.pt is read with torch.load(weights_only=True). load_model() rebuilds the model a checkpoint describes (a GPT, or
a VLM with its encoder) and loads its verified weights: the one way every script loads one.

A finished stage is reused only when its fingerprint equals the one this run would write (check_fingerprint): edit
model.py, the shapes world or a config key that defines the stage, and the old checkpoint is refused with what
differs, never silently reused.
"""

import ast
import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import socket
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from encoders import build_encoder
from model import GPT, VLM, GPTConfig


def read_checkpoint_info(folder):
    """A checkpoint's config.json (recovering one whose swap a crash interrupted)."""
    recover(folder)
    path = os.path.join(folder, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'no checkpoint at {folder} ({path} is missing): create it with '
                                f'`python train.py --stages=text` (text checkpoints go to text_out_dir/ckpt_XXX)')
    try:
        with open(path) as f:
            info = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f'{path} is not valid JSON ({str(e)[:200]}): the checkpoint is corrupt') from None
    missing = [k for k in ('stage', 'step', 'model_args') if not isinstance(info, dict) or k not in info]
    if missing:
        raise ValueError(f'{path} lacks {", ".join(missing)}: not a nanoVLP checkpoint, or a corrupt one')
    return info


def rng_state():
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            'python': [py_version, list(py_state), py_gauss]}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state['python']
    random.setstate((version, tuple(py_state), py_gauss))


def full_state(raw_model, optimizer):
    """
    The weights and the optimizer state a checkpoint stores, whole and on the CPU, keyed by parameter name (so a
    checkpoint written by an FSDP run loads into a single process and back). Under FSDP this gathers the shards: a
    collective that every rank calls. An encoder the model does not save (model.VLM.saves_encoder) is left out.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    skip_encoder = not getattr(raw_model, 'saves_encoder', True)
    # copies, so tied weights are two tensors to safetensors
    weights = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in
               get_model_state_dict(raw_model, options=options).items()
               if not (skip_encoder and k.startswith('encoder.'))}
    return weights, get_optimizer_state_dict(raw_model, optimizer, options=options)


def fsync_path(path):
    """Flush a file or a folder entry to disk: a rename is durable only once what it renames is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder, weights, optimizer_state, info, files=()):
    """
    Write a checkpoint atomically: a crash leaves the old one or the new one, never half of one. Weights that are
    not finite are refused (a NaN checkpoint must never become "the last good one"); config.json records a checksum
    of the weights and the state, which loading verifies. files: copies to put beside them.
    """
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'not writing {folder}: weights {", ".join(bad[:3])} hold NaN or inf')
    tmp = folder + '.tmp'
    recover(folder)
    shutil.rmtree(tmp, ignore_errors=True)  # what a crash left half written
    os.makedirs(tmp)
    save_file(weights, os.path.join(tmp, 'model.safetensors'))
    # a step's batch is a function of the step (data.seeded_generator): the step is the data position
    torch.save({'optimizer': optimizer_state, 'step': info['step'], 'rng': rng_state()}, os.path.join(tmp, 'state.pt'))
    info = dict(info, checksums={name: file_digest(os.path.join(tmp, name), full=True)
                                 for name in ('model.safetensors', 'state.pt')})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump(info, f, indent=1)
    for path in files:  # copies that travel with the checkpoint (a stage's metrics.jsonl)
        shutil.copy(path, tmp)
    swap_in(tmp, folder)


def swap_in(tmp, folder):
    """
    Replace folder by the complete folder tmp: every file flushed, then two renames (the old folder to {folder}.old,
    tmp into place). A crash between them leaves {folder}.old, which recover() puts back.
    """
    old = folder + '.old'
    for name in os.listdir(tmp):
        fsync_path(os.path.join(tmp, name))
    fsync_path(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_path(os.path.dirname(os.path.abspath(folder)))
    shutil.rmtree(old, ignore_errors=True)


def is_checkpoint(folder):
    """True when folder holds a finished checkpoint (one whose swap a crash interrupted is put back first)."""
    recover(folder)
    return os.path.exists(os.path.join(folder, 'config.json'))


def recover(folder):
    """Put back {folder}.old when a crash came between the two renames of save_checkpoint."""
    old = folder + '.old'
    if not os.path.exists(folder) and os.path.exists(os.path.join(old, 'config.json')):
        os.replace(old, folder)


def load_state(folder):
    """state.pt, refusing anything but tensors and plain containers: a pickled object is an error, never run."""
    path = verified(folder, 'state.pt')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses pickled code: say which file and why
        raise RuntimeError(f'cannot load {path} safely: it holds more than tensors and plain containers '
                           f'(torch.load with weights_only=True said: {e}). nanoVLP never unpickles objects from a '
                           f'checkpoint; if you wrote this file yourself, save only tensors, numbers and strings') from e
    except Exception as e:  # a truncated zip, a file of another kind
        raise RuntimeError(f'cannot read {path}: it is truncated or corrupt ({str(e)[:200]})') from e


def verified(folder, name):
    """The path of a checkpoint file whose bytes match the checksum config.json recorded for it."""
    path = os.path.join(folder, name)
    has_info = os.path.exists(os.path.join(folder, 'config.json'))
    expected = read_checkpoint_info(folder).get('checksums', {}).get(name) if has_info else None
    if expected is not None and (not os.path.isfile(path) or file_digest(path, full=True) != expected):
        raise ValueError(f'{path} does not match the checksum its config.json recorded: it was truncated, damaged '
                         f'or replaced after it was written; use another checkpoint')
    return path


def load_weights(model, folder, verify=True):
    """
    A checkpoint's model.safetensors into model, strictly, but for an encoder the model does not save (it was
    rebuilt from its recorded source). A mismatch names the file and the keys. verify=False: the caller has just
    checked the file against its checksum (check_shapes does), so it is not read twice.
    """
    path = verified(folder, 'model.safetensors') if verify else os.path.join(folder, 'model.safetensors')
    try:
        state = load_file(path)
    except Exception as e:  # safetensors' error names neither the file nor what to do
        raise ValueError(f'{path} is truncated or corrupt ({str(e)[:200]})') from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not getattr(model, 'saves_encoder', True):
        missing = [k for k in missing if not k.startswith('encoder.')]
    if missing or unexpected:
        raise ValueError(f'{path} does not fit the model in its config.json: missing {missing[:5]}, '
                         f'unexpected {unexpected[:5]}')
    return model


def check_shapes(skeleton, folder, encoder_saved=True):
    """
    The tensors of folder's model.safetensors, read from its header (nothing allocated), must be those of skeleton,
    the model its config.json describes (built on the meta device; its encoder's tensors are expected only when the
    checkpoint saved them). Raises ValueError naming what differs.
    """
    path = verified(folder, 'model.safetensors')
    try:
        with safe_open(path, 'pt') as f:
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f'{path} is truncated or corrupt ({str(e)[:200]})') from None
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()
                if encoder_saved or not k.startswith('encoder.')}
    wrong = [f'{k} {stored[k]} (config.json: {v})' for k, v in expected.items() if k in stored and stored[k] != v]
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if wrong or missing or unexpected:
        raise ValueError(f'{path} does not hold the model its config.json describes: {len(wrong)} tensors of another '
                         f'shape {wrong[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}')


def build_model(info, skeleton=False):
    """
    A GPT, or a VLM with its encoder, of the shape recorded in a checkpoint's config.json (weights: see below).
    skeleton: every encoder random, nothing read from disk: for a model built on the meta device to compare shapes.
    """
    try:
        gpt = GPT(GPTConfig(**info['model_args']))
        if 'encoder' not in info:
            return gpt
        e = info['encoder']
        name, scale, saved, frozen, img_size = e['name'], e['scale'], e['saved'], e['frozen'], e['img_size']
        projector, image_token, inject_layer = e['projector'], e['image_token'], e['inject_layer']
    except (TypeError, KeyError) as err:
        raise ValueError(f'config.json does not describe a nanoVLP model ({type(err).__name__}: {err})') from None
    # an encoder whose weights the checkpoint holds starts random; a frozen one is rebuilt from its recorded source,
    # which must still be the file it was made with
    weights = 'random' if saved or skeleton else e['weights']
    for name_, digest in ({} if saved or skeleton else e.get('weights_digest', {})).items():
        path = weights[name_] if isinstance(weights, dict) else weights
        if not os.path.isfile(path) or file_digest(path) != digest:
            raise ValueError(f'the frozen encoder of this checkpoint is rebuilt from {path}, which is missing or '
                             f'is no longer the file it was trained with (pre-trained again?): restore that file, '
                             f'or train the image stage again')
    encoder = build_encoder(name, scale, weights, img_size, freeze=frozen)
    return VLM(gpt, encoder, image_token, projector, inject_layer)


def load_model(ckpt_dir, device='cpu'):
    """
    Rebuild the model saved in ckpt_dir; returns (model in eval mode, the checkpoint's config.json). Its shape is
    checked against model.safetensors' header on the meta device first: a config.json that claims a larger model
    than its weights is an error before anything is allocated.
    """
    info = read_checkpoint_info(ckpt_dir)
    with torch.device('meta'):
        check_shapes(build_model(info, skeleton=True), ckpt_dir, info.get('encoder', {}).get('saved', True))
    model = load_weights(build_model(info), ckpt_dir, verify=False)  # check_shapes verified the file
    return model.to(device).eval(), info


def resume(found, made_by, model, allow_stale=False, warn=print):
    """
    The newest of the finished checkpoints found, [(step, folder)]: its fingerprint checked against made_by, its
    weights loaded into model. Returns (step, folder, its state.pt).
    """
    step, folder = max(found)
    check_fingerprint(folder, made_by, allow_stale, warn)
    load_weights(model, folder)
    return step, folder, load_state(folder)


def load_optimizer_state(raw_model, optimizer, optimizer_state, sharded=False):
    """Load a checkpoint's optimizer state (keyed by parameter name) into this run's optimizer, sharded or not."""
    options = StateDictOptions(full_state_dict=True) if sharded else None
    set_optimizer_state_dict(raw_model, optimizer, optimizer_state, options=options)


def finished_checkpoints(folder):
    """Finished checkpoints directly inside folder, as (step, path), oldest first; interrupted writes recovered."""
    found = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith('.old'):
                recover(os.path.join(folder, name[:-len('.old')]))
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not name.endswith(('.tmp', '.old')) and os.path.exists(os.path.join(path, 'config.json')):
                found.append((read_checkpoint_info(path)['step'], path))
    return sorted(found)


def prune(folder, keep_last):
    """Delete all but the newest keep_last checkpoints in folder (the periodic ones of a stage)."""
    for _, path in finished_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(path)


# -----------------------------------------------------------------------------
# fingerprints: what made a checkpoint, so that a stale one is never reused silently

class StaleCheckpoint(ValueError):
    """A finished checkpoint that other code, data or settings made: the message says what differs."""


def code_digest(path):
    """
    A digest of a module's code with comments and docstrings left out (its syntax tree): a comment edit keeps a
    checkpoint, any change to what the code does makes it stale.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        body = getattr(node, 'body', None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:16]


_digests = {}


def file_digest(path, full=False):
    """
    sha256 of a file's bytes (its first 16 hex digits), remembered per path, size and mtime within a process; full:
    read it again every time (a checksum must see the bytes on disk now).
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if full or key not in _digests:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 24), b''):
                h.update(block)
        _digests[key] = h.hexdigest()[:16]
    return _digests[key]


def fingerprint_differences(made, expected):
    """What differs between the fingerprint a checkpoint holds and the one expected, as phrases."""
    found = []
    for section in sorted(set(made) | set(expected)):
        there, here = made.get(section, {}), expected.get(section, {})
        for key in sorted(set(there) | set(here), key=str):
            if there.get(key) != here.get(key):
                found.append(f'{key}: {there.get(key)!r} there, {here.get(key)!r} here' if section == 'config' else
                             f'{section} {key} differs ({there.get(key)} there, {here.get(key)} here)')
    return found


def check_fingerprint(folder, expected, allow_stale=False, warn=print):
    """
    Nothing when folder's checkpoint was made by what the fingerprint `expected` describes; otherwise
    StaleCheckpoint naming the differences, or with allow_stale a warning and nothing.
    """
    made = read_checkpoint_info(folder).get('fingerprint')
    differences = fingerprint_differences(made, expected) if made else ['it records no fingerprint']
    if not differences:
        return
    message = f'{folder} was made by other code, data or settings: {"; ".join(differences)}'
    if allow_stale:
        warn(f'warning: {message}. Reusing it anyway (allow_stale=True)')
        return
    raise StaleCheckpoint(f'{message}. Run into another folder (out_dir, text_out_dir), delete it, or pass '
                          f'--allow_stale=True to reuse it knowingly')


# -----------------------------------------------------------------------------
# one writer per folder: a run locks the folders it writes, so two runs never overwrite each other's checkpoints

class FolderLocked(RuntimeError):
    """Another live run holds the lock of a folder this run would write: the message names it."""


def acquire_lock(folder):
    """
    Lock folder for this process: {folder}/LOCK holds our pid, host and start time, created only if absent. A lock
    whose process is gone (same host, pid not running) is stale, from a crash, and taken over. A live holder, or one
    on another host, is FolderLocked. Returns the lock's path, for release_lock.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'LOCK')
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(path)
            if holder == {}:
                continue  # released in between
            if holder is None or (holder.get('host') == me['host'] and not pid_running(holder.get('pid'))):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # stale (or unreadable): its run is gone
                continue
            raise FolderLocked(f'{folder} is being written by another run (pid {holder.get("pid")} on '
                               f'{holder.get("host")}, since {holder.get("started")}): wait for it to finish, choose '
                               f'another out_dir / text_out_dir, or delete {path} if that run is gone') from None
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        return path
    raise FolderLocked(f'{path}: could not take the lock (another run takes it at the same time)')


def lock_holder(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}  # released in between: try again
    except ValueError:
        time.sleep(0.1)  # being written right now
        with open(path) as f, contextlib.suppress(ValueError):
            return json.load(f)
        return None


def pid_running(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # alive under another user (or unreadable: assume alive, refuse rather than overwrite)
    return True


def release_lock(path):
    """Remove a lock this process holds (one that another process took over is left alone)."""
    if (lock_holder(path) or {}).get('pid') == os.getpid():
        os.remove(path)
