"""
The paper's benchmarks, read from the files exactly as their publishers distribute them, under BENCH/<task>/:

    vqav2        v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json, val2014/*.jpg
    gqa          testdev_balanced_questions.json, images/*.jpg
    textvqa      TextVQA_0.5.1_val.json, train_images/*.jpg           (the val images ship in train_images)
    pope         coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json, val2014/*.jpg
    vizwiz       val.json, val/*.jpg
    arc_easy     ARC-Easy-Test.jsonl            arc_challenge   ARC-Challenge-Test.jsonl
    hellaswag    hellaswag_val.jsonl            piqa            valid.jsonl, valid-labels.lst
    winogrande   dev.jsonl                      openbookqa      test.jsonl

    python eval.py --ckpt=out/finetune --tasks=vqav2,pope,arc_easy --bench_dir=BENCH --limit=500

Text tasks are multiple choice by log-likelihood (eval.multiple_choice), with the per-byte normalized variant and
the chance of each item's choice count. Vision tasks are answered by greedy generation and scored with the VQA
metric (vqav2, textvqa, vizwiz), exact match (gqa), or accuracy and F1 of yes / no (pope). --limit takes the same
seeded subset every time.
"""

import json
import os
import random
import re
from collections import Counter

TEXT_TASKS = ('arc_easy', 'arc_challenge', 'hellaswag', 'piqa', 'winogrande', 'openbookqa')
VISION_TASKS = ('vqav2', 'gqa', 'textvqa', 'pope', 'vizwiz')
POPE_SPLITS = ('random', 'popular', 'adversarial')
# LLaVA-1.5's instruction for short answers: the benchmarks' answers are a word or a phrase
SHORT_ANSWER = '\nAnswer the question using a single word or phrase.'


def path_in(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} is missing: put the files of {os.path.basename(folder)} there exactly as '
                                f'their publishers distribute them (see benchmarks.py for the names)')
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# text: items {'prompt' (or one per choice), 'choices', 'answer'}

def question_choices(record):
    """ARC and OpenBookQA: a stem, lettered (or numbered) choices, an answer key."""
    labels = [c['label'] for c in record['question']['choices']]
    return {'prompt': f"Question: {record['question']['stem']}\nAnswer:",
            'choices': [' ' + c['text'] for c in record['question']['choices']],
            'answer': labels.index(record['answerKey'])}


def hellaswag_text(text):
    """HellaSwag's WikiHow contexts carry bracketed section tags ([title], [step]) and double spaces."""
    text = re.sub(r'\[[^\]]*\]', '', text.strip().replace(' [title]', '. '))
    return re.sub(' {2,}', ' ', text)


def hellaswag_item(r):
    ctx = r['ctx_a'] + ' ' + r['ctx_b'].capitalize() if 'ctx_a' in r else r['ctx']
    return {'prompt': hellaswag_text(f"{r['activity_label']}: {ctx}"),
            'choices': [' ' + hellaswag_text(e) for e in r['endings']], 'answer': int(r['label'])}


def winogrande_item(r):
    """The option fills the blank in the prompt; the choice scored is the rest of the sentence (partial scoring)."""
    before, _, after = r['sentence'].partition('_')
    rest = ' ' + after.strip()
    return {'prompt': [before + r['option1'], before + r['option2']], 'choices': [rest, rest],
            'answer': int(r['answer']) - 1}


def read_text_task(task, folder):
    if task in ('arc_easy', 'arc_challenge'):
        name = 'ARC-Easy-Test.jsonl' if task == 'arc_easy' else 'ARC-Challenge-Test.jsonl'
        return [question_choices(r) for r in read_jsonl(path_in(folder, name))]
    if task == 'openbookqa':
        return [question_choices(r) for r in read_jsonl(path_in(folder, 'test.jsonl'))]
    if task == 'hellaswag':
        return [hellaswag_item(r) for r in read_jsonl(path_in(folder, 'hellaswag_val.jsonl'))]
    if task == 'piqa':
        records = read_jsonl(path_in(folder, 'valid.jsonl'))
        with open(path_in(folder, 'valid-labels.lst')) as f:
            labels = [int(line) for line in f if line.strip()]
        if len(labels) != len(records):
            raise ValueError(f'{folder}: {len(records)} questions but {len(labels)} labels')
        return [{'prompt': f"Question: {r['goal']}\nAnswer:", 'choices': [' ' + r['sol1'], ' ' + r['sol2']],
                 'answer': y} for r, y in zip(records, labels)]
    if task == 'winogrande':
        return [winogrande_item(r) for r in read_jsonl(path_in(folder, 'dev.jsonl'))]
    raise ValueError(f'unknown text benchmark {task!r}: {", ".join(TEXT_TASKS)}')


# -----------------------------------------------------------------------------
# vision: items {'image' (a path), 'question', 'answers' (all the human answers) , 'split' (pope)}

def read_vision_task(task, folder):
    if task == 'vqav2':
        questions = read_json(path_in(folder, 'v2_OpenEnded_mscoco_val2014_questions.json'))['questions']
        annotations = {a['question_id']: a for a in
                       read_json(path_in(folder, 'v2_mscoco_val2014_annotations.json'))['annotations']}
        return [{'image': os.path.join(folder, 'val2014', f"COCO_val2014_{q['image_id']:012d}.jpg"),
                 'question': q['question'] + SHORT_ANSWER,
                 'answers': [a['answer'] for a in annotations[q['question_id']]['answers']]} for q in questions]
    if task == 'gqa':
        questions = read_json(path_in(folder, 'testdev_balanced_questions.json'))
        return [{'image': os.path.join(folder, 'images', f"{q['imageId']}.jpg"), 'question': q['question'] +
                 SHORT_ANSWER, 'answers': [q['answer']]} for _, q in sorted(questions.items())]
    if task == 'textvqa':
        records = read_json(path_in(folder, 'TextVQA_0.5.1_val.json'))['data']
        return [{'image': os.path.join(folder, 'train_images', f"{r['image_id']}.jpg"),
                 'question': r['question'] + SHORT_ANSWER, 'answers': r['answers']} for r in records]
    if task == 'vizwiz':
        records = read_json(path_in(folder, 'val.json'))
        prompt = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
        return [{'image': os.path.join(folder, 'val', r['image']), 'question': r['question'] + prompt,
                 'answers': [a['answer'] for a in r['answers']]} for r in records]
    if task == 'pope':
        items = []
        for split in POPE_SPLITS:
            for r in read_jsonl(path_in(folder, f'coco_pope_{split}.json')):
                items.append({'image': os.path.join(folder, 'val2014', r['image']), 'question': r['text'] +
                              SHORT_ANSWER, 'answers': [r['label']], 'split': split})
        return items
    raise ValueError(f'unknown vision benchmark {task!r}: {", ".join(VISION_TASKS)}')


def check_tasks(tasks):
    """An unknown task name is an error that lists the known ones (before any model is loaded)."""
    unknown = [t for t in tasks if t not in TEXT_TASKS + VISION_TASKS]
    if unknown:
        raise ValueError(f'unknown task {", ".join(map(repr, unknown))}; the tasks are: vision '
                         f'{", ".join(VISION_TASKS)}; text {", ".join(TEXT_TASKS)}')


def read_task(task, bench_dir, limit=0, seed=0):
    """A benchmark's items; with limit, a fixed seeded subset of that many (the same on every call)."""
    folder = os.path.join(bench_dir, task)
    items = read_text_task(task, folder) if task in TEXT_TASKS else read_vision_task(task, folder)
    if not items:
        raise ValueError(f'{folder} holds no {task} items')
    if limit and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def yes_no(prediction):
    """POPE's reading of a free answer: 'no' when it says no or not, else 'yes'."""
    words = re.findall(r'[a-z]+', prediction.lower())
    return 'no' if 'no' in words or 'not' in words else 'yes'


def pope_scores(predictions, items):
    """Accuracy and F1 (yes as the positive class) per POPE split."""
    out = {}
    for split in POPE_SPLITS:
        pairs = [(yes_no(p), it['answers'][0]) for p, it in zip(predictions, items) if it['split'] == split]
        if not pairs:
            continue
        c = Counter(pairs)
        tp, fp, fn = c[('yes', 'yes')], c[('yes', 'no')], c[('no', 'yes')]
        precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out[split] = {'accuracy': sum(p == y for p, y in pairs) / len(pairs), 'n': len(pairs),
                      'f1': 2 * precision * recall / max(precision + recall, 1e-12)}
    return out
