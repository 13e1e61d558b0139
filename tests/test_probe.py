"""probe.py: the caption probes ask, after each grounding item's image, in the captions' own words where the named
object is and what the object at a named place looks like, and score seen and held-out names apart."""
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


def test_the_probes_ask_in_caption_form_and_score_seen_and_held_out_apart(world, monkeypatch):
    enc, asked = data.get_tokenizer('bytes'), []
    items = [it for it in world.eval_items if it['task'] == 'grounding']
    targets = [it['scene'][0] for it in items]
    truth = {'place': [o['cell'] for o in targets], 'color': [shapes.COLORS.index(o['color']) for o in targets],
             'shape': [shapes.SHAPES.index(o['shape']) for o in targets]}

    def likeliest(model, prompts, images, choices, device):  # right on held-out names, wrong on seen ones
        asked.append((prompts, images, choices))
        name = list(probe.PROBES['sentences'])[len(asked) - 1]
        return [k if it['held_out'] else (k + 1) % len(c) for k, it, c in zip(truth[name], items, choices)]

    monkeypatch.setattr(probe, 'likeliest', likeliest)
    model = type('VLM', (), {'encoder': type('E', (), {'num_tokens': N})()})()
    r = probe.caption_probe(model, enc, world, 'cpu', eval_items=40)
    assert len(asked) == len(probe.PROBES['sentences']) == 3
    share = float(np.mean([it['held_out'] for it in items]))
    assert r == {name: dict(accuracy=share, accuracy_seen=0.0, accuracy_held_out=1.0, chance=c, n=len(items))
                 for name, c in (('place', 1 / 9), ('color', 1 / 6), ('shape', 1 / 4))}
    image = data.special_id(enc, '<|image|>')
    words = {'place': lambda o: (f"The {o['shape']} at the", [f" {p} is {o['color']}" for p in shapes.POSITIONS]),
             'color': lambda o: (f"The {o['shape']} at the {shapes.POSITIONS[o['cell']]} is",
                                 [' red', ' green', ' blue', ' yellow', ' purple', ' orange']),
             'shape': lambda o: (f"The {o['color']} object at the {shapes.POSITIONS[o['cell']]} is a",
                                 [' circle', ' square', ' triangle', ' cross'])}
    for name, (prompts, pictures, choices) in zip(probe.PROBES['sentences'], asked):
        for prompt, options, o, it, picture in zip(prompts, choices, targets, items, pictures):
            context, replies = words[name](o)
            assert prompt[:N] == [image] * N and enc.decode(prompt[N:]) == context
            assert [enc.decode(r) for r in options] == replies
            assert (picture == shapes.render(it['scene'], 48)).all()  # the item's own picture
    assert 0 < sum(it['held_out'] for it in items) < len(items)


def test_question_form_probes_ask_each_task_s_questions_as_a_caption_states_them(world, monkeypatch):
    enc, asked = data.get_tokenizer('bytes'), []

    def likeliest(model, prompts, images, choices, device):  # the right answer on held-out names, the first on seen
        task = list(probe.PROBES['questions'])[len(asked)]
        items = [it for it in world.eval_items if it['task'] == task]
        asked.append((task, items, prompts, choices))
        return [shapes.ANSWERS[task].index(it['answer']) if it['held_out'] else 0 for it in items]

    monkeypatch.setattr(probe, 'likeliest', likeliest)
    model = type('VLM', (), {'encoder': type('E', (), {'num_tokens': N})()})()
    r = probe.caption_probe(model, enc, world, 'cpu', eval_items=40, caption_form='questions')
    assert list(r) == ['color', 'shape', 'count', 'exists', 'position']  # every task but grounding
    image = data.special_id(enc, '<|image|>')
    for task, items, prompts, choices in asked:
        answers = shapes.ANSWERS[task]
        for it, prompt, options in zip(items, prompts, choices):
            assert prompt[:N] == [image] * N and enc.decode(prompt[N:]) == it['question']
            assert [enc.decode(o) for o in options] == [f' {a}.' for a in answers]  # as the caption writes it
        held = [it['held_out'] for it in items]
        first = [it['answer'] == answers[0] for it in items]
        assert r[task]['accuracy_seen'] == pytest.approx(np.mean([f for f, h in zip(first, held) if not h]))
        assert r[task]['chance'] == 1 / len(answers) and r[task]['n'] == len(items) == 40
        assert r[task]['accuracy_held_out'] == (1.0 if any(held) else None)  # count names nothing: never held out
    assert r['count']['accuracy_held_out'] is None and r['color']['accuracy_held_out'] == 1.0


def test_the_probe_refuses_a_text_checkpoint(tmp_path, monkeypatch):
    info = {'config': {'dataset': 'shapes'}, 'tokenizer': 'bytes'}
    monkeypatch.setattr(probe, 'load_model', lambda ckpt, device: (torch.nn.Linear(1, 1), info))
    with pytest.raises(ValueError, match=f'{tmp_path} is not a VLM of the shapes world'):
        probe.probe_checkpoint(str(tmp_path))
