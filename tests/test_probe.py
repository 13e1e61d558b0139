"""probe.py: the caption probe asks, after each grounding item's image, in the captions' own words where the named
color and shape are, and scores seen and held-out names apart."""
import os

import numpy as np
import pytest
import torch

import data
import images
import probe
import shapes

N = 36


@pytest.fixture(scope='module')
def world(shapes_dir):
    shapes.prepare_images(os.path.join(shapes_dir, 'shapes'), 48, 20, 20, 40)
    return images.ImageWorld(os.path.join(shapes_dir, 'shapes'), 48, n_captions=20, n_instruct=20, n_eval=40)


def test_the_probe_asks_in_caption_form_and_scores_seen_and_held_out_apart(world, monkeypatch):
    enc, asked = data.get_tokenizer('bytes'), []
    items = [it for it in world.eval_items if it['task'] == 'grounding']
    truth = [shapes.POSITIONS.index(shapes.POSITIONS[it['scene'][0]['cell']]) for it in items]

    def likeliest(model, prompts, images, choices, device):  # right on held-out names, wrong on seen ones
        asked.append((prompts, images, choices))
        return [k if it['held_out'] else (k + 1) % 9 for k, it in zip(truth, items)]

    monkeypatch.setattr(probe, 'likeliest', likeliest)
    model = type('VLM', (), {'encoder': type('E', (), {'num_tokens': N})()})()
    r = probe.caption_probe(model, enc, world, 'cpu', eval_items=40)
    assert r == dict(accuracy=float(np.mean([it['held_out'] for it in items])), accuracy_seen=0.0,
                     accuracy_held_out=1.0, chance=1 / 9, n=len(items))
    prompts, images, choices = asked[0]
    image = data.special_id(enc, '<|image|>')
    for prompt, options, it, picture in zip(prompts, choices, items, images):
        target = it['scene'][0]
        assert prompt[:N] == [image] * N and enc.decode(prompt[N:]) == f"The {target['shape']} at the"
        assert [enc.decode(o) for o in options] == [f" {p} is {target['color']}" for p in shapes.POSITIONS]
        assert (picture == shapes.render(it['scene'], 48)).all()  # the item's own picture
    assert 0 < sum(it['held_out'] for it in items) < len(items)


def test_the_probe_refuses_a_text_checkpoint(tmp_path, monkeypatch):
    info = {'config': {'dataset': 'shapes'}, 'tokenizer': 'bytes'}
    monkeypatch.setattr(probe, 'load_model', lambda ckpt, device: (torch.nn.Linear(1, 1), info))
    with pytest.raises(ValueError, match=f'{tmp_path} is not a VLM of the shapes world'):
        probe.probe_checkpoint(str(tmp_path))
