"""
torchrun on the CPU (gloo): DDP and FSDP runs of every stage equal a single process with the same global batch, FSDP
checkpoints load into a single process and back, and torch.compile compiles once per stage.
"""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import run_train

# every stage, with an unfrozen encoder (its gradients cross the ranks too) and image-caption rows whose scored
# target counts differ, so an unweighted mean over micro-batches would not match
TINY = ['--device=cpu', '--text_iters=10', '--save_fracs=[0.5,1.0]', '--image_inject_frac=0.5', '--warmup_iters=2',
        '--batch_size=4', '--image_iters=4', '--image_ratio=0.5', '--caption_scenes=40', '--conversations=40',
        '--finetune_epochs=1', '--rewarm_iters=1', '--log_interval=2', '--encoder=vit', '--freeze_encoder=False',
        '--encoder_weights=random', '--evaluate=']  # weights compared, not scores
STAGES = ('text/ckpt_050', 'text/ckpt_100', 'image', 'finetune')


def launch(out, shapes_dir, *extra, ranks=0):
    """train.py in a subprocess: plain python, or torchrun with `ranks` processes."""
    args = TINY + [f'--data_dir={shapes_dir}', f'--out_dir={out}', f'--text_out_dir={out}/text', *extra]
    return run_train(args, ranks)


def assert_same_weights(a, b, atol):
    wa, wb = load_file(os.path.join(a, 'model.safetensors')), load_file(os.path.join(b, 'model.safetensors'))
    assert sorted(wa) == sorted(wb)
    for k in wa:  # Adam turns float-order differences of tiny gradients into ~lr-sized ones: hence atol
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope='module')
def single(tmp_path_factory, shapes_dir):
    out = str(tmp_path_factory.mktemp('single'))
    launch(out, shapes_dir)
    return out


@pytest.fixture(scope='module')
def sharded(tmp_path_factory, shapes_dir):
    """Every stage under FSDP on 2 ranks: compared with one process, and its checkpoints loaded by one process."""
    out = str(tmp_path_factory.mktemp('fsdp'))
    launch(out, shapes_dir, '--fsdp=True', ranks=2)
    return out


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
@pytest.mark.slow
def test_two_ranks_equal_one_process_in_every_stage(single, shapes_dir, tmp_path, mode, request):
    if mode == 'ddp':  # 2 ranks x 2 micro-steps of one row
        out = str(tmp_path / mode)
        printed = launch(out, shapes_dir, '--gradient_accumulation_steps=2', '--data_workers=1', ranks=2)
        assert printed.count('weights identical on all 2 ranks') == 3
    else:
        out = request.getfixturevalue('sharded')
    for stage in STAGES:
        assert_same_weights(os.path.join(single, stage), os.path.join(out, stage), atol=2e-3)
    # the text stage has no uneven targets: there the match is to float rounding
    assert_same_weights(os.path.join(single, 'text/ckpt_100'), os.path.join(out, 'text/ckpt_100'), atol=1e-4)


@pytest.mark.slow
def test_ddp_gradients_match_their_bucket_views(shapes_dir, tmp_path):
    # DINOv2's register tokens are [1, 4, d]: with one image in a batch their gradient was a strided slice, and DDP
    # printed "Grad strides do not match bucket view strides" and copied it every step
    printed = launch(str(tmp_path), shapes_dir, '--stages=text,image', '--encoder=dino_siglip', '--image_ratio=0.25',
                     ranks=1)
    assert 'image step 4/4' in printed
    assert 'Grad strides do not match' not in printed


@pytest.mark.slow
def test_fsdp_checkpoints_load_into_one_process_and_back(single, sharded, shapes_dir, tmp_path):
    # one process resumes from the FSDP run's ckpt_050 (weights and the optimizer state keyed by name) ...
    resumed = str(tmp_path / 'resumed')
    shutil.copytree(os.path.join(sharded, 'text/ckpt_050'), os.path.join(resumed, 'text/ckpt_050'))
    printed = launch(resumed, shapes_dir, '--stages=text', '--init_from=resume')
    assert 'resuming from' in printed
    assert_same_weights(os.path.join(sharded, 'text/ckpt_100'), os.path.join(resumed, 'text/ckpt_100'), atol=1e-4)
    # ... and an FSDP run resumes from the single process's
    back = str(tmp_path / 'back')
    shutil.copytree(os.path.join(single, 'text/ckpt_050'), os.path.join(back, 'text/ckpt_050'))
    launch(back, shapes_dir, '--stages=text', '--init_from=resume', '--fsdp=True', ranks=2)
    assert_same_weights(os.path.join(single, 'text/ckpt_100'), os.path.join(back, 'text/ckpt_100'), atol=1e-4)


def test_fsdp_needs_torchrun():
    with pytest.raises(train.ConfigError, match='launch with torchrun'):
        train.runtime.setup_runtime(train.get_config(['--fsdp=True']))


@pytest.mark.slow
def test_each_stage_compiles_once(tmp_path, shapes_dir, capsys):
    """Batches of one stage have one shape, whatever their number of images: one graph, no recompiles or breaks."""
    torch._dynamo.reset()
    out = str(tmp_path / 'run')
    cfg = train.get_config(TINY + [f'--data_dir={shapes_dir}', f'--out_dir={out}', f'--text_out_dir={out}/text',
                                   '--stages=text,image', '--compile=True', '--image_iters=6'])
    train.main(cfg)
    printed = capsys.readouterr().out
    assert 'text stage: torch.compile made 1 new graph(s)' in printed
    assert 'image stage: torch.compile made 1 new graph(s)' in printed
