"""
Evaluate a nanoVLP checkpoint: per task its accuracy, chance, centered accuracy (a - c) / (1 - c), which puts chance
at 0 and all right at 1, and a bootstrap interval; the vision and text stable scores, each the mean centered accuracy
over its tasks. On the shapes world's own tasks, or on the paper's benchmarks (benchmarks.py).

    python eval.py --ckpt=out/text/ckpt_100          # prints a table, writes out/text/ckpt_100/eval.json
"""

import io
import json
import os
import string
import sys
from collections import Counter

import numpy as np
import torch

import data
import grounding
import images
import shapes
from checkpoint import load_model
from configurator import configure, script_config
from likelihood import choice_requests, likeliest, multiple_choice
from model import VLM
from stats import bootstrap_means, centered, interval, stable_score, task_result

# the stable scores an eval.json holds: {key: (short name, modality, the tasks it averages)}
STABLE_SCORES = {'vision_stable_score': ('vision', 'vision', 'tasks'),
                 'vision_blind_stable_score': ('vision (blind)', 'vision', 'blind_tasks'),
                 'text_stable_score': ('text', 'text', 'tasks')}

# -----------------------------------------------------------------------------
# config for `python eval.py`
ckpt = ''  # the checkpoint folder to score (eval.json, or eval_bench.json with tasks, is written into it)
device = 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
data_dir = 'data'  # where the shapes world is (written there first when missing), for checkpoints trained on it
tasks = ''  # comma-separated benchmarks (benchmarks.py) or 'paper' (its vision suite); '': the dataset's own tasks
bench_dir = 'bench'  # the folder holding the benchmarks' files in their publishers' layouts
limit = 0  # score at most this many items per benchmark (a seeded sample); 0: all
slim = 0  # grounding: vlm-evaluation's seeded slim subset of this many per dataset / clutter split (1024); 0: all
eval_items = 0  # items per vision task of the shapes world's own tasks (up to 1000); 0: its run's eval_items
text_eval_items = 0  # items per text task of the shapes world (up to 1000); 0: its run's text_eval_items
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# scores and intervals

def text_tasks(model, enc, items, device, rng):
    tasks = {}
    for name in sorted({it['task'] for it in items}):
        chosen = [it for it in items if it['task'] == name]
        k = {len(it['choices']) for it in chosen}
        if len(k) != 1:
            raise ValueError(f'text task {name} mixes items with {sorted(k)} choices: chance would be unknown')
        raw, norm = multiple_choice(model, enc, chosen, device)
        tasks[name] = task_result('text', raw, 1.0 / k.pop(), rng, accuracy_norm=float(np.mean(norm)))
    return tasks


# -----------------------------------------------------------------------------
# open-ended questions about images, by greedy generation

def normalize_answer(text):
    """Lower case, no punctuation, no articles, single spaces: 'The Red.' and 'red' are the same answer."""
    text = text.lower().translate(str.maketrans('', '', string.punctuation))
    return ' '.join(w for w in text.split() if w not in ('a', 'an', 'the'))


@torch.no_grad()
def answer(model, enc, prompts, images, device, max_new_tokens=16, batch_size=64):
    """Greedy answers to prompts (token lists, each with its image); batched among prompts of equal length."""
    answers = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, members in by_length.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            idx = torch.tensor([prompts[i] for i in chunk], device=device)
            imgs = torch.from_numpy(np.stack([images[i] for i in chunk])).to(device)
            out = model.generate(idx, imgs, max_new_tokens, stop_token=data.special_id(enc, '<|endoftext|>'))
            for i, row in zip(chunk, out[:, length:].tolist()):
                answers[i] = decode_reply(enc, row)
    return answers


def decode_reply(enc, ids):
    """The text of generated ids up to the first special token (or an id of the padded, untrained vocabulary): an
    imported LM's end-of-text may be any id, so the special tokens are matched, not a range."""
    specials = {data.special_id(enc, t) for t in data.SPECIAL_TOKENS}
    return enc.decode(ids[:next((j for j, t in enumerate(ids) if t in specials or t >= enc.n_vocab), len(ids))])


def vision_tasks(model, enc, world, device, rng, blind=False, eval_items=shapes.EVAL_ITEMS):
    """
    The shapes world's vision questions, the first eval_items of each task; blind: every image replaced by a
    uniform gray one. A task with a closed answer set (shapes.ANSWERS) answers with the likeliest reply of its set
    (the reply and its end token), as POPE and the text tasks are scored: a model that knows the answer is not
    scored wrong for leaving the format at a word it never met in a question. Boxes (grounding) are generated and
    scored by IoU >= 0.5. Each task also reports its accuracy on the items that name only concepts fine-tuning
    names (seen) and on the others (held out).
    """
    n_tokens = model.encoder.num_tokens
    kept = shapes.first_per_task(world.eval_items, eval_items)
    items = [world.eval_items[i] for i in kept]
    prompts = [data.question_prompt(enc, it['question'], n_tokens) for it in items]
    images = np.asarray(world.images[world.eval_ids[kept]])
    if blind:
        images = np.full_like(images, 128)
    predictions = [None] * len(items)
    closed = [i for i, it in enumerate(items) if it['task'] in shapes.ANSWERS]
    eot = data.special_id(enc, '<|endoftext|>')
    replies = {task: [enc.encode_ordinary(a) + [eot] for a in answers] for task, answers in shapes.ANSWERS.items()}
    picks = likeliest(model, [prompts[i] for i in closed], [images[i] for i in closed],
                      [replies[items[i]['task']] for i in closed], device)
    for i, k in zip(closed, picks):
        predictions[i] = shapes.ANSWERS[items[i]['task']][k]
    boxes = [i for i, it in enumerate(items) if it['task'] not in shapes.ANSWERS]  # a box is about 24 bytes long
    for i, reply in zip(boxes, answer(model, enc, [prompts[i] for i in boxes], [images[i] for i in boxes], device, 32)):
        predictions[i] = reply
    tasks = {}
    for name in shapes.VISION_TASKS:
        chosen = [(p, it) for p, it in zip(predictions, items) if it['task'] == name]
        if name == 'grounding':  # as vlm-evaluation scores RefCOCO: a list of 4 numbers, IoU >= 0.5
            scores = [grounding.grounding_accuracy(p.strip(), it['box'], shapes.GROUNDING_IOU) for p, it in chosen]
        else:
            scores = [float(normalize_answer(p) == normalize_answer(it['answer'])) for p, it in chosen]
        # each task's answers are balanced over a known set, so an image-blind model gets its chance
        split = {f'accuracy_{part}': float(np.mean([s for s, (_, it) in zip(scores, chosen) if it['held_out'] == held]))
                 for part, held in (('seen', False), ('held_out', True)) if any(it['held_out'] == held for _, it in chosen)}
        tasks[name] = task_result('vision', scores, chosen[0][1]['chance'], rng, predictions=[p for p, _ in chosen],
                                  **split)
    return tasks


def evaluate(model, enc, folder, device, world_args=(), eval_items=shapes.EVAL_ITEMS, text_items=None, seed=0):
    """All tasks of the dataset in folder, the first eval_items of each vision task and text_items (default:
    eval_items) of each text task; the vision tasks when world_args (the shapes ImageWorld's) are given for a VLM.
    The eval.json dict."""
    rng = np.random.default_rng(seed)
    items = shapes.load_text_tasks(folder)
    text_items = text_items or eval_items
    tasks = text_tasks(model, enc, [items[i] for i in shapes.first_per_task(items, text_items)], device, rng)
    results = {'vision_stable_score': None, 'vision_stable_score_ci95': None,
               'vision_blind_stable_score': None, 'vision_blind_stable_score_ci95': None}
    if isinstance(model, VLM) and world_args:
        world = images.ImageWorld.rendered(folder, *world_args)
        vision = vision_tasks(model, enc, world, device, rng, eval_items=eval_items)
        blind = vision_tasks(model, enc, world, device, rng, blind=True, eval_items=eval_items)
        tasks.update(vision)
        score, ci = stable_score(vision, 'vision', rng)
        blind_score, blind_ci = stable_score(blind, 'vision', rng)
        results.update(vision_stable_score=score, vision_stable_score_ci95=ci, vision_blind_stable_score=blind_score,
                       vision_blind_stable_score_ci95=blind_ci, blind_tasks=blind)
    score, ci = stable_score(tasks, 'text', rng)
    results.update(text_stable_score=score, text_stable_score_ci95=ci, tasks=tasks, eval_items=eval_items,
                   text_eval_items=text_items)
    return results


def format_table(results):
    lines = [f"{'task':<17}{'modality':<10}{'acc':>7}{'chance':>8}{'centered':>10}  {'95% CI':<16}{'n':>6}"]
    for name, t in results['tasks'].items():
        if not t['n']:
            lines.append(f"{name:<17}{t['modality']:<10}{'no item left to score (see skipped)':>31}{0:>22}")
            continue
        lo, hi = t['ci95']
        lines.append(f"{name:<17}{t['modality']:<10}{t['accuracy']:>7.3f}{t['chance']:>8.3f}{t['centered']:>10.3f}  "
                     f"[{lo:+.3f}, {hi:+.3f}]{t['n']:>6}")
    for key in STABLE_SCORES:
        if key not in results:
            continue
        value, ci = results[key], results[key + '_ci95']
        shown = 'n/a (no image encoder)' if value is None else f'{value:.3f}  [{ci[0]:+.3f}, {ci[1]:+.3f}]'
        lines.append(f"{key.replace('_', ' '):<35}{shown}")
    return '\n'.join(lines)


def stable_scores_line(r):
    """The stable scores of an eval.json, on one line: 'vision 0.520 | vision (blind) -0.327 | text 0.869'."""
    return ' | '.join(f'{name} {r[key]:.3f}' for key, (name, _, _) in STABLE_SCORES.items() if r[key] is not None)


def saved_scores(folder, cfg, device, vision=True):
    """
    What a training run logs for a checkpoint it just saved: its stable scores on its dataset's own tasks (writing
    eval.json beside it; vision=False: text only, for a VLM that has not learned to answer yet), or, for a prepared
    corpus without tasks, how to score it on the paper's benchmarks.
    """
    if cfg.dataset != 'shapes' and not os.path.exists(os.path.join(cfg.dataset, 'text_tasks.json')):
        return (f'no built-in tasks for dataset={cfg.dataset}: score it with python eval.py --ckpt={folder} '
                f'--tasks=... --bench_dir=...')
    return stable_scores_line(evaluate_checkpoint(folder, device, cfg.data_dir, vision=vision, verbose=False))


def stable_score_table(rows, title):
    """[(name, checkpoint folder)] -> the stable scores of those with an eval.json, with their intervals, under a
    title, and a blank line ('' when none has one)."""
    fmt = lambda r, k: 'n/a' if r.get(k) is None else f"{r[k]:.3f} [{r[k + '_ci95'][0]:+.3f}, {r[k + '_ci95'][1]:+.3f}]"
    lines = [f"{'checkpoint':<16}" + ''.join(f'{name:<26}' for name, _, _ in STABLE_SCORES.values())]
    for name, folder in rows:
        path = os.path.join(folder, 'eval.json')
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            lines.append(f"{name:<16}" + ''.join(f'{fmt(r, key):<26}' for key in STABLE_SCORES))
    return f'\nstable scores with 95% intervals ({title}):\n' + '\n'.join(lines) + '\n' if len(lines) > 1 else ''


def evaluate_checkpoint(ckpt_dir, device='cpu', data_dir='data', eval_items=0, text_items=0, vision=True,
                        verbose=True):
    """
    Evaluate the model in ckpt_dir on its dataset's own tasks and write ckpt_dir/eval.json; returns the results.
    A checkpoint of the shapes world is scored on the world under data_dir (written there when missing), on the
    first eval_items items of each vision task and text_items of each text task (0: its run's eval_items and
    text_eval_items); vision=False leaves a VLM's vision tasks out.
    """
    model, info = load_model(ckpt_dir, device)
    enc = data.get_tokenizer(info['tokenizer'])
    c = info['config']
    folder = shapes.prepare_text(data_dir, verbose=verbose) if c['dataset'] == 'shapes' else c['dataset']
    if not os.path.exists(os.path.join(folder, 'text_tasks.json')):
        raise ValueError(f'{ckpt_dir} was trained on dataset={folder}, which has no built-in tasks: score it on '
                         f'benchmarks with --tasks=... --bench_dir=...')
    world_args = images.ImageWorld.args_of(c) if 'encoder' in info else ()
    eval_items = eval_items or c.get('eval_items')
    if not eval_items:
        raise ValueError(f'{ckpt_dir}/config.json: its config has no eval_items; say how many items per task to '
                         f'score (eval.py --eval_items=N)')
    text_items = text_items or c.get('text_eval_items') or eval_items
    results = evaluate(model, enc, folder, device, world_args if vision else (), eval_items, text_items)
    results['checkpoint'] = {'stage': info['stage'], 'step': info['step']}
    tmp = os.path.join(ckpt_dir, 'eval.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(results, f)
    os.replace(tmp, os.path.join(ckpt_dir, 'eval.json'))
    if verbose:
        print(f'{ckpt_dir} ({info["stage"]} stage, step {info["step"]})\n{format_table(results)}')
    return results


# -----------------------------------------------------------------------------
# the paper's benchmarks (their files: benchmarks.py)

POPE_WORDS = ('Yes', 'No')  # POPE's answer is the likelier of these two continuations


def benchmark_image(item, folder, size):
    """
    The pixels of an item's image, read only inside its benchmark's folder, or BadImage with the reason it is skipped
    under. A grounding item's image must have the size its box was normalized by (the reference reads the size from
    the file).
    """
    from images import BadImage, decode_image, read_image_file

    raw = read_image_file(item['image'], folder)  # a folder, a FIFO or a NUL byte in the name: BadImage too
    pixels = decode_image(raw, size)
    if 'size' in item:
        from PIL import Image
        if list(Image.open(io.BytesIO(raw)).size) != list(item['size']):
            raise BadImage('image size differs from its annotation')
    return pixels


def askable(enc, model, item, protocol):
    """An item's prompt tokens, or None when they leave no room in block_size: a generated answer needs one
    position, a yes/no answer its longer word; an image's tokens are never cut away to make room."""
    prompt = data.question_prompt(enc, item['question'], model.encoder.num_tokens)
    room = max(len(enc.encode_ordinary(w)) for w in POPE_WORDS) - 1 if protocol == 'yes_no' else 1
    return prompt if len(prompt) + room <= model.config.block_size else None


def run_benchmarks(model, enc, tasks, bench_dir, device='cpu', limit=0, seed=0, slim=0):
    """
    The named benchmarks (or task sets, benchmarks.TASK_SETS) as one results dict (the shape of eval.json), with the
    stable scores over them. An item that cannot be asked is skipped and counted by reason under 'skipped': one its
    reader skips, an unusable image, a prompt longer than the model's block.
    """
    import benchmarks as bm
    from images import BadImage

    tasks = bm.expand_tasks(tasks)
    bm.check_tasks(tasks)
    rng = np.random.default_rng(seed)
    results, skipped = {}, Counter()
    for task in tasks:
        bench = bm.BENCHMARKS[task]
        items, how = bm.read_task(task, bench_dir, limit, seed, slim)
        skipped.update({f'{task}: {reason}': n for reason, n in how.pop('skipped').items()})
        if bench.protocol == 'choice':
            raw, norm = multiple_choice(model, enc, items, device)
            chance = float(np.mean([1 / len(it['choices']) for it in items]))
            # continuations longer than the block, scored in windows
            windowed = sum(any(len(cont) > model.config.block_size for _, cont in choice_requests(enc, it))
                           for it in items)
            results[task] = task_result(bench.modality, raw, chance, rng,
                                        accuracy_norm=float(np.mean(norm)) if norm else None, windowed=windowed,
                                        **how)
            continue
        if not isinstance(model, VLM):
            raise ValueError(f'{task} needs a model with an image encoder; this checkpoint is text-only')
        kept, images, prompts = [], [], []
        for it in items:  # an image path a benchmark file names is read only inside that benchmark's folder
            prompt = askable(enc, model, it, bench.protocol)
            if prompt is None:
                skipped[f'{task}: prompt longer than block_size'] += 1
                continue
            try:
                images.append(benchmark_image(it, os.path.join(bench_dir, bench.folder or task),
                                              model.encoder.img_size))
            except BadImage as e:
                skipped[f'{task}: {e}'] += 1
                continue
            kept.append(it)
            prompts.append(prompt)
        if bench.protocol == 'yes_no':
            results[task] = pope_result(model, enc, prompts, images, kept, device, rng, **how)
            continue
        new_tokens = {} if bench.max_new_tokens is None else {'max_new_tokens': bench.max_new_tokens}
        predictions = answer(model, enc, prompts, images, device, **new_tokens)
        scores = [bench.score(p, it) for p, it in zip(predictions, kept)]
        extra = bench.summary(predictions, kept, scores) if bench.summary else {}
        results[task] = task_result(bench.modality, scores, 0.0, rng, predictions=predictions, **extra, **how)
    out = {'tasks': results, 'skipped': dict(skipped)}
    for modality in ('vision', 'text'):
        score, ci = stable_score(results, modality, rng)
        out[f'{modality}_stable_score'], out[f'{modality}_stable_score_ci95'] = score, ci
        out[f'{modality}_stable_score_tasks'] = [t for t, r in results.items() if r['modality'] == modality and r['n']]
    return out


def pope_result(model, enc, prompts, images, items, device, rng, n_boot=1000, **how):
    """
    POPE by TRI-ML vlm-evaluation's protocol: the answer is the likelier of 'Yes' and 'No' after the prompt (no
    free-text parse). Its accuracy is the mean of the three splits' (as published), its chance the mean of theirs.
    """
    import benchmarks as bm
    yes_no = [enc.encode_ordinary(w) for w in POPE_WORDS]
    said_yes = [k == 0 for k in likeliest(model, prompts, images, [yes_no] * len(prompts), device)]
    splits = bm.pope_splits(said_yes, items)
    scores = [float(y == (it['answers'][0] == 'yes')) for y, it in zip(said_yes, items)]
    result = task_result('vision', scores, 0.0, rng, splits=splits, predictions=['yes' if y else 'no' for y in said_yes],
                         **how)
    if splits:
        accuracy, chance = (float(np.mean([s[k] for s in splits.values()])) for k in ('accuracy', 'chance'))
        by_split = [np.array([sc for sc, it in zip(scores, items) if it['split'] == s]) for s in splits]
        boots = np.mean([bootstrap_means(s, n_boot, rng) for s in by_split], axis=0)
        result.update(accuracy=accuracy, chance=chance, centered=centered(accuracy, chance),
                      ci95=interval(centered(boots, chance)))
    return result


def benchmark_checkpoint(ckpt_dir, tasks, bench_dir, device='cpu', limit=0, slim=0):
    """Run benchmarks (or task sets such as 'paper') on the model in ckpt_dir; writes ckpt_dir/eval_bench.json and
    prints the table: each benchmark's accuracy, and the stable scores over them."""
    import benchmarks

    tasks = benchmarks.expand_tasks(tasks)
    benchmarks.check_tasks(tasks)
    model, info = load_model(ckpt_dir, device)
    enc = data.get_tokenizer(info['tokenizer'])
    results = run_benchmarks(model, enc, tasks, bench_dir, device, limit, slim=slim)
    with open(os.path.join(ckpt_dir, 'eval_bench.json.tmp'), 'w') as f:
        json.dump(results, f)
    os.replace(os.path.join(ckpt_dir, 'eval_bench.json.tmp'), os.path.join(ckpt_dir, 'eval_bench.json'))
    print(f'{ckpt_dir} on {", ".join(tasks)}\n{format_table(results)}')
    for task, r in results['tasks'].items():
        if 'accuracy_norm' in r:
            print(f'{task}: length-normalized accuracy {r["accuracy_norm"]:.3f}')
        for split, v in r.get('splits', {}).items():
            print(f'pope {split}: accuracy {v["accuracy"]:.3f} (chance {v["chance"]:.3f}), precision '
                  f'{v["precision"]:.3f}, recall {v["recall"]:.3f}, F1 {v["f1"]:.3f}, yes {v["yes_ratio"]:.1%} '
                  f'({v["n"]} questions)')
        for group, v in r.get('groups', {}).items():
            print(f'{task} {group}: accuracy {v["accuracy"]:.3f} ({v["n"]} expressions)')
        if 'invalid' in r:
            print(f'{task}: {r["invalid"]} of {r["n"]} generated texts are no box (scored wrong)')
        if r.get('windowed'):
            print(f'{task}: {r["windowed"]} items have a choice longer than block_size, scored in windows')
        for key in ('version', 'protocol', 'prompt', 'subset'):  # how the files were read and asked
            if key in r:
                print(f'{task} {key}: {r[key]}')
    for modality in ('vision', 'text'):
        if results[f'{modality}_stable_score'] is not None:
            print(f'{modality} stable score over {", ".join(results[f"{modality}_stable_score_tasks"])}')
    if results['skipped']:
        print(f'skipped: {results["skipped"]}')
    return results


if __name__ == '__main__':
    cfg = configure(sys.argv[1:], script_config(globals()), source=__file__)
    if not cfg['ckpt']:
        sys.exit('usage: python eval.py --ckpt=DIR [--device=cuda] [--tasks=paper | vqav2,pope,arc_easy,... '
                 '--bench_dir=BENCH --limit=N --slim=N] (--help lists the keys)')
    try:
        if cfg['tasks']:
            benchmark_checkpoint(cfg['ckpt'], cfg['tasks'].split(','), cfg['bench_dir'], cfg['device'], cfg['limit'],
                                 cfg['slim'])
        else:
            evaluate_checkpoint(cfg['ckpt'], cfg['device'], cfg['data_dir'], cfg['eval_items'], cfg['text_eval_items'])
    except (ValueError, FileNotFoundError) as err:  # an unknown task, a missing benchmark file: no traceback
        sys.exit(f'error: {err}')
