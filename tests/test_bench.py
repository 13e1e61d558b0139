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


@pytest.mark.parametrize('args', [['--data=/nonexistent/*.tar']])
def test_data_pipeline_names_missing_shards(args, capsys):
    with pytest.raises((ValueError, SystemExit), match='nonexistent'):
        run(args, capsys)
