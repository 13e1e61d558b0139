"""
Hostile data and unlucky users: every attack ends in a counted skip or an error that names the file and the field,
with memory held under a cap where the attack is on memory (conftest.run_capped), and no run's work lost.
"""
import gzip
import io
import json
import os
import socket
import subprocess
import tarfile

import pytest
import torch
from PIL import Image

import checkpoint
import locks
import corpora
import eval as ev
import images
import train
from configurator import ConfigError
from conftest import run_capped, write_tar
from model import GPT, GPTConfig


def png(size, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, 'PNG')
    return buf.getvalue()


# 1. a thin image is not a memory bomb

@pytest.mark.slow
def test_a_thin_image_is_skipped_under_a_memory_cap(tmp_path):
    (tmp_path / 'thin.png').write_bytes(png((65000, 8)))  # a few hundred bytes; padded to a square: 12.7 GB
    proc = run_capped(f'import images\ntry:\n    images.decode_image(open("{tmp_path}/thin.png", "rb").read(), 384)\n'
                      f'except images.BadImage as e:\n    print("skipped:", e)')
    assert proc.returncode == 0 and 'skipped: extreme aspect ratio' in proc.stdout, proc.stderr[-500:]
    wide = images.decode_image(png((400, 100)), 40)  # an ordinary wide image: resized to 40 x 10, padded white
    assert wide.shape == (40, 40, 3) and tuple(wide[20, 20]) == (200, 30, 30) and tuple(wide[2, 20]) == (255,) * 3


# 2. image paths stay inside their folders; only regular files, and a bounded number of bytes, are read

def test_image_paths_that_escape_or_are_not_files_are_refused_and_counted(tmp_path):
    root, outside = tmp_path / 'llava', tmp_path / 'secret'
    (root / 'coco').mkdir(parents=True)
    outside.mkdir()
    (outside / 'x.png').write_bytes(png((16, 16)))
    (root / 'coco' / 'ok.png').write_bytes(png((16, 16)))
    os.symlink(outside / 'x.png', root / 'coco' / 'link.png')
    os.mkfifo(root / 'coco' / 'fifo.png')  # opened blocking, it would wait forever for a writer
    with open(root / 'coco' / 'big.png', 'wb') as f:
        f.truncate(images.MAX_IMAGE_BYTES + 1)  # sparse: no disk used
    turn = lambda: [{'from': 'human', 'value': '<image>\nWhat?'}, {'from': 'gpt', 'value': 'x'}]
    names = ['coco/ok.png', '../secret/x.png', str(outside / 'x.png'), 'coco/link.png', '/dev/zero',
             'coco/fifo.png', 'coco/big.png', 'coco/missing.png']
    (root / 'llava.json').write_text(json.dumps([{'image': n, 'conversations': turn()} for n in names]))
    source = images.RealImages(16, instruct_data=str(root / 'llava.json'), verbose=False)
    usable = [source.usable(source.n_captions + i) for i in range(len(names))]
    assert usable == [True] + [False] * 7
    assert source.skipped == {'outside its folder': 4, 'not a regular file': 1, 'file too large': 1, 'missing file': 1}


def test_a_benchmark_image_outside_its_folder_is_a_counted_skip(tmp_path):
    from model import VLM
    from encoders import build_encoder
    import data
    bench = tmp_path / 'bench'
    (bench / 'vizwiz' / 'val').mkdir(parents=True)
    (tmp_path / 'elsewhere.jpg').write_bytes(png((16, 16)))
    record = {'question': 'What is this?', 'answerable': 1, 'answer_type': 'other',
              'answers': [{'answer': 'cup', 'answer_confidence': 'yes'}] * 10}
    (bench / 'vizwiz' / 'val.json').write_text(json.dumps([dict(record, image='../../../elsewhere.jpg')]))
    enc = data.get_tokenizer('bytes')
    gpt = GPT(GPTConfig(block_size=256, vocab_size=320, n_layer=1, n_head=1, n_embd=16))
    model = VLM(gpt, build_encoder('patch', freeze=False), data.special_id(enc, '<|image|>')).eval()
    out = ev.run_benchmarks(model, enc, ['vizwiz'], str(bench))
    assert out['skipped'] == {'vizwiz: outside its folder': 1} and out['tasks']['vizwiz']['n'] == 0


# 3. compression bombs: bounded captions and documents, compressed shards named, a dead worker an error

def sparse_tar(path, members):
    """A tar whose members are (name, bytes) or (name, a size): a size leaves a hole, so 1 GiB costs no disk."""
    with open(path, 'wb') as f:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = payload if isinstance(payload, int) else len(payload)
            f.write(info.tobuf())
            if isinstance(payload, int):
                f.seek(-(-payload // 512) * 512, os.SEEK_CUR)
            else:
                f.write(payload + b'\0' * (-len(payload) % 512))
        f.write(b'\0' * 1024)


@pytest.mark.slow
def test_a_huge_caption_is_not_read_and_a_compressed_shard_is_named(tmp_path):
    shard = tmp_path / 'bomb.tar'
    sparse_tar(shard, [('0.png', png((16, 16))), ('0.txt', 2 ** 30), ('1.png', png((16, 16))), ('1.txt', b'a cup')])
    proc = run_capped(f'import images\nkeys, ranges, skipped = images.index_shard("{shard}")\n'
                      f'print(keys, dict(skipped))', cap_gib=1.0)
    assert proc.returncode == 0 and "['1'] {'caption too large': 1}" in proc.stdout, proc.stderr[-500:]
    write_tar(tmp_path / 'plain.tar', [('0.png', png((16, 16))), ('0.txt', b'a cup')])
    with open(tmp_path / 'plain.tar', 'rb') as f, gzip.open(tmp_path / 'gz.tar', 'wb') as g:
        g.write(f.read())
    with pytest.raises(ValueError, match=r'gz.tar is gzip-compressed'):
        images.index_shard(str(tmp_path / 'gz.tar'))


@pytest.mark.slow
def test_a_huge_document_in_a_small_gzip_is_skipped_under_a_memory_cap(tmp_path):
    path = tmp_path / 'bomb.jsonl.gz'
    with gzip.open(path, 'wb', compresslevel=1) as f:  # 256 MiB of text in a line, a few hundred KB on disk
        f.write(b'{"text": "')
        for _ in range(256):
            f.write(b'a' * 2 ** 20)
        f.write(b'"}\n{"text": "the cup is red"}\n')
    proc = run_capped(f'import corpora\nmeta = corpora.prepare_text(["{path}"], "{tmp_path}/out", workers=1, '
                      f'val_fraction=0.0, verbose=False)\nprint(meta["skipped"], meta["tokens"]["train"])')
    assert proc.returncode == 0 and "{'document too large': 1} 15" in proc.stdout, proc.stderr[-500:]


def die(job):  # a tokenizer process killed for memory
    os._exit(9)


def test_a_dead_tokenizer_process_is_an_error_not_a_hang(tmp_path, monkeypatch):
    (tmp_path / 'a.jsonl').write_text('{"text": "hello"}\n')
    monkeypatch.setattr(corpora, '_tokenize', die)
    with pytest.raises(RuntimeError, match='a tokenizer process died'):
        corpora.prepare_text([str(tmp_path / 'a.jsonl')], str(tmp_path / 'out'), workers=1, verbose=False)
    assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'out.tmp')


# 4. a failed re-prepare leaves the dataset it would have replaced

def test_a_failed_prepare_keeps_the_good_dataset(tmp_path):
    (tmp_path / 'good.jsonl').write_text('{"text": "the cup is red"}\n' * 20)
    (tmp_path / 'allbad.jsonl').write_text('not json\n{"no": "text"}\n')
    (tmp_path / 'empty.txt').write_text('')
    keep = str(tmp_path / 'keep')
    corpora.prepare_text([str(tmp_path / 'good.jsonl')], keep, workers=1, verbose=False)
    before = {n: open(os.path.join(keep, n), 'rb').read() for n in os.listdir(keep)}
    for bad in ('allbad.jsonl', 'empty.txt'):
        with pytest.raises(ValueError, match=r'no text found.*left as it was'):
            corpora.prepare_text([str(tmp_path / bad)], keep, workers=1, verbose=False)
        assert {n: open(os.path.join(keep, n), 'rb').read() for n in os.listdir(keep)} == before
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'mine.txt').write_text('x')
    with pytest.raises(ValueError, match='is not a dataset folder'):  # replacing it would delete mine.txt
        corpora.prepare_text([str(tmp_path / 'good.jsonl')], str(tmp_path / 'notes'), workers=1, verbose=False)


# 5. one writer per folder

TEXT = ['--stages=text', '--block_size=64', '--batch_size=4', '--text_iters=8', '--save_fracs=[0.5,1.0]',
        '--warmup_iters=1', '--log_interval=4', '--eval_interval=0', '--device=cpu']


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, shapes_dir):
    out = tmp_path / 'text'
    out.mkdir()
    holder = subprocess.Popen(['sleep', '60'])
    try:
        (out / 'LOCK').write_text(json.dumps({'pid': holder.pid, 'host': socket.gethostname(), 'started': 'now'}))
        args = TEXT + [f'--data_dir={shapes_dir}', f'--text_out_dir={out}', f'--out_dir={tmp_path}']
        with pytest.raises(locks.FolderLocked, match=f'being written by another run \\(pid {holder.pid}'):
            train.main(train.get_config(args))
        assert not os.path.exists(out / 'ckpt_050')
    finally:
        holder.kill()
        holder.wait()
    train.main(train.get_config(args))  # its holder is gone: a stale lock, from a crash
    assert os.path.exists(out / 'ckpt_100') and not os.path.exists(out / 'LOCK')  # released on exit


# 6. the NaN guard never blesses a NaN checkpoint

def test_an_infinite_learning_rate_is_refused_before_compute():
    with pytest.raises(ConfigError, match=r'learning_rate=inf: must be finite'):
        train.get_config(['--learning_rate=1e999'])


def test_non_finite_weights_are_never_written_as_a_checkpoint(tmp_path, shapes_dir, monkeypatch):
    step, calls = torch.optim.AdamW.step, []

    def poisoned(self, *a, **k):  # the 4th update is applied with a NaN learning rate: finite gradients, NaN weights
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                self.param_groups[0]['params'][0].fill_(float('nan'))
        return out

    monkeypatch.setattr(torch.optim.AdamW, 'step', poisoned)
    out = tmp_path / 'text'
    with pytest.raises(train.TrainingError, match=r'step 4: the weights hold NaN or inf, so .*ckpt_050 was not written'):
        train.main(train.get_config(TEXT + [f'--data_dir={shapes_dir}', f'--text_out_dir={out}',
                                            f'--out_dir={tmp_path}']))
    assert not os.path.exists(out / 'ckpt_050')


# 7. a checkpoint's config.json cannot steer evaluation

def tiny_checkpoint(folder, **config):
    gpt = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=1, n_embd=16))
    opt = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    info = {'stage': 'text', 'step': 1, 'iters': 1, 'tokenizer': 'bytes', 'model_args': vars(gpt.config),
            'config': dict(dataset='shapes', **config)}
    checkpoint.save_checkpoint(str(folder), *checkpoint.full_state(gpt, opt), info)
    return str(folder)


@pytest.mark.slow
def test_a_config_json_claiming_a_huge_model_fails_before_allocating(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / 'ck')
    info = json.load(open(os.path.join(ckpt, 'config.json')))
    info['model_args'].update(n_layer=64, n_head=64, n_embd=8192)  # 50 GB of float32 if it were built
    json.dump(info, open(os.path.join(ckpt, 'config.json'), 'w'))
    proc = run_capped(f'import checkpoint\ntry:\n    checkpoint.load_model("{ckpt}")\nexcept ValueError as e:\n    print(e)')
    assert proc.returncode == 0 and 'does not hold the model its config.json describes' in proc.stdout, \
        proc.stderr[-500:]


def test_evaluation_writes_only_where_its_command_line_says(tmp_path, shapes_dir):
    ckpt = tiny_checkpoint(tmp_path / 'ck', data_dir=str(tmp_path / 'elsewhere'), eval_items=10)
    ev.evaluate_checkpoint(ckpt, data_dir=shapes_dir, verbose=False)
    assert not os.path.exists(tmp_path / 'elsewhere') and os.path.exists(os.path.join(ckpt, 'eval.json'))


# 8. every value is typed and in range before compute

@pytest.mark.parametrize('flag,error', [('--data_workers=abc', 'expected int'),
                                        ("--save_fracs=[0.5,'a']", r'save_fracs\[1\]'),
                                        ('--beta1=2', r'beta1=2.0: must be in \[0, 1\)'),
                                        ('--image_ratio=-0.1', r'must be in \[0, 1\]')])
def test_bad_values_are_config_errors(flag, error):
    with pytest.raises(ConfigError, match=error):
        train.get_config([flag])


def test_compile_false_is_false():
    assert train.get_config(['--compile=false']).compile is False
    assert train.get_config(['--compile=true']).compile is True


# 9. errors that name the file: damaged checkpoints, malformed json, bit flips

def test_damaged_checkpoint_files_are_named(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / 'ck')
    weights = os.path.join(ckpt, 'model.safetensors')
    raw = bytearray(open(weights, 'rb').read())
    raw[-5] ^= 1  # one bit of one weight
    open(weights, 'wb').write(raw)
    with pytest.raises(ValueError, match=r'model.safetensors does not match the checksum'):
        checkpoint.load_model(ckpt)
    open(weights, 'wb').write(raw[:len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match=r'model.safetensors does not match the checksum'):
        checkpoint.load_model(ckpt)
    state = os.path.join(ckpt, 'state.pt')
    open(state, 'wb').write(open(state, 'rb').read()[:100])
    with pytest.raises(ValueError, match=r'state.pt does not match the checksum'):
        checkpoint.load_state(ckpt)
    info = json.load(open(os.path.join(ckpt, 'config.json')))
    del info['checksums']  # with nothing to compare against, a truncated file is still named as such
    json.dump(info, open(os.path.join(ckpt, 'config.json'), 'w'))
    with pytest.raises(RuntimeError, match=r'cannot read .*state.pt: it is truncated or corrupt'):
        checkpoint.load_state(ckpt)
    with pytest.raises(ValueError, match=r'model.safetensors is truncated or corrupt'):
        checkpoint.load_model(ckpt)
    open(os.path.join(ckpt, 'config.json'), 'w').write('{"stage": "text", ')
    with pytest.raises(ValueError, match=r'config.json is not valid JSON'):
        checkpoint.load_model(ckpt)


def test_malformed_llava_records_are_counted_and_a_malformed_file_named(tmp_path):
    ok = {'conversations': [{'from': 'human', 'value': 'Hi?'}, {'from': 'gpt', 'value': 'Hi.'}]}
    records = [ok, 'a string', {'conversations': 'not a list'}, {'conversations': [{'from': 'human', 'value': 3}]},
               dict(ok, image=['a list']), {'image': 'x.png'}]
    (tmp_path / 'l.json').write_text(json.dumps(records))
    kept, skipped = images.llava_conversations(str(tmp_path / 'l.json'), str(tmp_path))
    assert len(kept) == 1 and skipped == {'malformed record': 5}
    (tmp_path / 'deep.json').write_text('[' * 200_000 + ']' * 200_000)
    with pytest.raises(ValueError, match=r'deep.json nests its JSON too deeply'):
        images.llava_conversations(str(tmp_path / 'deep.json'), str(tmp_path))
    (tmp_path / 'cut.json').write_text('[{"conversations": [')
    with pytest.raises(ValueError, match=r'cut.json is not valid JSON: .* line 1, column 21'):
        images.llava_conversations(str(tmp_path / 'cut.json'), str(tmp_path))
    (tmp_path / 'obj.json').write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r'obj.json: expected a non-empty JSON list'):
        images.llava_conversations(str(tmp_path / 'obj.json'), str(tmp_path))
