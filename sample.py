"""
Ask a trained checkpoint a question about a picture, or continue a text prompt.

    python sample.py --ckpt=out/finetune --scene=7 --prompt="How many shapes are there?"   # a shapes-world test scene
    python sample.py --ckpt=out/finetune --image=cat.jpg --prompt="What animal is this?"
    python sample.py --ckpt=out/text/ckpt_100 --prompt="The pet of Bumi is a"               # a text checkpoint

--scene renders a scene of the shapes world's test split (seeded, so the same seed is the same scene) and saves it
as a PNG beside the checkpoint (scene_SEED.png), so you can look at what the model was asked about.
"""

import os
import random
import sys

import numpy as np
import torch

import checkpoint
import data
import eval as ev
import shapes
from configurator import ConfigError, check_ranges, configure, script_config
from model import VLM

# -----------------------------------------------------------------------------
# config for `python sample.py`
ckpt = 'out/finetune'  # the checkpoint folder to ask
prompt = 'How many shapes are there?'  # the question (a VLM) or the text to continue (a text checkpoint)
image = ''  # an image file to ask about; '': a shapes-world test scene
scene = -1  # which test scene (its seed); -1: scene 0
max_new_tokens = 32  # at most this many tokens of reply
temperature = 0.0  # 0: greedy
top_k = 0  # sample from the k likeliest tokens; 0: from all
seed = 0  # of the sampling
device = 'cpu'  # 'cpu', 'cuda', ...
scene_size = 48  # the scene is rendered at this many pixels (the shapes world's default)
# -----------------------------------------------------------------------------


def shapes_scene(seed, size):
    """A test-split scene (seeds disjoint from training's) and its rendering."""
    scene = shapes.scene_with(random.Random(shapes.SPLIT_SEEDS['test'] * 1_000_003 + seed), {})
    return scene, shapes.render(scene, size)


RANGES = dict(max_new_tokens='[1, 131072]', temperature='[0, 100]', top_k='[0, 4194304]', seed='[0, 4294967295]',
              scene='[-1, 1000000000]', scene_size='[1, 1024]')  # checked before the checkpoint is read


def read_image(path, size):
    """The picture in a file the user names, decoded to size x size: a regular file (not a FIFO, /dev/zero or a
    folder) of at most images.MAX_IMAGE_BYTES, else a one-line error naming it."""
    from images import BadImage, decode_image, read_image_file
    try:
        raw = read_image_file(path, os.path.dirname(os.path.realpath(path)))  # checked before a byte is read
        return decode_image(raw, size)
    except BadImage as e:
        sys.exit(f'--image={path}: {e}')


def main(cfg):
    check_ranges(cfg, RANGES)
    torch.manual_seed(cfg['seed'])
    model, info = checkpoint.load_model(cfg['ckpt'], cfg['device'])
    enc = data.get_tokenizer(info['tokenizer'])
    stop = data.special_id(enc, '<|endoftext|>')
    images = None
    if isinstance(model, VLM):
        if cfg['image']:
            picture = read_image(cfg['image'], model.encoder.img_size)
        else:
            seed = cfg['scene'] if cfg['scene'] >= 0 else 0
            scene, picture = shapes_scene(seed, cfg['scene_size'])
            path = os.path.join(cfg['ckpt'], f'scene_{seed}.png')
            from PIL import Image
            Image.fromarray(picture).resize((192, 192), Image.Resampling.NEAREST).save(path)
            print(f'scene {seed}: {", ".join(shapes.describe(o, random.Random(0)) for o in scene)} (saved {path})')
        idx = data.question_prompt(enc, cfg['prompt'], model.encoder.num_tokens)
        images = torch.from_numpy(np.array(picture[None])).to(cfg['device'])
    elif cfg['image'] or cfg['scene'] >= 0:
        sys.exit(f'{cfg["ckpt"]} is a text-only checkpoint: it cannot look at an image (use an image or finetune one)')
    else:
        idx = enc.encode_ordinary(cfg['prompt'])
    if len(idx) >= info['model_args']['block_size']:
        sys.exit(f'the prompt is {len(idx)} tokens; {cfg["ckpt"]} reads at most {info["model_args"]["block_size"]} '
                 f'(its block_size), the reply included: shorten it')
    x = torch.tensor([idx], device=cfg['device'])
    kwargs = dict(max_new_tokens=cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                  stop_token=stop)
    out = model.generate(x, images, **kwargs) if images is not None else model.generate(x, **kwargs)
    reply = ev.decode_reply(enc, out[0, len(idx):].tolist())
    print(f'{cfg["prompt"]} -> {reply}')
    return reply


if __name__ == '__main__':
    try:
        main(configure(sys.argv[1:], script_config(globals()), source=__file__))
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    except (ValueError, OSError, RuntimeError) as e:  # a missing or damaged checkpoint: the message names the file
        sys.exit(f'error: {e}')
