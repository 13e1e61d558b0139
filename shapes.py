"""
The shapes world: a small universe generated from a seed, offline, so that the whole study runs on a laptop CPU with
no data prepared. Its text corpus states facts about a fixed population of people (their colours, pets, towns and
food, and, rarely, the instrument they play), arithmetic in words and ordered sequences; its text tasks ask for them
as multiple choice with known chance, two hard enough that a short run does not saturate them: where forgetting
shows. Its pictures are scenes of 1-4 coloured shapes on a 3x3 grid, with captions, conversations and balanced
vision questions, grounding among them; fine-tuning names only some of the colors and shapes (SEEN).

    python shapes.py                 # write {data_dir}/shapes/ (text shards, text tasks) and print its sizes
"""

import json
import os
import random
import sys
from collections import Counter

import numpy as np

from configurator import configure
from checkpoint import code_digest
from data import get_tokenizer, special_id, write_shard
from grounding import box_iou  # vlm-evaluation's, as the paper's RefCOCO is scored

# -----------------------------------------------------------------------------
# config for `python shapes.py`
data_dir = 'data'  # the world is written to {data_dir}/shapes
# -----------------------------------------------------------------------------

# the code that generates the world: its rendered pictures and its text are made again when it changes (comments aside)
WORLD_CODE = code_digest(__file__)[:12]
SPLIT_SEEDS = {'train': 1, 'val': 2, 'test': 3}  # disjoint streams of sentences and items

# -----------------------------------------------------------------------------
# its fixed population of facts

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
# a long-tail fact: stated in few documents, so a short run learns it only in part and forgetting shows there first
RARE_ATTRIBUTE = ('instrument', ['drum', 'flute', 'harp', 'horn', 'lute', 'pipe'],
                  [('The instrument of {p} is the', '.'), ('{p} plays the', ' in the evening.')])
RARE_RATE = 0.1  # the chance that a profile states it


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
    rare = random.Random(seed + 1)  # its own stream: the other facts stay those of earlier versions
    name, choices, _ = RARE_ATTRIBUTE
    for p in people:
        facts[p][name] = rare.choice(choices)
    values[name] = choices
    sequences = {'days': DAYS, 'months': MONTHS, 'numbers': NUMBER_WORDS[1:], 'river': towns}
    return {'people': people, 'facts': facts, 'values': values, 'sequences': sequences}


# -----------------------------------------------------------------------------
# text corpus

def fact_sentence(rng, world, person, attr, phrasing=None):
    templates = RARE_ATTRIBUTE[2] if attr == RARE_ATTRIBUTE[0] else ATTRIBUTES[attr][1]
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


def arithmetic_triple(rng):
    """a + b - c, a - b + c, a + b + c or a - b - c: each partial result and the answer in 0 .. ARITHMETIC_MAX."""
    while True:
        a, b, c = (rng.randint(0, ARITHMETIC_MAX) for _ in range(3))
        first, second = rng.choice('+-'), rng.choice('+-')
        mid = a + b if first == '+' else a - b
        end = mid + c if second == '+' else mid - c
        if 0 <= mid <= ARITHMETIC_MAX and 0 <= end <= ARITHMETIC_MAX:
            word = {'+': 'plus', '-': 'minus'}
            return (f'{NUMBER_WORDS[a]} {word[first]} {NUMBER_WORDS[b]} {word[second]} {NUMBER_WORDS[c]} is',
                    NUMBER_WORDS[end])


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
        if rng.random() < RARE_RATE:
            sentences.append(fact_sentence(rng, world, rng.choice(people), RARE_ATTRIBUTE[0]))
    elif kind < 0.8:  # a page of sums: one in three has three terms
        sentences = [' '.join(arithmetic_triple(rng) if rng.random() < 1 / 3 else arithmetic_pair(rng)) + '.'
                     for _ in range(rng.randint(2, 5))]
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
# text tasks (multiple choice; the right answer is uniform over the choice set, so chance = 1/k)

def choice_set(rng, answer, pool, k=4):
    choices = [answer] + rng.sample([v for v in pool if v != answer], k - 1)
    rng.shuffle(choices)
    return choices


def numbers_around(rng, answer):
    """Four consecutive numbers of 0 .. ARITHMETIC_MAX holding the answer at a uniform place among them."""
    lo = min(max(NUMBER_WORDS.index(answer) - rng.randrange(4), 0), ARITHMETIC_MAX + 1 - 4)
    return NUMBER_WORDS[lo:lo + 4]


def text_item(rng, world, task):
    """One item of a text task: (prompt, choices, answer), the answer uniform over the choices' places."""
    if task in ('facts', 'rare_facts'):  # the first phrasing of an attribute, asked for any person
        person = rng.choice(world['people'])
        attr = rng.choice(sorted(ATTRIBUTES)) if task == 'facts' else RARE_ATTRIBUTE[0]
        prompt = (RARE_ATTRIBUTE[2] if task == 'rare_facts' else ATTRIBUTES[attr][1])[0][0].format(p=person)
        answer = world['facts'][person][attr]
        return prompt, choice_set(rng, answer, world['values'][attr]), answer
    if task in ('arithmetic', 'long_arithmetic'):
        prompt, answer = (arithmetic_pair if task == 'arithmetic' else arithmetic_triple)(rng)
        return prompt, numbers_around(rng, answer), answer
    if task == 'sequence':  # three items of an order, which one comes next?
        items, name, seq = sequence_span(rng, world, 4)
        return f"{SEQUENCE_INTROS[name]}: {', '.join(items[:3])},", choice_set(rng, items[3], seq), items[3]
    raise ValueError(f'unknown text task {task!r}; the tasks are {", ".join(TEXT_TASKS)}')


def make_text_tasks(world, seed, n_per_task):
    """n_per_task items of every text task, each task from its own stream: the first n of them do not depend on
    n_per_task, so scoring the first eval_items scores a prefix of the same questions."""
    items = []
    for t, task in enumerate(TEXT_TASKS):
        rng = random.Random(seed * 1000 + t)
        for _ in range(n_per_task):
            prompt, choices, answer = text_item(rng, world, task)
            choices = [' ' + c for c in choices]  # a continuation starts with its space
            items.append(dict(task=task, prompt=prompt, choices=choices, answer=choices.index(' ' + answer)))
    return items


# -----------------------------------------------------------------------------
# scenes, their pictures, captions and questions

SHAPES = ['circle', 'square', 'triangle', 'cross']
SIZES = ['small', 'large']
POSITIONS = ['top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right']
RGB = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (60, 100, 240), 'yellow': (235, 215, 40),
       'purple': (160, 70, 210), 'orange': (245, 140, 30)}
BACKGROUND = 25  # dark gray: every color above stands out against it
MAX_OBJECTS = 4
# scenes with fewer objects are more common: a small model first learns to read one object, then to pick one out
OBJECT_COUNT_WEIGHTS = (4, 3, 2, 1)
VISION_TASKS = ('color', 'shape', 'count', 'exists', 'position', 'grounding')
# The colors and shapes that fine-tuning names (SEEN: half of each). Captions describe every scene fully, every color
# and shape; evaluation also asks about objects named by the others (held out: "the square", "the purple object"),
# which a model can find only if the image-caption stage grounded their names, and answers with seen words alone (a
# word fine-tuning never lets the model say it will not say: measured, docs/results.md). So vision is learned in the
# image-text stage, as in the paper, and fine-tuning teaches the question format on the seen half.
SEEN = {'color': ['red', 'blue', 'yellow'], 'shape': ['circle', 'triangle']}
REFERENTS = {'color': COLORS, 'shape': SHAPES}  # what evaluation's questions name
# The closed answer set of each task but grounding (a box): evaluation ranks them by likelihood (eval.vision_tasks)
ANSWERS = {'color': SEEN['color'], 'shape': SEEN['shape'], 'count': NUMBER_WORDS[1:MAX_OBJECTS + 1],
           'exists': ['yes', 'no'], 'position': POSITIONS}
# each task's question, the one place it is worded: evaluation, fine-tuning and question-form captions ask it so
QUESTIONS = {'color': 'What color is the {shape}?', 'shape': 'What shape is the {color} object?',
             'count': 'How many shapes are there?', 'exists': 'Is there {a} {color} {shape}?',
             'position': 'Where is the {shape}?'}
GROUNDING_PROMPT = 'Please provide the bounding box coordinate of the region this sentence describes: the {} {}.'
GROUNDING_IOU = 0.5  # a box counts when its IoU with the object's reaches this (RefCOCO's threshold)
TEXT_TASKS = ('facts', 'rare_facts', 'arithmetic', 'long_arithmetic', 'sequence')
EVAL_ITEMS = 1000  # items made per task, text and vision; a run scores the first eval_items of each (train.py)


def article(word):
    return 'an' if word[0] in 'aeiou' else 'a'


def ask(task, color='', shape=''):
    """The question of a task (QUESTIONS) about the object of this color and/or shape."""
    return QUESTIONS[task].format(color=color, shape=shape, a=article(color or 'x'))


def half(kind, value):
    """The seen values of a kind ('color', 'shape') if value is one of them, else the held-out ones."""
    seen = SEEN[kind]
    return seen if value in seen else [v for v in REFERENTS[kind] if v not in seen]


def random_object(rng, cell, shape=None, color=None, size=None):
    return dict(shape=shape or rng.choice(SHAPES), color=color or rng.choice(COLORS), size=size or rng.choice(SIZES),
                cell=cell)


def object_box(obj):
    """An object's bounding box [x1, y1, x2, y2] in image coordinates 0 .. 1, rounded to 2 decimals as LLaVA and
    vlm-evaluation write boxes: its cell's center and the extent render() gives its shape."""
    row, col = divmod(obj['cell'], 3)
    r = (0.42 if obj['size'] == 'large' else 0.27) / 3
    half = 0.85 * r if obj['shape'] == 'square' else r
    below = 0.8 * r if obj['shape'] == 'triangle' else half  # a triangle's base is 0.8 r below its center
    cx, cy = (col + 0.5) / 3, (row + 0.5) / 3
    return [round(v, 2) for v in (cx - half, cy - half, cx + half, cy + below)]


def box_text(box):
    return '[' + ', '.join(f'{v:.2f}' for v in box) + ']'


def grounding_chance():
    """The accuracy of the best answer that ignores the image: the one box that reaches GROUNDING_IOU for the most
    of the boxes the task asks for (cells, sizes and shapes uniform)."""
    boxes = [object_box(dict(cell=c, size=z, shape=s)) for c in range(9) for z in SIZES for s in SHAPES]
    return max(np.mean([box_iou(g, b) >= GROUNDING_IOU for b in boxes]) for g in boxes)


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
    """One object in one of several phrasings, each naming its color, shape and place (and sometimes its size), in
    every order a question asks for them: what is at a place, what color a shape is, where a colored shape is."""
    size = obj['size'] + ' ' if rng.random() < 0.5 else ''
    color, shape, place = obj['color'], obj['shape'], POSITIONS[obj['cell']]
    return rng.choice([f'{article(size or color)} {size}{color} {shape} at the {place}',
                       f'the {size}{shape} at the {place} is {color}', f'the {size}{color} {shape} is at the {place}',
                       f'the {size}{color} object at the {place} is a {shape}'])


def caption(scene, rng):
    """Every object of the scene, each in its own phrasing, and half the time the count first."""
    objs = [describe(o, rng) for o in rng.sample(scene, len(scene))]
    listed = objs[0] if len(objs) == 1 else ', '.join(objs[:-1]) + ' and ' + objs[-1]
    n = len(scene)
    counted = 'There ' + ('is one shape' if n == 1 else f'are {NUMBER_WORDS[n]} shapes')
    text = rng.choice(['{l}.', counted + ': {l}.']).format(l=listed)
    return text[0].upper() + text[1:]


def question_caption(scene, rng, n_facts=4):
    """
    A caption in question form: n_facts of the facts the vision questions ask of the scene (a different few each draw),
    each a (question, answer) pair in QUESTIONS' words, naming every color and shape, held out or not: the count, each
    object's color by its shape and its place (when no other object has that shape), its shape by its color (likewise),
    its presence, and the absence of one color-shape pair. data.caption_sample scores the answers.
    """
    facts = [(ask('count'), NUMBER_WORDS[len(scene)])]
    for o in scene:
        if sum(p['shape'] == o['shape'] for p in scene) == 1:
            facts += [(ask('color', shape=o['shape']), o['color']), (ask('position', shape=o['shape']),
                                                                      POSITIONS[o['cell']])]
        if sum(p['color'] == o['color'] for p in scene) == 1:
            facts.append((ask('shape', o['color']), o['shape']))
        facts.append((ask('exists', o['color'], o['shape']), 'yes'))
    absent = [(c, s) for c in COLORS for s in SHAPES if all((o['color'], o['shape']) != (c, s) for o in scene)]
    facts = list(dict.fromkeys(facts + [(ask('exists', *rng.choice(absent)), 'no')]))  # two red circles: one fact
    return rng.sample(facts, min(n_facts, len(facts)))


CAPTIONS = {'sentences': caption, 'questions': question_caption}  # caption_form's: a str, or (question, answer) pairs


def scene_with(rng, first, n=None, fewest=1, colors=COLORS, shapes=SHAPES):
    """A scene of n objects (fewest .. MAX_OBJECTS, fewer more often) whose first object has the attributes in
    `first`; the others avoid its shape and its color, so a question about it by shape or by color has one answer,
    and take theirs from `colors` and `shapes`."""
    n = n or rng.choices(range(fewest, MAX_OBJECTS + 1), weights=OBJECT_COUNT_WEIGHTS[fewest - 1:])[0]
    cell = first.get('cell', rng.randrange(9))
    obj = random_object(rng, cell, first.get('shape'), first.get('color'), first.get('size'))
    others = rng.sample([c for c in range(9) if c != cell], n - 1)
    return [obj] + [random_object(rng, c, rng.choice([s for s in shapes if s != obj['shape']]),
                                  rng.choice([k for k in colors if k != obj['color']])) for c in others]


def question(rng, task, referents=REFERENTS, fewest=1):
    """
    (scene, question, answer, chance, named): a question about one object named by a color or a shape of
    `referents` (REFERENTS: evaluation; SEEN: fine-tuning), its answer uniform over the task's answers (a color or a
    shape answer is a seen one), chance what an answer that ignores the image scores, named the (kind, value)
    pairs the question names. A question that names something asks about a scene of at least `fewest` objects.

    No object is singled out by anything but the name: the other objects' named attribute comes from the same half
    (seen or held out) as the named value, and their answered one from the task's answers. Otherwise a model that
    never learned "square" could answer "Where is the square?" with the one object fine-tuning never named, and
    "What color is the square?" with the one object whose color is an answer.
    """
    color, shape = rng.choice(referents['color']), rng.choice(referents['shape'])
    named = [('color', color), ('shape', shape)]
    alike = dict(fewest=fewest, colors=half('color', color), shapes=half('shape', shape))
    if task == 'color':  # the color of the one object of a shape
        answer = rng.choice(ANSWERS['color'])
        scene = scene_with(rng, {'color': answer, 'shape': shape}, **dict(alike, colors=ANSWERS['color']))
        return scene, ask('color', shape=shape), answer, 1 / len(ANSWERS['color']), named[1:]
    if task == 'shape':
        answer = rng.choice(ANSWERS['shape'])
        scene = scene_with(rng, {'color': color, 'shape': answer}, **dict(alike, shapes=ANSWERS['shape']))
        return scene, ask('shape', color), answer, 1 / len(ANSWERS['shape']), named[:1]
    if task == 'count':
        n = rng.randint(1, MAX_OBJECTS)
        return scene_with(rng, {}, n), ask('count'), NUMBER_WORDS[n], 1 / MAX_OBJECTS, []
    if task == 'exists':  # a color and a shape named, present together in the scene or not
        if rng.random() < 0.5:
            scene, answer = scene_with(rng, {'color': color, 'shape': shape}, **alike), 'yes'
        else:  # near misses: objects of the named color or the named shape, never both
            answer, scene = 'no', [dict(color=color, shape=shape)]
            while any((o['color'], o['shape']) == (color, shape) for o in scene):
                scene = scene_with(rng, {'color': rng.choice(alike['colors']), 'shape': rng.choice(alike['shapes'])},
                                   **alike)
        rng.shuffle(scene)
        return scene, ask('exists', color, shape), answer, 1 / 2, named
    if task == 'position':
        cell = rng.randrange(9)
        scene = scene_with(rng, {'shape': shape, 'cell': cell}, **alike)
        return scene, ask('position', shape=shape), POSITIONS[cell], 1 / len(POSITIONS), named[1:]
    if task == 'grounding':  # a referring expression in, its box out, as RefCOCO asks (cells and sizes uniform)
        scene = scene_with(rng, {'color': color, 'shape': shape, 'cell': rng.randrange(9), 'size': rng.choice(SIZES)},
                           **alike)
        return scene, GROUNDING_PROMPT.format(color, shape), box_text(object_box(scene[0])), GROUNDING_CHANCE, named
    raise ValueError(f'unknown vision task {task!r}; the tasks are {", ".join(VISION_TASKS)}')


GROUNDING_CHANCE = grounding_chance()


def conversation(rng):
    """A scene and one or two question-answer turns about it, naming only SEEN colors and shapes."""
    scene, q, a, _, _ = question(rng, rng.choice(VISION_TASKS), SEEN)
    turns = [(q, a)]
    if rng.random() < 0.3:  # a second turn that any scene answers
        turns.append((ask('count'), NUMBER_WORDS[len(scene)]))
    return scene, turns


def render_all(scenes, size):
    return np.stack([render(scene, size) for scene in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


def image_sets(n_captions, n_instruct, n_eval):
    """The fixed scene lists of the image data: caption scenes and conversations (train split), vision eval items
    (test split). Generated from their seeds in well under a second; their pictures are rendered once to a file."""
    rng = random.Random(SPLIT_SEEDS['train'] * 1000 + 7)
    caption_scenes = [scene_with(rng, {}) for _ in range(n_captions)]
    conversations = [conversation(rng) for _ in range(n_instruct)]
    eval_items = []
    for i, task in enumerate(VISION_TASKS):  # a stream per task: the first n questions do not depend on n_eval
        rng = random.Random(SPLIT_SEEDS['test'] * 1000 + 7 + i)
        eval_items += [dict(task=task, scene=s, question=q, answer=a, chance=c, box=object_box(s[0]),
                            held_out=any(v not in SEEN[kind] for kind, v in named))
                       for s, q, a, c, named in (question(rng, task, fewest=2) for _ in range(n_eval))]
    return caption_scenes, conversations, eval_items


def images_path(folder, scene_size, n_captions, n_instruct, n_eval):
    return os.path.join(folder, f'images_{WORLD_CODE}_{scene_size}px_{n_captions}_{n_instruct}_{n_eval}.npy')


def prepare_images(folder, scene_size, n_captions=8000, n_instruct=6000, n_eval=EVAL_ITEMS):
    """Render the image sets' pictures to one .npy in folder, once per resolution and size; returns its path."""
    path = images_path(folder, scene_size, n_captions, n_instruct, n_eval)
    if not os.path.exists(path):
        caption_scenes, conversations, eval_items = image_sets(n_captions, n_instruct, n_eval)
        scenes = caption_scenes + [s for s, _ in conversations] + [it['scene'] for it in eval_items]
        np.save(path + '.tmp.npy', render_all(scenes, scene_size))
        os.replace(path + '.tmp.npy', path)  # only a complete file carries the final name
    return path


def prepare_text(data_dir='data', train_bytes=3_000_000, val_bytes=100_000, n_task_items=EVAL_ITEMS, verbose=True):
    """Write the shapes world's text shards and text tasks under {data_dir}/shapes, once; return the folder."""
    out = os.path.join(data_dir, 'shapes')
    meta_path = os.path.join(out, 'meta.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get('version') == WORLD_CODE:
                return out
    os.makedirs(out, exist_ok=True)
    enc, world = get_tokenizer('bytes'), make_world()
    eot = special_id(enc, '<|endoftext|>')
    meta = {'version': WORLD_CODE, 'tokenizer': 'bytes', 'vocab_size': enc.n_vocab, 'dtype': 'uint16',
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


def load_text_tasks(folder):
    with open(os.path.join(folder, 'text_tasks.json')) as f:
        return json.load(f)


def first_per_task(items, n):
    """The indices of the first n items of each task, in order: what a run scoring n items per task scores."""
    seen, kept = Counter(), []
    for i, it in enumerate(items):
        seen[it['task']] += 1
        if seen[it['task']] <= n:
            kept.append(i)
    return kept


if __name__ == '__main__':
    cfg = configure(sys.argv[1:], {'data_dir': data_dir}, source=__file__)
    prepare_text(cfg['data_dir'])
