"""sample.py: a question about a shapes-world scene or an image file, and a text prompt."""
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import sample
from configurator import script_config
from encoders import build_encoder
from model import GPT, VLM, GPTConfig


def save(folder, model, info):
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', **({'encoder_lr': 1e-4} if info.get('encoder') else {}))
    checkpoint.save_checkpoint(folder, *checkpoint.full_state(model, opt), info)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    enc = data.get_tokenizer('bytes')
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=data.padded_vocab_size(enc), n_layer=2, n_head=2, n_embd=32))
    base = {'stage': 'finetune', 'step': 1, 'tokenizer': 'bytes', 'model_args': asdict(gpt.config), 'config': {}}
    save(str(root / 'text'), gpt, dict(base, stage='text'))
    image_token = data.special_id(enc, '<|image|>')
    vlm = VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), image_token)
    encoder = {'name': 'patch', 'scale': 'tiny', 'weights': 'random', 'img_size': 48, 'frozen': False, 'saved': True,
               'projector': 'mlp', 'inject_layer': 0, 'image_token': image_token}
    save(str(root / 'vlm'), vlm, dict(base, encoder=encoder))
    return root


def args(**kw):
    return dict(script_config(vars(sample)), **kw)


def test_scene_question_saves_the_picture(checkpoints):
    ckpt = str(checkpoints / 'vlm')
    reply = sample.main(args(ckpt=ckpt, scene=7, max_new_tokens=5))
    assert isinstance(reply, str) and len(reply.encode()) <= 5  # an untrained model's 5 bytes at most
    picture = np.asarray(Image.open(os.path.join(ckpt, 'scene_7.png')))
    scene, rendered = sample.shapes_scene(7, 48)
    assert picture.shape == (192, 192, 3) and (picture[::4, ::4] == rendered).all()
    assert sample.shapes_scene(7, 48)[0] == scene  # a seed is always the same scene


def test_image_file_question(checkpoints, tmp_path):
    path = tmp_path / 'red.png'
    Image.new('RGB', (30, 20), (255, 0, 0)).save(path)
    assert isinstance(sample.main(args(ckpt=str(checkpoints / 'vlm'), image=str(path), max_new_tokens=3)), str)


def test_text_checkpoint_continues_text_and_refuses_images(checkpoints):
    assert isinstance(sample.main(args(ckpt=str(checkpoints / 'text'), prompt='The pet of', max_new_tokens=4)), str)
    with pytest.raises(SystemExit, match='text-only checkpoint'):
        sample.main(args(ckpt=str(checkpoints / 'text'), scene=1))
