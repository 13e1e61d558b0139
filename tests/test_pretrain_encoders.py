"""Tests for pretrain_encoders.py: every objective learns, the saved weights load as weights=PATH, the probe reads."""

import math

import pytest
import torch
from safetensors import safe_open

import shapes
import encoders
import pretrain_encoders as P
from encoders import build_encoder


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.mark.slow
@pytest.mark.parametrize('family', P.OBJECTIVES)
def test_objective_lowers_its_loss_and_weights_load_as_path(family, tmp_path):
    state = torch.random.get_rng_state()
    path = P.pretrain(family, str(tmp_path / f'{family}.safetensors'), 0, steps=40, batch_size=16, lr=1e-3,
                      n_scenes=400, verbose=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # pre-training leaves the caller's RNG alone
    with safe_open(path, 'pt') as f:
        meta = f.metadata()
    assert float(meta['last_loss']) < float(meta['first_loss'])
    # the file is a plain timm state dict: it loads through weights=PATH
    images = P.make_scenes(4, seed=5)[1]
    by_path = build_encoder(family, weights=path)
    assert not torch.equal(by_path.encode(images), build_encoder(family, weights='random').encode(images))


def test_labels_and_scenes():
    scenes, images, _ = P.make_scenes(50, seed=9)
    assert images.shape == (50, 48, 48, 3) and {len(s) for s in scenes} == {1, 2, 3, 4}
    pairs, counts = P.class_labels(scenes)
    assert pairs.shape == (50, len(shapes.COLORS) * len(shapes.SHAPES))
    assert torch.equal(counts, torch.tensor([len(s) - 1 for s in scenes]))
    # a pair is marked exactly when the scene has an object of that color and shape
    first = scenes[0][0]
    k = shapes.COLORS.index(first['color']) * len(shapes.SHAPES) + shapes.SHAPES.index(first['shape'])
    assert pairs[0, k] == 1 and pairs[0].sum() == len({(o['color'], o['shape']) for o in scenes[0]})
    # the ResNet's dense targets: each of the 9 cells holds its object's pair, or N_PAIRS when empty
    cells = P.cell_labels(scenes)
    assert cells.shape == (50, 9) and cells[0, first['cell']] == k
    assert torch.equal((cells < P.N_PAIRS).sum(1), counts + 1)


def test_dino_teacher_reads_the_image():
    # with timm's LayerScale of 1e-5 the class token ignores the image and the teacher's targets are uniform from
    # the first step; the objective starts LayerScale at 1, so different scenes get different targets
    model = encoders.create_timm_model('dinov2', 'tiny', 'random', 48)
    objective = P.DINOObjective(model, scenes=None, rng=None)
    pixels = encoders.to_pixels(P.make_scenes(32, seed=4)[1], 48, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        t_cls, _ = objective.tokens(*objective.teacher, pixels)
    targets = P.sinkhorn(t_cls / objective.teacher_temp)
    entropy = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
    assert all(bool((b.ls1.gamma == 1).all()) for b in model.blocks)
    assert entropy < 0.9 * math.log(t_cls.shape[1])  # at LayerScale 1e-5: 0.997 log K, uniform; here about 0.73


def test_nothing_to_pretrain_for_patch(tmp_path):
    with pytest.raises(ValueError, match='nothing to pre-train'):
        P.pretrain('patch', str(tmp_path / 'patch.safetensors'), 0)


def test_probe_reads_what_the_features_hold():
    class Oracle(torch.nn.Module):  # features that spell out the labels: the probe must score them perfectly
        def encode(self, images):
            # recover the scene from the pixels' colors is hard; instead look the scene up by its image bytes
            return torch.stack([lookup[bytes(img.tobytes())] for img in images]).unsqueeze(1)

    lookup = {}
    for split in ('probe_train', 'probe_test'):
        scenes, images, _ = P.make_scenes(3000 if split == 'probe_train' else 1000, P.SCENE_SEEDS[split])
        pairs, counts = P.class_labels(scenes)
        feats = torch.cat([pairs, torch.nn.functional.one_hot(counts, shapes.MAX_OBJECTS).float()], 1)
        lookup.update({bytes(img.tobytes()): f for img, f in zip(images, feats)})
    result = P.linear_probe(Oracle(), ridge=1e-6)
    assert result['pairs'] == 1.0 and result['count'] == 1.0

    class Blank(torch.nn.Module):  # features that hold nothing: count at the majority rate, pairs almost never
        def encode(self, images):
            return torch.zeros(len(images), 1, 8)

    blank = P.linear_probe(Blank())
    assert blank['pairs'] < 0.05 and blank['count'] < 0.35
