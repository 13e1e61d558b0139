"""
The paper's benchmarks, read from the files exactly as their publishers distribute them, under BENCH/<task>/ (the
readers below name each file; the RefCOCO family and OCID-Ref are grounding.py's), and scored as their references
score them, so the numbers compare with published ones: one registry, BENCHMARKS, that eval.py runs.

    python eval.py --ckpt=out/finetune --tasks=vqav2,pope,arc_easy --bench_dir=BENCH --limit=500
    python eval.py --ckpt=out/finetune --tasks=paper --bench_dir=BENCH    # the paper's seven vision benchmarks

Text tasks are built as lm-evaluation-harness builds them and scored by log-likelihood (likelihood.multiple_choice): acc,
and acc_norm (per character). Vision tasks are answered greedily and scored as TRI-ML vlm-evaluation scores them
(VQAv2, TextVQA with LLaVA-1.5's OCR prompt when its file is there, GQA), VizWiz as its official evaluation does;
POPE is the likelier of 'Yes' and 'No' (TRI-ML), with accuracy, precision, recall, F1 and yes-ratio per split. A
malformed record is an error naming the file, the record and the field; an item that cannot be asked is skipped and
counted by reason. --limit takes the same seeded subset every time.
"""

import json
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import data

POPE_SPLITS = ('random', 'popular', 'adversarial')
# LLaVA-1.5's instruction for short answers: the benchmarks' answers are a word or a phrase
SHORT_ANSWER = '\nAnswer the question using a single word or phrase.'


def path_in(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} is missing: put the files of {os.path.basename(folder)} there exactly as '
                                f'their publishers distribute them (see benchmarks.py for the names)')
    return path


def text_lines(path):
    """The lines of a UTF-8 text file; a line that is not UTF-8 (a file saved as latin-1, say) is an error naming
    the file and the line, not a codec traceback."""
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise ValueError(f'{path}, line {n}: not UTF-8 text (byte {e.start} of the line is '
                                 f'{raw[e.start:e.start + 1]!r}); use the file as its publisher distributes it, '
                                 f'or convert it to UTF-8') from None


def read_jsonl(path):
    """The records of a JSON-lines file; a line that is not JSON is an error naming the file and the line."""
    records = []
    for n, line in text_lines(path):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError) as e:
                raise ValueError(f'{path}, line {n}: not a JSON record ({str(e)[:100]})') from None
    return records


def read_json(path):
    return data.read_json(path)


class Skip(Exception):
    """An item that cannot be asked, though its record is well formed; str(e) is the reason it is counted under."""


def items_of(path, records, make, skipped=None):
    """make(record) for each record; a record without a field, or with a wrong type or value, is an error that names
    the file, the record and what is wrong (a malformed download must never be scored, least of all as 0). A record
    that make() skips (raises Skip) is counted in skipped by reason, or, with no counter, is an error as well."""
    items = []
    for n, record in enumerate(records, 1):
        try:
            items.append(make(record))
        except Skip as e:
            if skipped is None:
                raise ValueError(f'{path}, record {n}: {e}') from None
            skipped[str(e)] += 1
        except KeyError as e:
            raise ValueError(f'{path}, record {n}: missing field {e}') from None
        except (TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f'{path}, record {n}: {e}') from None
    return items


def image_file(folder, subfolder, name):
    """The path of the image a record names, or a Skip: an empty name would name the folder itself, and a NUL byte
    no file at all."""
    if not isinstance(name, (str, int)) or isinstance(name, bool):
        raise TypeError(f'its image name is {type(name).__name__}, not a string')
    name = str(name)
    if not name.strip():
        raise Skip('no image file named')
    if '\0' in name:
        raise Skip('NUL byte in the image name')
    return os.path.join(folder, subfolder, name)


def choice(index, n, what):
    if not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(f'{what} {index!r} is not one of the {n} choices')
    return index


# -----------------------------------------------------------------------------
# text: items {'prompt' (or one per choice), 'choices', 'answer'}, built as lm-evaluation-harness's task files build
# them: a choice is scored as a continuation that starts with the harness's target delimiter, a space

def question_choices(record, stem_only=False):
    """ARC and OpenBookQA: a stem, lettered (or numbered) choices, an answer key. OpenBookQA's context is the bare
    stem; ARC's is "Question: ... Answer:"."""
    stem, options = record['question']['stem'], record['question']['choices']
    labels = [c['label'] for c in options]
    key = record['answerKey'].strip() if stem_only else record['answerKey']  # the harness strips OpenBookQA's key
    if key not in labels:
        raise ValueError(f'answerKey {key!r} is not among the choice labels {labels}')
    return {'prompt': stem if stem_only else f'Question: {stem}\nAnswer:', 'choices': [' ' + c['text'] for c in options],
            'answer': labels.index(key)}


def hellaswag_text(text):
    """The harness's HellaSwag preprocessing: WikiHow's [title] becomes a period, other [tags] go, and one pass
    turns double spaces into single ones."""
    text = text.strip().replace(' [title]', '. ')
    return re.sub('\\[.*?\\]', '', text).replace('  ', ' ')


def hellaswag_item(r):
    ctx = r['ctx_a'] + ' ' + r['ctx_b'].capitalize()
    return {'prompt': hellaswag_text(f"{r['activity_label']}: {ctx}"),
            'choices': [' ' + hellaswag_text(e) for e in r['endings']],
            'answer': choice(int(r['label']), len(r['endings']), 'label')}


def winogrande_item(r):
    """The option fills the blank in the prompt; the choice scored is the rest of the sentence (partial scoring)."""
    before, blank, after = r['sentence'].partition('_')
    if not blank:
        raise ValueError('its sentence has no _ for the option to fill')
    rest = ' ' + after.strip()
    return {'prompt': [before + r['option1'], before + r['option2']], 'choices': [rest, rest],
            'answer': choice({'1': 0, '2': 1}.get(r['answer']), 2, 'answer')}


def read_arc(folder, name):
    path = path_in(folder, name)
    return items_of(path, read_jsonl(path), question_choices), {}


def read_openbookqa(folder):
    path = path_in(folder, 'test.jsonl')
    return items_of(path, read_jsonl(path), lambda r: question_choices(r, stem_only=True)), {}


def read_hellaswag(folder):
    path = path_in(folder, 'hellaswag_val.jsonl')
    return items_of(path, read_jsonl(path), hellaswag_item), {}


def read_piqa(folder):
    path, labels_path = path_in(folder, 'valid.jsonl'), path_in(folder, 'valid-labels.lst')
    records = read_jsonl(path)
    labels = [line.strip() for _, line in text_lines(labels_path) if line.strip()]
    if len(labels) != len(records):
        raise ValueError(f'{folder}: {len(records)} questions in valid.jsonl but {len(labels)} labels in '
                         f'valid-labels.lst')
    return items_of(path, zip(records, labels), lambda rl: {
        'prompt': f"Question: {rl[0]['goal']}\nAnswer:", 'choices': [' ' + rl[0]['sol1'], ' ' + rl[0]['sol2']],
        'answer': choice({'0': 0, '1': 1}.get(rl[1]), 2, 'label')}), {}


def read_winogrande(folder):
    path = path_in(folder, 'dev.jsonl')
    return items_of(path, read_jsonl(path), winogrande_item), {}


# -----------------------------------------------------------------------------
# vision: items {'image' (a path), 'question', 'answers' (all the human answers), 'split' (pope)}

def answer_list(answers):
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f'answers must be a non-empty list of strings, not {str(answers)[:80]}')
    return answers


def read_vqav2(folder):
    qpath = path_in(folder, 'v2_OpenEnded_mscoco_val2014_questions.json')
    apath = path_in(folder, 'v2_mscoco_val2014_annotations.json')
    annotations = {a['question_id']: a for a in items_of(apath, read_json(apath)['annotations'], dict)}
    return items_of(qpath, read_json(qpath)['questions'], lambda q: {
        'image': os.path.join(folder, 'val2014', f"COCO_val2014_{int(q['image_id']):012d}.jpg"),
        'question': q['question'] + SHORT_ANSWER,
        'answers': answer_list([a['answer'] for a in annotations[q['question_id']]['answers']])}), {}


def read_gqa(folder):
    path, skipped = path_in(folder, 'testdev_balanced_questions.json'), Counter()
    return items_of(path, [q for _, q in sorted(read_json(path).items())], lambda q: {
        'image': image_file(folder, 'images', q['imageId'] and f"{q['imageId']}.jpg"),
        'question': q['question'] + SHORT_ANSWER, 'answers': answer_list([q['answer']])}, skipped), {'skipped': skipped}


def read_textvqa(folder):
    path, skipped = path_in(folder, 'TextVQA_0.5.1_val.json'), Counter()
    prompts, how = textvqa_prompts(folder)
    return items_of(path, read_json(path)['data'], lambda r: {
        'image': image_file(folder, 'train_images', r['image_id'] and f"{r['image_id']}.jpg"),
        'question': prompts.get((r['image_id'], r['question'].lower())) or ocr_prompt(r['question'], r.get('ocr_tokens')),
        'answers': answer_list(r['answers'])}, skipped), {'prompt': how, 'skipped': skipped}


def read_vizwiz(folder):
    path, skipped = path_in(folder, 'val.json'), Counter()
    prompt = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
    return items_of(path, read_json(path), lambda r: {
        'image': image_file(folder, 'val', r['image']), 'question': r['question'] + prompt,
        'answers': answer_list([a['answer'] for a in r['answers']])}, skipped), {'skipped': skipped}


def read_pope(folder):
    items, counts, skipped = [], [], Counter()
    for split in POPE_SPLITS:
        path = path_in(folder, f'coco_pope_{split}.json')
        records = read_jsonl(path)
        counts.append(len(records))
        items += items_of(path, records, lambda r: pope_item(r, folder, split), skipped)
    version = POPE_VERSIONS.get(tuple(counts), f'unknown: {dict(zip(POPE_SPLITS, counts))} questions')
    return items, {'version': version, 'questions': dict(zip(POPE_SPLITS, counts)), 'skipped': skipped,
                   'protocol': "the likelier of 'Yes' and 'No' as the answer (TRI-ML vlm-evaluation); "
                               "accuracy is the mean of the three splits'"}


def pope_item(r, folder, split):
    if r['label'] not in ('yes', 'no'):
        raise ValueError(f"label {r['label']!r} is neither 'yes' nor 'no'")
    return {'image': image_file(folder, 'val2014', r['image']), 'question': r['text'] + SHORT_ANSWER,
            'answers': [r['label']], 'split': split}


OCR_FILE = 'textvqa_val_v051_ocr.jsonl'  # LLaVA-1.5's TextVQA questions with their OCR tokens


def ocr_prompt(question, tokens):
    """LLaVA-1.5's TextVQA prompt: with OCR tokens, a 'Reference OCR token:' line between question and instruction."""
    if not tokens:
        return question + SHORT_ANSWER
    return f"{question[:1].upper()}{question[1:]}\nReference OCR token: {', '.join(tokens)}{SHORT_ANSWER}"


def textvqa_prompts(folder):
    """{(image_id, question in lower case): prompt} from LLaVA-1.5's OCR file when it is there, and which prompt the
    run uses: its, the annotation file's own ocr_tokens, or none."""
    path = os.path.join(folder, OCR_FILE)
    if not os.path.exists(path):
        return {}, 'LLaVA-1.5 short answer; OCR tokens where the annotation file has ocr_tokens, else none'
    prompts = {}
    for r in items_of(path, read_jsonl(path), lambda r: (r['question_id'], r['text'])):
        prompts[(r[0], r[1].split('\n')[0].lower())] = r[1]  # its question_id is the image's id
    return prompts, f'LLaVA-1.5 with OCR tokens ({OCR_FILE})'


TASK_SETS = {
    # the paper's vision suite, as its stable score counts it: the RefCOCO family by RefCOCO (IoU >= 0.5), beside
    # VQAv2, GQA, VizWiz, TextVQA, POPE and OCID-Ref (IoU >= 0.25)
    'paper': ('vqav2', 'gqa', 'vizwiz', 'textvqa', 'pope', 'refcoco', 'ocid_ref'),
}


def expand_tasks(tasks):
    """Task names with each task set (TASK_SETS) replaced by its tasks, each task once, in order."""
    return list(dict.fromkeys(t for name in tasks for t in TASK_SETS.get(name, (name,))))


def check_tasks(tasks):
    """An unknown task name is an error that lists the known ones (before any model is loaded)."""
    unknown = [t for t in expand_tasks(tasks) if t not in BENCHMARKS]
    if unknown:
        raise ValueError(f'unknown task {", ".join(map(repr, unknown))}; the tasks are: vision '
                         f'{", ".join(tasks_of("vision"))}; text {", ".join(tasks_of("text"))}; the sets '
                         f'{", ".join(TASK_SETS)}')


def read_task(task, bench_dir, limit=0, seed=0, slim=0):
    """
    A benchmark's items, read from BENCH/<task>/ (or the folder its entry names), with limit a fixed seeded subset
    of that many (the same on every call) and slim, for grounding, vlm-evaluation's seeded slim subset of that many
    per dataset or clutter split; and what to record of how they were read (the files' version, the prompt, the
    items skipped by reason under 'skipped').
    """
    bench = BENCHMARKS[task]
    if slim and bench.slim is None:
        raise ValueError(f'{task} has no slim subsets; the grounding tasks do '
                         f'({", ".join(t for t, b in BENCHMARKS.items() if b.slim)})')
    folder = os.path.join(bench_dir, bench.folder or task)
    items, how = bench.read(folder)
    how = dict(how)
    how['skipped'] = Counter(how.get('skipped', {}))
    if slim:
        keys = bench.slim(folder, slim)
        items = [it for it in items if it['key'] in keys]
        how['subset'] = f"vlm-evaluation's slim-{slim} (its seeded shuffle, the first {slim} of each group)"
    if not items:
        raise ValueError(f'{folder} holds no {task} items' + (f' (skipped: {dict(how["skipped"])})'
                                                                if how['skipped'] else ''))
    if limit and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items, how


# -----------------------------------------------------------------------------
# the reference scorers, each as its published evaluation code computes it (read, then written here anew):
# the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py), TRI-ML/vlm-evaluation's VQAv2, TextVQA (mmf's m4c
# EvalAIAnswerProcessor), GQA and POPE harnesses, and the VizWiz-VQA evaluation API

VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the official list: not ' (don't), not : and not . (handled below)
VQA_COMMA = re.compile(r'\d,\d')  # a digit-comma-digit anywhere (1,000): every punctuation mark is then deleted
VQA_PERIOD = re.compile(r'\.(?!\d)')  # a period not followed by a digit (3.5 keeps its point)
VQA_NUMBERS = {w: str(i) for i, w in enumerate('zero one two three four five six seven eight nine ten'.split())}
VQA_NUMBERS['none'] = '0'
VQA_ARTICLES = ('a', 'an', 'the')
# the contractions the official code restores, written in full: a word spelled without apostrophes becomes the
# contraction (dont -> don't); with two or more apostrophes, each spelling that lacks one of them does
VQA_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've")
# three entries of the official table break that rule, and are kept as they are: let's and she's map to themselves,
# somebody'd to somebodyd. (Its I'm, I've, I'd've keep their capital I, so they never match a lowercased word.)
VQA_QUIRKS = {"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"}


def contraction_table(apostrophe="'"):
    """The official table of restored contractions, its apostrophes written as `apostrophe`."""
    table = {}
    for word in VQA_CONTRACTED.split():
        marks = [i for i, c in enumerate(word) if c == "'"]
        spellings = [word.replace("'", '')] if len(marks) == 1 else [word[:i] + word[i + 1:] for i in marks]
        table.update({s: word for s in spellings})
    table.update(VQA_QUIRKS)
    return {k.replace("'", apostrophe): v.replace("'", apostrophe) for k, v in table.items()}


VQA_CONTRACTIONS = contraction_table()
VIZWIZ_CONTRACTIONS = contraction_table('\u2019')  # the VizWiz API's table writes them with a typographic apostrophe


def vqa_punctuation(text):
    """
    The official processPunctuation: a mark next to a space (or anywhere, in a text holding digit-comma-digit) is
    deleted, elsewhere it becomes a space; then periods not followed by a digit go. Every test looks at the text as
    it came in. The official code passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
    """
    out, delete_all = text, VQA_COMMA.search(text) is not None
    for p in VQA_PUNCTUATION:
        out = out.replace(p, '' if delete_all or p + ' ' in text or ' ' + p in text else ' ')
    return VQA_PERIOD.sub('', out, count=32)


def vqa_digits_articles(text, contractions=VQA_CONTRACTIONS):
    """The official processDigitArticle: lower case, number words to digits, no articles, contractions restored."""
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return ' '.join(contractions.get(w, w) for w in words if w not in VQA_ARTICLES)


def leave_one_out(prediction, answers):
    """VQA accuracy: over each annotator left out, min(1, matching others / 3), averaged (4+ of 10 agreeing: 1)."""
    return sum(min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3)
               for i in range(len(answers))) / len(answers)


def vqa_prediction(prediction, contractions=VQA_CONTRACTIONS):
    text = prediction.replace('\n', ' ').replace('\t', ' ').strip()
    return vqa_digits_articles(vqa_punctuation(text), contractions)


def vqav2_accuracy(prediction, answers):
    """VQAv2 as TRI-ML vlm-evaluation scores it: the prediction fully normalized, the human answers stripped of
    punctuation only (always: the official script does so only when they disagree), compared exactly."""
    return leave_one_out(vqa_prediction(prediction), [vqa_punctuation(a) for a in answers])


def vizwiz_accuracy(prediction, answers):
    """VizWiz as its official evaluation scores it: the prediction normalized, the human answers as written."""
    return leave_one_out(vqa_prediction(prediction, VIZWIZ_CONTRACTIONS), answers)


def textvqa_answer(text):
    """mmf's EvalAIAnswerProcessor (TextVQA's official one): lower, no commas or question marks, 's apart, then the
    VQA punctuation and digit-article steps. It is applied to the prediction and to every human answer alike."""
    text = text.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
    text = text.replace('\n', ' ').replace('\t', ' ').strip()
    return vqa_digits_articles(vqa_punctuation(text))


def textvqa_accuracy(prediction, answers):
    return leave_one_out(textvqa_answer(prediction), [textvqa_answer(a) for a in answers])


def gqa_accuracy(prediction, answer):
    """GQA as TRI-ML vlm-evaluation scores it: every ASCII punctuation mark deleted, lower case (nothing stripped),
    then exact match with the answer as published."""
    return float(prediction.translate(str.maketrans('', '', string.punctuation)).lower() == answer)


POPE_VERSIONS = {(2910, 3000, 3000): 'AoiDragon/POPE@e3e39262 (2,910 random questions): the files TRI-ML '
                                     'vlm-evaluation and LLaVA-1.5 pin',
                 (3000, 3000, 3000): 'AoiDragon/POPE after e3e39262 (3,000 questions in every split)'}


def pope_splits(said_yes, items):
    """
    POPE's metrics per split, from which of 'Yes' and 'No' the model found likelier (said_yes, per item): accuracy,
    precision, recall and F1 with yes as the positive class, the share of yes answers, and chance, 1/2: POPE asks
    yes/no questions balanced half and half in every split (a --limit sample that drew one label only would make
    the rate of its more frequent label 1, and centered accuracy undefined).
    """
    out = {}
    for split in POPE_SPLITS:
        pairs = [(y, it['answers'][0] == 'yes') for y, it in zip(said_yes, items) if it['split'] == split]
        if not pairs:
            continue
        tp = sum(p and t for p, t in pairs)
        fp = sum(p and not t for p, t in pairs)
        fn = sum(t and not p for p, t in pairs)
        precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out[split] = {'accuracy': sum(p == t for p, t in pairs) / len(pairs), 'precision': precision,
                      'recall': recall, 'f1': 2 * precision * recall / max(precision + recall, 1e-12),
                      'yes_ratio': sum(p for p, _ in pairs) / len(pairs), 'chance': 0.5,
                      'n': len(pairs)}
    return out


# -----------------------------------------------------------------------------
# the registry: eval.py runs a task by its entry here

@dataclass(frozen=True)
class Benchmark:
    read: Callable  # folder -> (items, how they were read): the publisher's files under BENCH/<task>/
    modality: str  # 'text' or 'vision': the stable score it counts towards
    # how eval.run_benchmarks answers an item: 'choice' (the likeliest of its choices, as lm-evaluation-harness),
    # 'generate' (a greedy answer, then score), 'yes_no' (the likelier of 'Yes' and 'No', POPE's protocol)
    protocol: str
    score: Optional[Callable] = None  # 'generate': (prediction, item) -> the item's accuracy, as its reference scores
    folder: str = ''  # the folder under BENCH it reads, when not the task's name (the RefCOCO family shares one)
    max_new_tokens: Optional[int] = None  # 'generate': how many tokens to answer in; None: eval.answer's default
    slim: Optional[Callable] = None  # (folder, n) -> the keys of the reference's seeded subset of n per group
    summary: Optional[Callable] = None  # (predictions, items, scores) -> what the reference reports beside accuracy


def grounding(dataset, threshold, folder=''):
    """A grounding benchmark, read and scored by grounding.py, imported when one runs (it uses this module's
    readers' helpers), generating up to 128 tokens as vlm-evaluation does."""
    def g():
        import grounding
        return grounding
    return Benchmark(lambda f: g().read(dataset, f), 'vision', 'generate', lambda p, it: g().accuracy(p, it, threshold),
                     folder, 128, lambda f, n: g().slim(dataset, f, n), lambda *a: g().summary(*a))


BENCHMARKS = {
    'vqav2': Benchmark(read_vqav2, 'vision', 'generate', lambda p, it: vqav2_accuracy(p, it['answers'])),
    'gqa': Benchmark(read_gqa, 'vision', 'generate', lambda p, it: gqa_accuracy(p, it['answers'][0])),
    'textvqa': Benchmark(read_textvqa, 'vision', 'generate', lambda p, it: textvqa_accuracy(p, it['answers'])),
    'pope': Benchmark(read_pope, 'vision', 'yes_no'),
    'vizwiz': Benchmark(read_vizwiz, 'vision', 'generate', lambda p, it: vizwiz_accuracy(p, it['answers'])),
    'refcoco': grounding('refcoco', 0.5, 'refcoco'),
    'refcoco+': grounding('refcoco+', 0.5, 'refcoco'),
    'refcocog': grounding('refcocog', 0.5, 'refcoco'),
    'ocid_ref': grounding('ocid_ref', 0.25),
    'arc_easy': Benchmark(lambda folder: read_arc(folder, 'ARC-Easy-Test.jsonl'), 'text', 'choice'),
    'arc_challenge': Benchmark(lambda folder: read_arc(folder, 'ARC-Challenge-Test.jsonl'), 'text', 'choice'),
    'hellaswag': Benchmark(read_hellaswag, 'text', 'choice'),
    'piqa': Benchmark(read_piqa, 'text', 'choice'),
    'winogrande': Benchmark(read_winogrande, 'text', 'choice'),
    'openbookqa': Benchmark(read_openbookqa, 'text', 'choice'),
}


def tasks_of(modality):
    return tuple(name for name, b in BENCHMARKS.items() if b.modality == modality)
