import json
import os

import numpy as np
import pytest
import torch

import data
import shapes


def test_byte_tokenizer_round_trip_and_specials():
    enc = data.get_tokenizer('bytes')
    text = 'Bumi has a pet cat. ünïcode ✓'
    ids = enc.encode_ordinary(text)
    assert max(ids) < 256 and enc.decode(ids) == text
    assert [data.special_id(enc, t) for t in data.SPECIAL_TOKENS] == [256, 257, 258, 259]
    assert data.padded_vocab_size(enc) == 320


def test_text_never_produces_special_tokens():
    enc = data.get_tokenizer('bytes')
    ids = enc.encode_ordinary('a caption with <|image|> and <|endoftext|> in it')
    assert max(ids) < 256
    assert enc.decode(ids).count('<|image|>') == 1


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        data.get_tokenizer('bpe')


def test_world_and_corpus_are_deterministic():
    assert shapes.make_world() == shapes.make_world()
    world = shapes.make_world()
    assert shapes.make_corpus(world, 1, 5000) == shapes.make_corpus(world, 1, 5000)
    assert shapes.make_corpus(world, 1, 5000) != shapes.make_corpus(world, 2, 5000)


def test_corpus_states_the_world_facts():
    world = shapes.make_world()
    text = ' '.join(shapes.make_corpus(world, 1, 200_000))
    person = world['people'][0]
    facts = world['facts'][person]
    assert f"The favorite color of {person} is {facts['color']}." in text or \
        f"{person} likes the color {facts['color']} best." in text
    assert 'three plus four is seven.' in text


def test_text_tasks_have_known_chance_and_uniform_answers():
    items = shapes.make_text_tasks(shapes.make_world(), 3, 400)
    assert [it['task'] for it in items[::400]] == list(shapes.TEXT_TASKS)
    for it in items:
        assert len(it['choices']) == 4 and len(set(it['choices'])) == 4
        assert it['choices'][it['answer']].startswith(' ')
    # the right answer sits uniformly among the choices, so an answer-blind scorer gets 1/4
    for task in shapes.TEXT_TASKS:
        positions = np.bincount([it['answer'] for it in items if it['task'] == task], minlength=4)
        assert positions.min() > 0.15 * positions.sum(), task
    world = shapes.make_world()
    for it in items:
        answer = it['choices'][it['answer']].strip()
        if it['task'] in ('arithmetic', 'long_arithmetic'):  # 'a plus b is', 'a minus b plus c is'
            words = it['prompt'].split()[:-1]
            total = shapes.NUMBER_WORDS.index(words[0])
            for op, b in zip(words[1::2], words[2::2]):
                total += shapes.NUMBER_WORDS.index(b) * (1 if op == 'plus' else -1)
            assert len(words) == (3 if it['task'] == 'arithmetic' else 5) and answer == shapes.NUMBER_WORDS[total]
        if it['task'] == 'facts' and it['prompt'].startswith('The pet of'):
            assert answer == world['facts'][it['prompt'].split()[3]]['pet']
        if it['task'] == 'rare_facts':
            assert answer == world['facts'][it['prompt'].split()[3]]['instrument']
    # every task from its own stream: fewer items are a prefix of more, so eval_items scores the same first ones
    fewer = shapes.make_text_tasks(world, 3, 100)
    assert all(fewer[100 * t:100 * t + 100] == items[400 * t:400 * t + 100] for t in range(len(shapes.TEXT_TASKS)))
    assert shapes.first_per_task(items, 2) == [i for t in range(5) for i in (400 * t, 400 * t + 1)]


def test_rare_facts_are_rare_in_the_corpus():
    world = shapes.make_world()
    text = ' '.join(shapes.make_corpus(world, 1, 300_000))
    person = world['people'][0]
    common = text.count(f'The pet of {person} is') + text.count(f'{person} has a pet')
    rare = text.count(f'The instrument of {person} is') + text.count(f'{person} plays the')
    assert 0 < rare < common / 4


def test_prepared_shards_match_meta(shapes_dir):
    folder = os.path.join(shapes_dir, 'shapes')
    meta = data.load_meta(folder)
    for split in ('train', 'val'):
        tokens = data.open_shard(folder, split)
        assert len(tokens) == meta['tokens'][split] and tokens.dtype == np.uint16
    assert data.open_shard(folder, 'train')[:200].max() <= 256


def test_wrong_shard_size_or_dtype_is_a_clear_error(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / 'train.bin')
    (tmp_path / 'meta.json').write_text(json.dumps({'dtype': 'uint16', 'tokens': {'train': 120}}))
    with pytest.raises(ValueError, match='truncated or was written with another dtype'):
        data.open_shard(str(tmp_path), 'train')
    np.arange(60, dtype=np.uint32).tofile(tmp_path / 'train.bin')  # 240 bytes: 120 uint16 would fit...
    (tmp_path / 'meta.json').write_text(json.dumps({'dtype': 'uint32', 'tokens': {'train': 120}}))
    with pytest.raises(ValueError, match='480 bytes'):  # ...but meta says uint32
        data.open_shard(str(tmp_path), 'train')


def test_missing_meta_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='meta.json not found'):
        data.open_shard(str(tmp_path), 'train')


def test_text_batch_targets_are_shifted_inputs(shapes_dir):
    tokens = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    x, y = data.text_batch(tokens, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_slices_of_a_step_are_the_single_process_batch(shapes_dir):
    tokens = data.open_shard(os.path.join(shapes_dir, 'shapes'), 'train')
    whole, _ = data.text_batch(tokens, 8, 16, data.seeded_generator(5, 3))
    parts = [data.text_batch(tokens, 8, 16, data.seeded_generator(5, 3), slice(a, a + 2))[0] for a in (0, 2, 4, 6)]
    assert torch.equal(torch.cat(parts), whole)
    other, _ = data.text_batch(tokens, 8, 16, data.seeded_generator(5, 4))
    assert not torch.equal(other, whole)  # each step its own batch
