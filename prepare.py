"""
What a training run reads, made once and kept under data_dir, and what identifies what the run makes.

prepare_run(cfg) is the one place a run makes its inputs: the shapes world's text and pictures, the shapes encoders'
weights (pre-trained when missing), a frozen encoder's feature cache, the index of real image shards. Rank 0 makes
what is missing, the others wait at one barrier, then every rank opens it. No stage makes anything on first use.

fingerprint() says what made a stage's checkpoints (its config keys, code, data and encoder weights): train.py
reuses a finished stage only when the fingerprint it holds is the one this run would write. The code it hashes is
the list each stage declares (train.STAGES); tests/test_fingerprint.py traces a run of every stage and fails when a
module that runs is in neither that list nor NOT_FINGERPRINTED below.
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import tiktoken
import torch
from safetensors import safe_open

import data
import images
import pretrain_encoders
import shapes
from checkpoint import code_digest, file_digest
from configurator import ConfigError, check_ranges
from encoders import ENCODERS, build_encoder, cached_features
from model import PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))  # the code that fingerprints hash


def encoder_shape(cfg):
    """The encoder built on the meta device: its token count and resolution, instantly, even at paper scale."""
    try:
        with torch.device('meta'):
            return build_encoder(cfg.encoder, cfg.encoder_scale, 'random', freeze=cfg.freeze_encoder)
    except ValueError as e:  # e.g. dino_siglip halves whose patch grids differ
        raise ConfigError(f'encoder={cfg.encoder!r}, encoder_scale={cfg.encoder_scale!r}: {e}') from e


LONGEST_CAPTION = 200  # bytes: four objects in the longest phrasing, with room to spare
# every number in train.py's config must be finite and >= 0; these keys are held to narrower ranges
RANGES = {k: '> 0' for k in ('text_iters', 'image_iters', 'batch_size', 'gradient_accumulation_steps', 'block_size',
                             'learning_rate', 'image_lr', 'finetune_lr', 'encoder_lr', 'finetune_epochs', 'keep_last',
                             'scene_size', 'caption_scenes', 'conversations', 'eval_iters', 'log_interval')}
RANGES.update(save_fracs='(0, 1]', image_inject_frac='[0, 1]', image_ratio='[0, 1]', instruct_ratio='[0, 1]',
              finetune_text_ratio='[0, 1)', beta1='[0, 1)', beta2='[0, 1)')
CHOICES = dict(model=PRESETS, encoder=ENCODERS, dtype=('auto', 'float32', 'bfloat16'), init_from=('scratch', 'resume'),
               image_ratio_of=('rows', 'tokens'))  # the keys that take one of a few values


def check_config(cfg, images):
    """
    What a run needs of its config beyond each key's type, checked before any compute: every number in its range
    and every choice one of its values; checkpoint steps the text stage can take; and for a run with image stages
    (images) an injection point with a text checkpoint, an encoder that can be what the config says, room in a row
    for an image and a caption, and the input files.
    """
    check_ranges(vars(cfg), RANGES, CHOICES)
    steps = [frac_step(f, cfg.text_iters) for f in cfg.save_fracs]
    if not steps or len(set(steps)) != len(steps) or min(steps) < 1:
        raise ConfigError(f'save_fracs={cfg.save_fracs} with text_iters={cfg.text_iters} gives checkpoint steps '
                          f'{steps}: they must be distinct and >= 1; raise text_iters')
    if not 0 < cfg.eval_items <= shapes.EVAL_ITEMS:
        raise ConfigError(f'eval_items={cfg.eval_items}: the shapes world has 1 to {shapes.EVAL_ITEMS} items per task')
    if cfg.image_ratio + cfg.instruct_ratio > 1:
        raise ConfigError(f'image_ratio={cfg.image_ratio} and instruct_ratio={cfg.instruct_ratio} sum to more than 1')
    if not images:
        return
    if cfg.image_inject_frac not in cfg.save_fracs + [0]:
        raise ConfigError(f'image_inject_frac={cfg.image_inject_frac} is not 0 or one of save_fracs={cfg.save_fracs}: '
                          f'images can only be injected at a saved text checkpoint, or from scratch')
    if not ENCODERS[cfg.encoder].pretrained and cfg.freeze_encoder:
        raise ConfigError(f'encoder={cfg.encoder} is learned from scratch with nothing to freeze: set '
                          f'freeze_encoder=False')
    enc_tokens = encoder_shape(cfg).num_tokens
    if enc_tokens + LONGEST_CAPTION + 1 > cfg.block_size:
        raise ConfigError(f'block_size={cfg.block_size} cannot hold one image ({enc_tokens} tokens) and a caption '
                          f'(up to {LONGEST_CAPTION} tokens): raise block_size to at least '
                          f'{enc_tokens + LONGEST_CAPTION + 1}')
    check_inputs(cfg)


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


@dataclass(frozen=True)
class Prepared:
    """What prepare_run made or found for a run."""
    folder: str  # the token dataset: train.bin, val.bin, meta.json (and the shapes world's tasks)
    enc: tiktoken.Encoding  # its tokenizer, with the special tokens
    weights: Any = None  # the encoder weights the image stages load: 'random', 'hub', a path, or {half: path}
    source: Any = None  # the image source (shapes.ImageWorld or images.RealImages), for the image stages


def prepare_run(cfg, images, verbose=True):
    """
    The run's data and where its encoder weights are: the token dataset (the shapes world is written first), and
    for a run with stages that read images (images) the shapes encoders' weights (pre-trained when missing), the image source (the shapes
    world's renders, or the index of real shards) and a frozen encoder's feature cache. Under DDP rank 0 calls it
    first, then the others, which find everything made (runtime.master_first).
    """
    folder = shapes.prepare_text(cfg.data_dir, verbose=verbose) if cfg.dataset == 'shapes' else cfg.dataset
    enc = data.get_tokenizer(data.load_meta(folder)['tokenizer'])
    if not images:
        return Prepared(folder, enc)
    weights = (pretrain_encoders.shapes_weights(cfg.encoder, cfg.data_dir, cfg.seed, verbose)
               if cfg.encoder_weights == 'shapes' else cfg.encoder_weights)
    img_size = encoder_shape(cfg).img_size
    if real_image_data(cfg):
        source = images.RealImages(img_size, cfg.image_data, cfg.caption_key, cfg.instruct_data, cfg.instruct_images,
                                   cache_dir=os.path.join(cfg.data_dir, 'image_index'), verbose=verbose)
        if verbose:
            print(f'image data: {source.summary()}', flush=True)
    else:
        world = (folder, cfg.scene_size, cfg.caption_scenes, cfg.conversations)
        shapes.prepare_images(*world)
        source = shapes.ImageWorld(*world)
    prep = Prepared(folder, enc, weights, source)
    if caches_features(cfg):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the encoder the image stage builds (a random one depends on the seed)
            feature_cache(cfg, prep, build_encoder(cfg.encoder, cfg.encoder_scale, weights, freeze=True),
                          create=True, verbose=verbose)
    return prep


def feature_cache(cfg, prep, encoder, create=False, verbose=False):
    """A frozen encoder's features of the shapes world's fixed image set (encoders.cached_features), or None."""
    if not (caches_features(cfg) and encoder.frozen):
        return None
    name = f'shapes-v{shapes.SHAPES_VERSION}-{cfg.scene_size}px-{cfg.caption_scenes}-{cfg.conversations}'
    return cached_features(encoder, prep.source.images, name, os.path.join(cfg.data_dir, 'features'), create=create,
                           verbose=verbose)


# Modules a stage runs whose code does not decide what its checkpoints hold, and why
NOT_FINGERPRINTED = {
    'checkpoint.py': 'writes and reads the files; their bytes are verified by the checksums config.json records',
    'eval.py': 'scores a saved checkpoint into eval.json, which python eval.py can always make again',
    'stats.py': 'the statistics of eval.json (centered accuracy), likewise',
    'configurator.py': 'parses the config, whose resolved keys the fingerprint holds',
    'prepare.py': 'makes the inputs, whose data and weights the fingerprint holds by digest',
    'pretrain_encoders.py': 'writes the shapes encoders, which the fingerprint holds by digest',
}


STAGE_CODE = ('model.py', 'data.py', 'runtime.py', 'train.py')  # the code every stage runs
# the keys of train.py that change how or where a run is carried out, not what a checkpoint holds (train.defining_keys)
RUN_KEYS = ('out_dir', 'text_out_dir', 'data_dir', 'stages', 'init_from', 'allow_stale', 'evaluate', 'eval_items',
            'eval_interval', 'eval_iters', 'log_interval', 'ckpt_interval', 'keep_last', 'max_bad_steps', 'wandb_log',
            'wandb_project', 'wandb_run_name', 'save_fracs', 'gradient_accumulation_steps', 'device', 'dtype',
            'compile', 'fsdp', 'grad_checkpoint', 'data_workers', 'peak_flops')


def fingerprint(cfg, prep, config, code, reads_images):
    """
    What makes a stage's checkpoints what they are: config (the keys that define the stage, train.fingerprint), the
    code of the modules it runs (STAGE_CODE, its own `code`, the module that makes its data, encoders.py when it
    reads images), its data and, when it reads images, its encoder weights and image data. Equal fingerprints: the
    same checkpoints.
    """
    modules = set(STAGE_CODE + tuple(code)) | ({'shapes.py'} if cfg.dataset == 'shapes' else set())
    if reads_images:
        modules |= {'encoders.py', 'images.py' if real_image_data(cfg) else 'shapes.py'}
    made = {'config': config,
            'code': {m: code_digest(os.path.join(HERE, m)) for m in sorted(modules)},
            'data': {'meta.json': file_digest(os.path.join(prep.folder, 'meta.json'))}}
    if reads_images:
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
    """What a VLM checkpoint's config.json says beyond the LM: its encoder, enough to rebuild it (checkpoint.build_model),
    and for an encoder not saved with it, the digest of the weights file it is rebuilt from."""
    e = raw_model.encoder
    return {'model_args': asdict(raw_model.gpt.config),
            'encoder': {'name': e.name, 'scale': e.scale, 'weights': e.weights, 'img_size': e.img_size,
                        'frozen': e.frozen, 'saved': raw_model.saves_encoder, 'projector': cfg.projector,
                        'inject_layer': raw_model.inject_layer, 'image_token': raw_model.image_token,
                        'weights_digest': {} if raw_model.saves_encoder else weights_digest(e.weights)}}


# -----------------------------------------------------------------------------
# where a run's stages write

def frac_step(frac, iters):
    return round(frac * iters)


def frac_name(frac):
    return f'ckpt_{round(frac * 100):03d}'


def stage_outputs(cfg, name):
    """{fraction of the stage: folder} of the checkpoints stage `name` is there to write: the text stage's at
    save_fracs ({text_out_dir}/ckpt_020 ...), any other stage's at its end ({out_dir}/<name>)."""
    if name == 'text':
        return {f: os.path.join(cfg.text_out_dir, frac_name(f)) for f in cfg.save_fracs}
    return {1.0: os.path.join(cfg.out_dir, name)}


def checkpoint_of(cfg, name):
    """The checkpoint of stage `name` the next stage starts from (the text stage's: at image_inject_frac)."""
    return os.path.join(cfg.text_out_dir, frac_name(cfg.image_inject_frac)) if name == 'text' else \
        stage_outputs(cfg, name)[1.0]


def steps_dir(cfg, name):
    """A stage's periodic checkpoints and log: {text_out_dir}/steps, {out_dir}/image_steps, {out_dir}/finetune_steps."""
    return os.path.join(cfg.text_out_dir, 'steps') if name == 'text' else os.path.join(cfg.out_dir, f'{name}_steps')
