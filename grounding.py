"""
The paper's grounding benchmarks, RefCOCO, RefCOCO+, RefCOCOg and OCID-Ref, as TRI-ML vlm-evaluation reads and scores
them (vlm_eval/tasks/harnesses/refcoco.py, ocidref.py): their val splits, every sentence of every ref, its prompt, a
box generated as a list of normalized corners, correct at IoU >= 0.5 (0.25 for OCID-Ref), and its seeded slim
subsets. The refer annotations are pickles: read_plain_pickle admits plain containers, strings and numbers only,
checking every opcode before anything is built, so a pickle with code in it is refused unread. benchmarks.py's
registry holds the four tasks.

Items: {'image', 'question', 'answers' (the box as text), 'box' [x1, y1, x2, y2] normalized to the image's width and
height and rounded to 2 decimals, 'size' (width, height), 'group', 'key'}.
"""

import ast
import io
import json
import os
import pickle
import pickletools
import random
from collections import Counter

from benchmarks import Skip, image_file, items_of, path_in, read_json

# image's width and height and rounded to 2 decimals, 'size' (width, height), 'group', 'key'}, built as TRI-ML
# vlm-evaluation builds its RefCOCO and OCID-Ref val indexes (vlm_eval/tasks/harnesses/refcoco.py, ocidref.py)

# Prismatic's referring-expression prompt (vlm-evaluation's bbox_refer_prompt_fn), the image first as always here
GROUNDING_PROMPT = 'Please provide the bounding box coordinate of the region this sentence describes: "{}"'
GROUNDING_TOKENS = 128  # vlm-evaluation generates up to max_length=128 new tokens, greedily
GROUNDING_SEED = 21  # vlm-evaluation shuffles each index once with Random(21); its slim subsets are prefixes of it
# the RefCOCO family as vlm-evaluation reads it (REFER API): the dataset, its refs file, and the refs in its val split
REFCOCO = {'refcoco': ('RefCOCO', 'refs(unc).p', 3811), 'refcoco+': ('RefCOCO+', 'refs(unc).p', 3805),
           'refcocog': ('RefCOCOg', 'refs(umd).p', 2573)}
OCID_SIZE = (640, 480)  # vlm-evaluation takes every OCID image as 640 x 480 (run_benchmarks checks each file's)
OCID_EXAMPLES = 18342  # the expressions of OCID-Ref's val split (vlm-evaluation's ocid-ref-full)
# OCID's clutter splits by take_id, as vlm-evaluation's get_split: takes 0-9, 10-16, 17-20
OCID_CLUTTER = ((9, 'Minimum Clutter'), (16, 'Medium Clutter'), (20, 'Maximum Clutter'))
# the pickle opcodes that build only None, booleans, numbers, strings, bytes, lists, tuples, dicts and sets: none
# names a global (GLOBAL, STACK_GLOBAL, INST, OBJ), calls one (REDUCE, NEWOBJ, BUILD), or reaches outside the file
# (PERSID, EXT1, NEXT_BUFFER)
PLAIN_OPCODES = frozenset(
    'PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT '
    'BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 BINBYTES '
    'SHORT_BINBYTES BINBYTES8 EMPTY_LIST APPEND APPENDS LIST EMPTY_DICT DICT SETITEM SETITEMS EMPTY_TUPLE TUPLE '
    'TUPLE1 TUPLE2 TUPLE3 EMPTY_SET ADDITEMS FROZENSET GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE'.split())
MAX_PICKLE_BYTES = 2 ** 30  # refs(unc).p is tens of MB; a file over this is refused unread


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that can make no object but the plain ones: every global is refused (a second wall behind the
    opcode check in read_plain_pickle)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'it names the global {module}.{name}')

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('it refers to a persistent object')


def read_plain_pickle(path, max_bytes=MAX_PICKLE_BYTES):
    """
    The value of a pickle that holds only plain containers, strings and numbers, as the refer annotations do. Every
    opcode is checked before anything is built: a pickle that names or calls anything (a code payload through
    __reduce__, say) is refused unrun, as is a truncated one, each an error naming the file. Python 2 strings are
    read as UTF-8.
    """
    if os.path.getsize(path) > max_bytes:
        raise ValueError(f'{path} is over {max_bytes} bytes: not an annotation pickle')
    with open(path, 'rb') as f:
        raw = f.read()
    refused = None
    try:
        for op, _, pos in pickletools.genops(io.BytesIO(raw)):  # reads each opcode's argument, builds nothing
            if op.name not in PLAIN_OPCODES:
                refused = f'its opcode {op.name} at byte {pos}'
                break
        if refused is None:
            return PlainUnpickler(io.BytesIO(raw), encoding='utf-8').load()
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, KeyError, IndexError, MemoryError,
            RecursionError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f'{path} is not a readable pickle ({type(e).__name__}: {str(e)[:120]})') from None
    raise ValueError(f'{path}: refused unread, {refused} could make or call an object (only plain containers, '
                     f'strings and numbers are read from a pickle)')


def normalized_box(x1, y1, x2, y2, size):
    """A box in pixels as vlm-evaluation records it: each corner over the image's width or height, rounded to 2
    decimals. A box that is empty or leaves its image (vlm-evaluation asserts) is a Skip."""
    width, height = size
    if not (x1 < x2 <= width and y1 < y2 <= height):
        raise Skip('box outside its image')
    return [round(c, 2) for c in (x1 / width, y1 / height, x2 / width, y2 / height)]


def number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{what} {str(value)[:40]!r} is not a number')
    return value


def grounding_item(image, sentence, box, size, group, key):
    if not isinstance(sentence, str):
        raise ValueError(f'its expression is {type(sentence).__name__}, not a string')
    return {'image': image, 'question': GROUNDING_PROMPT.format(sentence), 'answers': [str(box)], 'box': box,
            'size': list(size), 'group': group, 'key': key}


def refer_refs(path):
    """The refs of a refer annotation file (refs(unc).p, refs(umd).p): each one's ids, split and sentences."""
    refs = read_plain_pickle(path)
    if not isinstance(refs, list):
        raise ValueError(f'{path}: expected the list of refs the refer annotations hold, found {type(refs).__name__}')
    return items_of(path, refs, lambda r: {
        'ref_id': r['ref_id'], 'ann_id': r['ann_id'], 'image_id': int(r['image_id']), 'split': r['split'],
        'sentences': [(s['sent_id'], s['sent']) for s in r['sentences']]})


def by_id(path, instances, field):
    """instances.json's annotations or images by id; one without an id, or not a record, is an error naming it."""
    if not isinstance(instances, dict) or not isinstance(instances.get(field), list):
        raise ValueError(f'{path}: expected a COCO instances file with a list of {field}')
    records = items_of(path, instances[field], lambda r: r if isinstance(r, dict) and 'id' in r else r['id'])
    return {r['id']: r for r in records}


def read_refcoco(folder, dataset):
    """
    One dataset of the RefCOCO family as vlm-evaluation indexes it: every sentence of every ref of the val split (the
    refer annotations' refs, unc's split for RefCOCO and RefCOCO+, umd's for RefCOCOg), in the files' order, the box
    its annotation in instances.json gives (x, y, w, h in pixels), on COCO train2014's image. The image's size is the
    one instances.json records (vlm-evaluation reads it from the file; run_benchmarks checks that they agree).
    """
    group, refs_name, expected = REFCOCO[dataset]
    refs_path = path_in(os.path.join(folder, dataset), refs_name)
    instances_path = path_in(os.path.join(folder, dataset), 'instances.json')
    instances = read_json(instances_path)
    annotations, images = by_id(instances_path, instances, 'annotations'), by_id(instances_path, instances, 'images')
    val = [ref for ref in refer_refs(refs_path) if ref['split'] == 'val']
    items, skipped = [], Counter()
    for ref in val:
        ann, image = annotations.get(ref['ann_id']), images.get(ref['image_id'])
        if ann is None or image is None:
            skipped['ref without its annotation or image in instances.json'] += len(ref['sentences'])
            continue
        try:
            x, y, w, h = (number(v, 'bbox') for v in ann['bbox'])
            size = (number(image['width'], 'width'), number(image['height'], 'height'))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f'{instances_path}: annotation {ref["ann_id"]} or image {ref["image_id"]} of ref '
                             f'{ref["ref_id"]} is malformed ({e})') from None
        try:
            box = normalized_box(x, y, x + w, y + h, size)
        except Skip as e:
            skipped[str(e)] += len(ref['sentences'])
            continue
        path = os.path.join(folder, 'train2014', f"COCO_train2014_{ref['image_id']:012d}.jpg")
        items += items_of(refs_path, ref['sentences'], lambda s: grounding_item(
            path, s[1], box, size, group, (group, ref['ref_id'], s[0])))
    sentences = sum(len(ref['sentences']) for ref in val)
    version = (f"the val split vlm-evaluation asserts ({expected:,} refs)" if len(val) == expected else
               f"unknown: {len(val):,} refs in its val split, vlm-evaluation expects {expected:,}")
    return items, {'version': version, 'refs': len(val), 'sentences': sentences, 'skipped': skipped,
                   'protocol': f'{group} val, every sentence of each ref; the generated box counts at IoU >= 0.5 '
                               f'(TRI-ML vlm-evaluation)'}


def refcoco_slim(folder, n):
    """The keys of vlm-evaluation's metadata-slim-n: one index over RefCOCO, RefCOCO+ and RefCOCOg (each val ref's
    sentences in order), shuffled once with its seed, then the first n of each dataset (all three files needed)."""
    keys = []
    for dataset, (group, refs_name, _) in REFCOCO.items():
        for ref in refer_refs(path_in(os.path.join(folder, dataset), refs_name)):
            if ref['split'] == 'val':
                keys += [(group, ref['ref_id'], sent_id) for sent_id, _ in ref['sentences']]
    return seeded_slim(keys, n)


def seeded_slim(keys, n):
    """vlm-evaluation's slim subset: the index's positions shuffled with Random(21) (the permutation depends only on
    the index's length), then walked, keeping the first n keys of each group (a key's first field)."""
    order = list(range(len(keys)))
    random.Random(GROUNDING_SEED).shuffle(order)
    taken, kept = Counter(), set()
    for i in order:
        if taken[keys[i][0]] < n:
            taken[keys[i][0]] += 1
            kept.add(keys[i])
    return kept


def ocid_records(folder):
    path = path_in(folder, 'val_expressions.json')
    records = read_json(path)
    if not isinstance(records, dict):
        raise ValueError(f'{path}: expected a JSON object of {{sentence id: expression record}} (OCID-Ref\'s '
                         f'val_expressions.json), found {type(records).__name__}')
    return path, list(records.items())


def ocid_clutter(take_id):
    if isinstance(take_id, bool) or not isinstance(take_id, int):
        raise ValueError(f'take_id {take_id!r} is not an integer')
    if not 0 <= take_id <= 20:
        raise Skip('take_id outside 0-20')
    return next(name for last, name in OCID_CLUTTER if take_id <= last)


def ocid_item(folder, sentence_id, r):
    box = json.loads(r['bbox'])  # a string holding [x1, y1, x2, y2] in pixels
    if not isinstance(box, list) or len(box) != 4:
        raise ValueError(f'bbox {r["bbox"]!r} is not a list of 4 numbers')
    box = normalized_box(*(number(v, 'bbox') for v in box), OCID_SIZE)
    group = ocid_clutter(r['take_id'])
    return grounding_item(image_file(folder, 'OCID-dataset', r['scene_path']), r['sentence'], box, OCID_SIZE, group,
                          (group, int(sentence_id)))


def read_ocid_ref(folder):
    """OCID-Ref's val split as vlm-evaluation indexes it: every expression of val_expressions.json in the file's
    order, its box ([x1, y1, x2, y2] in pixels, a JSON string) over 640 x 480, its clutter split by take_id."""
    path, records = ocid_records(folder)
    skipped = Counter()
    items = items_of(path, records, lambda kv: ocid_item(folder, *kv), skipped)
    version = (f"the val split vlm-evaluation expects ({OCID_EXAMPLES:,} expressions)" if len(records) == OCID_EXAMPLES
               else f"unknown: {len(records):,} expressions, vlm-evaluation expects {OCID_EXAMPLES:,}")
    return items, {'version': version, 'skipped': skipped,
                   'protocol': 'OCID-Ref val; the generated box counts at IoU >= 0.25 (TRI-ML vlm-evaluation), '
                               'also per clutter split'}


def ocid_slim(folder, n):
    """The keys of vlm-evaluation's OCID-Ref metadata-slim-n: the first n of each clutter split after its shuffle."""
    path, records = ocid_records(folder)
    return seeded_slim(items_of(path, records, lambda kv: (ocid_clutter(kv[1]['take_id']), int(kv[0])), Counter()), n)


def parse_box(text):
    """
    vlm-evaluation's parse_bbox: the generated text as a Python literal (ast.literal_eval: nothing is run) must be a
    list of 4 numbers, each in [0, 1], with x1 < x2 and y1 < y2; anything else (a tuple, 3 numbers, reversed
    corners, a number over 1, words) is no box: None.
    """
    try:
        box = ast.literal_eval(text)
        if not (isinstance(box, list) and len(box) == 4):
            return None
        if not all(0 <= c <= 1 for c in box):
            return None
        return box if box[0] < box[2] and box[1] < box[3] else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def box_iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes (vlm-evaluation's compute_iou)."""
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, width) * max(0, height)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def grounding_accuracy(prediction, box, threshold):
    """1.0 when the prediction parses as a box whose IoU with the reference box reaches threshold, else 0.0 (an
    unparsable prediction counts as wrong, as vlm-evaluation's 'invalid')."""
    predicted = parse_box(prediction)
    return float(predicted is not None and box_iou(predicted, box) >= threshold)


def accuracy(prediction, item, threshold):
    """An item's score: its generated text stripped (as Prismatic's generate_batch decodes it), then
    grounding_accuracy."""
    return grounding_accuracy(prediction.strip(), item['box'], threshold)


def read(dataset, folder):
    """The items of one of the four tasks ('refcoco', 'refcoco+', 'refcocog', 'ocid_ref') under folder."""
    return read_ocid_ref(folder) if dataset == 'ocid_ref' else read_refcoco(folder, dataset)


def slim(dataset, folder, n):
    """The keys of vlm-evaluation's seeded slim subset of n per group of the task's index."""
    return ocid_slim(folder, n) if dataset == 'ocid_ref' else refcoco_slim(folder, n)


def summary(predictions, items, scores):
    """What vlm-evaluation reports beside the accuracy: per group (OCID-Ref's clutter splits) and the predictions
    that are no box at all."""
    groups = {}
    for g in dict.fromkeys(it['group'] for it in items):
        mine = [s for s, it in zip(scores, items) if it['group'] == g]
        groups[g] = {'accuracy': float(sum(mine) / len(mine)), 'n': len(mine)}
    return {'groups': groups, 'invalid': sum(parse_box(p.strip()) is None for p in predictions)}
