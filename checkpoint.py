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

Files others may have put in place (config.json, state.pt) are read only when they are regular files of a bounded
size: a FIFO or /dev/zero is an error naming it, never a hang. One run writes a folder at a time: locks.py.
"""

import ast
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import stat
import typing

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from encoders import build_encoder
from model import GPT, VLM, GPTConfig


def read_file(path, max_bytes):
    """
    The bytes of a small file that a user or another run may have put there: it must be a regular file (a FIFO
    would block the read, /dev/zero never end it) of at most max_bytes. Raises ValueError naming the path;
    FileNotFoundError when it is missing.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opened without O_NONBLOCK waits for a writer
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = 'a folder' if stat.S_ISDIR(mode) else 'a FIFO' if stat.S_ISFIFO(mode) else 'a device or socket'
        raise ValueError(f'{path} is {kind}, not a regular file: move it away')
    with os.fdopen(fd, 'rb') as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f'{path} is larger than {max_bytes:,} bytes: not a file nanoVLP wrote; move it away')
    return raw


def read_json(path, max_bytes=64 * 2 ** 20):
    """A JSON file read through read_file; ValueError naming the path for one that is truncated or not JSON."""
    raw = read_file(path, max_bytes)
    try:
        return json.loads(raw.decode('utf-8'))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f'{path} is not valid JSON ({str(e)[:200]}): truncated or damaged') from None


def read_checkpoint_info(folder):
    """A checkpoint's config.json (recovering one whose swap a crash interrupted)."""
    recover(folder)
    path = os.path.join(folder, 'config.json')
    if not os.path.lexists(path):
        raise FileNotFoundError(f'no checkpoint at {folder} ({path} is missing): create it with '
                                f'`python train.py --stages=text` (text checkpoints go to text_out_dir/ckpt_XXX)')
    try:
        info = read_json(path)
    except FileNotFoundError:  # a dangling symlink
        raise ValueError(f'{path} is a link to nothing: the checkpoint is corrupt') from None
    except ValueError as e:
        raise ValueError(f'{e}: the checkpoint is corrupt') from None
    missing = [k for k in ('stage', 'step', 'model_args') if not isinstance(info, dict) or k not in info]
    if missing:
        raise ValueError(f'{path} lacks {", ".join(missing)}: not a nanoVLP checkpoint, or a corrupt one')
    if not isinstance(info['step'], int) or isinstance(info['step'], bool) or info['step'] < 0:
        raise ValueError(f'{path}: step={info["step"]!r} is not a step number: the checkpoint is corrupt')
    if not isinstance(info.get('checksums', {}), dict):
        raise ValueError(f'{path}: checksums={info["checksums"]!r}, expected {{file: digest}}: the file was edited or '
                         f'damaged; use another checkpoint')
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
    if expected is None and os.path.lexists(path) and not os.path.isfile(path):  # a FIFO would block the read
        raise ValueError(f'{path} is not a regular file: the checkpoint is corrupt; use another checkpoint')
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


# the largest a model_args int of config.json may be (the 1b preset is 24 x 16 x 2048; Llama 3 reads 2 ** 17 tokens);
# any other int of model.GPTConfig is at most 2 ** 20, and a float finite and > 0
MODEL_ARGS_MAX = {'block_size': 2 ** 17, 'vocab_size': 2 ** 22, 'n_layer': 1024, 'n_head': 1024, 'n_kv_head': 1024,
                  'n_embd': 2 ** 16}


def check_model_args(args, where='config.json'):
    """
    A checkpoint's model_args, before a model is built from them: known keys, each of its type and in its range,
    n_embd a multiple of n_head with an even head width (rotary halves). Raises ValueError naming the key.
    """
    if not isinstance(args, dict):
        raise ValueError(f'{where}: model_args={args!r:.80} is not an object: the checkpoint is corrupt')
    hints = typing.get_type_hints(GPTConfig)
    for key, value in args.items():
        if key not in hints:
            raise ValueError(f'{where}: model_args holds an unknown key {key!r}: not a nanoVLP checkpoint, or '
                             f'one of a newer version')
        kinds = typing.get_args(hints[key]) or (hints[key],)  # Optional[int]: (int, NoneType)
        if value is None and type(None) in kinds:
            continue
        kind = kinds[0]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is bool:
            ok, rule = isinstance(value, bool), 'true or false'
        elif kind is int:
            top = MODEL_ARGS_MAX.get(key, 2 ** 20)
            ok, rule = isinstance(value, int) and number and 1 <= value <= top, f'an int in [1, {top}]'
        else:
            ok, rule = number and math.isfinite(value) and value > 0, 'a finite number > 0'
        if not ok:
            raise ValueError(f'{where}: model_args {key}={value!r:.80} must be {rule}: the checkpoint is corrupt or '
                             f'was edited')
    n_embd, n_head = args.get('n_embd', GPTConfig.n_embd), args.get('n_head', GPTConfig.n_head)
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError(f'{where}: model_args n_embd={n_embd} is not n_head={n_head} heads of an even width: '
                         f'the checkpoint is corrupt or was edited')


def build_model(info, skeleton=False):
    """
    A GPT, or a VLM with its encoder, of the shape recorded in a checkpoint's config.json (weights: see below).
    skeleton: every encoder random, nothing read from disk: for a model built on the meta device to compare shapes.
    """
    check_model_args(info['model_args'])
    try:
        gpt = GPT(GPTConfig(**info['model_args']))
        if 'encoder' not in info:
            return gpt
        e = info['encoder']
        name, scale, saved, frozen, img_size = e['name'], e['scale'], e['saved'], e['frozen'], e['img_size']
        projector, image_token, inject_layer = e['projector'], e['image_token'], e['inject_layer']
    except (TypeError, KeyError) as err:
        raise ValueError(f'config.json does not describe a nanoVLP model ({type(err).__name__}: {err})') from None
    for key, value, low, top in (('img_size', img_size, 1, 4096), ('image_token', image_token, 0,
                                                                     gpt.config.vocab_size - 1),
                                 ('inject_layer', inject_layer, 0, gpt.config.n_layer - 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
            raise ValueError(f'config.json: encoder {key}={value!r:.80} must be an int in [{low}, {top}]: the '
                             f'checkpoint is corrupt or was edited')
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
    check_model_args(info['model_args'], os.path.join(ckpt_dir, 'config.json'))  # the error names the file
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
    """
    Finished checkpoints directly inside folder, as (step, path), oldest first; interrupted writes recovered. One
    whose config.json cannot be read is not finished: it is left out (and left alone).
    """
    found = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith('.old'):
                recover(os.path.join(folder, name[:-len('.old')]))
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not name.endswith(('.tmp', '.old')) and os.path.exists(os.path.join(path, 'config.json')):
                try:
                    found.append((read_checkpoint_info(path)['step'], path))
                except ValueError:
                    continue
    return sorted(found)


def prune(folder, keep_last, written=None):
    """
    Delete the periodic checkpoints of a stage in folder but the keep_last newest. written: the checkpoint this run
    has just written: it and the keep_last - 1 highest steps below it are kept, and the checkpoints of higher steps,
    which another (older, longer) run left and this run would write again, go; ranking by step alone would keep
    those and delete this run's own.
    """
    found = finished_checkpoints(folder)
    if written is not None:
        step = next((s for s, p in found if os.path.samefile(p, written)), None)
        if step is None:
            raise ValueError(f'prune: {written} is not a finished checkpoint in {folder}')
        for _, path in [(s, p) for s, p in found if s > step]:
            shutil.rmtree(path)
        found = [(s, p) for s, p in found if s <= step and not os.path.samefile(p, written)] + [(step, written)]
    for _, path in found[:-keep_last]:
        shutil.rmtree(path)


# -----------------------------------------------------------------------------
# fingerprints: what made a checkpoint, so that a stale one is never reused silently

class StaleCheckpoint(ValueError):
    """A finished checkpoint that other code, data or settings made: the message says what differs."""


def code_digest(path):
    """
    A digest of a module's code with comments and docstrings left out (its syntax tree): a comment edit keeps a
    checkpoint, any change to what the code does makes it stale. The same code has the same digest on every Python
    from 3.11: the tree is written out as 3.11 writes it, without the fields later versions added to the grammar
    (type_params, 3.12) where the code does not use them, and with the empty fields 3.13 stopped writing. Else a
    run made under one Python would be stale under another, and the shapes world made again under a new name.
    """
    with open(path, 'rb') as f:
        source = f.read()
    key = hashlib.sha256(source).hexdigest()  # the same bytes parse to the same tree: parsed once per process
    if key not in _code_digests:
        tree = ast.parse(source, path)
        for node in ast.walk(tree):
            body = getattr(node, 'body', None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
            if getattr(node, 'type_params', None) == []:
                del node.type_params  # ast.dump leaves out a field the node lacks
        _code_digests[key] = hashlib.sha1(ast.dump(tree, **_DUMP_EMPTY).encode()).hexdigest()[:16]
    return _code_digests[key]


_code_digests = {}
_DUMP_EMPTY = {'show_empty': True} if 'show_empty' in inspect.signature(ast.dump).parameters else {}  # 3.13+


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
