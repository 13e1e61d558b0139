"""
What a training run reads, made once and kept under data_dir, and what identifies what the run makes.

prepare(cfg, rt) is the one place a run makes its inputs: the shapes world's text and pictures, the shapes encoders'
weights (pre-trained when missing), a frozen encoder's feature cache, the index of real image shards. Rank 0 makes
what is missing, the others wait at one barrier, then every rank opens it. No stage makes anything on first use.

fingerprint() says what made a stage's checkpoints (its config keys, code, data and encoder weights): train.py
reuses a finished stage only when the fingerprint it holds is the one this run would write.
"""

import json
import os
from dataclasses import asdict
from types import SimpleNamespace

import torch
from safetensors import safe_open

import data
import images
import pretrain_encoders
import shapes
from checkpoint import code_digest, file_digest
from configurator import ConfigError
from encoders import build_encoder, cached_features
from runtime import master_first

HERE = os.path.dirname(os.path.abspath(__file__))  # the code that fingerprints hash


def encoder_shape(cfg):
    """The encoder built on the meta device: its token count and resolution, instantly, even at paper scale."""
    try:
        with torch.device('meta'):
            return build_encoder(cfg.encoder, cfg.encoder_scale, 'random', freeze=cfg.freeze_encoder)
    except ValueError as e:  # e.g. dino_siglip halves whose patch grids differ
        raise ConfigError(f'encoder={cfg.encoder!r}, encoder_scale={cfg.encoder_scale!r}: {e}') from e


def check_inputs(cfg):
    """
    The files an image stage reads exist (checked before any compute): encoder weights given as paths, and real
    image data, which replaces the shapes world's for every image sample of a run: no run mixes the two.
    """
    paths = cfg.encoder_weights.values() if isinstance(cfg.encoder_weights, dict) else [cfg.encoder_weights]
    for path in paths:
        if path in ('shapes', 'random', 'hub'):
            continue
        if not os.path.isfile(path):
            raise ConfigError(f'encoder weights file not found: encoder_weights={path!r}')
        try:  # its header only, so a file that is not safetensors fails here and not after the text stage
            with safe_open(path, 'pt'):
                pass
        except Exception as e:  # safetensors' own error names neither the file nor the key
            raise ConfigError(f'encoder_weights: {path} is not a readable .safetensors file ({e})') from None
    if not (cfg.image_data or cfg.instruct_data):
        return
    if not cfg.image_data and cfg.image_ratio > 0:
        raise ConfigError(f'instruct_data is set but image_data is not: the image stage (image_ratio='
                          f'{cfg.image_ratio}) needs image-caption shards; set image_data, or image_ratio=0')
    if not cfg.instruct_data and (cfg.instruct_ratio > 0 or 'finetune' in cfg.stages.split(',')):
        raise ConfigError('image_data is set but instruct_data is not: fine-tuning and instruct_ratio need '
                          'conversations; set instruct_data=llava.json, or stages=text,image with instruct_ratio=0')
    if cfg.image_data:
        try:
            images.shard_paths(cfg.image_data)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.instruct_data and not os.path.isfile(cfg.instruct_data):
        raise ConfigError(f'instruct_data={cfg.instruct_data!r}: no such file')
    if cfg.instruct_images and not os.path.isdir(cfg.instruct_images):
        raise ConfigError(f'instruct_images={cfg.instruct_images!r}: no such folder')


def real_image_data(cfg):
    return bool(cfg.image_data or cfg.instruct_data)


def caches_features(cfg):
    return cfg.cache_features and cfg.freeze_encoder and not real_image_data(cfg)


def prepare(cfg, rt):
    """Rank 0 makes what is missing (the others wait at one barrier), then every rank opens it: see prepare_run."""
    return master_first(rt, lambda: prepare_run(cfg, verbose=rt.master))


def prepare_run(cfg, verbose=True):
    """
    The run's data and where its encoder weights are: the token dataset (the shapes world is written first), and
    for the image stages the shapes encoders' weights (pre-trained when missing), the image source (the shapes
    world's renders, or the index of real shards) and a frozen encoder's feature cache.
    """
    folder = shapes.prepare_text(cfg.data_dir, verbose=verbose) if cfg.dataset == 'shapes' else cfg.dataset
    prep = SimpleNamespace(folder=folder, enc=data.get_tokenizer(data.load_meta(folder)['tokenizer']),
                           weights=None, source=None)
    if not {'image', 'finetune'} & set(cfg.stages.split(',')):
        return prep
    prep.weights = (pretrain_encoders.shapes_weights(cfg.encoder, cfg.data_dir, cfg.seed, verbose)
                    if cfg.encoder_weights == 'shapes' else cfg.encoder_weights)
    img_size = encoder_shape(cfg).img_size
    if real_image_data(cfg):
        prep.source = images.RealImages(img_size, cfg.image_data, cfg.caption_key, cfg.instruct_data,
                                        cfg.instruct_images, cache_dir=os.path.join(cfg.data_dir, 'image_index'),
                                        verbose=verbose)
        if verbose:
            print(f'image data: {prep.source.summary()}', flush=True)
    else:
        world = (prep.folder, cfg.scene_size, cfg.caption_scenes, cfg.conversations)
        shapes.prepare_images(*world)
        prep.source = shapes.ImageWorld(*world)
    if caches_features(cfg):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the encoder the image stage builds (a random one depends on the seed)
            feature_cache(cfg, prep, build_encoder(cfg.encoder, cfg.encoder_scale, prep.weights, freeze=True),
                          create=True, verbose=verbose)
    return prep


def feature_cache(cfg, prep, encoder, create=False, verbose=False):
    """A frozen encoder's features of the shapes world's fixed image set (encoders.cached_features), or None."""
    if not (caches_features(cfg) and encoder.frozen):
        return None
    name = f'shapes-v{shapes.SHAPES_VERSION}-{cfg.scene_size}px-{cfg.caption_scenes}-{cfg.conversations}'
    return cached_features(encoder, prep.source.images, name, os.path.join(cfg.data_dir, 'features'), create=create,
                           verbose=verbose)


def fingerprint(cfg, stage, prep, config):
    """
    What makes a stage's checkpoints what they are: config (the keys that define the stage, train.fingerprint), the
    code of the modules it runs, its data and its encoder weights. Equal fingerprints: the same checkpoints.
    """
    modules = ['model.py', 'data.py', 'runtime.py', 'train.py']
    if stage != 'text':
        modules += ['encoders.py', 'images.py' if real_image_data(cfg) else 'shapes.py']
    if cfg.dataset == 'shapes':
        modules.append('shapes.py')
    made = {'config': config,
            'code': {m: code_digest(os.path.join(HERE, m)) for m in sorted(set(modules))},
            'data': {'meta.json': file_digest(os.path.join(prep.folder, 'meta.json'))}}
    if stage != 'text':
        made['encoder'] = weights_digest(prep.weights)
        if cfg.image_data:  # shards are identified by path, size and mtime: hashing terabytes is not an option
            made['data']['image_data'] = [(p, os.path.getsize(p), os.path.getmtime(p))
                                          for p in images.shard_paths(cfg.image_data)]
        if cfg.instruct_data:
            made['data']['instruct_data'] = file_digest(cfg.instruct_data)
    return json.loads(json.dumps(made))  # as config.json will hold it: tuples become lists


def weights_digest(weights):
    """{name: digest} of the encoder weight files a run loads; nothing for 'random' (the seed decides) or 'hub'."""
    files = weights if isinstance(weights, dict) else {'weights': weights}
    return {k: file_digest(p) for k, p in files.items() if p not in ('random', 'hub')}


def vlm_info(cfg, raw_model):
    """What a VLM checkpoint's config.json says beyond the LM: its encoder, enough to rebuild it (eval.build_model),
    and for an encoder not saved with it, the digest of the weights file it is rebuilt from."""
    e = raw_model.encoder
    return {'model_args': asdict(raw_model.gpt.config),
            'encoder': {'name': e.name, 'scale': e.scale, 'weights': e.weights, 'img_size': e.img_size,
                        'frozen': e.frozen, 'saved': raw_model.saves_encoder, 'projector': cfg.projector,
                        'inject_layer': raw_model.inject_layer, 'image_token': raw_model.image_token,
                        'weights_digest': {} if raw_model.saves_encoder else weights_digest(e.weights)}}
