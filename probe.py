"""
What the image-text stage grounded, asked in the captions' own words: a probe of a checkpoint's knowledge of the
shapes world that needs no fine-tuning. Each item of the grounding task (a color and a shape named, a scene of two
or more objects whose others share the named values' halves) becomes, after its image, the caption prefix
`The {shape} at the`, and the answer is the place whose continuation ` {place} is {color}` is likeliest: the one
place where the named color and shape are together. Chance is 1/9. Split, as the vision tasks are, into items that
name only what fine-tuning names (seen) and the others (held out).

A model that never saw a caption scores near chance; one whose captions grounded every name scores as well on the
held-out names as on the seen ones. Read on the image stage's checkpoint, it says what the image-text stage taught
before fine-tuning; read after fine-tuning too, whether fine-tuning kept it. docs/results.md reads it beside the
vision score, which asks the same things as questions.

    python probe.py --ckpt=out/image/image                 # prints the accuracies, writes out/image/image/probe.json
"""

import json
import os
import sys

import numpy as np

import data
import images
import shapes
from checkpoint import load_model
from configurator import configure, script_config
from likelihood import likeliest

# -----------------------------------------------------------------------------
# config for `python probe.py`
ckpt = ''  # a VLM checkpoint of the shapes world (the image stage's, or fine-tuning's)
device = 'cpu'  # 'cpu', 'cuda', ...
data_dir = 'data'  # where the shapes world is (rendered there first when missing)
eval_items = 500  # the first this many items of the grounding task
# -----------------------------------------------------------------------------


def caption_probe(model, enc, world, device, eval_items=500):
    """{accuracy, accuracy_seen, accuracy_held_out, chance, n} of the caption probe on the world's grounding items."""
    kept = [i for i in shapes.first_per_task(world.eval_items, eval_items) if world.eval_items[i]['task'] == 'grounding']
    items = [world.eval_items[i] for i in kept]
    image = [data.special_id(enc, '<|image|>')] * model.encoder.num_tokens
    prompts, choices = [], []
    for it in items:
        target = it['scene'][0]  # the named object (grounding scenes keep it first)
        context = f"The {target['shape']} at the"
        ctx = enc.encode_ordinary(context)
        prompts.append(image + ctx)
        choices.append([enc.encode_ordinary(f"{context} {place} is {target['color']}")[len(ctx):]
                        for place in shapes.POSITIONS])
    picks = likeliest(model, prompts, list(world.images[world.eval_ids[kept]]), choices, device)
    right = np.array([shapes.POSITIONS[k] == shapes.POSITIONS[it['scene'][0]['cell']] for k, it in zip(picks, items)])
    held = np.array([it['held_out'] for it in items])
    return dict(accuracy=float(right.mean()), accuracy_seen=float(right[~held].mean()),
                accuracy_held_out=float(right[held].mean()), chance=1 / len(shapes.POSITIONS), n=len(items))


def probe_checkpoint(ckpt_dir, device='cpu', data_dir='data', eval_items=500):
    """The caption probe of the VLM in ckpt_dir, written to ckpt_dir/probe.json; returns it."""
    model, info = load_model(ckpt_dir, device)
    c = info['config']
    if 'encoder' not in info or c['dataset'] != 'shapes':
        raise ValueError(f'{ckpt_dir} is not a VLM of the shapes world: the probe asks about its scenes')
    enc = data.get_tokenizer(info['tokenizer'])
    folder = shapes.prepare_text(data_dir, verbose=False)
    world_args = (c['scene_size'], c['caption_scenes'], c['conversations'])
    shapes.prepare_images(folder, *world_args)
    result = caption_probe(model, enc, images.ImageWorld(folder, *world_args), device, eval_items)
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
    print(f"caption probe of {cfg['ckpt']}: {r['accuracy']:.3f} (seen {r['accuracy_seen']:.3f}, held out "
          f"{r['accuracy_held_out']:.3f}; chance {r['chance']:.3f}, {r['n']} items)")
