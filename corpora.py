"""
Real text corpora to token shards, streamed: never more than a chunk of documents in memory.

    python corpora.py --input='dclm/*.jsonl.zst' --out=data/dclm --tokenizer=gpt2
    python train.py config/scale_79m.py --dataset=data/dclm

Reads .txt (a file is one document), .jsonl and .jsonl.gz (one JSON object a line, its `text` field: the DCLM /
FineWeb layout), .jsonl.zst (with the optional package zstandard) and .parquet (with pyarrow, its `text` column).
Documents are tokenized by a pool of processes and appended to train.bin / val.bin, each followed by <|endoftext|>;
a document goes to val when a hash of its text falls under val_fraction, so the split does not depend on the order of
the inputs. meta.json (tokenizer, vocabulary, dtype, token and document counts, skipped lines) says the folder is
complete; the folder is built beside --out and swapped in only then, so a failed run never damages a good dataset.
A document over max_document_bytes is skipped and counted: memory stays bounded whatever a compressed file holds.
"""

import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import stat
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

import data
from checkpoint import swap_in
from configurator import configure, script_config

# -----------------------------------------------------------------------------
# config for `python corpora.py`
input = ''  # comma-separated files, folders (searched recursively) and globs (quote them: '*.jsonl.gz')
out = ''  # the dataset folder to write: train.bin, val.bin, meta.json
tokenizer = 'bytes'  # 'bytes' (256 byte tokens) or 'gpt2' (tiktoken's BPE, the paper's scale)
val_fraction = 0.005  # share of documents that go to val.bin, chosen by a hash of their text
workers = 0  # tokenizer processes; 0: one per core
max_document_bytes = 4 * 2 ** 20  # a longer document (a .txt file, a JSON line) is skipped and counted, never read whole
# -----------------------------------------------------------------------------

FORMATS = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')
BUILD_MARK = '.corpora-build'  # a file in every folder corpora.py builds: {out}.tmp is its own, safe to clear


def expand_inputs(patterns):
    """Files named by paths, globs and folders (searched recursively), in sorted order; an error for none."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in '*?[') else [pattern]
        for path in found:
            if os.path.isdir(path):
                files += sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                                if f.endswith(FORMATS))
            elif os.path.exists(path):
                files.append(path)
            else:
                raise FileNotFoundError(f'input {path} does not exist')
    unknown = [f for f in files if not f.endswith(FORMATS)]
    if unknown:
        raise ValueError(f'{unknown[0]}: unknown format; the readers take {", ".join(FORMATS)}')
    if not files:
        raise ValueError(f'no input files match {" ".join(patterns)}')
    return files


def open_text_stream(path):
    """A text stream of a .jsonl / .jsonl.gz / .jsonl.zst file."""
    if path.endswith('.gz'):
        return gzip.open(path, 'rt', encoding='utf-8', errors='replace')
    if path.endswith('.zst'):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f'{path}: reading .zst needs the optional package zstandard (pip install zstandard)')
        raw = open(path, 'rb')
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding='utf-8', errors='replace')
    return open(path, encoding='utf-8', errors='replace')


def documents(path, skipped, text_key='text', max_bytes=4 * 2 ** 20):
    """
    Yield the documents of one file; lines that are not JSON objects with a text field, and documents over
    max_bytes (a 1 MB .gz can hold a 1 GB line), are counted in skipped. At most max_bytes are held at a time.
    """
    if path.endswith('.txt'):
        with open(path, encoding='utf-8', errors='replace') as f:
            text = f.read(max_bytes + 1)
        if len(text) > max_bytes:
            skipped['document too large'] += 1
        elif text:
            yield text
        return
    if path.endswith('.parquet'):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f'{path}: reading .parquet needs the optional package pyarrow (pip install pyarrow)')
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_key], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and len(text) > max_bytes:
                    skipped['document too large'] += 1
                elif isinstance(text, str) and text:
                    yield text
                else:
                    skipped['empty or missing text'] += 1
        return
    with open_text_stream(path) as f:
        for line in iter(lambda: f.readline(max_bytes + 1), ''):
            if len(line) > max_bytes and not line.endswith('\n'):  # too long: read past the rest, never hold it
                while (rest := f.readline(max_bytes)) and not rest.endswith('\n'):
                    pass
                skipped['document too large'] += 1
                continue
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(text_key)
            except (ValueError, AttributeError, RecursionError):
                skipped['not a JSON object'] += 1
                continue
            if isinstance(text, str) and text:
                yield text
            else:
                skipped['empty or missing text'] += 1


def in_val(text, val_fraction):
    """A fixed pseudo-random share of the documents, chosen by their content."""
    h = int.from_bytes(hashlib.blake2b(text.encode('utf-8', errors='replace'), digest_size=8).digest(), 'little')
    return h / 2 ** 64 < val_fraction


_encoder = None


def _tokenize(args):
    """In a worker: a chunk of documents -> (train tokens, val tokens) as arrays, each document ending in EOT."""
    global _encoder
    docs, tokenizer, val_fraction = args
    if _encoder is None:
        _encoder = data.get_tokenizer(tokenizer)
    eot = data.special_id(_encoder, '<|endoftext|>')
    out = {True: [], False: []}
    for text, ids in zip(docs, _encoder.encode_ordinary_batch(docs, num_threads=1)):
        out[in_val(text, val_fraction)] += ids + [eot]
    return out[False], out[True]


def chunks(files, skipped, chunk_bytes, on_file, max_bytes, unreadable=None):
    """
    Documents of all files in chunks of about chunk_bytes of text. A file that is not a regular file, or that
    breaks as it is read (a truncated .gz, a corrupt .parquet), is skipped from there on and counted, its name and
    reason appended to unreadable: one bad file never stops the build. The documents read before the break are kept.
    """
    chunk, size = [], 0
    for path in files:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read, /dev/zero never end it
                raise ValueError('not a regular file')
            for doc in documents(path, skipped, max_bytes=max_bytes):
                chunk.append(doc)
                size += len(doc)
                if size >= chunk_bytes:
                    yield chunk
                    chunk, size = [], 0
        except (ImportError, MemoryError):
            raise
        except Exception as e:  # EOFError, zlib.error, OSError, a zstd or an Arrow error: the file, not the build
            skipped['unreadable file'] += 1
            reason = f'{path}: {type(e).__name__}: {str(e)[:200]}'
            if unreadable is not None:
                unreadable.append(reason)
            print(f'skipped the rest of {reason}', file=sys.stderr, flush=True)
        on_file(path)
    if chunk:
        yield chunk


def tokenized(jobs, workers):
    """
    _tokenize over jobs in a pool of processes, in order, with at most 2 x workers chunks in flight (bounded memory).
    A worker that dies (killed for memory) is an error that says so, never a hang.
    """
    pending = deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('fork')) as pool:
        try:
            for job in jobs:
                pending.append(pool.submit(_tokenize, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise RuntimeError('a tokenizer process died (killed for memory?): lower max_document_bytes or workers, '
                               'and check the inputs for enormous documents') from None


def prepare_text(inputs, out, tokenizer='bytes', val_fraction=0.005, workers=None, chunk_bytes=1 << 20, verbose=True,
                 max_document_bytes=4 * 2 ** 20):
    """
    Tokenize the documents of inputs into {out}/train.bin, val.bin and meta.json; returns meta. The dataset is built
    in {out}.tmp and swapped in only when complete and not empty: a failed run leaves a good {out} as it was.
    """
    files = expand_inputs(inputs)
    out = os.path.normpath(out)  # 'ds/' is ds: its siblings ds.tmp and ds.old, never ds/.old inside it
    tmp, old = out + '.tmp', out + '.old'
    if not os.path.lexists(out) and os.path.isfile(os.path.join(old, 'meta.json')):
        os.replace(old, out)  # a run stopped between swap_in's two renames: the dataset it was, put back
        print(f'{out} was missing and {old} held its dataset (a run stopped while it swapped a build in): put back',
              flush=True)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f'{out} exists and is not a folder: --out names the dataset folder to write; choose another')
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, 'meta.json')):
        raise ValueError(f'{out} exists and is not a dataset folder (no meta.json): the new dataset replaces the whole '
                         f'folder, so choose a new or empty one')
    # the build goes to {out}.tmp, and the dataset it replaces to {out}.old while it is swapped in: names that
    # must be free, or what an earlier run of corpora.py left there, never a folder of the user's
    if os.path.lexists(tmp) and not os.path.isfile(os.path.join(tmp, BUILD_MARK)):
        raise ValueError(f'{tmp} exists and is not a build of corpora.py: corpora.py builds the dataset there; move '
                         f'it away or choose another --out')
    if os.path.lexists(old):
        raise ValueError(f'{old} exists: corpora.py moves the dataset it replaces there while it swaps the new one '
                         f'in; move it away (if it is the dataset an earlier build replaced, delete it)')
    enc = data.get_tokenizer(tokenizer)  # fails here, before any work, when gpt2's merges cannot be fetched
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    os.makedirs(tmp)
    with open(os.path.join(tmp, BUILD_MARK), 'w') as f:
        f.write('a dataset folder built by corpora.py\n')
    total_bytes = sum(os.path.getsize(f) for f in files)
    done_bytes, skipped, counts, t0 = 0, Counter(), {'train': 0, 'val': 0}, time.time()
    unreadable = []  # 'path: reason' of each input skipped (from where it broke on)

    last_report = [0.0]

    def report(force=False):
        if verbose and (force or time.time() - last_report[0] > 5):
            last_report[0] = time.time()
            rate = done_bytes / max(time.time() - t0, 1e-9)
            eta = f'{(total_bytes - done_bytes) / rate:.0f}s' if rate else '?'
            print(f'{done_bytes / max(total_bytes, 1):6.1%} of {total_bytes / 1e6:,.1f} MB of files done | '
                  f'{counts["train"]:,} train / {counts["val"]:,} val tokens | {rate / 1e6:.2f} MB/s | eta {eta}',
                  flush=True)

    def on_file(path):
        nonlocal done_bytes
        done_bytes += os.path.getsize(path)
        report(force=True)

    try:
        with open(os.path.join(tmp, 'train.bin'), 'wb') as train_f, open(os.path.join(tmp, 'val.bin'), 'wb') as val_f:
            jobs = ((c, tokenizer, val_fraction) for c in chunks(files, skipped, chunk_bytes, on_file,
                                                                 max_document_bytes, unreadable))
            for train_ids, val_ids in tokenized(jobs, workers or os.cpu_count()):  # in order: timing changes nothing
                for f, split, ids in ((train_f, 'train', train_ids), (val_f, 'val', val_ids)):
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    counts[split] += len(ids)
                report()
        if counts['train'] == 0:
            raise ValueError(f'{" ".join(inputs)}: no text found (skipped: {dict(skipped) or "nothing"}); an empty '
                             f'dataset cannot be trained on{f", and {out} is left as it was" if os.path.exists(out) else ""}')
        meta = {'tokenizer': tokenizer, 'vocab_size': enc.n_vocab, 'dtype': np.dtype(dtype).name, 'tokens': counts,
                'files': len(files), 'input_bytes': total_bytes, 'skipped': dict(skipped),
                'val_fraction': val_fraction, **({'unreadable_files': unreadable[:1000]} if unreadable else {})}
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        swap_in(tmp, out)  # meta.json in place means the folder is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f'{out}: {counts["train"]:,} train / {counts["val"]:,} val tokens ({tokenizer}, {meta["dtype"]}) from '
              f'{len(files)} files in {time.time() - t0:.0f}s' +
              (f'; skipped {sum(skipped.values())} lines: {dict(skipped)}' if skipped else '') +
              (f'; {len(unreadable)} files broke as they were read (meta.json lists them): '
               f'{"; ".join(unreadable[:3])}' if unreadable else ''))
    return meta


if __name__ == '__main__':
    cfg = configure(sys.argv[1:], script_config(globals()), source=__file__)
    if not cfg['input'] or not cfg['out']:
        sys.exit('usage: python corpora.py --input=PATH[,PATH...] --out=DIR [--tokenizer=gpt2] (--help lists the keys)')
    try:
        prepare_text(cfg['input'].split(','), cfg['out'], cfg['tokenizer'], cfg['val_fraction'], cfg['workers'] or None,
                     max_document_bytes=cfg['max_document_bytes'])
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f'error: {e}')
