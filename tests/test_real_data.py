"""
Real data through training: img2dataset tar shards as the image stage's captions, a LLaVA json as the instruction
data, a prepared text corpus as the text; then the checkpoint on every benchmark. Every fixture is written here.
"""
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import benchmarks
import corpora
import data
import shapes
import eval as ev
import images
import train
from conftest import run_train, write_tar

N = 36  # image tokens of a tiny encoder at 48 px (a 6 x 6 grid)


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, 'PNG')
    return buf.getvalue()


def write_real_data(root):
    """Two caption shards (the second with a corrupt image and a sample without a caption), a LLaVA json whose
    records include a text-only one and one whose image file is missing, and a small text corpus."""
    rng = random.Random(0)
    scenes = [shapes.scene_with(rng, {}) for _ in range(20)]
    shards = root / 'shards'
    shards.mkdir(parents=True)
    for s in range(2):
        samples = []
        for i, scene in enumerate(scenes[s * 10:(s + 1) * 10]):
            key = f'{s:05d}/{s:05d}{i:04d}'
            samples += [(f'{key}.png', png(shapes.render(scene, 40))), (f'{key}.txt', shapes.caption(scene, rng).encode()),
                        (f'{key}.json', json.dumps({'caption': 'unused', 'url': 'http://x'}).encode())]
        if s == 1:
            samples += [('00001/bad.jpg', b'\xff\xd8 not really a jpeg'), ('00001/bad.txt', b'a broken picture'),
                        ('00001/nocap.png', png(shapes.render(scenes[0], 40)))]
        write_tar(str(shards / f'{s:05d}.tar'), samples)
    pictures = root / 'llava' / 'coco'
    pictures.mkdir(parents=True)
    records = []
    for i, scene in enumerate(scenes[:8]):
        Image.fromarray(shapes.render(scene, 64)).save(pictures / f'{i}.jpg')
        records.append({'id': str(i), 'image': f'coco/{i}.jpg', 'conversations': [
            {'from': 'human', 'value': '<image>\nHow many shapes are there?'},
            {'from': 'gpt', 'value': shapes.NUMBER_WORDS[len(scene)]}]})
    records.append({'id': 'gone', 'image': 'coco/missing.jpg', 'conversations': [
        {'from': 'human', 'value': 'What is this?\n<image>'}, {'from': 'gpt', 'value': 'a picture'}]})
    records.append({'id': 'text', 'conversations': [
        {'from': 'human', 'value': 'Say hello.'}, {'from': 'gpt', 'value': 'hello'}]})
    with open(root / 'llava' / 'llava.json', 'w') as f:
        json.dump(records, f)
    docs = root / 'docs'
    docs.mkdir()
    with open(docs / 'docs.jsonl', 'w') as f:
        f.writelines(json.dumps({'text': f'Document {i}: ' + 'the quick brown fox jumps over the dog. ' * 30}) + '\n'
                     for i in range(80))
    corpora.prepare_text([str(docs)], str(root / 'corpus'), val_fraction=0.2, workers=1, verbose=False)
    return shards, root / 'llava' / 'llava.json', root / 'corpus'


@pytest.fixture(scope='module')
def real(tmp_path_factory):
    return write_real_data(tmp_path_factory.mktemp('real'))


@pytest.fixture
def enc():
    return data.get_tokenizer('bytes')


def test_shards_are_indexed_once_and_bad_samples_counted(real, tmp_path, monkeypatch, enc):
    shards, llava, _ = real
    cache = str(tmp_path / 'index')
    source = images.RealImages(48, str(shards), cache_dir=cache, verbose=False)
    assert source.n_captions == 21 and source.indexing_skipped == {'no caption': 1}  # 20 good, 1 corrupt image
    # the caption is the .txt, or a .json field by caption_key
    by_json = images.RealImages(48, str(shards), caption_key='caption', cache_dir=cache, verbose=False)
    assert enc.decode(by_json.caption_sample(0, enc, N, None)[0][N:-1]) == 'unused'
    monkeypatch.setattr(images, 'index_shard', lambda *a: pytest.fail('a cached shard was indexed again'))
    again = images.RealImages(48, str(shards / '*.tar'), cache_dir=cache, verbose=False)
    assert np.array_equal(again.ranges, source.ranges)
    # every caption draw is usable; the corrupt image is drawn (21 candidates), skipped and counted, never returned
    gen = torch.Generator().manual_seed(0)
    refs = []
    for _ in range(200):
        tokens, mask, [ref] = data.draw_sample(source, enc, 'caption', gen, N, 256)
        refs.append(ref)
        assert tokens[:N] == [data.special_id(enc, '<|image|>')] * N
    assert len(set(refs)) == 20 and source.skipped['not an image'] > 0
    pixels = source.pixels(refs[:3])
    assert pixels.shape == (3, 48, 48, 3) and pixels.dtype == np.uint8 and not source.decoded


def test_real_batches_are_a_function_of_the_step(real, tmp_path, enc):
    shards, llava, corpus = real
    text = data.open_shard(str(corpus), 'train')
    make = lambda source, rows=slice(None): data.mixture_batch(source, enc, text, 8, 256, N, 0.6, 0.3,
                                                                data.seeded_generator(5, 3), rows)
    a = images.RealImages(48, str(shards), instruct_data=str(llava), cache_dir=str(tmp_path), verbose=False)
    b = images.RealImages(48, str(shards), instruct_data=str(llava), cache_dir=str(tmp_path), verbose=False)
    whole, halves = make(a), [make(b, slice(0, 4)), make(b, slice(4, 8))]
    assert torch.equal(whole[0], torch.cat([h[0] for h in halves])) and whole[2] == halves[0][2] + halves[1][2]
    assert np.array_equal(a.pixels(whole[2]), np.concatenate([b.pixels(halves[0][2]), b.pixels(halves[1][2])]))


def test_llava_rows_mask_a_missing_image_and_keep_text_only_records(real, tmp_path, enc):
    _, llava, _ = real
    source = images.RealImages(48, instruct_data=str(llava), verbose=False)  # images relative to the json's folder
    assert source.n_captions == 0 and source.n_conversations == 10
    image = data.special_id(enc, '<|image|>')
    x, y, refs = data.finetune_row(source, enc, [0, 8, 9], 256, N)  # an image, a missing image, text only
    assert source.skipped == {'missing file': 1} and refs == [0, None]  # one ref per <image> mark; None: blank
    assert (x == image).sum() == 2 * N
    answers = enc.decode([t for t in y.tolist() if 0 <= t < 256])  # the scored targets, end tokens aside
    first_answer = json.load(open(llava))[0]['conversations'][1]['value']
    assert answers == first_answer + 'hello'  # the missing image's answer 'a picture' carries no loss
    blank = source.pixels([None])
    assert (blank == 255).all()


def test_real_data_config_errors(real, tmp_path):
    shards, llava, _ = real
    with pytest.raises(train.ConfigError, match='image_data is set but instruct_data is not'):
        train.get_config([f'--image_data={shards}'])
    with pytest.raises(train.ConfigError, match='instruct_data is set but image_data is not'):
        train.get_config([f'--instruct_data={llava}'])
    with pytest.raises(train.ConfigError, match='matches no .tar shards'):
        train.get_config([f'--image_data={tmp_path}/nothing*.tar', f'--instruct_data={llava}'])
    with pytest.raises(train.ConfigError, match='no such file'):
        train.get_config([f'--image_data={shards}', f'--instruct_data={tmp_path}/llava.json'])
    train.get_config([f'--image_data={shards}', '--stages=text,image'])  # no conversations needed: fine


def launch(real, out, *extra, ranks=0):
    """train.py on the real-data fixtures, every stage, in a subprocess (torchrun with `ranks` processes); its log."""
    shards, llava, corpus = real
    args = [f'--dataset={corpus}', f'--image_data={shards}', f'--instruct_data={llava}', f'--data_dir={out}/data',
            f'--out_dir={out}', f'--text_out_dir={out}/text', '--text_iters=6', '--save_fracs=[0.5,1.0]',
            '--image_inject_frac=0.5', '--warmup_iters=1', '--batch_size=4', '--image_iters=4', '--image_ratio=0.5',
            '--instruct_ratio=0.25', '--finetune_epochs=2', '--rewarm_iters=1', '--log_interval=2', '--encoder=vit',
            '--encoder_weights=random', '--eval_iters=1', '--device=cpu', '--finetune_text_ratio=0.5', *extra]
    return run_train(args, ranks)


@pytest.fixture(scope='module')
def real_run(real, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('real_run'))
    return out, launch(real, out)


@pytest.mark.slow
def test_all_stages_on_real_data_then_every_benchmark(real_run, bench):
    out, log = real_run
    assert 'image data: 21 image-caption pairs in 2 shards; 10 conversations (9 with an image); left out when ' \
           'read: no caption 1' in log
    image_log, finetune_log = log.split('finetune stage:', 1)
    # the corrupt image drawn for a caption, the missing LLaVA image drawn twice for instruct_ratio rows
    assert 'image step 4/4' in image_log and 'skipped so far: not an image 1, missing file 2' in image_log
    # fine-tuning reached the conversation with the missing image once (3 rows, 2 a step: one is left each epoch)
    assert 'finetune step 2/2' in finetune_log and 'skipped so far: missing file 1' in finetune_log
    assert 'stable scores' not in log  # no built-in tasks: the scores come from eval.py --tasks
    ckpt = os.path.join(out, 'finetune')
    tasks = [t for t in benchmarks.BENCHMARKS if t not in ('refcoco', 'refcoco+', 'refcocog', 'ocid_ref')]  # grounding: tests/test_grounding.py
    result = ev.benchmark_checkpoint(ckpt, tasks, bench)
    assert set(result['tasks']) == set(tasks)
    assert result['vision_stable_score'] is not None and result['text_stable_score'] is not None
    assert json.load(open(os.path.join(ckpt, 'eval_bench.json')))['tasks'].keys() == result['tasks'].keys()


@pytest.mark.slow
def test_two_ranks_and_a_worker_read_real_data_as_one_process(real, real_run, tmp_path):
    single, single_log = real_run
    out = str(tmp_path / 'ddp')
    log = launch(real, out, '--data_workers=1', ranks=2)  # each rank reads its own rows, in a DataLoader worker
    skips = lambda text: [line.split(' | ')[-1] for line in text.splitlines() if 'skipped so far' in line]
    assert skips(log) == skips(single_log)  # the counts summed over the ranks are the single process's
    for stage in ('image', 'finetune'):
        a, b = (load_file(os.path.join(d, stage, 'model.safetensors')) for d in (single, out))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-3, rtol=0, msg=k)
