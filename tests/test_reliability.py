"""
Reliability: SIGKILL at any step and resume bit for bit, a kill while a checkpoint is written, the NaN guard,
refusing pickled objects, and config errors before any compute.
"""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import model
import train
from configurator import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# text then image stage, a checkpoint every 2 steps, the trained patch encoder (its weights are in every checkpoint)
RUN = ['--device=cpu', '--stages=text,image', '--text_iters=10', '--save_fracs=[0.5,1.0]', '--image_inject_frac=0.5',
       '--warmup_iters=2', '--batch_size=2', '--image_iters=8', '--image_ratio=0.5', '--caption_scenes=40',
       '--conversations=40', '--log_interval=1', '--eval_interval=0', '--ckpt_interval=2', '--keep_last=2',
       '--encoder=patch', '--freeze_encoder=False', '--encoder_weights=random', '--evaluate=']


def args(out, shapes_dir, *extra):
    return RUN + [f'--data_dir={shapes_dir}', f'--out_dir={out}', f'--text_out_dir={out}/text', *extra]


def run_and_kill(cmd, prefix):
    """Run cmd, SIGKILL it as soon as it prints a line starting with prefix; returns whether it was killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    for line in proc.stdout:
        if line.startswith(prefix):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def same_bits(a, b):
    wa, wb = load_file(os.path.join(a, 'model.safetensors')), load_file(os.path.join(b, 'model.safetensors'))
    return sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, shapes_dir):
    straight = str(tmp_path / 'straight')
    train.main(train.get_config(args(straight, shapes_dir)))
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    text_step, image_step = rng.randint(2, 9), rng.randint(1, 7)
    out = str(tmp_path / 'killed')
    cmd = [sys.executable, 'train.py', *args(out, shapes_dir)]
    # killed in the text stage, resumed and killed again in the image stage, then resumed to the end
    assert run_and_kill(cmd, f'text step {text_step}/'), f'the run ended before text step {text_step} (seed {seed})'
    assert run_and_kill(cmd + ['--init_from=resume'], f'image step {image_step}/'), \
        f'the resumed run ended before image step {image_step} (seed {seed})'
    printed = subprocess.run(cmd + ['--init_from=resume'], cwd=ROOT, check=True, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS='1')).stdout
    assert 'text stage: already complete' in printed
    for ckpt in ('text/ckpt_050', 'text/ckpt_100', 'image'):
        assert same_bits(os.path.join(straight, ckpt), os.path.join(out, ckpt)), \
            f'{ckpt} differs after kills at text step {text_step} and image step {image_step} (seed {seed})'
    # keep_last=2: only the newest periodic checkpoints remain
    assert len(checkpoint.finished_checkpoints(os.path.join(out, 'image_steps'))) == 2


STALL = '''
import os, sys, time
sys.path.insert(0, {root!r})
import torch
import checkpoint
from model import GPT, GPTConfig
gpt = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
opt = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
info = {{'stage': 'text', 'step': 1, 'tokenizer': 'bytes', 'model_args': vars(gpt.config), 'config': {{}}}}
checkpoint.save_checkpoint({folder!r}, *checkpoint.full_state(gpt, opt), info)

def stall(*args, **kwargs):
    print('stalled', flush=True)
    time.sleep(120)

if {where!r} == 'weights':  # half of model.safetensors written
    save_file = checkpoint.save_file
    def partial(tensors, path, *a, **k):
        with open(path, 'wb') as f:
            f.write(b'partial bytes')
        stall()
    checkpoint.save_file = partial
else:  # between the two renames: the old checkpoint moved aside, the new one not yet in place
    replace = os.replace
    def second_stalls(src, dst):
        if src.endswith('.tmp'):
            stall()
        replace(src, dst)
    checkpoint.os.replace = second_stalls
with torch.no_grad():
    for p in gpt.parameters():
        p.add_(1.0)
checkpoint.save_checkpoint({folder!r}, *checkpoint.full_state(gpt, opt), dict(info, step=2))
'''


@pytest.mark.slow
@pytest.mark.parametrize('where', ['weights', 'rename'])
def test_kill_while_a_checkpoint_is_written_keeps_the_previous(tmp_path, where):
    folder = str(tmp_path / 'ckpt')
    script = STALL.format(root=ROOT, folder=folder, where=where)
    assert run_and_kill([sys.executable, '-c', script], 'stalled')
    assert checkpoint.read_checkpoint_info(folder)['step'] == 1  # recovered from ckpt.old after a rename kill
    loaded, info = checkpoint.load_model(folder)
    fresh = model.GPT(model.GPTConfig(**info['model_args']))
    assert not torch.equal(loaded.lm_head.weight, fresh.lm_head.weight)  # it holds trained, saved weights ...
    assert checkpoint.load_state(folder)['step'] == 1  # ... from step 1, not the half-written step 2
    gpt, _ = checkpoint.load_model(folder)
    opt = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    checkpoint.save_checkpoint(folder, *checkpoint.full_state(gpt, opt), dict(info, step=3))  # writing goes on
    assert checkpoint.read_checkpoint_info(folder)['step'] == 3 and sorted(os.listdir(tmp_path)) == ['ckpt']


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, shapes_dir, monkeypatch):
    out = str(tmp_path / 'run')
    forward = model.GPT.forward
    calls = {'n': 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls['n'] += 1
            if calls['n'] == 8:  # the batch of step 8
                loss = loss * float('nan')
        return logits, loss

    monkeypatch.setattr(model.GPT, 'forward', poisoned)
    cfg = train.get_config(args(out, shapes_dir, '--stages=text'))
    with pytest.raises(train.TrainingError, match=r'text stage, step 8: the loss or its gradient is not finite.*'
                                                  r'last good checkpoint is .*text[/\\]steps[/\\]step_000006'):
        train.main(cfg)
    before = load_file(os.path.join(out, 'text', 'ckpt_050', 'model.safetensors'))
    assert checkpoint.read_checkpoint_info(os.path.join(out, 'text', 'ckpt_050'))['step'] == 5
    assert not os.path.exists(os.path.join(out, 'text', 'ckpt_100'))  # nothing written after the bad step
    assert [s for s, _ in checkpoint.finished_checkpoints(os.path.join(out, 'text', 'steps'))] == [4, 6]
    # with max_bad_steps=1 the bad batch is dropped and the run finishes
    calls['n'] = 0
    out2 = str(tmp_path / 'skip')
    train.main(train.get_config(args(out2, shapes_dir, '--stages=text', '--max_bad_steps=1')))
    assert checkpoint.read_checkpoint_info(os.path.join(out2, 'text', 'ckpt_100'))['step'] == 10
    same = load_file(os.path.join(out2, 'text', 'ckpt_050', 'model.safetensors'))
    assert all(torch.equal(before[k], same[k]) for k in before)  # steps before the bad one are untouched


def test_a_pickled_callable_in_state_is_refused(tmp_path):
    folder = tmp_path / 'ckpt'
    folder.mkdir()
    torch.save({'step': 1, 'hook': os.system}, folder / 'state.pt')  # torch.load would call os.system on load
    with pytest.raises(RuntimeError, match=r'cannot load .*state.pt safely'):
        checkpoint.load_state(str(folder))


def test_config_errors_name_the_key_before_compute(monkeypatch, tmp_path):
    def fail(*a, **k):
        raise AssertionError('compute started')
    monkeypatch.setattr(train.runtime, 'setup_runtime', fail)
    (tmp_path / 'broken.safetensors').write_bytes(b'not a safetensors file')
    cases = {
        '--text_iters=0': 'text_iters=0: must be > 0',
        '--learning_rate=-1.0': 'learning_rate=-1.0: must be > 0',
        '--ckpt_interval=-5': 'ckpt_interval=-5: must be >= 0',
        '--finetune_text_ratio=1.0': 'finetune_text_ratio=1.0: must be in',
        '--image_inject_frac=0.5': 'image_inject_frac=0.5 is not 0 or one of save_fracs',
        '--block_size=128': 'block_size=128 cannot hold one image',
        '--data_workers=-1': 'data_workers=-1',
        '--batch_size=abc': 'batch_size',
        '--no_such_key=1': 'no_such_key',
        f'--encoder_weights={tmp_path}/broken.safetensors': 'broken.safetensors is not a readable .safetensors',
        f'--encoder_weights={tmp_path}/missing.safetensors': 'encoder weights file not found',
    }
    for flag, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('.', r'\.')):
            train.get_config([flag])


def test_dino_siglip_grids_that_differ_are_a_config_error(monkeypatch):
    import encoders
    siglip = encoders.ENCODERS['siglip']
    monkeypatch.setitem(encoders.ENCODERS, 'siglip', dataclasses.replace(
        siglip, tiny=dict(siglip.tiny, kwargs=dict(siglip.tiny['kwargs'], patch_size=16))))
    with pytest.raises(ConfigError, match=r"encoder='dino_siglip'.*one patch grid"):
        train.get_config(['--encoder=dino_siglip'])


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path, shapes_dir):
    out = str(tmp_path / 'run')
    train.main(train.get_config(args(out, shapes_dir, '--stages=text')))
    with open(os.path.join(out, 'text', 'ckpt_100', 'config.json')) as f:
        assert json.load(f)['config']['learning_rate'] == 3e-3
    with pytest.raises(checkpoint.StaleCheckpoint, match='learning_rate: 0.003 there, 0.001 here'):
        train.main(train.get_config(args(out, shapes_dir, '--stages=text', '--init_from=resume',
                                         '--learning_rate=1e-3')))

