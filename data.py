"""
Data for nanoVLP: the tokenizer, the embedded "shapes world", token shards and the batch samplers.

With no data prepared, everything runs on the shapes world: a small universe generated from a seed, offline, and
written on first use under {data_dir}/shapes/. Its text corpus states facts about a fixed population of people
(their colours, pets, towns and food), arithmetic in words and ordered sequences (days, months, counting, the towns
along the river); its text tasks ask for those facts, sums and next items as multiple choice with known chance.

    python data.py shapes            # write data/shapes/ now and print its sizes (train.py does it on first use)
"""

import json
import os
import random
import sys

import numpy as np
import tiktoken
import torch

# -----------------------------------------------------------------------------
# tokenizers

# Special tokens come only from the code that builds samples: text is always encoded with encode_ordinary, so a
# document that happens to contain the characters '<|image|>' stays ordinary text.
SPECIAL_TOKENS = ['<|endoftext|>', '<|image|>', '<|user|>', '<|assistant|>']
# GPT-2's pre-tokenizer split: it only decides where byte runs may merge, so any reasonable split works for bytes
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_tokenizer(name):
    """'bytes': 256 byte tokens + the special tokens (the shapes world); 'gpt2': tiktoken's GPT-2 BPE + the same."""
    if name == 'bytes':
        ranks = {bytes([i]): i for i in range(256)}
        pattern = SPLIT_PATTERN
    elif name == 'gpt2':
        base = tiktoken.get_encoding('gpt2')  # downloads its merges once, then tiktoken caches them
        ranks, pattern = base._mergeable_ranks, base._pat_str
    else:
        raise ValueError(f"unknown tokenizer {name!r}: use 'bytes' (the shapes world) or 'gpt2' (real corpora)")
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f'nanovlp_{name}', pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def padded_vocab_size(enc):
    """The embedding table size: the vocabulary rounded up to a multiple of 64, which matmul kernels prefer."""
    return 64 * -(-enc.n_vocab // 64)


def special_id(enc, token):
    return enc.encode_single_token(token)


# -----------------------------------------------------------------------------
# the shapes world: its fixed population of facts

WORLD_SEED = 1234  # the world's facts; the corpus and task splits below draw their sentences with their own seeds
NUMBER_WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten', 'eleven',
                'twelve', 'thirteen', 'fourteen', 'fifteen', 'sixteen', 'seventeen', 'eighteen', 'nineteen', 'twenty']
COLORS = ['red', 'green', 'blue', 'yellow', 'purple', 'orange']
DAYS = ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday']
MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October',
          'November', 'December']
N_PEOPLE = 24
N_TOWNS = 8

# Each attribute: its values and its phrasings. A phrasing is (prompt, ending); the task prompts use the first one.
ATTRIBUTES = {
    'color': (COLORS, [('The favorite color of {p} is', '.'), ('{p} likes the color', ' best.'),
                       ('Ask {p} about colors and the answer is always', '.')]),
    'pet': (['cat', 'dog', 'bird', 'fish', 'horse', 'rabbit'],
            [('The pet of {p} is a', '.'), ('{p} has a pet', ' at home.'), ('Every morning {p} feeds the', '.')]),
    'food': (['apples', 'bread', 'rice', 'soup', 'cheese', 'plums'],
             [('The favorite food of {p} is', '.'), ('{p} eats', ' every day.'), ('For dinner {p} wants', '.')]),
    'town': (None, [('{p} lives in', '.'), ('The home of {p} is', '.'), ('{p} walks home to', ' at night.')]),
}


def make_names(rng, n, syllables):
    onsets, vowels = 'bdfgklmnprstvz', 'aeiou'
    names = set()
    while len(names) < n:
        names.add(''.join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)).capitalize())
    return sorted(names)


def make_world(seed=WORLD_SEED):
    """The fixed facts of the shapes world: people with attributes, and towns in their order along the river."""
    rng = random.Random(seed)
    towns = make_names(rng, N_TOWNS, 3)
    rng.shuffle(towns)  # the river's order, north to south
    people = make_names(rng, N_PEOPLE, 2)
    values = {attr: vals or towns for attr, (vals, _) in ATTRIBUTES.items()}
    facts = {p: {attr: rng.choice(values[attr]) for attr in ATTRIBUTES} for p in people}
    sequences = {'days': DAYS, 'months': MONTHS, 'numbers': NUMBER_WORDS[1:], 'river': towns}
    return {'people': people, 'facts': facts, 'values': values, 'sequences': sequences}


# -----------------------------------------------------------------------------
# the shapes world: text corpus

def fact_sentence(rng, world, person, attr, phrasing=None):
    templates = ATTRIBUTES[attr][1]
    prompt, ending = templates[rng.randrange(len(templates)) if phrasing is None else phrasing]
    return prompt.format(p=person) + ' ' + world['facts'][person][attr] + ending


ARITHMETIC_MAX = 10  # sums and differences of numbers up to ten: 121 facts, enough to take a small model a while


def arithmetic_pair(rng):
    """a + b or a - b with every number in 0 .. ARITHMETIC_MAX."""
    a, b = rng.randint(0, ARITHMETIC_MAX), rng.randint(0, ARITHMETIC_MAX)
    if rng.random() < 0.5 and a + b <= ARITHMETIC_MAX:
        return f'{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is', NUMBER_WORDS[a + b]
    a, b = max(a, b), min(a, b)
    return f'{NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]} is', NUMBER_WORDS[a - b]


def sequence_span(rng, world, length):
    """A run of consecutive items from one of the world's orders (days and months wrap around)."""
    name = rng.choice(sorted(world['sequences']))
    seq = world['sequences'][name]
    if name in ('days', 'months'):
        start = rng.randrange(len(seq))
        return [seq[(start + i) % len(seq)] for i in range(length)], name, seq
    length = min(length, len(seq))
    start = rng.randrange(len(seq) - length + 1)
    return seq[start:start + length], name, seq


SEQUENCE_INTROS = {'days': 'The days go', 'months': 'The months go', 'numbers': 'We count',
                   'river': 'Down the river the towns are'}


def make_document(rng, world):
    """One short document: a profile of a person, a page of sums, or a list, mixed as a small model can learn."""
    kind = rng.random()
    if kind < 0.5:
        people = rng.sample(world['people'], rng.randint(1, 2))
        sentences = [fact_sentence(rng, world, p, attr) for p in people for attr in rng.sample(sorted(ATTRIBUTES), 3)]
    elif kind < 0.8:
        sentences = [' '.join(arithmetic_pair(rng)) + '.' for _ in range(rng.randint(2, 5))]
    else:
        sentences = []
        for _ in range(rng.randint(1, 3)):
            items, name, _ = sequence_span(rng, world, rng.randint(3, 7))
            sentences.append(f"{SEQUENCE_INTROS[name]}: {', '.join(items)}.")
    return ' '.join(sentences)


def make_corpus(world, seed, n_bytes):
    rng = random.Random(seed)
    docs, size = [], 0
    while size < n_bytes:
        docs.append(make_document(rng, world))
        size += len(docs[-1]) + 1
    return docs


# -----------------------------------------------------------------------------
# the shapes world: text tasks (multiple choice; the right answer is uniform over the choice set, so chance = 1/k)

def choice_set(rng, answer, pool, k=4):
    choices = [answer] + rng.sample([v for v in pool if v != answer], k - 1)
    rng.shuffle(choices)
    return choices


def make_text_tasks(world, seed, n_per_task):
    rng = random.Random(seed)
    items = []
    for _ in range(n_per_task):  # facts: the first phrasing of each attribute, asked for any person
        person, attr = rng.choice(world['people']), rng.choice(sorted(ATTRIBUTES))
        prompt = ATTRIBUTES[attr][1][0][0].format(p=person)
        answer = world['facts'][person][attr]
        items.append(dict(task='facts', prompt=prompt, choices=choice_set(rng, answer, world['values'][attr]),
                          answer=answer))
    for _ in range(n_per_task):  # arithmetic: four consecutive numbers, the answer at a uniform place among them
        prompt, answer = arithmetic_pair(rng)
        lo = min(max(NUMBER_WORDS.index(answer) - rng.randrange(4), 0), ARITHMETIC_MAX + 1 - 4)
        items.append(dict(task='arithmetic', prompt=prompt, choices=NUMBER_WORDS[lo:lo + 4], answer=answer))
    for _ in range(n_per_task):  # sequence: three items of an order, which one comes next?
        items_, name, seq = sequence_span(rng, world, 4)
        prompt = f"{SEQUENCE_INTROS[name]}: {', '.join(items_[:3])},"
        items.append(dict(task='sequence', prompt=prompt, choices=choice_set(rng, items_[3], seq), answer=items_[3]))
    for item in items:
        item['choices'] = [' ' + c for c in item['choices']]  # a continuation starts with its space
        item['answer'] = item['choices'].index(' ' + item['answer'])
    return items


# -----------------------------------------------------------------------------
# token shards on disk

SHAPES_VERSION = 2  # bump when the generator changes, so stale caches are rebuilt
SPLIT_SEEDS = {'train': 1, 'val': 2, 'test': 3}  # disjoint streams of sentences and items


def write_shard(path, tokens, dtype=np.uint16):
    arr = np.asarray(tokens, dtype=dtype)
    tmp = path + '.tmp'
    arr.tofile(tmp)
    os.replace(tmp, path)  # never leave a half-written shard behind
    return len(arr)


def prepare_shapes(data_dir='data', train_bytes=3_000_000, val_bytes=100_000, n_task_items=200, verbose=True):
    """Write the shapes world's text shards and text tasks under {data_dir}/shapes, once; return the folder."""
    out = os.path.join(data_dir, 'shapes')
    meta_path = os.path.join(out, 'meta.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get('version') == SHAPES_VERSION:
                return out
    os.makedirs(out, exist_ok=True)
    enc, world = get_tokenizer('bytes'), make_world()
    eot = special_id(enc, '<|endoftext|>')
    meta = {'version': SHAPES_VERSION, 'tokenizer': 'bytes', 'vocab_size': enc.n_vocab, 'dtype': 'uint16',
            'world_seed': WORLD_SEED, 'tokens': {}}
    for split, n_bytes in (('train', train_bytes), ('val', val_bytes)):
        docs = make_corpus(world, SPLIT_SEEDS[split], n_bytes)
        tokens = [t for ids in enc.encode_ordinary_batch(docs) for t in ids + [eot]]
        meta['tokens'][split] = write_shard(os.path.join(out, f'{split}.bin'), tokens)
    with open(os.path.join(out, 'text_tasks.json'), 'w') as f:
        json.dump(make_text_tasks(world, SPLIT_SEEDS['test'], n_task_items), f)
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + '.tmp', meta_path)  # meta.json last: its presence means the folder is complete
    if verbose:
        print(f"shapes world written to {out}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens")
    return out


def dataset_dir(dataset, data_dir):
    """The folder of a token dataset: 'shapes' is generated on first use; anything else is a prepared folder."""
    return prepare_shapes(data_dir) if dataset == 'shapes' else dataset


def load_meta(folder):
    path = os.path.join(folder, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: prepare the dataset first (python data.py prepare text ...)')
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
    size = os.path.getsize(path)
    if size != expected * dtype.itemsize:
        raise ValueError(f'token shard {path} has {size} bytes, but meta.json says {expected:,} tokens of '
                         f'{dtype.name} ({expected * dtype.itemsize} bytes): the shard is truncated or was written '
                         f'with another dtype; prepare the dataset again')
    return np.memmap(path, dtype=dtype, mode='r')


# -----------------------------------------------------------------------------
# batches

def text_batch(tokens, batch_size, block_size, generator, rank=0, world_size=1):
    """
    Random windows of block_size + 1 tokens: inputs and next-token targets. Every rank draws the offsets of the
    whole global micro-batch from the same generator and keeps its own slice, so a run on N ranks sees exactly the
    batches of a single-process run with N times the micro-batch, and the generator's state is the data position.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(f'a token shard of {len(tokens)} tokens is too small for block_size={block_size}')
    offsets = torch.randint(len(tokens) - block_size - 1, (batch_size * world_size,), generator=generator)
    offsets = offsets[rank * batch_size:(rank + 1) * batch_size].tolist()
    rows = torch.from_numpy(np.stack([tokens[i:i + block_size + 1] for i in offsets]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def load_text_tasks(folder):
    with open(os.path.join(folder, 'text_tasks.json')) as f:
        return json.load(f)


if __name__ == '__main__':
    if sys.argv[1:2] == ['shapes']:
        prepare_shapes(sys.argv[2] if len(sys.argv) > 2 else 'data')
    else:
        sys.exit(__doc__)
