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

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import tiktoken
import torch
from safetensors import safe_open

import data
import images
import import_lm
import pretrain_encoders
import shapes
from checkpoint import code_digest, file_digest, is_checkpoint, read_checkpoint_info
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


LONGEST_CAPTION = 200  # bytes: a long caption of four objects (the rare longer one is skipped and counted)
# every number in train.py's config must be finite and >= 0; these keys are held to narrower ranges
RANGES = {k: '> 0' for k in ('text_iters', 'image_iters', 'batch_size', 'gradient_accumulation_steps', 'block_size',
                             'learning_rate', 'image_lr', 'finetune_lr', 'encoder_lr', 'finetune_epochs', 'keep_last',
                             'scene_size', 'caption_scenes', 'conversations', 'eval_iters', 'log_interval')}
RANGES.update(save_fracs='(0, 1]', image_inject_frac='[0, 1]', image_ratio='[0, 1]', instruct_ratio='[0, 1]',
              finetune_text_ratio='[0, 1)', beta1='[0, 1)', beta2='[0, 1)')
# and the counts are bounded above, so that a typo (--block_size=10000000) is a config error before anything is
# allocated, not a MemoryError after minutes (or an OverflowError: --seed=10**20). The bounds are far above the
# paper's scale (1b: 256 x 2048, 24 layers)
RANGES.update({k: f'{RANGES.get(k, ">= 0")} and <= {top}' for k, top in dict(
    text_iters=10 ** 9, image_iters=10 ** 9, log_interval=10 ** 9, warmup_iters=10 ** 9, rewarm_iters=10 ** 9,
    eval_interval=10 ** 9, ckpt_interval=10 ** 9, max_bad_steps=10 ** 9, seed=2 ** 32 - 1, text_seed=2 ** 32 - 1,
    encoder_seed=2 ** 32 - 1, batch_size=2 ** 20, gradient_accumulation_steps=2 ** 20, block_size=2 ** 17,
    eval_iters=10 ** 5, keep_last=10 ** 6, finetune_epochs=1000, scene_size=1024, caption_scenes=10 ** 7,
    conversations=10 ** 7, data_workers=256, image_inject_layer=1023, text_eval_items=10 ** 6).items()})
MAX_TOKENS_PER_STEP = 2 ** 27  # batch_size x block_size: 134M tokens, 256 x the 1b preset's
MAX_IMAGE_BYTES = 2 ** 36  # the shapes world's rendered pictures, uint8 (64 GiB)
CHOICES = dict(model=PRESETS, encoder=ENCODERS, dtype=('auto', 'float32', 'bfloat16'), init_from=('scratch', 'resume'),
               image_ratio_of=('rows', 'tokens'), caption_form=shapes.CAPTIONS)  # keys that take one of a few values


def check_config(cfg, reads_images):
    """
    What a run needs of its config beyond each key's type, checked before any compute: every number in its range
    and every choice one of its values; checkpoint steps the text stage can take; and for a run with image stages
    (reads_images) an injection point with a text checkpoint, an encoder that can be what the config says, room in a row
    for an image and a caption, and the input files.
    """
    check_ranges(vars(cfg), RANGES, CHOICES)
    if cfg.batch_size * cfg.block_size > MAX_TOKENS_PER_STEP:
        raise ConfigError(f'batch_size={cfg.batch_size} x block_size={cfg.block_size} is more than '
                          f'{MAX_TOKENS_PER_STEP:,} tokens a step: lower one of them')
    steps = [frac_step(f, cfg.text_iters) for f in cfg.save_fracs]
    if not steps or len(set(steps)) != len(steps) or min(steps) < 1:
        raise ConfigError(f'save_fracs={cfg.save_fracs} with text_iters={cfg.text_iters} gives checkpoint steps '
                          f'{steps}: they must be distinct and >= 1; raise text_iters')
    names = {}
    for frac in cfg.save_fracs:  # one folder per fraction: two that share a name would overwrite each other
        if frac_name(frac) in names:
            raise ConfigError(f'save_fracs: {names[frac_name(frac)]} and {frac} are both saved as '
                              f'{frac_name(frac)} (checkpoints are named by whole percents): drop one of them')
        names[frac_name(frac)] = frac
    if cfg.dataset != 'shapes':
        check_dataset(cfg.dataset)
    elif (cfg.caption_scenes + cfg.conversations + shapes.EVAL_ITEMS) * cfg.scene_size ** 2 * 3 > MAX_IMAGE_BYTES:
        raise ConfigError(f'caption_scenes={cfg.caption_scenes}, conversations={cfg.conversations} and scene_size='
                          f'{cfg.scene_size} render more than {MAX_IMAGE_BYTES / 2 ** 30:.0f} GiB of pictures: lower '
                          f'them')
    if not 0 < cfg.eval_items <= shapes.EVAL_ITEMS:
        raise ConfigError(f'eval_items={cfg.eval_items}: the shapes world has 1 to {shapes.EVAL_ITEMS} items per task')
    if cfg.image_ratio + cfg.instruct_ratio > 1:
        raise ConfigError(f'image_ratio={cfg.image_ratio} and instruct_ratio={cfg.instruct_ratio} sum to more than 1')
    if not reads_images:
        return
    if cfg.caption_form != 'sentences' and real_image_data(cfg):
        raise ConfigError(f"caption_form={cfg.caption_form!r} writes the shapes world's captions, and this run reads "
                          f"real image data (image_data, instruct_data): leave caption_form='sentences'")
    source = check_text_checkpoint(cfg) if cfg.text_checkpoint else None  # import_lm.py's, or another run's
    n_layer = source['model_args']['n_layer'] if source else PRESETS[cfg.model]['n_layer']
    if cfg.image_inject_layer >= n_layer:
        raise ConfigError(f'image_inject_layer={cfg.image_inject_layer}: the {cfg.model} LM has blocks 0 .. '
                          f'{n_layer - 1}')
    if not source and cfg.image_inject_frac not in cfg.save_fracs + [0]:
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


def check_text_checkpoint(cfg):
    """
    text_checkpoint, before any compute: a text checkpoint (import_lm.py's, or another run's) the image stage can
    start from on this run's data: the dataset tokenized with its tokenizer, its context at least block_size, and a
    recorded LR schedule to continue (unless image_inject_frac=1.0 re-warms). Returns its config.json.
    """
    where = f'text_checkpoint={cfg.text_checkpoint!r}'
    if 'text' in cfg.stages.split(','):
        raise ConfigError(f'{where} takes the text stage\'s place: run --stages=image,finetune')
    if cfg.image_inject_frac == 0:
        raise ConfigError(f'{where} and image_inject_frac=0 (images from scratch, no text checkpoint): set '
                          f'image_inject_frac=1.0 to re-warm its LR, any other value to continue its schedule')
    if not is_checkpoint(cfg.text_checkpoint):
        raise ConfigError(f'{where}: no checkpoint there (no config.json); write one with python import_lm.py '
                          f'--hf_dir=DIR --out={cfg.text_checkpoint}')
    try:
        info = read_checkpoint_info(cfg.text_checkpoint)
        ours = 'bytes' if cfg.dataset == 'shapes' else data.load_meta(cfg.dataset)['tokenizer']
        same = import_lm.tokenizer_identity(ours) == import_lm.tokenizer_identity(info['tokenizer'])
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f'{where}: {e}') from None
    if 'encoder' in info:
        raise ConfigError(f'{where} is a VLM ({info["stage"]} stage): the image stage starts from a text checkpoint')
    if not same:
        raise ConfigError(f'{where} has the tokenizer {info["tokenizer"]}, dataset={cfg.dataset!r} another ({ours}): '
                          f'tokenize the data with the checkpoint\'s (import_lm.py --shapes_out=DIR writes the shapes '
                          f'world\'s, corpora.py --tokenizer={info["tokenizer"]} a corpus) and pass --dataset=DIR')
    if info['model_args']['block_size'] < cfg.block_size:
        raise ConfigError(f'block_size={cfg.block_size} is longer than the context of {where} '
                          f'({info["model_args"]["block_size"]}): lower block_size')
    if cfg.image_inject_frac != 1.0 and not (info.get('lr_at_step') or info.get('config', {}).get('learning_rate')):
        raise ConfigError(f'{where} records no LR schedule to continue: import it with --peak_lr, --min_lr, --warmup '
                          f'and --total_steps (or --lr_at_step), or re-warm with image_inject_frac=1.0')
    return info


def injection_lr(cfg, cosine):
    """
    (The LR the text run had reached at the injection point, the floor its cosine decays to): this run's text stage
    at image_inject_frac, or the run that made text_checkpoint, from its config.json: its step and schedule under
    train.py's names (import_lm.py records the source run's), or the LR it had reached there (lr_at_step).
    """
    info = read_checkpoint_info(cfg.text_checkpoint) if cfg.text_checkpoint else {}
    c, step = (info['config'], info['step']) if info else (vars(cfg), frac_step(cfg.image_inject_frac, cfg.text_iters))
    floor = c['min_lr']
    return info.get('lr_at_step') or cosine(step, c['learning_rate'], c['warmup_iters'], c['text_iters'], floor), floor


def check_dataset(folder):
    """A dataset folder from corpora.py has its meta.json; a missing one says what happened to it, and what to do."""
    if os.path.isfile(os.path.join(folder, 'meta.json')):
        return
    old = os.path.normpath(folder) + '.old'
    if not os.path.exists(folder) and os.path.isfile(os.path.join(old, 'meta.json')):
        raise ConfigError(f'dataset={folder!r} is missing, and {old} holds the dataset it was: corpora.py was stopped '
                          f'while it swapped a new build in. Run the same corpora.py command again (it puts {old} back '
                          f'first), or rename {old} to {folder}')
    raise ConfigError(f'dataset={folder!r} is not a dataset folder (no meta.json): build it with python corpora.py '
                      f'--input=... --out={folder}, or use dataset=shapes')


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
    source: Any = None  # the image source (images.ImageWorld or images.RealImages), for the image stages


def prepare_run(cfg, reads_images, verbose=True):
    """
    The run's data and where its encoder weights are: the token dataset (the shapes world is written first), and
    for a run with stages that read images (reads_images) the shapes encoders' weights (pre-trained when missing), the image source (the shapes
    world's renders, or the index of real shards) and a frozen encoder's feature cache. Under DDP rank 0 calls it
    first, then the others, which find everything made (runtime.master_first).
    """
    folder = shapes.prepare_text(cfg.data_dir, verbose=verbose) if cfg.dataset == 'shapes' else cfg.dataset
    enc = data.get_tokenizer(data.load_meta(folder)['tokenizer'])
    if not reads_images:
        return Prepared(folder, enc)
    weights = (pretrain_encoders.shapes_weights(cfg.encoder, cfg.data_dir, cfg.encoder_seed, verbose)
               if cfg.encoder_weights == 'shapes' else cfg.encoder_weights)
    img_size = encoder_shape(cfg).img_size
    if real_image_data(cfg):
        source = images.RealImages(img_size, cfg.image_data, cfg.caption_key, cfg.instruct_data, cfg.instruct_images,
                                   cache_dir=os.path.join(cfg.data_dir, 'image_index'), verbose=verbose)
        if verbose:
            print(f'image data: {source.summary()}', flush=True)
    else:
        source = images.ImageWorld.rendered(folder, cfg.scene_size, cfg.caption_scenes, cfg.conversations,
                                            caption_form=cfg.caption_form)
    prep = Prepared(folder, enc, weights, source)
    if caches_features(cfg):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the encoder the image stage builds (a random one depends on the seed)
            feature_cache(cfg, prep, build_encoder(cfg.encoder, cfg.encoder_scale, weights, freeze=True),
                          create=True, verbose=verbose)
    return prep


def caption_row_ratio(cfg, prep, n_image_tokens, verbose=False):
    """The share of the image stage's rows that are caption rows (data.caption_row_ratio: image_ratio of its rows or
    tokens); the fine-tuning rehearses at that share (finetune_rehearsal)."""
    return data.caption_row_ratio(prep.source, prep.enc, cfg.block_size, n_image_tokens, cfg.image_ratio,
                                  cfg.image_ratio_of, cfg.instruct_ratio, cfg.seed, verbose=verbose)


def feature_cache(cfg, prep, encoder, create=False, verbose=False):
    """
    A frozen encoder's features of the shapes world's fixed image set (encoders.cached_features), or None. The
    cache is keyed by everything the features depend on: the encoder's weights and shape (cached_features), the
    image set and its file, and the code that computes them: encoders.py (comments aside), timm and torch. An edit
    to encoders.py that changes the features makes a new cache, never a read of the old one.
    """
    if not (caches_features(cfg) and encoder.frozen):
        return None
    import timm
    rendered = getattr(prep.source.images, 'filename', None)  # the pictures' .npy (a memmap)
    made_by = [code_digest(os.path.join(HERE, 'encoders.py')), timm.__version__, torch.__version__,
               str(tuple(prep.source.images.shape))]
    if rendered:
        st = os.stat(rendered)
        made_by += [os.path.abspath(rendered), st.st_size, st.st_mtime_ns]  # rendered again: a new file
    code = hashlib.sha1(json.dumps(made_by).encode()).hexdigest()[:12]
    name = f'shapes-{shapes.WORLD_CODE}-{cfg.scene_size}px-{cfg.caption_scenes}-{cfg.conversations}-{code}'
    return cached_features(encoder, prep.source.images, name, os.path.join(cfg.data_dir, 'features'), create=create,
                           verbose=verbose)


# Modules a stage runs whose code does not decide what its checkpoints hold, and why
NOT_FINGERPRINTED = {
    'checkpoint.py': 'writes and reads the files; their bytes are verified by the checksums config.json records',
    'eval.py': 'scores a saved checkpoint into eval.json, which python eval.py can always make again',
    'likelihood.py': 'the log-likelihood scoring eval.py scores with, likewise',
    'grounding.py': 'its box scorer scores the shapes world\'s grounding task into eval.json, likewise',
    'benchmarks.py': 'the helpers grounding.py reads files with, imported with it',
    'stats.py': 'the statistics of eval.json (centered accuracy), likewise',
    'configurator.py': 'parses the config, whose resolved keys the fingerprint holds',
    'prepare.py': 'makes the inputs, whose data and weights the fingerprint holds by digest',
    'pretrain_encoders.py': 'writes the shapes encoders, which the fingerprint holds by digest',
}


STAGE_CODE = ('model.py', 'data.py', 'runtime.py', 'train.py')  # the code every stage runs
# the keys of train.py that change how or where a run is carried out, not what a checkpoint holds (train.defining_keys)
RUN_KEYS = ('out_dir', 'text_out_dir', 'image_out_dir', 'data_dir', 'stages', 'init_from', 'allow_stale', 'evaluate',
            'eval_items', 'text_eval_items', 'eval_interval', 'eval_iters', 'log_interval', 'ckpt_interval', 'keep_last',
            'max_bad_steps', 'wandb_log', 'wandb_project', 'wandb_run_name', 'save_fracs', 'gradient_accumulation_steps',
            'device', 'dtype', 'compile', 'fsdp', 'grad_checkpoint', 'data_workers', 'peak_flops')


def defining_keys(config, stages, name):
    """The config keys (of a dict) that define stage `name`'s checkpoints (stages: train.STAGES, in run order): all
    but RUN_KEYS and the keys that later stages are the first to read. A key listed nowhere defines every stage, so
    a new key can only make a stage be trained again, never reused stale."""
    order = list(stages)
    later = {k for n in order[order.index(name) + 1:] for k in stages[n].keys}
    return {k: v for k, v in config.items() if k not in RUN_KEYS and k not in later}


def fingerprint(cfg, prep, stages, name):
    """
    What makes stage `name`'s checkpoints what they are: the config keys that define it (defining_keys), the code
    of the modules it runs (STAGE_CODE, its own `code`, the module that makes its data, encoders.py when it reads
    images), its data and, when it reads images, its encoder weights and image data. Equal fingerprints: the same
    checkpoints.
    """
    kind = stages[name]
    config, code, reads_images = defining_keys(vars(cfg), stages, name), kind.code, kind.reads_images
    modules = set(STAGE_CODE + tuple(code)) | ({'shapes.py'} if cfg.dataset == 'shapes' else set())
    if reads_images:
        modules |= {'encoders.py', 'images.py'} | (set() if real_image_data(cfg) else {'shapes.py'})  # the source
    made = {'config': config,
            'code': {m: code_digest(os.path.join(HERE, m)) for m in sorted(modules)},
            'data': {'meta.json': file_digest(os.path.join(prep.folder, 'meta.json'))}}
    if reads_images:
        made['encoder'] = weights_digest(prep.weights)
        if getattr(cfg, 'text_checkpoint', ''):  # not this run's text stage: its config.json (weights, step, schedule)
            made['data']['text_checkpoint'] = file_digest(os.path.join(cfg.text_checkpoint, 'config.json'))
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
    return {1.0: os.path.join(stage_dir(cfg, name), name)}


def checkpoint_of(cfg, name):
    """The checkpoint of stage `name` the next stage starts from (the text stage's: at image_inject_frac, or the one
    text_checkpoint names)."""
    if name == 'text' and getattr(cfg, 'text_checkpoint', ''):
        return cfg.text_checkpoint
    return os.path.join(cfg.text_out_dir, frac_name(cfg.image_inject_frac)) if name == 'text' else \
        stage_outputs(cfg, name)[1.0]


def stage_dir(cfg, name):
    """The folder a stage writes into: text_out_dir, image_out_dir (or out_dir) for the image stage, else out_dir."""
    return {'text': cfg.text_out_dir, 'image': cfg.image_out_dir or cfg.out_dir}.get(name, cfg.out_dir)


def steps_dir(cfg, name):
    """A stage's periodic checkpoints and log: {text_out_dir}/steps, {image_out_dir}/image_steps, {out_dir}/<name>_steps."""
    return os.path.join(cfg.text_out_dir, 'steps') if name == 'text' else os.path.join(stage_dir(cfg, name),
                                                                                           f'{name}_steps')
