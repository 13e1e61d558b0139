"""
Data for nanoVLP: the tokenizer, the embedded "shapes world", token shards and the batch samplers.

With no data prepared, everything runs on the shapes world: a small universe generated from a seed, offline, and
written on first use under {data_dir}/shapes/. Its text corpus states facts about a fixed population of people
(their colours, pets, towns and food), arithmetic in words and ordered sequences (days, months, counting, the towns
along the river); its text tasks ask for those facts, sums and next items as multiple choice with known chance.

    python data.py shapes            # write data/shapes/ now and print its sizes (train.py does it on first use)
    python data.py prepare text --input=PATH [PATH ...] --out=DIR [--tokenizer=gpt2]   # a real corpus: corpora.py
"""

import json
import os
import random
import sys
import time
from collections import Counter

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
# the shapes world: scenes, their pictures, captions and questions

SHAPES = ['circle', 'square', 'triangle', 'cross']
SIZES = ['small', 'large']
POSITIONS = ['top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right']
RGB = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (60, 100, 240), 'yellow': (235, 215, 40),
       'purple': (160, 70, 210), 'orange': (245, 140, 30)}
BACKGROUND = 25  # dark gray: every color above stands out against it
MAX_OBJECTS = 4
# scenes with fewer objects are more common: a small model first learns to read one object, then to pick one out
OBJECT_COUNT_WEIGHTS = (4, 3, 2, 1)
VISION_TASKS = ('color', 'shape', 'count', 'exists', 'position')


def random_object(rng, cell, shape=None, color=None):
    return dict(shape=shape or rng.choice(SHAPES), color=color or rng.choice(COLORS), size=rng.choice(SIZES),
                cell=cell)


def render(scene, size=48):
    """A scene as uint8 [size, size, 3]: each object drawn in its cell of the 3x3 grid."""
    img = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    cell = size / 3
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for obj in scene:
        row, col = divmod(obj['cell'], 3)
        dx, dy = xx - (col + 0.5) * cell, yy - (row + 0.5) * cell
        r = cell * (0.42 if obj['size'] == 'large' else 0.27)
        if obj['shape'] == 'circle':
            mask = dx ** 2 + dy ** 2 <= r ** 2
        elif obj['shape'] == 'square':
            mask = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
        elif obj['shape'] == 'triangle':  # apex up, base at 0.8 r below the center
            mask = (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
        else:  # cross
            mask = ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
        img[mask] = RGB[obj['color']]
    return img


def describe(obj, rng):
    words = f"{obj['size'] + ' ' if rng.random() < 0.5 else ''}{obj['color']} {obj['shape']}"  # size: sometimes
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words} at the {POSITIONS[obj['cell']]}"


def caption(scene, rng):
    objs = [describe(o, rng) for o in rng.sample(scene, len(scene))]
    listed = objs[0] if len(objs) == 1 else ', '.join(objs[:-1]) + ' and ' + objs[-1]
    n = len(scene)
    template = rng.choice(['{l}.', 'In this picture: {l}.', 'We see {l}.',
                           'There ' + ('is one shape' if n == 1 else f'are {NUMBER_WORDS[n]} shapes') + ': {l}.'])
    text = template.format(l=listed)
    return text[0].upper() + text[1:]


def scene_with(rng, first, n=None):
    """A scene of n objects (1 .. MAX_OBJECTS) whose first object has the attributes in `first`; the others avoid
    its shape and its color, so a question about it by shape or by color has one answer."""
    n = n or rng.choices(range(1, MAX_OBJECTS + 1), weights=OBJECT_COUNT_WEIGHTS)[0]
    cell = first.get('cell', rng.randrange(9))
    obj = random_object(rng, cell, first.get('shape'), first.get('color'))
    others = rng.sample([c for c in range(9) if c != cell], n - 1)
    return [obj] + [random_object(rng, c, rng.choice([s for s in SHAPES if s != obj['shape']]),
                                  rng.choice([k for k in COLORS if k != obj['color']])) for c in others]


def question(rng, task):
    """(scene, question, answer) with the answer uniform over the task's answer set; returns also that set."""
    if task == 'color':
        answer = rng.choice(COLORS)
        scene = scene_with(rng, {'color': answer})
        return scene, f"What color is the {scene[0]['shape']}?", answer, COLORS
    if task == 'shape':
        answer = rng.choice(SHAPES)
        scene = scene_with(rng, {'shape': answer})
        return scene, f"What shape is the {scene[0]['color']} object?", answer, SHAPES
    if task == 'count':
        n = rng.randint(1, MAX_OBJECTS)
        return scene_with(rng, {}, n), 'How many shapes are there?', NUMBER_WORDS[n], NUMBER_WORDS[1:MAX_OBJECTS + 1]
    if task == 'exists':
        scene = scene_with(rng, {})
        if rng.random() < 0.5:
            obj = rng.choice(scene)
            color, shape, answer = obj['color'], obj['shape'], 'yes'
        else:
            present = {(o['color'], o['shape']) for o in scene}
            color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
            answer = 'no'
        return scene, f'Is there a {color} {shape}?', answer, ['yes', 'no']
    if task == 'position':
        cell = rng.randrange(9)
        scene = scene_with(rng, {'cell': cell})
        return scene, f"Where is the {scene[0]['shape']}?", POSITIONS[cell], POSITIONS
    raise ValueError(f'unknown vision task {task!r}; the tasks are {", ".join(VISION_TASKS)}')


def conversation(rng):
    """A scene and one or two question-answer turns about it."""
    scene, q, a, _ = question(rng, rng.choice(VISION_TASKS))
    turns = [(q, a)]
    if rng.random() < 0.3:  # a second turn that any scene answers
        turns.append(('How many shapes are there?', NUMBER_WORDS[len(scene)]))
    return scene, turns


def render_all(scenes, size):
    return np.stack([render(scene, size) for scene in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


# -----------------------------------------------------------------------------
# image-text samples and their packing into rows

def chat_tokens(enc, turns):
    """<|user|> q <|assistant|> a <|endoftext|> per turn; the mask marks the answer tokens and their end token."""
    user, assistant, eot = (special_id(enc, t) for t in ('<|user|>', '<|assistant|>', '<|endoftext|>'))
    tokens, mask = [], []
    for q, a in turns:
        prompt = [user] + enc.encode_ordinary(q) + [assistant]
        answer = enc.encode_ordinary(a) + [eot]
        tokens += prompt + answer
        mask += [False] * len(prompt) + [True] * len(answer)
    return tokens, mask


def caption_sample(enc, text, n_image_tokens):
    """<|image|> x N, the caption, <|endoftext|>: the loss is on the caption and its end."""
    image = special_id(enc, '<|image|>')
    words = enc.encode_ordinary(text) + [special_id(enc, '<|endoftext|>')]
    return [image] * n_image_tokens + words, [False] * n_image_tokens + [True] * len(words)


def question_prompt(enc, question, n_image_tokens):
    """What the model sees before it answers: the image, the question, the assistant marker."""
    return ([special_id(enc, '<|image|>')] * n_image_tokens + [special_id(enc, '<|user|>')] +
            enc.encode_ordinary(question) + [special_id(enc, '<|assistant|>')])


def instruct_sample(enc, turns, n_image_tokens):
    image = special_id(enc, '<|image|>')
    tokens, mask = chat_tokens(enc, turns)
    return [image] * n_image_tokens + tokens, [False] * n_image_tokens + mask


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


class ImageWorld:
    """
    The shapes world's image data, rendered once and kept in memory: the caption scenes and the instruction
    conversations of the train split (fixed sets, so a frozen encoder's features can be cached), and the vision
    eval items of the test split.
    """

    def __init__(self, folder, scene_size, n_captions=8000, n_instruct=6000, n_eval=100):
        self.folder, self.scene_size = folder, scene_size
        rng = random.Random(SPLIT_SEEDS['train'] * 1000 + 7)
        self.caption_scenes = [scene_with(rng, {}) for _ in range(n_captions)]
        self.conversations = [conversation(rng) for _ in range(n_instruct)]
        rng = random.Random(SPLIT_SEEDS['test'] * 1000 + 7)
        self.eval_items = [dict(task=t, scene=s, question=q, answer=a, answers=k)
                           for t in VISION_TASKS for s, q, a, k in (question(rng, t) for _ in range(n_eval))]
        path = os.path.join(folder, f'images_v{SHAPES_VERSION}_{scene_size}px_{n_captions}_{n_instruct}_{n_eval}.npy')
        if not os.path.exists(path):  # rendering is a few seconds: do it once per resolution
            scenes = self.caption_scenes + [s for s, _ in self.conversations] + [it['scene'] for it in self.eval_items]
            np.save(path + '.tmp.npy', render_all(scenes, scene_size))
            os.replace(path + '.tmp.npy', path)
        self.images = np.load(path, mmap_mode='r')
        self.caption_ids = np.arange(n_captions)
        self.conversation_ids = n_captions + np.arange(n_instruct)
        self.eval_ids = n_captions + n_instruct + np.arange(len(self.eval_items))
        if len(self.images) != len(self.eval_ids) + n_captions + n_instruct:
            raise ValueError(f'{path} does not match the scene lists: delete it to render it again')
        self.skipped = Counter()  # rendered pictures never fail; images.RealImages counts its skips here

    # the image source interface that mixture_batch and the fine-tuning rows use (images.RealImages has it too):
    # samples are (tokens, loss mask, image refs), and a ref is an index into self.images
    @property
    def n_captions(self):
        return len(self.caption_ids)

    @property
    def n_conversations(self):
        return len(self.conversation_ids)

    def caption_sample(self, i, enc, n_image_tokens, generator):
        text = caption(self.caption_scenes[i], random.Random(randint(generator, 2 ** 31)))  # a phrasing per draw
        return caption_sample(enc, text, n_image_tokens) + ([int(self.caption_ids[i])],)

    def conversation_sample(self, i, enc, n_image_tokens):
        return instruct_sample(enc, self.conversations[i][1], n_image_tokens) + ([int(self.conversation_ids[i])],)

    def usable(self, ref):
        return True

    def pixels(self, refs):
        return np.asarray(self.images[refs])


def randint(generator, n):
    return int(torch.randint(n, (1,), generator=generator))


def seeded_generator(*keys):
    """
    A torch generator for integer keys such as (seed, step). Training draws each step's batch from
    seeded_generator(seed, step), so a batch is a function of the step alone: a resumed run needs only the step to
    continue exactly, and a DataLoader worker can build any step without the ones before it.
    """
    mixed = np.random.SeedSequence(list(keys)).generate_state(2, np.uint32)  # well mixed, unlike seed + step
    return torch.Generator().manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)


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


def finetune_plan(source, enc, block_size, n_image_tokens, epochs, seed, verbose=False):
    """
    The fine-tuning epochs as rows of conversation indices: each epoch a shuffle of the conversations, packed greedily
    into rows of block_size tokens. Lengths are measured once; the rows are built when a batch is (finetune_row).
    Conversations longer than a row are left out and counted in source.skipped. Returns [epoch][row] = [indices].
    """
    lengths, t0, n = [], time.time(), source.n_conversations
    for i in range(n):  # LLaVA's 665k conversations take minutes: say how long
        lengths.append(len(source.conversation_sample(i, enc, n_image_tokens)[0]))
        if verbose and (i + 1) % 100_000 == 0:
            print(f'finetune: measured {i + 1:,} of {n:,} conversations, eta '
                  f'{(time.time() - t0) / (i + 1) * (n - i - 1):.0f}s', flush=True)
    too_long = sum(n + 1 > block_size for n in lengths)
    if too_long:
        source.skipped['longer than block_size'] += too_long
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


# -----------------------------------------------------------------------------
# token shards on disk

SHAPES_VERSION = 3  # bump when the generator changes, so stale caches are rebuilt
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
# batches

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


def load_text_tasks(folder):
    with open(os.path.join(folder, 'text_tasks.json')) as f:
        return json.load(f)


if __name__ == '__main__':
    if sys.argv[1:2] == ['shapes']:
        prepare_shapes(sys.argv[2] if len(sys.argv) > 2 else 'data')
    elif sys.argv[1:3] == ['prepare', 'text']:
        import corpora
        corpora.main(sys.argv[3:])
    else:
        sys.exit(__doc__)
