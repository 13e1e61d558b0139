"""python corpora.py: every reader, the round trip text -> tokens -> text, the split, counted skips."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import corpora
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['The cat sat on the mat.', 'Ünïcode ✓ and <|image|> stay text.', 'Line one\nline two\n', 'x' * 5000]


def write_inputs(folder):
    folder.mkdir()
    (folder / 'a.txt').write_text(DOCS[0])
    with open(folder / 'b.jsonl', 'w') as f:
        f.write(json.dumps({'text': DOCS[1], 'url': 'u'}) + '\n')
        f.write('not json\n')
        f.write(json.dumps({'title': 'no text field'}) + '\n\n')
    with gzip.open(folder / 'c.jsonl.gz', 'wt') as f:
        for doc in DOCS[2:]:
            f.write(json.dumps({'text': doc}) + '\n')
    return folder


def decode_documents(out, split, enc):
    meta = json.load(open(os.path.join(out, 'meta.json')))
    tokens = np.fromfile(os.path.join(out, f'{split}.bin'), dtype=meta['dtype'])
    assert len(tokens) == meta['tokens'][split]
    eot = data.special_id(enc, '<|endoftext|>')
    docs, start = [], 0
    for i in np.flatnonzero(tokens == eot):
        docs.append(enc.decode(tokens[start:i].tolist()))
        start = i + 1
    assert start == len(tokens)  # every document ends in <|endoftext|>
    return docs


def test_round_trip_every_reader_and_counted_skips(tmp_path):
    inputs = write_inputs(tmp_path / 'in')
    out = str(tmp_path / 'out')
    meta = corpora.prepare_text([str(inputs)], out, val_fraction=0.0, workers=2, chunk_bytes=10, verbose=False)
    enc = data.get_tokenizer('bytes')
    assert sorted(decode_documents(out, 'train', enc)) == sorted(DOCS)
    assert meta['skipped'] == {'not a JSON object': 1, 'empty or missing text': 1}
    assert meta['tokens']['val'] == 0 and meta['dtype'] == 'uint16' and meta['files'] == 3
    assert data.open_shard(out, 'train')[:3].tolist() == list(b'The')  # what train.py opens with dataset=DIR


def test_split_is_by_content_and_fixed(tmp_path):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    docs = [f'document number {i} says {i * i}' for i in range(400)]
    with open(inputs / 'docs.jsonl', 'w') as f:
        f.writelines(json.dumps({'text': d}) + '\n' for d in docs)
    enc = data.get_tokenizer('bytes')
    runs = []
    for workers, chunk in ((1, 1 << 20), (2, 100)):
        out = str(tmp_path / f'out{workers}')
        corpora.prepare_text([str(inputs / 'docs.jsonl')], out, val_fraction=0.1, workers=workers, chunk_bytes=chunk,
                             verbose=False)
        runs.append((decode_documents(out, 'train', enc), decode_documents(out, 'val', enc)))
    assert runs[0] == runs[1]  # the same shards whatever the workers and chunking
    train, val = runs[0]
    assert sorted(train + val) == sorted(docs) and 20 <= len(val) <= 60  # about 10 % of 400
    assert all(corpora.in_val(d, 0.1) for d in val)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        corpora.prepare_text([str(tmp_path / 'missing.jsonl')], str(tmp_path / 'o'), verbose=False)
    (tmp_path / 'data.csv').write_text('a,b')
    with pytest.raises(ValueError, match='unknown format'):
        corpora.prepare_text([str(tmp_path / 'data.csv')], str(tmp_path / 'o'), verbose=False)
    (tmp_path / 'empty.jsonl').write_text(json.dumps({'text': ''}) + '\n')
    with pytest.raises(ValueError, match='no text found'):
        corpora.prepare_text([str(tmp_path / 'empty.jsonl')], str(tmp_path / 'o'), verbose=False)
    assert not os.path.exists(tmp_path / 'o' / 'meta.json')  # an incomplete folder never looks prepared


def test_optional_formats_say_what_to_install(tmp_path, monkeypatch):
    for name, module in (('x.jsonl.zst', 'zstandard'), ('x.parquet', 'pyarrow.parquet')):
        (tmp_path / name).write_bytes(b'\0')
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
        if module == 'pyarrow.parquet':
            monkeypatch.setitem(sys.modules, 'pyarrow', None)
        with pytest.raises(ImportError, match=f'needs the optional package {module.split(".")[0]}'):
            list(corpora.documents(str(tmp_path / name), corpora.Counter()))


@pytest.mark.slow
def test_command_line(tmp_path):
    inputs = write_inputs(tmp_path / 'in')
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'corpora.py', f'--input={inputs}/a.txt,{inputs}/b.jsonl', f'--out={out}',
                           '--workers=1'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'skipped 2 lines' in proc.stdout and 'eta' in proc.stdout
    assert json.load(open(out / 'meta.json'))['files'] == 2


def test_train_reads_a_prepared_corpus(tmp_path, capsys):
    import train
    inputs = tmp_path / 'in'
    inputs.mkdir()
    with open(inputs / 'docs.jsonl', 'w') as f:
        f.writelines(json.dumps({'text': f'Document {i}: ' + 'the quick brown fox jumps. ' * 20}) + '\n'
                     for i in range(60))
    out = str(tmp_path / 'corpus')
    corpora.prepare_text([str(inputs)], out, val_fraction=0.3, workers=1, verbose=False)
    ckpts = str(tmp_path / 'text')
    train.main(train.get_config([f'--dataset={out}', f'--text_out_dir={ckpts}', f'--out_dir={tmp_path}',
                                 '--stages=text', '--text_iters=4',
                                 '--save_fracs=[0.5,1.0]', '--block_size=32', '--batch_size=2', '--warmup_iters=1',
                                 '--eval_iters=1', '--device=cpu']))
    printed = capsys.readouterr().out
    assert 'no built-in tasks for dataset=' in printed and 'text step 4/4' in printed
    assert sorted(os.listdir(ckpts)) == ['ckpt_050', 'ckpt_100', 'metrics.jsonl']
