"""
Data for nanoVLP: the tokenizer, the chat format (written once), token shards on disk, and the batches a training
step reads: text windows, image-caption and instruction samples packed into rows, the image stage's mixture and the
fine-tuning rows. Every batch is a function of (seed, step): see seeded_generator.

The data itself comes from shapes.py (the embedded world), corpora.py (real text corpora -> token shards) and
images.py (real image-caption shards, LLaVA conversations); they all meet the image source interface documented at
mixture_batch.
"""

import json
import os
import time
from collections import Counter

import numpy as np
import tiktoken
import torch

from configurator import ConfigError

# -----------------------------------------------------------------------------
# tokenizers

# Special tokens come only from the code that builds samples: text is always encoded with encode_ordinary, so a
# document that happens to contain the characters '<|image|>' stays ordinary text.
SPECIAL_TOKENS = ['<|endoftext|>', '<|image|>', '<|user|>', '<|assistant|>']
# GPT-2's pre-tokenizer split: it only decides where byte runs may merge, so any reasonable split works for bytes
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_tokenizer(name):
    """
    'bytes': 256 byte tokens + the special tokens (the shapes world); 'gpt2': tiktoken's GPT-2 BPE + the same; a path
    to a .json file: an imported LM's own tokenizer with the special tokens placed in its vocabulary (HFTokenizer,
    written by import_lm.py beside its checkpoint). A checkpoint records the name, which rebuilds the tokenizer.
    """
    if name.endswith('.json'):  # an imported LM's: the optional tokenizers package runs it
        from import_lm import HFTokenizer
        return HFTokenizer(name)
    if name == 'bytes':
        ranks = {bytes([i]): i for i in range(256)}
        pattern = SPLIT_PATTERN
    elif name == 'gpt2':
        base = tiktoken.get_encoding('gpt2')  # downloads its merges once, then tiktoken caches them
        ranks, pattern = base._mergeable_ranks, base._pat_str
    else:
        raise ValueError(f"unknown tokenizer {name!r}: use 'bytes' (the shapes world), 'gpt2' (real corpora) or the "
                         f".json tokenizer import_lm.py wrote beside an imported checkpoint")
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f'nanovlp_{name}', pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def padded_vocab_size(enc):
    """The embedding table size: the vocabulary rounded up to a multiple of 64, which matmul kernels prefer."""
    return 64 * -(-enc.n_vocab // 64)


def special_id(enc, token):
    return enc.encode_single_token(token)


# -----------------------------------------------------------------------------
# the chat format, image-caption samples, and their packing into rows

def chat_sample(enc, turns, n_image_tokens=0):
    """
    The chat format, the one place it is written: an image's n_image_tokens <|image|> tokens first, then per turn
    <|user|> question <|assistant|> answer <|endoftext|>. Returns (tokens, loss mask): the mask covers the answers
    and their end tokens only. A last turn whose answer is None ends at <|assistant|>: the prompt a model answers
    (question_prompt). Training on the shapes world and on LLaVA records, evaluation, benchmarks and sample.py all
    build their sequences here, so a model is asked in the very format it was taught.
    """
    user, assistant, eot = (special_id(enc, t) for t in ('<|user|>', '<|assistant|>', '<|endoftext|>'))
    tokens, mask = [special_id(enc, '<|image|>')] * n_image_tokens, [False] * n_image_tokens
    for q, a in turns:
        prompt = [user] + enc.encode_ordinary(q) + [assistant]
        answer = [] if a is None else enc.encode_ordinary(a) + [eot]
        tokens += prompt + answer
        mask += [False] * len(prompt) + [True] * len(answer)
    return tokens, mask


def question_prompt(enc, question, n_image_tokens):
    """What the model sees before it answers a question about one image."""
    return chat_sample(enc, [(question, None)], n_image_tokens)[0]


def caption_answer(answer):
    """How a question-form caption writes an answer after its question (probe.py ranks replies so written)."""
    return f' {answer}.'  # the space with the answer: " green" is one BPE token


def caption_sample(enc, caption, n_image_tokens):
    """
    <|image|> x N, the caption, <|endoftext|>. A caption is a str, scored whole, or (a shapes world question-form
    caption) a list of (question, answer) pairs written "question answer." one after another, scored on the answers.
    The loss is on what is scored and on the end.
    """
    tokens, mask = [special_id(enc, '<|image|>')] * n_image_tokens, [False] * n_image_tokens

    def add(text, scored):
        ids = enc.encode_ordinary(text)
        tokens.extend(ids)
        mask.extend([scored] * len(ids))

    if isinstance(caption, str):
        add(caption, True)
    else:
        for i, (question, answer) in enumerate(caption):
            add(f'{" " if i else ""}{question}', False)
            add(caption_answer(answer), True)
    tokens.append(special_id(enc, '<|endoftext|>'))
    mask.append(True)
    return tokens, mask


def pack_row(samples, block_size, eot):
    """
    Samples (tokens, mask, image ids) laid end to end after one <|endoftext|>, never split: returns inputs and
    targets of length block_size (targets -1 where the mask is off or past the end) and the row's image ids.
    """
    tokens, mask, images = [eot], [False], []
    for t, m, ims in samples:
        tokens += t
        mask += m
        images += ims
    if len(tokens) > block_size + 1:
        raise ValueError(f'{len(samples)} samples of {len(tokens)} tokens do not fit block_size={block_size}')
    pad = block_size + 1 - len(tokens)
    tokens, mask = tokens + [eot] * pad, mask + [False] * pad
    x = torch.tensor(tokens[:-1])
    y = torch.where(torch.tensor(mask[1:]), torch.tensor(tokens[1:]), -1)
    return x, y, images


def fill_row(draw, block_size):
    """Draw samples (tokens, mask, image ids) while they fit; the first one that does not is kept for later."""
    row, used = [], 1
    while True:
        sample = draw()
        if used + len(sample[0]) > block_size + 1:
            if not row:
                raise ValueError(f'one sample of {len(sample[0])} tokens does not fit block_size={block_size}')
            return row, sample
        row.append(sample)
        used += len(sample[0])


# -----------------------------------------------------------------------------
# token shards on disk

def write_shard(path, tokens, dtype=np.uint16):
    arr = np.asarray(tokens, dtype=dtype)
    tmp = path + '.tmp'
    arr.tofile(tmp)
    os.replace(tmp, path)  # never leave a half-written shard behind
    return len(arr)


def read_json(path):
    """A JSON file's value; a file that is not JSON is a ValueError naming it and where it breaks (no traceback)."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}') from None
    except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not UTF-8 text (byte {e.start}): is it the right file?') from None
    except RecursionError:
        raise ValueError(f'{path} nests its JSON too deeply to be a data file of this kind') from None


def load_meta(folder):
    path = os.path.join(folder, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: prepare the dataset first (python corpora.py --input=... --out=...)')
    with open(path) as f:
        return json.load(f)


def open_shard(folder, split):
    """Memory-map {folder}/{split}.bin, checking it against meta.json's dtype and token count."""
    meta = load_meta(folder)
    path = os.path.join(folder, f'{split}.bin')
    if not os.path.exists(path):
        raise FileNotFoundError(f'token shard {path} not found')
    dtype = np.dtype(meta.get('dtype', 'uint16'))
    expected = meta['tokens'][split]
    if expected == 0:
        raise ValueError(f'token shard {path} holds no tokens: the {split} split of the dataset is empty; prepare it '
                         f'from a corpus with text in it')
    size = os.path.getsize(path)
    if size != expected * dtype.itemsize:
        raise ValueError(f'token shard {path} has {size} bytes, but meta.json says {expected:,} tokens of '
                         f'{dtype.name} ({expected * dtype.itemsize} bytes): the shard is truncated or was written '
                         f'with another dtype; prepare the dataset again')
    return np.memmap(path, dtype=dtype, mode='r')


# -----------------------------------------------------------------------------
# batches: each a function of (seed, step), built for the rows a rank and micro-step take

def seeded_generator(*keys):
    """
    A torch generator for integer keys such as (seed, step). Training draws each step's batch from
    seeded_generator(seed, step), so a batch is a function of the step alone: a resumed run needs only the step to
    continue exactly, and a DataLoader worker can build any step without the ones before it.
    """
    mixed = np.random.SeedSequence(list(keys)).generate_state(2, np.uint32)  # well mixed, unlike seed + step
    return torch.Generator().manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)


def randint(generator, n):
    return int(torch.randint(n, (1,), generator=generator))


def text_batch(tokens, batch_size, block_size, generator, rows=slice(None)):
    """
    Random windows of block_size + 1 tokens: inputs and next-token targets. The offsets of all batch_size rows are
    drawn and the rows in the slice `rows` are read, so ranks and micro-steps that take their slices of a step's
    batch see exactly the rows of a single-process run.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(f'a token shard of {len(tokens)} tokens is too small for block_size={block_size}')
    offsets = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)[rows].tolist()
    batch = torch.from_numpy(np.stack([tokens[i:i + block_size + 1] for i in offsets]).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


# An image source (images.ImageWorld, images.RealImages) is what the image batches read: n_captions and
# n_conversations; caption_sample(i, enc, n_image_tokens, generator) and conversation_sample(i, enc, n_image_tokens),
# each (tokens, loss mask, image refs); usable(ref), which decodes an image and counts a failure in skipped (a
# Counter) by reason; pixels(refs), uint8 [len(refs), H, W, 3]. A new kind of image data implements these.
# why a sample drawn for a batch was left out: images.decode_image's and read_image_file's reasons (BadImage), a
# sample over block_size; every skip counter uses these keys (runtime.tally_counts sums them over the ranks)
SKIP_REASONS = ('not an image', 'too large', 'too small', 'extreme aspect ratio', 'truncated or corrupt',
                'missing file', 'unreadable file', 'unusable file name', 'outside its folder', 'not a regular file',
                'file too large', 'longer than block_size')
MAX_DRAWS = 1000  # draws in a row without a usable sample before a batch gives up: the image data is broken


def draw_sample(source, enc, kind, generator, n_image_tokens, block_size):
    """
    One random 'caption' or 'instruct' sample of an image source (the shapes world, or images.RealImages): (tokens,
    loss mask, image refs). A sample whose image fails to decode or that does not fit block_size is skipped, counted
    in source.skipped, and another drawn; the draws come from the generator, so the result is still a function of it.
    """
    for _ in range(MAX_DRAWS):
        if kind == 'caption':
            sample = source.caption_sample(randint(generator, source.n_captions), enc, n_image_tokens, generator)
        else:
            sample = source.conversation_sample(randint(generator, source.n_conversations), enc, n_image_tokens)
        if len(sample[0]) + 1 > block_size:
            source.skipped['longer than block_size'] += 1
        elif all(source.usable(ref) for ref in sample[2]):
            return sample
    raise ValueError(f'{MAX_DRAWS} {kind} samples in a row were unusable ({dict(source.skipped)}): check the data')


def mixture_batch(source, enc, text_tokens, batch_size, block_size, n_image_tokens, image_ratio, instruct_ratio,
                  generator, rows=slice(None)):
    """
    The image stage's rows of one step: each is image-caption (probability image_ratio), instruction
    (instruct_ratio) or text (the rest). The kinds and a seed per row are drawn for all batch_size rows; only the
    rows in the slice `rows` are built, from their own seeds, so any split over ranks and micro-steps sees the rows
    of the single-process batch. Returns inputs, targets and the image refs of the rows in order.
    """
    eot = special_id(enc, '<|endoftext|>')
    kinds = torch.rand(batch_size, generator=generator).tolist()
    seeds = torch.randint(2 ** 62, (batch_size,), generator=generator).tolist()
    xs, ys, image_refs = [], [], []
    for u, seed in zip(kinds[rows], seeds[rows]):
        row_gen = torch.Generator().manual_seed(seed)
        if u < image_ratio + instruct_ratio:
            kind = 'caption' if u < image_ratio else 'instruct'
            samples, _ = fill_row(lambda: draw_sample(source, enc, kind, row_gen, n_image_tokens, block_size),
                                  block_size)
            x, y, refs = pack_row(samples, block_size, eot)  # the sample that did not fit is dropped: rows stay random
        else:
            x, y = text_batch(text_tokens, 1, block_size, row_gen)
            x, y, refs = x[0], y[0], []
        xs.append(x)
        ys.append(y)
        image_refs += refs
    return torch.stack(xs), torch.stack(ys), image_refs


def caption_row_ratio(source, enc, block_size, n_image_tokens, image_ratio, of, instruct_ratio, seed, verbose=False):
    """
    The share of the image stage's rows that are image-caption rows: image_ratio itself when it counts rows (of=
    'rows'), or the share of rows that makes image_ratio of the tokens image and caption tokens (of='tokens',
    rows_for_token_share). A ConfigError when it leaves no room for instruct_ratio.
    """
    row_ratio = image_ratio
    if of == 'tokens':
        row_ratio, fill = rows_for_token_share(source, enc, block_size, n_image_tokens, image_ratio, seed)
        if verbose:
            print(f'image stage: image_ratio={image_ratio} of the tokens is {row_ratio:.4f} of the rows (a caption row '
                  f'is {fill:.1%} image and caption tokens, a text row 100% text)', flush=True)
    if row_ratio + instruct_ratio > 1:
        raise ConfigError(f'image_ratio={image_ratio} needs {row_ratio:.3f} of the rows and instruct_ratio='
                          f'{instruct_ratio} more: over 1')
    return row_ratio


def rows_for_token_share(source, enc, block_size, n_image_tokens, share, seed):
    """
    The share of rows that are image-caption rows when `share` of the tokens (padding aside) are to be image and
    caption tokens: caption rows are packed but not full, text rows are, so share = p * fill / (p * fill + 1 - p).
    Returns (p, fill).
    """
    fill = caption_row_fill(source, enc, block_size, n_image_tokens, seed)
    return share / (share + fill * (1 - share)), fill


def caption_row_fill(source, enc, block_size, n_image_tokens, seed, rows=100):
    """
    The mean share of a packed image-caption row that its samples fill (the rest is padding), over `rows` rows. A
    sample counts whole, its image, its caption and its end: a question-form caption's questions are image-text data
    the model reads although its loss is on the answers alone.
    """
    gen = seeded_generator(seed, 0, 1)  # apart from (seed, step)
    used = 0
    for _ in range(rows):
        samples, _ = fill_row(lambda: draw_sample(source, enc, 'caption', gen, n_image_tokens, block_size), block_size)
        used += sum(len(tokens) for tokens, _, _ in samples)
    return used / (rows * block_size)


TOKEN_KINDS = ('image', 'caption', 'instruction', 'text', 'unscored')


def token_kinds(x, y, enc):
    """
    A mixture batch's input tokens by kind (a Counter over TOKEN_KINDS): the <|image|> placeholders; the scored
    tokens of image-caption, instruction and text rows; and the rest (padding, separators, questions), 'unscored'.
    A row's kind is read off its tokens: a chat turn makes an instruction row, an image a caption row.
    """
    image, user = special_id(enc, '<|image|>'), special_id(enc, '<|user|>')
    counts = Counter(image=int((x == image).sum()))
    for row_x, row_y in zip(x, y):
        kind = 'instruction' if (row_x == user).any() else 'caption' if (row_x == image).any() else 'text'
        counts[kind] += int((row_y != -1).sum())
    counts['unscored'] = x.numel() - sum(counts.values())
    return counts


def finetune_plan(source, enc, block_size, n_image_tokens, epochs, seed, limit=0, verbose=False):
    """
    The fine-tuning epochs as rows of conversation indices: each epoch a shuffle of the conversations (the first
    limit of them; 0: all), packed greedily into rows of block_size tokens. Lengths are measured once; the rows are
    built when a batch is (finetune_row). Conversations longer than a row are left out, counted in source.skipped
    and, verbose, said. Returns [epoch][row] = [indices].
    """
    lengths, t0, n = [], time.time(), min(limit or source.n_conversations, source.n_conversations)
    for i in range(n):  # LLaVA's 665k conversations take minutes: say how long
        lengths.append(len(source.conversation_sample(i, enc, n_image_tokens)[0]))
        if verbose and (i + 1) % 100_000 == 0:
            print(f'finetune: measured {i + 1:,} of {n:,} conversations, eta '
                  f'{(time.time() - t0) / (i + 1) * (n - i - 1):.0f}s', flush=True)
    too_long = sum(n + 1 > block_size for n in lengths)
    if too_long:
        source.skipped['longer than block_size'] += too_long
        if verbose:
            print(f'finetune: {too_long:,} conversations longer than block_size={block_size} left out', flush=True)
    plan = []
    for epoch in range(epochs):
        order = torch.randperm(len(lengths), generator=seeded_generator(seed, epoch, 0)).tolist()
        rows, row, used = [], [], 1
        for i in order:
            if lengths[i] + 1 > block_size:
                continue
            if used + lengths[i] > block_size + 1:
                rows.append(row)
                row, used = [], 1
            row.append(i)
            used += lengths[i]
        if row:
            rows.append(row)
        plan.append(rows)
    return plan


def finetune_split(rows_per_epoch, batch_size, text_ratio):
    """
    How a fine-tuning step's batch_size rows split: (n_conv packed conversation rows, n_text rows of plain text, steps
    per epoch). LLaVA keeps text-only conversations in its mix for the reason the text rows are here: without them
    fine-tuning erases the LM's text knowledge. A ConfigError when an epoch's rows do not fill one step.
    """
    n_text = round(batch_size * text_ratio)
    n_conv = batch_size - n_text
    steps_per_epoch = rows_per_epoch // max(n_conv, 1)
    if n_conv == 0 or steps_per_epoch == 0:
        raise ConfigError(f'the instruction set packs into {rows_per_epoch} rows, fewer than the {n_conv} a step '
                          f'takes (batch_size={batch_size}, finetune_text_ratio={text_ratio}): lower either')
    return n_conv, n_text, steps_per_epoch


def finetune_row(source, enc, indices, block_size, n_image_tokens):
    """
    One fine-tuning row from conversation indices: (x, y, image refs). A conversation whose image fails to decode
    keeps its place but has no loss (its mask is off) and a blank image (ref None); it is counted in source.skipped.
    """
    samples = []
    for i in indices:
        tokens, mask, refs = source.conversation_sample(i, enc, n_image_tokens)
        if not all(source.usable(ref) for ref in refs):
            mask, refs = [False] * len(mask), [None] * len(refs)
        samples.append((tokens, mask, refs))
    return pack_row(samples, block_size, special_id(enc, '<|endoftext|>'))


def finetune_batch(source, enc, conversation_rows, text_tokens, n_text, captions, block_size, n_image_tokens,
                   features, generator, rows=slice(None)):
    """
    One fine-tuning step's rows: first the packed conversation rows (finetune_plan's, built by finetune_row), then
    n_text rows from the generator: plain text, or (captions > 0, fine-tuning rehearsing the image stage) the image
    stage's mixture with that share of caption rows. Only the rows in the slice `rows` are built, as in
    mixture_batch. Returns inputs, targets and the model inputs of the rows' images.
    """
    n_conv = len(conversation_rows)
    start, stop, _ = rows.indices(n_conv + n_text)
    batch = [finetune_row(source, enc, indices, block_size, n_image_tokens)
             for indices in conversation_rows[start:stop]]
    refs = [r for row in batch for r in row[2]]
    if stop > n_conv:
        part = slice(max(start - n_conv, 0), stop - n_conv)
        if captions:
            x, y, rehearsed = mixture_batch(source, enc, text_tokens, n_text, block_size, n_image_tokens, captions,
                                            0.0, generator, part)
            refs += rehearsed
        else:  # plain text windows
            x, y = text_batch(text_tokens, n_text, block_size, generator, part)
        batch += [(x[i], y[i]) for i in range(len(x))]
    return torch.stack([r[0] for r in batch]), torch.stack([r[1] for r in batch]), batch_inputs(source, features, refs)


def batch_inputs(source, features, refs):
    """
    The model inputs for a batch's images: cached features of a frozen encoder, or the uint8 pictures; an empty
    tensor for a batch without images, so every step runs the same modules on every rank.
    """
    if features is not None:
        return {'features': torch.from_numpy(np.asarray(features[refs]))}
    return {'images': torch.from_numpy(source.pixels(refs))}


def counting_skips(source, make):
    """
    A batch builder (step, rows) -> (x, y, inputs[, tally]) made into one for runtime.batch_loader: the batch
    carries a tally (a Counter), the samples its building skipped by reason (a DataLoader worker counts in its own
    copy) added to the tally make returned, if any (the image stage's token_kinds).
    """
    def build(step, rows):
        before = Counter(source.skipped)
        x, y, inputs, *tally = make(step, rows)
        return x, y, inputs, (tally[0] if tally else Counter()) + (source.skipped - before)
    return build
