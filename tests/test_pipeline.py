"""The image and fine-tuning stages on the shapes world: samples, packing, mixtures, schedules, the whole run."""
from collections import Counter
import json
import os
import random

import numpy as np
import pytest
import torch

import checkpoint
import data
import grounding
import images
import shapes
import eval as ev
import train
from configurator import ConfigError

N = 36  # image tokens of every tiny encoder at 48 px


@pytest.fixture(scope='module')
def world(shapes_dir):
    shapes.prepare_images(os.path.join(shapes_dir, 'shapes'), 48, 200, 150, 20)
    return images.ImageWorld(os.path.join(shapes_dir, 'shapes'), 48, n_captions=200, n_instruct=150, n_eval=20)


@pytest.fixture(scope='module')
def enc():
    return data.get_tokenizer('bytes')


def image_runs(row, image_token):
    """Lengths of the runs of consecutive <|image|> tokens in a row."""
    runs, n = [], 0
    for t in row.tolist() + [-1]:
        if t == image_token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_scenes_render_their_objects():
    scene = [dict(shape='square', color='red', size='large', cell=4)]
    img = shapes.render(scene, 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert tuple(img[24, 24]) == shapes.RGB['red'] and tuple(img[2, 2]) == (shapes.BACKGROUND,) * 3
    assert (img == shapes.RGB['red']).all(-1).sum() > 100


@pytest.mark.parametrize('task', shapes.VISION_TASKS)
def test_questions_are_answerable_and_balanced(task):
    rng = random.Random(0)
    answers = []
    for _ in range(600):
        scene, q, a, chance, named = shapes.question(rng, task)
        assert 1 <= len(scene) <= shapes.MAX_OBJECTS and len({o['cell'] for o in scene}) == len(scene)
        if task == 'color':  # the shape asked about is unique, and has the answered color
            shape = q.split()[-1][:-1]
            assert [o['color'] for o in scene if o['shape'] == shape] == [a]
        if task == 'count':
            assert shapes.NUMBER_WORDS[len(scene)] == a
        if task == 'exists':
            article, color, shape = q[:-1].split()[-3:]
            assert article == ('an' if color == 'orange' else 'a')
            assert (a == 'yes') == any(o['color'] == color and o['shape'] == shape for o in scene)
        if task == 'position':
            assert [shapes.POSITIONS[o['cell']] for o in scene if o['shape'] == q.split()[-1][:-1]] == [a]
        if task == 'grounding':  # the one object of that color and shape, its box
            color, shape = q[:-1].split()[-2:]
            target = [o for o in scene if o['color'] == color and o['shape'] == shape]
            assert len(target) == 1 and a == shapes.box_text(shapes.object_box(target[0]))
            a = (target[0]['cell'], target[0]['size'])
        answers.append(a)
    choices = shapes.ANSWERS.get(task) or [(c, z) for c in range(9) for z in shapes.SIZES]
    assert chance == (shapes.GROUNDING_CHANCE if task == 'grounding' else 1 / len(choices))
    counts = np.array([answers.count(c) for c in choices])
    assert counts.min() > 0.6 * 600 / len(choices)  # every answer about equally often: chance is 1/k


def test_a_box_is_what_the_picture_shows_and_iou_scores_it():
    for shape in shapes.SHAPES:
        obj = dict(shape=shape, color='red', size='large', cell=5)
        img = shapes.render([obj], 300)
        ys, xs = np.nonzero((img == shapes.RGB['red']).all(-1))
        drawn = [xs.min() / 300, ys.min() / 300, (xs.max() + 1) / 300, (ys.max() + 1) / 300]
        assert grounding.box_iou(drawn, shapes.object_box(obj)) > 0.93, shape  # 2 decimals, pixels of 1/300
    box = shapes.object_box(dict(shape='circle', color='red', size='small', cell=0))
    assert grounding.parse_box(shapes.box_text(box)) == box  # the answer is a box vlm-evaluation's parser reads
    assert grounding.grounding_accuracy(shapes.box_text(box), box, shapes.GROUNDING_IOU) == 1.0
    assert grounding.grounding_accuracy('somewhere left', box, shapes.GROUNDING_IOU) == 0.0
    # a box that ignores the picture finds about 1 object in 10: better than 1/18 (cell and size), as large boxes
    # of the same cell overlap most shapes' large boxes
    assert 1 / 18 < shapes.GROUNDING_CHANCE < 0.12


def test_fine_tuning_names_only_seen_colors_and_shapes_and_evaluation_all():
    rng = random.Random(2)
    for _ in range(500):
        _, turns = shapes.conversation(rng)
        for q, a in turns:
            words = set(f'{q} {a}'.lower().replace('?', ' ').replace('.', ' ').split())
            assert words & set(shapes.COLORS) <= set(shapes.SEEN['color']), (q, a)
            assert words & set(shapes.SHAPES) <= set(shapes.SEEN['shape']), (q, a)
    _, _, items = shapes.image_sets(0, 0, 300)
    held = [it for it in items if it['held_out']]
    assert 0.4 < len(held) / len(items) < 0.7  # evaluation also names the held-out colors and shapes
    assert all(set(it['question'].lower().rstrip('?.').split()) & (set(shapes.COLORS + shapes.SHAPES) -
                                                                    set(shapes.SEEN['color'] + shapes.SEEN['shape']))
               for it in held)
    assert {it['answer'] for it in items if it['task'] == 'color'} == set(shapes.SEEN['color'])  # answers: seen
    assert {it['answer'] for it in items if it['task'] == 'position'} == set(shapes.POSITIONS)


def test_only_its_name_picks_out_the_object_an_evaluation_question_asks_about():
    _, _, items = shapes.image_sets(0, 0, 300)
    for it in items:
        words, scene, task = it['question'].rstrip('?.').split(), it['scene'], it['task']
        if task == 'count':
            continue
        # one object answers a question about itself, whatever its name
        assert len(scene) >= 2, it['question']
        named = {'color': words[-1], 'shape': words[-2], 'position': words[-1]}.get(task, words[-2:])
        colors, shapes_ = {o['color'] for o in scene}, {o['shape'] for o in scene}
        if task == 'color':  # every object's color an answer; every shape of the named shape's half
            assert colors <= set(shapes.ANSWERS['color']) and shapes_ <= set(shapes.half('shape', named))
        elif task == 'shape':
            assert shapes_ <= set(shapes.ANSWERS['shape']) and colors <= set(shapes.half('color', named))
        elif task == 'position':
            assert shapes_ <= set(shapes.half('shape', named))
        else:  # exists, grounding: a color and a shape named
            assert colors <= set(shapes.half('color', named[0])) and shapes_ <= set(shapes.half('shape', named[1]))


def test_caption_describes_every_object_in_some_phrasing():
    rng = random.Random(1)
    phrasings = set()
    for _ in range(200):
        scene = shapes.scene_with(rng, {}, 3)
        text = shapes.caption(scene, rng).lower()
        for o in scene:
            color, shape, place = o['color'], o['shape'], shapes.POSITIONS[o['cell']]
            forms = {f'{color} {shape} at the {place}': 'list', f'{shape} at the {place} is {color}': 'shape first',
                     f'{color} {shape} is at the {place}': 'place last', f'{color} object at the {place} is a {shape}':
                     'color first'}
            found = [kind for form, kind in forms.items() if form in text.replace(f"{o['size']} ", '')]
            assert found, (o, text)
            phrasings.update(found)
        assert len(text) + 1 <= 256 - 36  # with 36 image tokens, a caption fits a 256-token row
    assert phrasings == {'list', 'shape first', 'place last', 'color first'}


def true_answer(scene, question):
    """The answer a question-form caption's question has in the scene, worked out from the scene itself."""
    for o in scene:
        color, shape = o['color'], o['shape']
        if question == shapes.ask('color', shape=shape):
            return color
        if question == shapes.ask('position', shape=shape):
            return shapes.POSITIONS[o['cell']]
        if question == shapes.ask('shape', color):
            return shape
    if question == shapes.ask('count'):
        return shapes.NUMBER_WORDS[len(scene)]
    pairs = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if question == shapes.ask('exists', c, s)]
    assert len(pairs) == 1, question
    return 'yes' if pairs[0] in [(o['color'], o['shape']) for o in scene] else 'no'


def test_question_caption_states_true_facts_naming_every_color_and_shape():
    rng, named, kinds = random.Random(2), set(), set()
    for _ in range(300):
        scene = shapes.scene_with(rng, {})
        facts = shapes.question_caption(scene, rng)
        assert 1 <= len(facts) <= 4 and len(set(facts)) == len(facts)
        for question, answer in facts:
            assert answer == true_answer(scene, question), (scene, question, answer)
            kinds.add(answer if answer in ('yes', 'no') else question.split()[0])
            named.update(w.rstrip('?') for w in question.split())
        # a question by shape or color is asked only of a shape or color that one object has
        for question, _ in facts:
            for o in scene:
                if question in (shapes.ask('color', shape=o['shape']), shapes.ask('position', shape=o['shape'])):
                    assert sum(p['shape'] == o['shape'] for p in scene) == 1
    assert kinds == {'How', 'What', 'Where', 'yes', 'no'}
    assert set(shapes.COLORS) | set(shapes.SHAPES) <= named  # held-out names as well as seen ones


def test_a_question_caption_is_scored_on_its_answers_only(enc):
    facts = [('What color is the square?', 'green'), ('Is there a red cross?', 'no')]
    tokens, mask = data.caption_sample(enc, facts, N)
    eot = data.special_id(enc, '<|endoftext|>')
    assert tokens[:N] == [data.special_id(enc, '<|image|>')] * N and not any(mask[:N])
    assert enc.decode(tokens[N:-1]) == 'What color is the square? green. Is there a red cross? no.'
    assert [t for t, m in zip(tokens, mask) if m] == enc.encode_ordinary(' green.') + enc.encode_ordinary(' no.') + [eot]
    words, whole = data.caption_sample(enc, 'A green square.', N)  # a str caption is scored whole
    assert all(whole[N:]) and enc.decode(words[N:-1]) == 'A green square.'


def test_caption_form_picks_the_world_s_captions(world, shapes_dir, enc):
    asked = images.ImageWorld(os.path.join(shapes_dir, 'shapes'), 48, n_captions=200, n_instruct=150, n_eval=20,
                              caption_form='questions')
    gen = torch.Generator().manual_seed(0)
    tokens, mask, refs = asked.caption_sample(3, enc, N, gen)
    text = enc.decode(tokens[N:-1])
    facts = [f + '.' for f in text.rstrip('.').split('. ')]
    assert refs == [3] and 1 <= len(facts) <= 4
    for fact in facts:
        question, answer = fact.split('? ')
        assert answer.rstrip('.') == true_answer(asked.caption_scenes[3], question + '?')
    gen = torch.Generator().manual_seed(0)
    assert enc.decode(world.caption_sample(3, enc, N, gen)[0][N:-1]).count('?') == 0  # 'sentences', the default
    with pytest.raises(ConfigError, match='caption_form'):
        train.get_config(['--caption_form=dialogue'])
    with pytest.raises(ConfigError, match="caption_form='questions' writes the shapes world's captions"):
        train.get_config(['--caption_form=questions', f'--image_data={shapes_dir}/none.tar'])


def test_a_token_share_counts_a_caption_whole_questions_included(world, shapes_dir, enc):
    asked = images.ImageWorld(os.path.join(shapes_dir, 'shapes'), 48, n_captions=200, n_instruct=150, n_eval=20,
                              caption_form='questions')
    for source in (world, asked):
        gen, parts = data.seeded_generator(0, 0, 1), Counter()  # caption_row_fill's rows, drawn again
        for _ in range(20):
            samples, _ = data.fill_row(lambda: data.draw_sample(source, enc, 'caption', gen, N, 256), 256)
            for tokens, mask, refs in samples:
                parts.update(all=len(tokens), scored=sum(mask), image=N * len(refs))
        fill = data.caption_row_fill(source, enc, 256, N, seed=0, rows=20)
        assert fill == pytest.approx(parts['all'] / (20 * 256))
        scored_or_image = (parts['scored'] + parts['image']) / (20 * 256)
        if source is world:  # a sentence caption is scored whole: all it fills is image or scored
            assert fill == pytest.approx(scored_or_image)
        else:  # the questions are read, not scored: they are more of the row than the answers
            assert fill > scored_or_image + (parts['scored'] / (20 * 256))


def test_loss_mask_covers_exactly_the_answers(enc):
    turns = [('What color is the circle?', 'red'), ('How many shapes are there?', 'two')]
    tokens, mask = data.chat_sample(enc, turns, N)
    eot = data.special_id(enc, '<|endoftext|>')
    answer_tokens = [t for t, m in zip(tokens, mask) if m]
    assert answer_tokens == enc.encode_ordinary('red') + [eot] + enc.encode_ordinary('two') + [eot]
    x, y, _ = data.pack_row([(tokens, mask, [0])], 128, eot)
    assert [t for t in y.tolist() if t != -1] == answer_tokens


def test_packing_never_splits_and_fits_block(world, enc, shapes_dir):
    text = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    gen = torch.Generator().manual_seed(0)
    image = data.special_id(enc, '<|image|>')
    for _ in range(20):
        x, y, ids = data.mixture_batch(world, enc, text, 8, 256, N, 0.5, 0.3, gen)
        assert x.shape == y.shape == (8, 256)
        runs = [r for row in x for r in image_runs(row, image)]
        assert all(r == N for r in runs)  # every image whole
        assert len(runs) == len(ids)  # one image id per image, in order
    skipped = world.skipped['longer than block_size']
    plan = data.finetune_plan(world, enc, 256, N, epochs=2, seed=0)
    assert world.skipped['longer than block_size'] == skipped  # every conversation fits
    assert sorted(i for row in plan[1] for i in row) == list(range(world.n_conversations))  # each exactly once
    assert plan[0] != plan[1]  # reshuffled every epoch
    rows = [data.finetune_row(world, enc, indices, 256, N) for indices in plan[0]]
    assert sum(len(image_runs(x, image)) for x, _, _ in rows) == len(world.conversations)
    for x, y, ids in rows:
        assert len(x) == 256 and all(r == N for r in image_runs(x, image)) and len(ids) == len(image_runs(x, image))
        text = enc.decode(x[x < 256].tolist())
        assert text.count('?') + text.count('describes:') >= len(ids)  # each conversation kept its question


def test_finetune_rehearsal_rows_carry_captions_with_their_images(world, enc, shapes_dir):
    text = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    image, user = data.special_id(enc, '<|image|>'), data.special_id(enc, '<|user|>')
    features = np.arange(len(world.images), dtype=np.float32)[:, None, None] * np.ones((1, N, 2), np.float32)
    plan = data.finetune_plan(world, enc, 256, N, epochs=1, seed=0)
    caption_rows = 0
    for step in range(30):
        make = lambda captions, rows=slice(None): data.finetune_batch(
            world, enc, plan[0][step % len(plan[0]):][:2], text, 6, captions, 256, N, features,
            torch.Generator().manual_seed(step), rows)
        x, y, inputs = make(0.5)
        assert x.shape == (8, 256)
        assert not any((row == user).any() for row in x[2:])  # conversations only in the first rows
        caption_rows += sum(bool((row == image).any()) for row in x[2:])
        rehearsed = sum(len(image_runs(row, image)) for row in x[2:])  # the images of the caption rows
        # the features follow the images in row order: a caption row's own scene, each image whole
        refs = inputs['features'][:, 0, 0].long().tolist()
        assert len(refs) == sum(len(image_runs(row, image)) for row in x)
        assert all(r in world.caption_ids for r in refs[len(refs) - rehearsed:])
        assert all(r in world.conversation_ids for r in refs[:len(refs) - rehearsed])
        parts = [make(0.5, slice(a, b)) for a, b in ((0, 3), (3, 8))]  # any split of the rows builds the same rows
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        plain, _, plain_inputs = make(0.0)
        assert not (plain[2:] == image).any() and len(plain_inputs['features']) == len(refs) - rehearsed
    assert 0.35 < caption_rows / (30 * 6) < 0.65  # captions=0.5 of the rehearsal rows


def test_realized_ratios_match_config(world, enc, shapes_dir):
    text = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    gen = torch.Generator().manual_seed(0)
    image, user = data.special_id(enc, '<|image|>'), data.special_id(enc, '<|user|>')
    kinds = {'caption': 0, 'instruct': 0, 'text': 0}
    for _ in range(1000):
        x, _, _ = data.mixture_batch(world, enc, text, 16, 256, N, 0.1, 0.05, gen)
        for row in x:
            kinds['instruct' if (row == user).any() else 'caption' if (row == image).any() else 'text'] += 1
    total = sum(kinds.values())
    assert abs(kinds['caption'] / total - 0.1) < 0.02 and abs(kinds['instruct'] / total - 0.05) < 0.02


def test_slices_of_a_step_are_the_single_process_mixture(world, enc, shapes_dir):
    text = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    whole = data.mixture_batch(world, enc, text, 8, 256, N, 0.5, 0.2, data.seeded_generator(3, 0))
    parts = [data.mixture_batch(world, enc, text, 8, 256, N, 0.5, 0.2, data.seeded_generator(3, 0), slice(a, a + 4))
             for a in (0, 4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert parts[0][2] + parts[1][2] == whole[2] and whole[2]  # the same images, in order


def test_image_stage_lr_continues_or_rewarms():
    cfg = train.get_config(['--text_iters=100', '--warmup_iters=10', '--image_iters=50', '--image_inject_frac=0.6'])
    lr = train.image_schedule(cfg)
    reached = train.text_schedule(cfg)(60)
    assert reached == pytest.approx(train.cosine_lr(60, cfg.learning_rate, 10, 100, cfg.min_lr)) and reached < 3e-3
    assert lr(0) == pytest.approx(reached)  # no warmup: the text schedule's LR at step 60
    assert lr(50) == pytest.approx(cfg.min_lr)
    assert all(lr(s) >= lr(s + 1) for s in range(50))  # and only down from there
    cfg = train.get_config(['--image_iters=50', '--image_inject_frac=1.0', '--rewarm_iters=5', '--image_lr=1e-3'])
    lr = train.image_schedule(cfg)
    assert lr(0) == pytest.approx(1e-3 / 6) and lr(5) == pytest.approx(1e-3)  # re-warmed to image_lr
    assert lr(50) == pytest.approx(cfg.min_lr)


def test_token_kinds_of_a_mixture(world, enc, shapes_dir):
    text = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    x, y, refs = data.mixture_batch(world, enc, text, 8, 256, N, 0.5, 0.25, data.seeded_generator(5, 0))
    kinds = data.token_kinds(x, y, enc)
    assert sum(kinds.values()) == x.numel() and kinds['image'] == N * len(refs)
    text_rows = sum(not (row == data.special_id(enc, '<|image|>')).any() and
                    not (row == data.special_id(enc, '<|user|>')).any() for row in x)
    assert kinds['text'] == text_rows * 256 and kinds['caption'] > 0 and kinds['instruction'] > 0
    fill = data.caption_row_fill(world, enc, 256, N, seed=0, rows=20)
    assert 0.5 < fill <= 1.0 and fill == data.caption_row_fill(world, enc, 256, N, seed=0, rows=20)


def test_images_from_scratch_and_the_encoder_schedule():
    cfg = train.get_config(['--image_iters=50', '--image_inject_frac=0', '--warmup_iters=10'])
    lr = train.image_schedule(cfg)  # the text stage's schedule: its warmup and peak, over the image stage
    assert lr(10) == pytest.approx(cfg.learning_rate)
    assert lr(0) < lr(5) < lr(10) and lr(50) == pytest.approx(cfg.min_lr)
    cfg = train.get_config(['--image_iters=50', '--freeze_encoder=False', '--encoder_lr=1e-4', '--rewarm_iters=5'])
    lm = lambda step: 6e-4
    lr = train.encoder_schedule(cfg, 50, lm)  # its own warmup and cosine, not the LM's reached LR
    assert lr(0) == pytest.approx(1e-4 / 6) and lr(5) == pytest.approx(1e-4)
    assert lr(50) == pytest.approx(1e-4 * cfg.min_lr / cfg.learning_rate)
    patch = train.get_config(['--encoder=patch', '--freeze_encoder=False'])
    assert train.encoder_schedule(patch, 50, lm) is lm  # learned from scratch: the LM's schedule


def test_bad_injection_point_and_block_size_fail_before_training():
    with pytest.raises(ConfigError, match=r'image_inject_frac=0.5 is not 0 or one of save_fracs'):
        train.get_config(['--image_inject_frac=0.5'])
    with pytest.raises(ConfigError, match='block_size=128 cannot hold one image'):
        train.get_config(['--block_size=128'])
    train.get_config(['--block_size=128', '--stages=text'])  # text alone needs no room for images


def test_blind_eval_feeds_gray_images(world, enc):
    seen = []

    class Encoder:
        num_tokens = N

        def encode(self, images):  # a closed question's image, once for all its replies
            seen.append(torch.from_numpy(images))
            return torch.zeros(len(images), N, 8)

    class Spy(torch.nn.Module):  # answers every closed question by likelihood (forward), grounding by generate
        encoder = Encoder()
        config = type('C', (), {'block_size': 256, 'vocab_size': enc.n_vocab})()

        def forward(self, idx, features):
            assert features.shape == (len(idx), N, 8)
            return torch.zeros(*idx.shape, enc.n_vocab), None

        def generate(self, idx, images, max_new_tokens, stop_token=None):
            seen.append(images.clone())
            return torch.cat([idx, torch.full((len(idx), 1), stop_token)], dim=1)

    rng = np.random.default_rng(0)
    ev.vision_tasks(Spy(), enc, world, 'cpu', rng, blind=True)
    assert all((imgs == 128).all() for imgs in seen) and sum(len(i) for i in seen) == len(world.eval_items)
    seen.clear()
    ev.vision_tasks(Spy(), enc, world, 'cpu', rng)
    assert any((imgs != 128).any() for imgs in seen)


def test_normalized_exact_match():
    assert ev.normalize_answer(' The Red.') == 'red'
    assert ev.normalize_answer('bottom  right!') == 'bottom right'
    assert ev.normalize_answer('a cross') == ev.normalize_answer('cross')


@pytest.mark.slow
@pytest.mark.parametrize('encoder,freeze,extra', [
    ('siglip', True, ['--image_ratio_of=tokens', '--finetune_rehearsal=True']),  # a share of tokens, made rows
    ('patch', False, ['--image_inject_frac=0']),  # images from scratch: no text stage
])
def test_all_stages_end_to_end(tmp_path, shapes_dir, encoder, freeze, extra, capsys):
    out = str(tmp_path / 'run')
    cfg = train.get_config([
        f'--data_dir={shapes_dir}', f'--out_dir={out}', f'--text_out_dir={out}/text', '--text_iters=10',
        '--save_fracs=[0.5,1.0]', '--image_inject_frac=0.5', '--warmup_iters=2', '--batch_size=4', '--image_iters=4',
        '--image_ratio=0.5', '--caption_scenes=40', '--conversations=40', '--finetune_epochs=1', '--rewarm_iters=1',
        '--log_interval=2', f'--encoder={encoder}', f'--freeze_encoder={freeze}', '--device=cpu',
        '--encoder_weights=random', '--eval_items=20', *extra])  # 'shapes' would pre-train for a minute: tests/test_pretrain_encoders.py
    train.main(cfg)
    printed = capsys.readouterr().out
    assert 'steps of 3 conversation + 1 text rows' in printed  # finetune_text_ratio=0.25 of 4
    from_scratch = '--image_inject_frac=0' in extra
    assert ('text stage: not needed' in printed) == from_scratch and os.path.exists(f'{out}/text/ckpt_100') != from_scratch
    if not from_scratch:  # 0.5 of the tokens: more than half of the rows, as caption rows hold padding
        share = float(printed.split('of the tokens is ')[1].split()[0])
        assert 0.5 < share < 0.75
        assert f'text rows ({share:.0%} captions)' in printed  # finetune_rehearsal: the image stage's share
    for stage, vision in (('image', False), ('finetune', True)):  # the image stage has not learned to answer yet
        with open(os.path.join(out, stage, 'eval.json')) as f:
            result = json.load(f)
        for key in ('vision_stable_score', 'text_stable_score', 'vision_blind_stable_score',
                    'vision_stable_score_ci95', 'text_stable_score_ci95', 'vision_blind_stable_score_ci95'):
            assert (result[key] is not None) == (vision or key.startswith('text')), (stage, key)
        assert set(result['tasks']) == (set(shapes.VISION_TASKS) if vision else set()) | set(shapes.TEXT_TASKS)
        assert {t['n'] for t in result['tasks'].values()} == ({20, 24} if vision else {24})  # text: all 24 items
    assert result['tasks']['position']['chance'] == pytest.approx(1 / 9)
    assert result['tasks']['grounding']['chance'] == pytest.approx(shapes.GROUNDING_CHANCE)
    model, info = checkpoint.load_model(os.path.join(out, 'finetune'))
    assert info['encoder']['name'] == encoder and model.encoder.frozen == freeze
    for folder, stage, steps in (('text', 'text', 10), ('image', 'image', 4), ('finetune', 'finetune', None)):
        if folder == 'text' and from_scratch:
            continue
        with open(os.path.join(out, folder, 'metrics.jsonl')) as f:  # a stage's log lines, one JSON object each
            lines = [json.loads(line) for line in f]
        assert lines and all(r['stage'] == stage and 'loss' in r or 'val_loss' in r for r in lines)
        assert steps is None or lines[-1]['step'] == steps
        if stage == 'image':  # the realised shares of the mixture's tokens, by kind
            shares = lines[-1]['token_shares']
            assert set(shares) <= set(data.TOKEN_KINDS) and sum(shares.values()) == pytest.approx(1)
            assert shares['image'] > 0 and shares['caption'] > 0 and shares['text'] > 0


CONFIGS = sorted(os.listdir(os.path.join(os.path.dirname(__file__), '..', 'config')))


@pytest.mark.parametrize('path', [p for p in CONFIGS if not p.startswith('ablate_')])  # tests/test_ablate.py
def test_every_config_file_is_valid(path):
    cfg = train.get_config([os.path.join(os.path.dirname(__file__), '..', 'config', path)])
    assert cfg.encoder in ('siglip', 'dinov2', 'dino_siglip', 'vit', 'resnet', 'patch')
    if path.startswith('scale_'):
        assert cfg.encoder_scale == 'paper' and cfg.batch_size % cfg.gradient_accumulation_steps == 0


def test_the_world_is_made_again_when_its_code_changes(tmp_path, monkeypatch):
    """Its pictures and text are keyed by the code that generates them: an edit never reads the old ones."""
    folder = shapes.prepare_text(str(tmp_path), train_bytes=20_000, val_bytes=5_000, n_task_items=5, verbose=False)
    before = shapes.images_path(folder, 48, 10, 10, 5)
    with open(os.path.join(folder, 'meta.json')) as f:
        assert json.load(f)['version'] == shapes.WORLD_CODE
    monkeypatch.setattr(shapes, 'WORLD_CODE', 'edited')
    assert shapes.images_path(folder, 48, 10, 10, 5) != before
    shapes.prepare_text(str(tmp_path), train_bytes=20_000, val_bytes=5_000, n_task_items=5, verbose=False)
    with open(os.path.join(folder, 'meta.json')) as f:
        assert json.load(f)['version'] == 'edited'  # made again
