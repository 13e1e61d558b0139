"""A finished stage is reused only when what made it is what this run would make: config, code, data, weights."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import prepare
import train
from configurator import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ['--stages=text', '--block_size=64', '--batch_size=4', '--text_iters=4', '--save_fracs=[0.5,1.0]',
        '--warmup_iters=1', '--log_interval=2', '--eval_interval=0', '--device=cpu']


def test_code_digest_ignores_comments_and_docstrings_only(tmp_path):
    a, b, c = tmp_path / 'a.py', tmp_path / 'b.py', tmp_path / 'c.py'
    a.write_text('"""A module."""\n\ndef f(x):\n    """Twice x."""\n    return 2 * x  # doubled\n')
    b.write_text('"""Another docstring."""\n# a new comment\n\ndef f(x):\n\n    return 2 * x\n')
    c.write_text('"""A module."""\n\ndef f(x):\n    """Twice x."""\n    return 3 * x  # doubled\n')
    assert checkpoint.code_digest(a) == checkpoint.code_digest(b) != checkpoint.code_digest(c)


# most of the grammar a project's code uses, its digest pinned at the value Python 3.11 gives: 3.12's ast.dump adds
# type_params=[] to every function and class, 3.13's leaves empty fields out, and code_digest must undo both, or a run
# made under one Python (an H200 machine's 3.12) is stale under another and its shapes world is written again
GRAMMAR = '''"""A module with most of the grammar a project's code uses."""
import os
from typing import Optional


@staticmethod
def f(x: int, *args, y: Optional[int] = None, **kw) -> int:
    """Twice x."""
    return 2 * x if y is None else [i async for i in y]


class A(object):
    z: int = 3

    async def g(self):
        with open(os.devnull) as fh, open(os.devnull):
            try:
                return {k: v for k, v in kw.items()}, lambda a=1: a, f'{self!r:>4}'
            except (OSError, ValueError) as e:
                raise RuntimeError from e
            finally:
                del fh
'''


def test_code_digest_is_the_same_on_every_python(tmp_path):
    path = tmp_path / 'grammar.py'
    path.write_text(GRAMMAR)
    assert checkpoint.code_digest(path) == 'b3a2f97dc796fa3e'


def test_a_new_key_defines_every_stage_until_declared_otherwise(shapes_dir):
    cfg = train.get_config([f'--data_dir={shapes_dir}'])
    prep = prepare.prepare_run(train.get_config([f'--data_dir={shapes_dir}', '--stages=text']), False, verbose=False)
    cfg.some_new_key = 3  # a key someone adds to train.py and forgets to classify
    assert train.fingerprint(cfg, 'text', prep)['config']['some_new_key'] == 3
    assert 'image_iters' not in train.fingerprint(cfg, 'text', prep)['config']  # declared: read by image stages only
    assert 'out_dir' not in train.fingerprint(cfg, 'text', prep)['config']  # declared: where, not what


def copy_of_the_code(tmp_path):
    code = tmp_path / 'code'
    code.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            shutil.copy(os.path.join(ROOT, name), code / name)
    return code


def test_changed_model_code_is_never_reused_silently(tmp_path, shapes_dir, monkeypatch, capsys):
    code = copy_of_the_code(tmp_path)
    monkeypatch.setattr(prepare, 'HERE', str(code))  # the fingerprint reads the code from here
    args = TEXT + [f'--data_dir={shapes_dir}', f'--text_out_dir={tmp_path}/text', f'--out_dir={tmp_path}']
    train.main(train.get_config(args))
    train.main(train.get_config(args))
    assert 'text stage: already complete' in capsys.readouterr().out  # nothing changed: reused
    with open(code / 'model.py', 'a') as f:
        f.write('\nPRESETS["demo"] = dict(PRESETS["demo"])  # a line of code\n')
    with pytest.raises(checkpoint.StaleCheckpoint, match=r'code model.py differs.*--allow_stale=True'):
        train.main(train.get_config(args))
    train.main(train.get_config(args + ['--allow_stale=True']))
    printed = capsys.readouterr().out
    assert 'warning:' in printed and 'code model.py differs' in printed and 'already complete' in printed


def test_a_stage_asks_for_its_input_and_does_not_run_it(tmp_path, shapes_dir):
    args = [f'--data_dir={shapes_dir}', f'--out_dir={tmp_path}/run', f'--text_out_dir={tmp_path}/text',
            '--stages=image', '--encoder_weights=random', '--device=cpu']
    with pytest.raises(ConfigError, match=r'ckpt_080 does not exist: run the text stage first'):
        train.get_config(args)  # before any compute


def test_a_frozen_encoder_rebuilt_from_a_changed_file_is_refused(tmp_path):
    path = str(tmp_path / 'siglip.safetensors')
    save_file({'x': torch.zeros(2)}, path)
    info = {'model_args': {'block_size': 64, 'vocab_size': 320, 'n_layer': 1, 'n_head': 1, 'n_embd': 16},
            'encoder': {'name': 'siglip', 'scale': 'tiny', 'weights': path, 'img_size': 48, 'frozen': True,
                        'saved': False, 'projector': 'mlp', 'inject_layer': 0, 'image_token': 257,
                        'weights_digest': {'weights': checkpoint.file_digest(path)}}}
    save_file({'x': torch.ones(2)}, path)  # pre-trained again after the checkpoint was made (minutes later)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    with pytest.raises(ValueError, match='no longer the file it was trained with'):
        checkpoint.build_model(info)


def test_a_checkpoint_without_its_frozen_encoder_loads_it_from_the_recorded_file(tmp_path):
    import encoders
    from types import SimpleNamespace
    from model import VLM, GPT, GPTConfig
    path = str(tmp_path / 'siglip.safetensors')
    timm_model = encoders.create_timm_model('siglip', 'tiny', 'random', 48)
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, path)
    gpt = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=1, n_embd=16))
    vlm = VLM(gpt, encoders.build_encoder('siglip', weights=path, freeze=True), 257)
    assert not vlm.saves_encoder
    info = {'stage': 'image', 'step': 1, 'iters': 1, 'tokenizer': 'bytes', 'config': {},
            **prepare.vlm_info(SimpleNamespace(projector='mlp'), vlm)}
    weights, state = checkpoint.full_state(vlm, vlm.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu'))
    assert not any(k.startswith('encoder.') for k in weights)  # the file holds the rest only
    checkpoint.save_checkpoint(str(tmp_path / 'ck'), weights, state, info)
    loaded, _ = checkpoint.load_model(str(tmp_path / 'ck'))
    for (k, a), (_, b) in zip(vlm.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_every_module_a_stage_runs_is_in_its_fingerprint(tmp_path, shapes_dir, monkeypatch):
    """Each stage, traced: every project module whose code ran while it trained is fingerprinted, or is declared
    in prepare.NOT_FINGERPRINTED with the reason its code does not decide the checkpoint."""
    ran, current = {}, []

    def profile(frame, event, arg):
        if event == 'call' and current:
            path = frame.f_code.co_filename
            if path.endswith('.py') and os.path.dirname(os.path.abspath(path)) == ROOT:
                ran.setdefault(current[-1], set()).add(os.path.basename(path))

    train_stage = train.train_stage

    def traced(cfg, rt, clock, prep, name, *args):
        current.append(name)
        try:
            return train_stage(cfg, rt, clock, prep, name, *args)
        finally:
            current.pop()

    monkeypatch.setattr(train, 'train_stage', traced)
    out = str(tmp_path / 'run')
    cfg = train.get_config(TEXT[1:] + [f'--data_dir={shapes_dir}', f'--out_dir={out}', f'--text_out_dir={out}/text',
                                       '--image_inject_frac=0.5', '--image_iters=2', '--caption_scenes=40',
                                       '--conversations=40', '--finetune_epochs=1', '--rewarm_iters=1',
                                       '--encoder_weights=random', '--eval_items=10', '--block_size=256'])
    sys.setprofile(profile)
    try:
        train.main(cfg)
    finally:
        sys.setprofile(None)
    assert set(ran) == set(train.STAGES)
    for name, modules in ran.items():
        kind = train.STAGES[name]
        hashed = set(train.fingerprint(cfg, name, prepare.Prepared(os.path.join(shapes_dir, 'shapes'), None,
                                                                    'random'))['code'])
        assert modules - hashed - set(prepare.NOT_FINGERPRINTED) == set(), name
        assert {'model.py', 'data.py', 'runtime.py', 'train.py'} <= modules & hashed  # the trace sees the core
        assert ('encoders.py' in modules & hashed) == kind.reads_images
