import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import eval as ev
import shapes
import train
from configurator import ConfigError
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--stages=text', '--block_size=64', '--batch_size=4', '--text_iters=12', '--save_fracs=[0.5,1.0]',
        '--warmup_iters=2', '--log_interval=4', '--eval_interval=6', '--eval_iters=2', '--device=cpu']


def run(tmp_path, shapes_dir, *extra, name='text'):
    out = str(tmp_path / name)
    cfg = train.get_config(FAST + [f'--data_dir={shapes_dir}', f'--text_out_dir={out}', f'--out_dir={tmp_path}',
                                   *extra])
    train.main(cfg)
    return out


def weights(folder):
    return load_file(os.path.join(folder, 'model.safetensors'))


@pytest.mark.slow
def test_text_stage_writes_checkpoints_in_design_format(tmp_path, shapes_dir, capsys):
    out = run(tmp_path, shapes_dir)
    assert sorted(os.listdir(out)) == ['ckpt_050', 'ckpt_100', 'metrics.jsonl']  # nothing .tmp or .old left behind
    for name in ('ckpt_050', 'ckpt_100'):
        assert sorted(os.listdir(os.path.join(out, name))) == ['config.json', 'eval.json', 'model.safetensors',
                                                                'state.pt']
    info = checkpoint.read_checkpoint_info(os.path.join(out, 'ckpt_050'))
    assert (info['stage'], info['step'], info['tokenizer']) == ('text', 6, 'bytes')
    assert all(not k.startswith(('_orig_mod', 'module')) for k in weights(os.path.join(out, 'ckpt_100')))
    printed = capsys.readouterr().out
    assert 'text step 12/12' in printed and 'eta' in printed and 'val loss' in printed


@pytest.mark.slow
def test_eval_json_has_design_keys(tmp_path, shapes_dir):
    out = run(tmp_path, shapes_dir)
    result = ev.evaluate_checkpoint(os.path.join(out, 'ckpt_100'), data_dir=shapes_dir, verbose=False)
    for key in ('vision_stable_score', 'text_stable_score', 'vision_blind_stable_score', 'text_stable_score_ci95'):
        assert key in result
    assert result['vision_stable_score'] is None  # a text-only model has no vision score
    assert set(result['tasks']) == set(shapes.TEXT_TASKS)
    for task in result['tasks'].values():
        assert set(task) >= {'modality', 'accuracy', 'chance', 'centered', 'n', 'ci95'}
        assert task['chance'] == 0.25 and task['n'] == 24


def test_checkpoint_round_trip_is_exact(tmp_path):
    gpt = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, tie_embeddings=True))
    opt = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    gpt(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))[1].backward()
    opt.step()
    info = {'stage': 'text', 'step': 1, 'tokenizer': 'bytes', 'model_args': vars(gpt.config), 'config': {}}
    checkpoint.save_checkpoint(str(tmp_path / 'ck'), *checkpoint.full_state(gpt, opt), info)
    loaded, _ = checkpoint.load_model(str(tmp_path / 'ck'))
    for (k, a), (_, b) in zip(gpt.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.lm_head.weight is loaded.wte.weight
    state = checkpoint.load_state(str(tmp_path / 'ck'))
    assert state['step'] == 1
    opt2 = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    checkpoint.load_optimizer_state(gpt, opt2, state['optimizer'])
    assert torch.equal(opt2.state_dict()['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, shapes_dir):
    straight = run(tmp_path, shapes_dir, name='straight')
    interrupted = run(tmp_path, shapes_dir, name='interrupted')
    torch.manual_seed(999)  # resuming must restore the RNG, not depend on it
    import shutil
    shutil.rmtree(os.path.join(interrupted, 'ckpt_100'))  # as if killed after the step-6 checkpoint
    run(tmp_path, shapes_dir, '--init_from=resume', name='interrupted')
    a, b = weights(os.path.join(straight, 'ckpt_100')), weights(os.path.join(interrupted, 'ckpt_100'))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_finished_text_stage_is_reused_and_other_settings_refused(tmp_path, shapes_dir, capsys):
    out = run(tmp_path, shapes_dir)
    before = os.path.getmtime(os.path.join(out, 'ckpt_100', 'model.safetensors'))
    run(tmp_path, shapes_dir)
    assert 'already complete' in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, 'ckpt_100', 'model.safetensors')) == before
    with pytest.raises(checkpoint.StaleCheckpoint, match=r'learning_rate: 0.003 there, 0.001 here'):
        run(tmp_path, shapes_dir, '--learning_rate=1e-3')


def test_config_errors_before_compute(tmp_path):
    with pytest.raises(ConfigError, match='not divisible'):
        train.runtime.setup_runtime(train.get_config(['--batch_size=6', '--gradient_accumulation_steps=4']))
    with pytest.raises(ConfigError, match="unknown stage 'txt'"):
        train.get_config(['--stages=txt'])
    with pytest.raises(ConfigError, match='must be distinct'):
        train.get_config(['--text_iters=3', '--save_fracs=[0.2,0.3]'])
    with pytest.raises(ConfigError, match='did you mean text_iters'):
        train.get_config(['--text_iter=3'])


def test_cosine_schedule():
    lr = lambda s: train.cosine_lr(s, peak=1.0, warmup=10, total=110, floor=0.1)
    assert lr(0) == pytest.approx(1 / 11) and lr(9) == pytest.approx(10 / 11)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    # no warmup: from the peak (a reached LR) straight down to the floor
    assert train.cosine_lr(0, 0.4, 0, 110, 0.1) == pytest.approx(0.4)
    assert train.cosine_lr(55, 0.4, 0, 110, 0.1) == pytest.approx(0.25)
    assert train.cosine_lr(110, 0.4, 0, 110, 0.1) == pytest.approx(0.1)


@pytest.mark.slow
def test_log_lines_go_to_metrics_jsonl_and_to_wandb_when_switched_on(tmp_path, shapes_dir, monkeypatch):
    logged = []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append('finished')

    fake = type(sys)('wandb')  # the package itself is optional: this stands in for it
    fake.init = lambda project, name, config: Run()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    out = run(tmp_path, shapes_dir, '--wandb_log=True')
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    assert [r['step'] for r in lines if 'loss' in r] == [4, 8, 12] and [r['step'] for r in lines if 'val_loss' in r] == [6, 12]
    assert [step for step, _ in logged[:-1]] == [r['global_step'] for r in lines] and logged[-1] == 'finished'
    assert logged[0][1]['text/loss'] == lines[0]['loss']
