"""
Train nanoVLP stage by stage: text pre-training, then (with an image encoder) image injection and instruction
fine-tuning, each followed by evaluation.

    python train.py --stages=text                      # text pre-training on the shapes world: out/text/ckpt_020 ...
    python train.py config/dino_siglip_unfrozen.py     # one cell of the encoder ablation
    torchrun --standalone --nproc_per_node=2 train.py  # DDP: nccl on CUDA, gloo on CPU
    python train.py config/scale_79m.py config/siglip_frozen.py --dataset=data/dclm --image_data='datacomp/*.tar' \
        --instruct_data=llava/llava_v1_5_mix665k.json   # real data (README: Reproducing the paper)
    python train.py --help                             # every key below, its default and its comment

Every global in the config section below is a key that config files and --key=value flags set (configurator.py).
A run prepares what it reads (prepare.py), then runs each stage of `stages` through one loop (run_stage), starting
from the checkpoint the stage before wrote; a finished stage is reused only when its fingerprint matches.
"""

import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch

import data
import prepare
import shapes
from checkpoint import (FolderLocked, StaleCheckpoint, acquire_lock, check_fingerprint, finished_checkpoints,
                        is_checkpoint, load_optimizer_state, prune, release_lock, set_rng_state)
from configurator import ConfigError, check_ranges, configure, script_config
from encoders import ENCODERS, build_encoder
from eval import load_model, saved_scores, stable_score_table
from model import GPT, PRESETS, VLM, GPTConfig
from runtime import (TrainingError, barrier, batch_loader, check_ranks_agree, close_runtime, format_time, log,
                     process_age, resume_point, save_stage_checkpoint, setup_runtime, start_metrics, time_table, timed,
                     train_steps, wrap_model)

# -----------------------------------------------------------------------------
# config
# I/O
out_dir = 'out'  # this run's image and finetune stages write to {out_dir}/image and {out_dir}/finetune
text_out_dir = 'out/text'  # the text stage's checkpoints; ablation cells that share it share one text stage
stages = 'text,image,finetune'  # comma-separated stages to run, in order; each starts from the one before it
init_from = 'scratch'  # 'scratch', or 'resume': continue an interrupted stage from its newest checkpoint
allow_stale = False  # reuse a finished stage although its fingerprint differs (other code, data or settings)
evaluate = True  # score each checkpoint a stage saves on the dataset's tasks (eval.json); False: later, with eval.py
eval_interval = 100  # steps between validation-loss estimates
eval_iters = 10  # batches per validation-loss estimate
eval_items = 500  # items scored per task of the shapes world, text and vision, the same first ones every time (up to
# 1000): past 200 seeds, not questions, dominate the spread (docs/results.md, "How many questions and seeds")
log_interval = 25  # steps between log lines
ckpt_interval = 100  # steps between a stage's periodic checkpoints, which init_from='resume' continues from; 0: none
keep_last = 2  # periodic checkpoints kept per stage, the newest; the text stage's save_fracs ones are never deleted
max_bad_steps = 0  # steps with a non-finite loss or gradient to skip (batch dropped) before the run stops
wandb_log = False  # also send the log lines to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
wandb_project = 'nanovlp'  # its project
wandb_run_name = ''  # its run name; '': out_dir
# data
dataset = 'shapes'  # 'shapes' (the embedded world, written under data_dir first) or a folder from corpora.py
data_dir = 'data'  # where the shapes world, its renders, the shapes encoders and every cache are kept
# model
model = 'demo'  # a preset of model.PRESETS: demo, 79m, 1b
block_size = 256  # context length in tokens
qk_norm = True  # RMSNorm on each head's queries and keys
tie_embeddings = False  # the paper's OpenLM models keep input and output embeddings separate
# text stage
text_iters = 400  # optimizer steps of text pre-training
save_fracs = [0.2, 0.4, 0.6, 0.8, 1.0]  # fractions of text_iters with a checkpoint: the candidate injection points
batch_size = 16  # sequences per optimizer step, summed over ranks and micro-steps
gradient_accumulation_steps = 1  # micro-steps per optimizer step
learning_rate = 3e-3  # peak LR of the text stage
min_lr = 3e-4  # where every cosine schedule ends
warmup_iters = 40  # linear warmup steps of the text stage
weight_decay = 0.1  # AdamW's, on matrices only
beta1 = 0.9  # AdamW's
beta2 = 0.95  # AdamW's
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
# image stage
image_inject_frac = 0.8  # the image injection point: the text checkpoint (a value of save_fracs) that gets the images;
# 0: images from scratch, the mixture from step 0 with the text stage's warmup and peak LR (no text stage runs)
image_iters = 300  # optimizer steps of the image stage
image_ratio = 0.1  # share of the image stage's data that is image-caption data, counted as image_ratio_of says
image_ratio_of = 'rows'  # 'rows' (sequences) or 'tokens' (image and caption tokens among all, padding aside)
instruct_ratio = 0.0  # fraction that are instruction conversations (the paper's "instruction data in pre-training")
image_lr = 3e-3  # peak LR when injecting into the fully trained model (image_inject_frac=1.0 re-warms up)
rewarm_iters = 20  # warmup steps of a stage that re-warms its LR (image at 1.0, finetune)
encoder = 'siglip'  # siglip, dinov2, dino_siglip, vit, resnet, patch
encoder_scale = 'tiny'  # 'tiny' (CPU demo) or 'paper' (SigLIP SO400M, DINOv2 ViT-L, ...)
encoder_weights = 'shapes'  # 'shapes' (pre-trained on the shapes world, once), 'random', 'hub', or a .safetensors
freeze_encoder = True  # keep the encoder's weights fixed (no grad, eval mode, not in the optimizer)
encoder_lr = 1e-5  # peak LR of an unfrozen pre-trained encoder, on its own schedule (train.encoder_schedule)
projector = 'mlp'  # linear, mlp, fused_mlp
image_inject_layer = 0  # the LM block before which visual tokens enter the residual stream (0: input embeddings)
cache_features = True  # with a frozen encoder: compute the image set's features once, then read them back
image_data = ''  # img2dataset .tar shards (a folder, a glob or one file): the image stage's captions; '': shapes world
caption_key = 'txt'  # a shard's caption: its .txt file, or this field of its .json
instruct_data = ''  # a LLaVA json of conversations: fine-tuning and instruct_ratio; '': the shapes world's
instruct_images = ''  # the folder instruct_data's image paths start from; '': the json's own folder
scene_size = 48  # shapes-world pictures are rendered at this many pixels; the encoder resizes to its own size
caption_scenes = 8000  # shapes-world scenes with captions for the image stage (a fixed set: features can be cached)
conversations = 6000  # shapes-world instruction conversations (fine-tuning, and instruct_ratio in the image stage)
# finetune stage
finetune_epochs = 3  # passes over the instruction conversations
finetune_lr = 1e-3  # peak LR of fine-tuning (re-warmed)
finetune_text_ratio = 0.25  # fraction of each fine-tuning batch that is plain text, so text is not forgotten
# system
device = 'auto'  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float32'
compile = None  # torch.compile the LM (once per stage: every batch has the same shapes); None: on for CUDA only
fsdp = False  # under torchrun, shard the LM (and a trainable encoder) over the ranks with FSDP: for 1b and larger
grad_checkpoint = False  # recompute each block's activations in the backward pass: less memory, about 1/3 more compute
data_workers = None  # DataLoader processes building batches ahead of the step; None: 4 on CUDA, 0 on CPU
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 looks it up (A100, H100) or leaves MFU out (CPU)
seed = 1337  # every stage's initialization and batches
# -----------------------------------------------------------------------------

TYPES = {'compile': bool, 'data_workers': int}  # the keys whose default is None
# every number must be finite and >= 0; these keys are held to narrower ranges
RANGES = {k: '> 0' for k in ('text_iters', 'image_iters', 'batch_size', 'gradient_accumulation_steps', 'block_size',
                             'learning_rate', 'image_lr', 'finetune_lr', 'encoder_lr', 'finetune_epochs', 'keep_last',
                             'scene_size', 'caption_scenes', 'conversations', 'eval_iters', 'log_interval')}
RANGES.update(save_fracs='(0, 1]', image_inject_frac='[0, 1]', image_ratio='[0, 1]', instruct_ratio='[0, 1]',
              finetune_text_ratio='[0, 1)', beta1='[0, 1)', beta2='[0, 1)')
# The keys that define a stage are every key but these: a key not listed defines every stage, so a new key can only
# make a stage be trained again, never reused stale. RUN_KEYS change how or where a run is carried out, not what a
# checkpoint holds; IMAGE_KEYS are read by the image and finetune stages only, FINETUNE_KEYS by fine-tuning only.
RUN_KEYS = ('out_dir', 'text_out_dir', 'data_dir', 'stages', 'init_from', 'allow_stale', 'evaluate', 'eval_items',
            'eval_interval', 'eval_iters', 'log_interval', 'ckpt_interval', 'keep_last', 'max_bad_steps', 'wandb_log',
            'wandb_project', 'wandb_run_name', 'save_fracs', 'gradient_accumulation_steps', 'device', 'dtype',
            'compile', 'fsdp', 'grad_checkpoint', 'data_workers', 'peak_flops')
IMAGE_KEYS = ('image_inject_frac', 'image_iters', 'image_ratio', 'image_ratio_of', 'instruct_ratio', 'image_lr',
              'rewarm_iters', 'encoder', 'encoder_scale', 'encoder_weights', 'freeze_encoder', 'encoder_lr',
              'projector', 'image_inject_layer', 'cache_features', 'image_data', 'caption_key', 'instruct_data',
              'instruct_images', 'scene_size', 'caption_scenes', 'conversations')
FINETUNE_KEYS = ('finetune_epochs', 'finetune_lr', 'finetune_text_ratio')
STAGES = ('text', 'image', 'finetune')
LONGEST_CAPTION = 200  # bytes: four objects in the longest phrasing, with room to spare


def get_config(args):
    """Defaults, then config files and --key=value flags, then every check that needs no compute."""
    cfg = SimpleNamespace(**configure(args, script_config(globals()), source=__file__, types=TYPES))
    check_ranges(vars(cfg), RANGES)
    stages = cfg.stages.split(',')
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f'stages={cfg.stages!r}: unknown stage {stage!r}; the stages are {", ".join(STAGES)}')
    for key, allowed in (('model', PRESETS), ('encoder', ENCODERS), ('dtype', ('auto', 'float32', 'bfloat16')),
                         ('init_from', ('scratch', 'resume')), ('image_ratio_of', ('rows', 'tokens'))):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f'{key}={getattr(cfg, key)!r}: use one of {", ".join(allowed)}')
    steps = [frac_step(f, cfg.text_iters) for f in cfg.save_fracs]
    if not steps or len(set(steps)) != len(steps) or min(steps) < 1:
        raise ConfigError(f'save_fracs={cfg.save_fracs} with text_iters={cfg.text_iters} gives checkpoint steps '
                          f'{steps}: they must be distinct and >= 1; raise text_iters')
    if not 0 < cfg.eval_items <= shapes.EVAL_ITEMS:
        raise ConfigError(f'eval_items={cfg.eval_items}: the shapes world has 1 to {shapes.EVAL_ITEMS} items per task')
    if cfg.image_ratio + cfg.instruct_ratio > 1:
        raise ConfigError(f'image_ratio={cfg.image_ratio} and instruct_ratio={cfg.instruct_ratio} sum to more than 1')
    if cfg.encoder == 'patch' and cfg.freeze_encoder:
        raise ConfigError('encoder=patch is a learned projection with nothing to freeze: set freeze_encoder=False')
    if {'image', 'finetune'} & set(stages):
        if cfg.image_inject_frac not in cfg.save_fracs + [0]:
            raise ConfigError(f'image_inject_frac={cfg.image_inject_frac} is not 0 or one of save_fracs='
                              f'{cfg.save_fracs}: images can only be injected at a saved text checkpoint, or from scratch')
        enc_tokens = prepare.encoder_shape(cfg).num_tokens
        prepare.check_inputs(cfg)
        before = {'image': 'text', 'finetune': 'image'}.get(stages[0])  # the first stage's input must exist already
        if before and not from_scratch(cfg, stages[0]) and not is_checkpoint(stage_folder(cfg, before,
                                                                                          cfg.image_inject_frac)):
            raise ConfigError(f'{stage_folder(cfg, before, cfg.image_inject_frac)} does not exist: run the {before} '
                              f'stage first (the default stages=text,image,finetune runs each in turn)')
        if enc_tokens + LONGEST_CAPTION + 1 > cfg.block_size:
            raise ConfigError(f'block_size={cfg.block_size} cannot hold one image ({enc_tokens} tokens) and a caption '
                              f'(up to {LONGEST_CAPTION} tokens): raise block_size to at least '
                              f'{enc_tokens + LONGEST_CAPTION + 1}')
    return cfg


def from_scratch(cfg, stage):
    """Whether `stage` starts from fresh weights: the text stage, and the image stage at image_inject_frac=0."""
    return stage == 'text' or (stage == 'image' and cfg.image_inject_frac == 0)


def frac_step(frac, iters):
    return round(frac * iters)


def frac_name(frac):
    return f'ckpt_{round(frac * 100):03d}'


def cosine_lr(step, peak, warmup, total, floor, start=None):
    """
    Linear warmup to peak over `warmup` steps, then cosine decay to `floor` at `total`. With start given there is
    no warmup: the cosine runs from start (e.g. the LR a text checkpoint had reached) down to floor.
    """
    if start is None and step < warmup:
        return peak * (step + 1) / (warmup + 1)
    top = peak if start is None else start
    begin = warmup if start is None else 0
    progress = min(1.0, (step - begin) / max(1, total - begin))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - floor)


def fingerprint(cfg, stage, prep):
    """The fingerprint a stage's checkpoints carry (prepare.fingerprint), with the config keys that define it."""
    later = {'text': IMAGE_KEYS + FINETUNE_KEYS, 'image': FINETUNE_KEYS, 'finetune': ()}[stage]
    return prepare.fingerprint(cfg, stage, prep, {k: v for k, v in vars(cfg).items() if k not in RUN_KEYS + later})


# -----------------------------------------------------------------------------
# the stages: each states its pieces (model, batches, LR, iterations, checkpoints) for run_stage

def new_gpt(cfg, rt, prep):
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=data.padded_vocab_size(prep.enc), qk_norm=cfg.qk_norm,
                         tie_embeddings=cfg.tie_embeddings, **PRESETS[cfg.model])).to(rt.device)


def text_stage(cfg, rt, prep):
    raw_model = new_gpt(cfg, rt, prep)
    log(rt, f'text stage: {cfg.model} GPT, {raw_model.num_params():,} parameters '
            f'({raw_model.num_params(non_embedding=True):,} without the input embedding)')
    train_tokens, val_tokens = data.open_shard(prep.folder, 'train'), data.open_shard(prep.folder, 'val')

    def make(step, rows):
        x, y = data.text_batch(train_tokens, cfg.batch_size, cfg.block_size, data.seeded_generator(cfg.seed, step),
                               rows)
        return x, y, {}, Counter()

    @torch.no_grad()
    def val_loss():
        raw_model.eval()
        gen = torch.Generator().manual_seed(0)  # the same batches every time, so the curve compares like with like
        losses = []
        with torch.compiler.set_stance('force_eager'):  # eval mode and no grad: no second compile for it
            for _ in range(cfg.eval_iters):
                x, y = data.text_batch(val_tokens, rt.micro_batch, cfg.block_size, gen)
                with rt.autocast:
                    losses.append(raw_model(x.to(rt.device), y.to(rt.device))[1].item())
        raw_model.train()
        return float(np.mean(losses))

    peak = cfg.learning_rate
    return SimpleNamespace(model=raw_model, make=make, iters=cfg.text_iters, peak=peak, val_loss=val_loss,
                           lr_at=lambda step: cosine_lr(step, peak, cfg.warmup_iters, cfg.text_iters, cfg.min_lr) / peak,
                           info={'model_args': asdict(raw_model.config)})


def image_schedule(cfg):
    """
    The image stage's peak LR and LR factor per step. Below 1.0 the text schedule continues from the LR it had
    reached at the injection point down to min_lr (the paper's cooldown); at 1.0 it re-warms up to image_lr; at 0
    (from scratch) it is the text stage's schedule: warmup_iters up to learning_rate, then down to min_lr.
    """
    if cfg.image_inject_frac == 0:
        peak = cfg.learning_rate
        return peak, lambda step: cosine_lr(step, peak, cfg.warmup_iters, cfg.image_iters, cfg.min_lr) / peak
    if cfg.image_inject_frac < 1.0:
        reached = cosine_lr(frac_step(cfg.image_inject_frac, cfg.text_iters), cfg.learning_rate, cfg.warmup_iters,
                            cfg.text_iters, cfg.min_lr)
        peak = cfg.learning_rate
        return peak, lambda step: cosine_lr(step, peak, 0, cfg.image_iters, cfg.min_lr, start=reached) / peak
    peak = cfg.image_lr
    return peak, lambda step: cosine_lr(step, peak, cfg.rewarm_iters, cfg.image_iters, cfg.min_lr) / peak


def image_stage(cfg, rt, prep):
    if from_scratch(cfg, 'image'):
        text_ckpt, gpt = 'a new LM (images from scratch)', new_gpt(cfg, rt, prep)
    else:
        text_ckpt = stage_input(cfg, rt, prep, 'text')
        gpt = load_model(text_ckpt, rt.device)[0]  # shapes checked against the file, then its verified weights
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg.encoder, cfg.encoder_scale, prep.weights, freeze=cfg.freeze_encoder)
    raw_model = VLM(gpt, encoder, data.special_id(prep.enc, '<|image|>'), cfg.projector, cfg.image_inject_layer)
    raw_model = raw_model.to(rt.device).train()
    log(rt, f'image stage: {cfg.encoder} ({"frozen" if encoder.frozen else "trained"}, {encoder.num_tokens} tokens '
            f'x {encoder.dim}) into {text_ckpt}, {cfg.image_iters} steps at image ratio {cfg.image_ratio}')
    features = prepare.feature_cache(cfg, prep, encoder)
    text_tokens = data.open_shard(prep.folder, 'train')
    row_ratio = cfg.image_ratio
    if cfg.image_ratio_of == 'tokens':
        row_ratio, fill = data.rows_for_token_share(prep.source, prep.enc, cfg.block_size, encoder.num_tokens,
                                                    cfg.image_ratio, cfg.seed)
        log(rt, f'image stage: image_ratio={cfg.image_ratio} of the tokens is {row_ratio:.4f} of the rows '
                f'(a caption row is {fill:.1%} image and caption tokens, a text row 100% text)')
    if row_ratio + cfg.instruct_ratio > 1:
        raise ConfigError(f'image_ratio={cfg.image_ratio} needs {row_ratio:.3f} of the rows and instruct_ratio='
                          f'{cfg.instruct_ratio} more: over 1')

    def make(step, rows):
        x, y, refs = data.mixture_batch(prep.source, prep.enc, text_tokens, cfg.batch_size, cfg.block_size,
                                        encoder.num_tokens, row_ratio, cfg.instruct_ratio,
                                        data.seeded_generator(cfg.seed + 1, step), rows)
        return x, y, data.batch_inputs(prep.source, features, refs), data.token_kinds(x, y, prep.enc)

    peak, lr_at = image_schedule(cfg)
    return SimpleNamespace(model=raw_model, make=data.counting_skips(prep.source, make), iters=cfg.image_iters,
                           peak=peak, lr_at=lr_at, val_loss=None, info=prepare.vlm_info(cfg, raw_model))


def finetune_stage(cfg, rt, prep):
    image_ckpt = stage_input(cfg, rt, prep, 'image')
    torch.manual_seed(cfg.seed)
    raw_model = load_model(image_ckpt, rt.device)[0].train()
    n_image_tokens, source, enc = raw_model.encoder.num_tokens, prep.source, prep.enc
    features = prepare.feature_cache(cfg, prep, raw_model.encoder)
    text_tokens = data.open_shard(prep.folder, 'train')
    epochs, too_long = data.finetune_plan(source, enc, cfg.block_size, n_image_tokens, cfg.finetune_epochs,
                                          cfg.seed + 2, verbose=rt.master)
    if too_long:
        log(rt, f'finetune stage: {too_long:,} conversations longer than block_size={cfg.block_size} left out')
    # each optimizer step: n_conv rows of conversations and n_text rows of plain text (LLaVA keeps text-only
    # conversations in its mix for the same reason: without them fine-tuning erases the LM's text knowledge)
    n_text = round(cfg.batch_size * cfg.finetune_text_ratio)
    n_conv = cfg.batch_size - n_text
    steps_per_epoch = len(epochs[0]) // max(n_conv, 1)
    if n_conv == 0 or steps_per_epoch == 0:
        raise ConfigError(f'the instruction set packs into {len(epochs[0])} rows, fewer than the {n_conv} a step '
                          f'takes (batch_size={cfg.batch_size}, finetune_text_ratio={cfg.finetune_text_ratio}): '
                          f'lower either')
    iters = steps_per_epoch * cfg.finetune_epochs
    log(rt, f'finetune stage: {source.n_conversations:,} conversations in {len(epochs[0])} rows, '
            f'{cfg.finetune_epochs} epochs = {iters} steps of {n_conv} conversation + {n_text} text rows')

    def make(step, rows):
        epoch, s = divmod(step, steps_per_epoch)
        return data.finetune_batch(source, enc, epochs[epoch][s * n_conv:(s + 1) * n_conv], text_tokens, n_text,
                                   cfg.block_size, n_image_tokens, features, data.seeded_generator(cfg.seed + 2, step),
                                   rows)

    lr_at = lambda step: cosine_lr(step, cfg.finetune_lr, cfg.rewarm_iters, iters, cfg.min_lr) / cfg.finetune_lr
    return SimpleNamespace(model=raw_model, make=data.counting_skips(source, make), iters=iters, peak=cfg.finetune_lr,
                           lr_at=lr_at, val_loss=None, info=prepare.vlm_info(cfg, raw_model))


STAGE_BUILDERS = {'text': text_stage, 'image': image_stage, 'finetune': finetune_stage}


def stage_folder(cfg, stage, frac=None):
    """Where a stage's checkpoint goes: {text_out_dir}/ckpt_080 (frac 0.8 of the text stage), {out_dir}/image ..."""
    return os.path.join(cfg.text_out_dir, frac_name(frac)) if stage == 'text' else os.path.join(cfg.out_dir, stage)


def stage_input(cfg, rt, prep, stage):
    """The checkpoint of `stage` that the next stage starts from: it must exist and be current (its fingerprint)."""
    folder = stage_folder(cfg, stage, cfg.image_inject_frac)
    if not is_checkpoint(folder):
        raise ConfigError(f'{folder} does not exist: run the {stage} stage first (stages={stage},... with the same '
                          f'settings; the default stages=text,image,finetune runs each in turn)')
    check_fingerprint(folder, fingerprint(cfg, stage, prep), cfg.allow_stale, warn=lambda m: log(rt, m))
    return folder


def steps_dir(cfg, stage):
    """A stage's periodic checkpoints: {text_out_dir}/steps, {out_dir}/image_steps, {out_dir}/finetune_steps."""
    return os.path.join(cfg.text_out_dir, 'steps') if stage == 'text' else os.path.join(cfg.out_dir, f'{stage}_steps')


# -----------------------------------------------------------------------------
# the one loop every stage runs through

def run_stage(cfg, rt, prep, stage):
    """Reuse a finished, current stage; otherwise build it, resume or start it, train it, save and score it."""
    with timed(rt, f'{stage} set-up'):
        run = setup_stage(cfg, rt, prep, stage)
    if run is None:
        return
    spec, saves = run.spec, run.saves

    def on_step(done):
        if done in saves:
            if done == spec.iters:
                check_ranks_agree(rt, spec.model)
            with timed(rt, f'{stage} checkpoints'):  # a stage's own folder carries its curves
                save_stage_checkpoint(rt, saves[done], spec.model, run.optimizer, run.info_at(done),
                                      files=[rt.metrics_path] if stage != 'text' and rt.master else [])
            with timed(rt, f'{stage} evaluation'):  # rank 0 scores it (eval.json beside it), the others wait
                scores = saved_scores(saves[done], cfg.dataset, rt.device, cfg.data_dir) if cfg.evaluate and rt.master \
                    else 'not scored (evaluate=False): python eval.py --ckpt=FOLDER'
                log(rt, f'{stage} stage: saved {saves[done]} | {scores}')
                barrier(rt)
        elif cfg.ckpt_interval and done % cfg.ckpt_interval == 0:  # a checkpoint to resume from
            folder = steps_dir(cfg, stage)
            with timed(rt, f'{stage} checkpoints'):
                save_stage_checkpoint(rt, os.path.join(folder, f'step_{done:06d}'), spec.model, run.optimizer,
                                      run.info_at(done))
                if rt.master:
                    prune(folder, cfg.keep_last)
                barrier(rt)

    # log lines as JSON: {text_out_dir}/metrics.jsonl; an image or finetune stage's go into its checkpoint at the end
    start_metrics(rt, os.path.join(cfg.text_out_dir if stage == 'text' else steps_dir(cfg, stage), 'metrics.jsonl'),
                  run.first)
    with timed(rt, f'{stage} steps'):
        train_steps(rt, stage, run.model, spec.model, run.optimizer, batch_loader(rt, spec.make, run.first, spec.iters),
                    run.schedules, run.first, spec.iters, on_step, spec.val_loss, cfg.batch_size * cfg.block_size, cfg)


def setup_stage(cfg, rt, prep, stage):
    """None when the stage is finished and current; else its pieces, built, wrapped and resumed where it stopped."""
    made_by = fingerprint(cfg, stage, prep)
    # {step: folder} of the checkpoints the stage is there to write (None: its last step)
    outputs = ({frac_step(f, cfg.text_iters): stage_folder(cfg, stage, f) for f in cfg.save_fracs} if stage == 'text'
               else {None: stage_folder(cfg, stage)})
    finished = [f for f in outputs.values() if is_checkpoint(f)]
    for folder in finished:  # another run's checkpoints are never overwritten (nor reused) blind
        check_fingerprint(folder, made_by, cfg.allow_stale, warn=lambda m: log(rt, m))
    if len(finished) == len(outputs):
        log(rt, f'{stage} stage: already complete in {os.path.dirname(finished[0])}, reusing it')
        return None
    spec = STAGE_BUILDERS[stage](cfg, rt, prep)
    info_at = lambda done: {'stage': stage, 'step': done, 'iters': spec.iters, 'config': vars(cfg),
                            'tokenizer': prep.enc.name.removeprefix('nanovlp_'), 'fingerprint': made_by, **spec.info}
    first, state = 0, None
    if cfg.init_from == 'resume':  # the stage's periodic checkpoints, and the text stage's save_fracs ones too
        found = finished_checkpoints(steps_dir(cfg, stage)) + (finished_checkpoints(cfg.text_out_dir)
                                                               if stage == 'text' else [])
        first, state = resume_point(rt, stage, spec.model, made_by, found, cfg.allow_stale)
    model = wrap_model(rt, spec.model)
    extra, schedules = {}, {'lm': spec.lr_at}  # each param group's LR: its peak_lr times its schedule's factor
    if stage != 'text':
        extra['encoder_lr'], schedules['encoder'] = encoder_schedule(cfg, spec)
    optimizer = spec.model.configure_optimizers(cfg.weight_decay, spec.peak, (cfg.beta1, cfg.beta2), rt.device_type,
                                                **extra)
    if state is not None:
        load_optimizer_state(spec.model, optimizer, state['optimizer'], sharded=rt.fsdp)
        set_rng_state(state['rng'])
    return SimpleNamespace(spec=spec, model=model, optimizer=optimizer, schedules=schedules, first=first, info_at=info_at,
                           saves={spec.iters if step is None else step: f for step, f in outputs.items()})


def encoder_schedule(cfg, spec):
    """
    The peak LR and the LR factor per step of a trained encoder in the image and finetune stages. A pre-trained one
    has its own: a linear warmup over rewarm_iters (its first gradients come through a projector that is still
    random) up to encoder_lr, then a cosine down to encoder_lr * min_lr / learning_rate (the LM's floor-to-peak
    ratio) at the stage's end. It does not take the LR the LM had reached at the injection point: an encoder that
    starts to train needs a warmup, not the tail of a cooldown. The patch encoder is a projection learned from
    scratch, a new part of the model like the projector: it follows the LM's schedule.
    """
    if cfg.encoder == 'patch':
        return spec.peak, spec.lr_at
    floor = cfg.encoder_lr * cfg.min_lr / cfg.learning_rate
    return cfg.encoder_lr, lambda step: cosine_lr(step, cfg.encoder_lr, cfg.rewarm_iters, spec.iters, floor) / cfg.encoder_lr


# -----------------------------------------------------------------------------

def main(cfg):
    rt = setup_runtime(cfg)
    rt.times['start-up'] = process_age()  # the interpreter, torch's import, the config
    locks = []
    try:
        for folder in sorted({cfg.out_dir, cfg.text_out_dir}) if rt.master else ():
            locks.append(acquire_lock(folder))  # one writer per folder: a second run stops here, naming this one
        with timed(rt, 'preparation'):
            prep = prepare.prepare(cfg, rt)
        stages = cfg.stages.split(',')
        for stage in stages:
            if stage == 'text' and 'image' in stages and from_scratch(cfg, 'image'):
                log(rt, 'text stage: not needed, image_inject_frac=0 trains the LM from scratch on the mixture')
                continue
            run_stage(cfg, rt, prep, stage)
        table = stable_score_table([(f'text {frac_name(cfg.image_inject_frac)}' if s == 'text' else s,
                                     stage_folder(cfg, s, cfg.image_inject_frac)) for s in STAGES])
        if rt.master and stages != ['text'] and table.count('\n'):  # a row below the header: a stage was scored
            print(f'\nstable scores with 95% intervals ({cfg.out_dir}):\n{table}')
        log(rt, f'done in {format_time(sum(rt.times.values()))}; where the time went:\n{time_table(rt.times)}')
        if rt.master:  # for ablate.py's table
            with open(os.path.join(cfg.out_dir, 'times.json'), 'w') as f:
                json.dump(rt.times, f)
    finally:
        for path in locks:
            release_lock(path)
        close_runtime(rt)


if __name__ == '__main__':
    try:
        config = get_config(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    try:
        main(config)
    except (ConfigError, TrainingError, StaleCheckpoint, FolderLocked) as e:
        sys.exit(f'error: {e}')
