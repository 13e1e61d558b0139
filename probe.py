"""
What the image-text stage grounded, asked in the captions' own words: probes of a checkpoint's knowledge of the
shapes world that need no fine-tuning, in the form its captions took (caption_form, PROBES). Captions in sentences:
each item of the grounding task (a color and a shape named, a scene of two or more objects whose others share the
named values' halves) becomes, after its image, a caption prefix, and the answer is its likeliest continuation:

    place   `The {shape} at the` + ` {place} is {color}`: where the named color and shape are     (chance 1/9)
    color   `The {shape} at the {place} is` + ` {color}`: the color of the object named and placed  (chance 1/6)
    shape   `The {color} object at the {place} is a` + ` {shape}`: its shape                        (chance 1/4)

'place' finds an object by its names; 'color' and 'shape' only read the object at a named place. Captions in
questions: each vision task but grounding asks its own items as a question-form caption does (`What color is the
square?` + ` red.`), the likeliest of the task's answers (chance as the task's). Each probe is split, as
the vision tasks are, into items that name only what fine-tuning names (seen) and the others (held out). A model
that never saw a caption scores near chance; one whose captions grounded every name scores as well on the held-out
names as on the seen ones. Read on the image stage's checkpoint, they say what the image-text stage taught before
fine-tuning; read after fine-tuning too, whether fine-tuning kept it. docs/results.md reads them beside the vision
score, which asks the same things as questions.

    python probe.py --ckpt=out/image/image                 # prints the accuracies, writes out/image/image/probe.json
"""

import json
import os
import sys
from typing import Callable, NamedTuple

import numpy as np

import data
import images
import shapes
from checkpoint import load_model
from configurator import configure, script_config
from likelihood import harness_tokens, likeliest

# -----------------------------------------------------------------------------
# config for `python probe.py`
ckpt = ''  # a VLM checkpoint of the shapes world (the image stage's, or fine-tuning's)
device = 'cpu'  # 'cpu', 'cuda', ...
data_dir = 'data'  # where the shapes world is (rendered there first when missing)
eval_items = 500  # the first this many items of the grounding task
# -----------------------------------------------------------------------------


class Probe(NamedTuple):
    task: str  # the vision task whose eval items it asks about
    prompt: Callable  # an item -> the caption prefix after the image
    values: list  # what the reply may say
    value_of: Callable  # the item -> the value that is right
    reply: Callable  # (the item, a value) -> the continuation ranked


def target(it):
    return it['scene'][0]  # the named object: a grounding scene keeps it first


def place(it):
    return shapes.POSITIONS[target(it)['cell']]


def question_probe(task):
    return Probe(task, lambda it: it['question'], shapes.ANSWERS[task], lambda it: it['answer'],
                 lambda it, v: data.caption_answer(v))


PROBES = {  # per caption form (shapes.CAPTIONS), the module docstring's probes
    'sentences': {
        'place': Probe('grounding', lambda it: f"The {target(it)['shape']} at the", shapes.POSITIONS, place,
                       lambda it, v: f" {v} is {target(it)['color']}"),
        'color': Probe('grounding', lambda it: f"The {target(it)['shape']} at the {place(it)} is", shapes.COLORS,
                       lambda it: target(it)['color'], lambda it, v: f' {v}'),
        'shape': Probe('grounding', lambda it: f"The {target(it)['color']} object at the {place(it)} is a",
                       shapes.SHAPES, lambda it: target(it)['shape'], lambda it, v: f' {v}')},
    'questions': {task: question_probe(task) for task in shapes.QUESTIONS},
}


def caption_probe(model, enc, world, device, eval_items=500, caption_form='sentences'):
    """
    {probe: {accuracy, accuracy_seen, accuracy_held_out, chance, n}} of the caption probes of a caption form
    (PROBES) on the world's eval items of each probe's task: after the item's image, the prompt, and the likeliest
    of its replies.
    """
    image = [data.special_id(enc, '<|image|>')] * model.encoder.num_tokens
    result, first = {}, shapes.first_per_task(world.eval_items, eval_items)
    for name, p in PROBES[caption_form].items():
        kept = [i for i in first if world.eval_items[i]['task'] == p.task]
        items = [world.eval_items[i] for i in kept]
        prompts, choices = [], []
        for it in items:
            requests = [harness_tokens(enc, p.prompt(it), p.reply(it, v)) for v in p.values]
            prompts.append(image + requests[0][0])
            choices.append([cont for _, cont in requests])
        picks = likeliest(model, prompts, list(world.images[world.eval_ids[kept]]), choices, device)
        right = np.array([p.values[k] == p.value_of(it) for k, it in zip(picks, items)])
        held = np.array([it['held_out'] for it in items])
        result[name] = dict(accuracy=float(right.mean()), accuracy_seen=float(right[~held].mean()), n=len(items),
                            accuracy_held_out=float(right[held].mean()) if held.any() else None,
                            chance=1 / len(p.values))
    return result


def probe_checkpoint(ckpt_dir, device='cpu', data_dir='data', eval_items=500):
    """The caption probes of the VLM in ckpt_dir, written to ckpt_dir/probe.json; returns them."""
    model, info = load_model(ckpt_dir, device)
    c = info['config']
    if 'encoder' not in info or c['dataset'] != 'shapes':
        raise ValueError(f'{ckpt_dir} is not a VLM of the shapes world: the probe asks about its scenes')
    enc = data.get_tokenizer(info['tokenizer'])
    folder = shapes.prepare_text(data_dir, verbose=False)
    world = images.ImageWorld.rendered(folder, *images.ImageWorld.args_of(c))
    result = caption_probe(model, enc, world, device, eval_items, c.get('caption_form', 'sentences'))
    with open(os.path.join(ckpt_dir, 'probe.json'), 'w') as f:
        json.dump(result, f)
    return result


if __name__ == '__main__':
    cfg = configure(sys.argv[1:], script_config(globals()), source=__file__)
    if not cfg['ckpt']:
        sys.exit('usage: python probe.py --ckpt=DIR [--device=cuda] [--eval_items=N] (--help lists the keys)')
    try:
        r = probe_checkpoint(cfg['ckpt'], cfg['device'], cfg['data_dir'], cfg['eval_items'])
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f'error: {err}')
    for name, p in r.items():
        held = 'n/a' if p['accuracy_held_out'] is None else f"{p['accuracy_held_out']:.3f}"
        print(f"caption probe '{name}' of {cfg['ckpt']}: {p['accuracy']:.3f} (seen {p['accuracy_seen']:.3f}, held "
              f"out {held}; chance {p['chance']:.3f}, {p['n']} items)")
