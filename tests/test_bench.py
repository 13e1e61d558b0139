"""bench.py runs its three benchmarks on tiny inputs and prints their figures: the step (LM, VLM with the encoder's
FLOPs and share), and the image data pipeline against PIL's ceiling with the workers a step needs."""
import io

import numpy as np
import pytest
from PIL import Image

import bench
from configurator import configure, script_config
from conftest import write_tar


def run(args, capsys):
    bench.main(configure(args, script_config(vars(bench))))
    return capsys.readouterr().out


def test_encoder_flops_are_counted_from_shapes_alone():
    two, four = bench.encoder_flops('siglip', 'tiny', 2), bench.encoder_flops('siglip', 'tiny', 4)
    assert two > 0 and four == 2 * two  # linear in the images
    # at least the matmuls of every block: 2 FLOPs per weight per token (36 patches of 48 px at stride 8)
    from encoders import build_encoder
    enc = build_encoder('siglip', 'tiny')
    block_weights = sum(p.numel() for n, p in enc.named_parameters() if 'blocks' in n and p.dim() == 2)
    assert two >= 2 * block_weights * 36 * 2


@pytest.mark.slow
def test_vlm_step_reports_images_encoder_share_and_mfu(capsys):
    out = run(['--encoder=siglip', '--modes=unfrozen,cached', '--steps=1', '--warmup=1', '--batch_size=4',
               '--device=cpu'], capsys)
    unfrozen, cached = [line for line in out.splitlines() if line.startswith('demo + siglip')]
    assert 'images/s' in unfrozen and 'of the step' in unfrozen and 'MFU' in unfrozen
    share = int(unfrozen.split('encoder ')[1].split('%')[0])
    assert 0 < share < 100
    assert 'encoder 0% of the step' in cached  # features read from a cache: no encoder in the step


def test_data_pipeline_against_the_pil_ceiling(tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(buf, 'JPEG')
        samples += [(f'{i:05d}.jpg', buf.getvalue()), (f'{i:05d}.txt', f'a picture number {i}'.encode())]
    samples.append(('00009.jpg', b'not an image'))  # counted, not fatal
    samples.append(('00009.txt', b'broken'))
    write_tar(tmp_path / 'shard.tar', samples)
    out = run([f'--data={tmp_path}/shard.tar', '--tokenizer=bytes', '--samples=7', '--step_tokens_per_s=1e6'], capsys)
    line = next(x for x in out.splitlines() if x.startswith('images/s per worker'))
    assert 'PIL decode and resize alone' in line and 'of that ceiling' in line
    workers = int(out.split('a step consumes')[1].split(': ')[1].split()[0])
    assert workers >= 1
    assert 'images per caption row of 256 tokens' in out


def test_gpu_suite_without_cuda_says_so(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, 'is_available', lambda: False)
    assert run(['--suite=gpu'], capsys).startswith('bench.py --suite=gpu: no CUDA device')


@pytest.mark.slow
def test_gpu_suite_plan_and_table_at_tiny_shapes(capsys):
    # the GPU suite's whole path, at demo shapes and tiny encoders on the CPU: every figure docs/performance.md
    # holds, as its table, each with its target
    out = run(['--suite=gpu', '--suite_scale=tiny', '--device=cpu'], capsys)
    table = [line for line in out.splitlines() if line.startswith('|')]
    assert table[0].startswith('| figure | setting | tokens/s |') and len(table) == 2 + 7
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip('|').split('|')] for line in table[2:])}
    assert list(rows) == ['`79m` text step', 'image stage, SigLIP frozen', 'image stage, SigLIP trained',
                          'image stage, DINO-SigLIP frozen', 'image stage, DINO-SigLIP trained', '`1b` text step',
                          'DataLoader workers per GPU']
    assert all(len(cells) == 10 for cells in rows.values())
    text_speed = float(rows['`79m` text step'][2].replace(',', ''))
    assert rows['`79m` text step'][8] == '≥ 45% MFU of datasheet' and rows['`1b` text step'][8].startswith('≥ 50%')
    assert rows['`79m` text step'][9] == 'n/a'  # a CPU has no datasheet peak
    frozen = rows['image stage, SigLIP frozen']
    target = float(frozen[8].split('(')[1].split()[0].replace(',', ''))
    assert abs(target - 0.8 * text_speed) <= 1  # 0.8x the text step's speed, each rounded to whole tokens/s
    frozen_speed = float(frozen[2].replace(',', ''))
    if abs(frozen_speed - 0.8 * text_speed) > 2:  # the table rounds both speeds to whole tokens/s
        assert frozen[9] == ('yes' if frozen_speed >= 0.8 * text_speed else 'no')
    assert rows['image stage, DINO-SigLIP trained'][8] == ''  # a trained encoder's stage has no target
    assert int(rows['DataLoader workers per GPU'][9].split()[0]) >= 1


@pytest.mark.parametrize('args', [['--data=/nonexistent/*.tar']])
def test_data_pipeline_names_missing_shards(args, capsys):
    with pytest.raises((ValueError, SystemExit), match='nonexistent'):
        run(args, capsys)
