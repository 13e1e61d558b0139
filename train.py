"""
Train nanoVLP stage by stage: text pre-training, then (with an image encoder) image injection and instruction
fine-tuning, each followed by evaluation.

    python train.py --stages=text                      # text pre-training on the shapes world: out/text/ckpt_020 ...
    python train.py config/dino_siglip_unfrozen.py     # one cell of the encoder ablation
    torchrun --standalone --nproc_per_node=2 train.py  # DDP: nccl on CUDA, gloo on CPU
    python train.py config/scale_79m.py config/siglip_frozen.py --dataset=data/dclm --image_data='datacomp/*.tar' \
        --instruct_data=llava/llava_v1_5_mix665k.json   # real data (README: Reproducing the paper)

Every global in the config section below is a key that config files and --key=value flags set (configurator.py).
"""

import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import data
import images
from checkpoint import (finished_checkpoints, full_state, load_optimizer_state, load_state, prune, read_checkpoint_info,
                        recover, save_checkpoint, set_rng_state)
from configurator import ConfigError, configure
from encoders import ENCODERS, build_encoder, cached_features
from eval import build_model, evaluate_checkpoint
from model import GPT, PRESETS, VLM, GPTConfig
from runtime import (barrier, batch_loader, check_ranks_agree, compile_count, format_time, log, master_first,
                     no_grad_sync, setup_runtime, wrap_model)

LONGEST_CAPTION = 200  # bytes: four objects in the longest phrasing, with room to spare
# keys that change how a run is carried out, not what it computes: they may differ between runs sharing a stage
RUN_ONLY_KEYS = ('stages', 'init_from', 'eval_interval', 'eval_iters', 'log_interval', 'device', 'dtype', 'compile',
                 'peak_flops', 'fsdp', 'grad_checkpoint', 'data_workers', 'ckpt_interval', 'keep_last',
                 'max_bad_steps')
# keys that must be > 0, and keys that must be >= 0 (checked before any compute)
POSITIVE_KEYS = ('text_iters', 'image_iters', 'batch_size', 'gradient_accumulation_steps', 'block_size', 'learning_rate',
                 'image_lr', 'finetune_lr', 'encoder_lr', 'finetune_epochs', 'keep_last', 'scene_size', 'caption_scenes',
                 'conversations', 'eval_iters', 'log_interval')
NON_NEGATIVE_KEYS = ('warmup_iters', 'rewarm_iters', 'min_lr', 'weight_decay', 'grad_clip', 'ckpt_interval',
                     'max_bad_steps', 'eval_interval', 'image_inject_layer', 'peak_flops')
FINETUNE_KEYS = ('finetune_epochs', 'finetune_lr', 'finetune_text_ratio')

# -----------------------------------------------------------------------------
# config
# I/O
out_dir = 'out'  # this run's image and finetune stages write to {out_dir}/image and {out_dir}/finetune
text_out_dir = 'out/text'  # the text stage's checkpoints; ablation cells that share it share one text stage
stages = 'text,image,finetune'  # comma-separated stages to run, in order
init_from = 'scratch'  # 'scratch', or 'resume': continue an interrupted stage from its newest checkpoint
eval_interval = 100  # steps between validation-loss estimates
eval_iters = 10  # batches per validation-loss estimate
log_interval = 25  # steps between log lines
ckpt_interval = 100  # steps between a stage's periodic checkpoints, which init_from='resume' continues from; 0: none
keep_last = 2  # periodic checkpoints kept per stage, the newest; the text stage's save_fracs ones are never deleted
max_bad_steps = 0  # steps with a non-finite loss or gradient to skip (batch dropped) before the run stops
# data
dataset = 'shapes'  # 'shapes' (the embedded world, generated on first use) or a folder from `data.py prepare text`
data_dir = 'data'  # where the shapes world is cached
# model
model = 'demo'  # a preset of model.PRESETS: demo, 79m, 1b
block_size = 256  # context length in tokens
qk_norm = True
tie_embeddings = False  # the paper's OpenLM models keep input and output embeddings separate
# text stage
text_iters = 400  # optimizer steps of text pre-training
save_fracs = [0.2, 0.4, 0.6, 0.8, 1.0]  # fractions of text_iters with a checkpoint: the candidate injection points
batch_size = 16  # sequences per optimizer step, summed over ranks and micro-steps
gradient_accumulation_steps = 1  # micro-steps per optimizer step
learning_rate = 3e-3  # peak LR of the text stage
min_lr = 3e-4  # where every cosine schedule ends
warmup_iters = 40
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
# image stage
image_inject_frac = 0.8  # the image injection point: which text checkpoint (a value of save_fracs) gets the images
image_iters = 300  # optimizer steps of the image stage
image_ratio = 0.1  # fraction of the sequences that are image-caption sequences
instruct_ratio = 0.0  # fraction that are instruction conversations (the paper's "instruction data in pre-training")
image_lr = 3e-3  # peak LR when injecting into the fully trained model (image_inject_frac=1.0 re-warms up)
rewarm_iters = 20  # warmup steps of a stage that re-warms its LR (image at 1.0, finetune)
encoder = 'siglip'  # siglip, dinov2, dino_siglip, vit, resnet, patch
encoder_scale = 'tiny'  # 'tiny' (CPU demo) or 'paper' (SigLIP SO400M, DINOv2 ViT-L, ...)
encoder_weights = 'shapes'  # 'shapes' (pre-trained on the shapes world, once), 'random', 'hub', or a .safetensors
freeze_encoder = True  # keep the encoder's weights fixed (no grad, eval mode, not in the optimizer)
encoder_lr = 1e-5  # peak LR of an unfrozen pre-trained encoder (patch, trained from scratch, takes the stage's)
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
seed = 1337
# -----------------------------------------------------------------------------

STAGES = ('text', 'image', 'finetune')
# the keys that define a text stage: runs whose values agree may share its checkpoints
TEXT_KEYS = ('dataset', 'model', 'block_size', 'qk_norm', 'tie_embeddings', 'text_iters', 'batch_size',
             'learning_rate', 'min_lr', 'warmup_iters', 'weight_decay', 'beta1', 'beta2', 'grad_clip', 'seed')


def default_config():
    return {k: v for k, v in globals().items()
            if not k.startswith('_') and k.islower() and isinstance(v, (int, float, bool, str, list, type(None)))}


def get_config(args):
    """Defaults, then config files and --key=value flags, then checks that need no compute."""
    cfg = SimpleNamespace(**configure(args, default_config()))
    for key in POSITIVE_KEYS + NON_NEGATIVE_KEYS:
        value, positive = getattr(cfg, key), key in POSITIVE_KEYS
        if value < 0 or (positive and value == 0):
            raise ConfigError(f'{key}={value}: must be {"> 0" if positive else ">= 0"}')
    if cfg.data_workers is not None and cfg.data_workers < 0:
        raise ConfigError(f'data_workers={cfg.data_workers}: must be >= 0, or None for the device default')
    if not 0 <= cfg.finetune_text_ratio < 1:
        raise ConfigError(f'finetune_text_ratio={cfg.finetune_text_ratio}: must be in [0, 1) (1 leaves no room '
                          f'for the conversations)')
    for stage in cfg.stages.split(','):
        if stage not in STAGES:
            raise ConfigError(f'stages={cfg.stages!r}: unknown stage {stage!r}; the stages are {", ".join(STAGES)}')
    if cfg.model not in PRESETS:
        raise ConfigError(f'model={cfg.model!r}: the presets are {", ".join(PRESETS)}')
    if not cfg.save_fracs or any(not 0 < f <= 1 for f in cfg.save_fracs):
        raise ConfigError(f'save_fracs={cfg.save_fracs}: every fraction must be in (0, 1]')
    steps = [frac_step(f, cfg.text_iters) for f in cfg.save_fracs]
    if len(set(steps)) != len(steps) or min(steps) < 1:
        raise ConfigError(f'save_fracs={cfg.save_fracs} with text_iters={cfg.text_iters} gives checkpoint steps '
                          f'{steps}: they must be distinct and >= 1; raise text_iters')
    if cfg.dtype not in ('auto', 'float32', 'bfloat16'):
        raise ConfigError(f"dtype={cfg.dtype!r}: use 'auto', 'float32' or 'bfloat16'")
    if cfg.init_from not in ('scratch', 'resume'):
        raise ConfigError(f"init_from={cfg.init_from!r}: use 'scratch' or 'resume'")
    if not 0 <= cfg.image_ratio + cfg.instruct_ratio <= 1 or min(cfg.image_ratio, cfg.instruct_ratio) < 0:
        raise ConfigError(f'image_ratio={cfg.image_ratio} and instruct_ratio={cfg.instruct_ratio} must be >= 0 '
                          f'and sum to at most 1')
    if cfg.encoder == 'patch' and cfg.freeze_encoder:
        raise ConfigError('encoder=patch is a learned projection with nothing to freeze: set freeze_encoder=False')
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f'encoder={cfg.encoder!r}: the encoders are {", ".join(ENCODERS)}')
    if {'image', 'finetune'} & set(cfg.stages.split(',')):
        if cfg.image_inject_frac not in cfg.save_fracs:
            raise ConfigError(f'image_inject_frac={cfg.image_inject_frac} is not one of save_fracs={cfg.save_fracs}: '
                              f'images can only be injected at a saved text checkpoint')
        try:
            with torch.device('meta'):  # the encoder's shape without its weights: instant even at paper scale
                enc_tokens = build_encoder(cfg.encoder, cfg.encoder_scale, 'random',
                                           freeze=cfg.freeze_encoder).num_tokens
        except ValueError as e:  # e.g. dino_siglip halves whose patch grids differ
            raise ConfigError(f'encoder={cfg.encoder!r}, encoder_scale={cfg.encoder_scale!r}: {e}') from e
        check_real_data(cfg)
        longest = enc_tokens + LONGEST_CAPTION
        if longest + 1 > cfg.block_size:
            raise ConfigError(f'block_size={cfg.block_size} cannot hold one image ({enc_tokens} tokens) and a caption '
                              f'(up to {LONGEST_CAPTION} tokens): raise block_size to at least {longest + 1}')
    return cfg


def check_real_data(cfg):
    """Real image data replaces the shapes world's for every image sample of a run: no run mixes the two."""
    if not (cfg.image_data or cfg.instruct_data):
        return
    stages = cfg.stages.split(',')
    if not cfg.image_data and cfg.image_ratio > 0:
        raise ConfigError(f'instruct_data is set but image_data is not: the image stage (image_ratio='
                          f'{cfg.image_ratio}) needs image-caption shards; set image_data, or image_ratio=0')
    if not cfg.instruct_data and (cfg.instruct_ratio > 0 or 'finetune' in stages):
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


def frac_step(frac, iters):
    return round(frac * iters)


def frac_name(frac):
    return f'ckpt_{round(frac * 100):03d}'


# -----------------------------------------------------------------------------
# the training loop every stage shares

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


def train_steps(rt, stage, model, raw_model, optimizer, batches, lr_at, first, last, on_step=None, val_loss=None,
                tokens_per_step=0, eval_interval=0, log_interval=10, grad_clip=0.0, peak_flops=0.0, max_bad_steps=0):
    """
    Optimizer steps first .. last-1 on the micro-batches (x, y, inputs, skipped) from batches (batch_loader), where
    skipped counts the samples left out while building it (bad images); lr_at(step) is the LR factor every param
    group multiplies its peak_lr by; on_step(step_done) runs after each step (checkpoints). A step whose gradient is
    not finite is not applied; after max_bad_steps of them the run stops (TrainingError).
    """
    bad_steps = 0
    accum = rt.micro_steps
    t_start, t_last, step_last = time.time(), time.time(), first
    losses, waited, skipped = [], 0.0, Counter()
    compiles = compile_count() if rt.compile else 0
    for step in range(first, last):
        factor = lr_at(step)
        for group in optimizer.param_groups:
            group['lr'] = group['peak_lr'] * factor
        t = time.time()
        micro_batches = [next(batches) for _ in range(accum)]
        waited += time.time() - t
        # the step's loss is the mean over all its scored targets, on every rank and micro-step: each micro-batch's
        # mean loss is weighted by its share of them (rows of captions and conversations score unequal numbers),
        # so the gradient does not depend on how the batch is split over ranks and micro-steps
        counts = [(y != -1).sum().item() for _, y, _, _ in micro_batches]
        for batch in micro_batches:
            skipped.update(batch[3])
        total = torch.tensor(float(sum(counts)), device=rt.device)
        if rt.ddp:
            dist.all_reduce(total)
        step_loss = 0.0  # this rank's mean over its scored targets, for the log
        for micro, (x, y, inputs, _) in enumerate(micro_batches):
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            inputs = {k: v.to(rt.device, non_blocking=True) for k, v in inputs.items()}
            with nullcontext() if micro == accum - 1 else no_grad_sync(model):
                with rt.autocast:
                    _, loss = model(x, y, **inputs)
                # DDP and FSDP average the ranks' gradients: scale by world_size to make that average a sum
                (loss * (counts[micro] * rt.world_size / total.clamp(min=1))).backward()
            step_loss = step_loss + loss.detach() * counts[micro] / max(sum(counts), 1)
        # the global gradient norm (clipped to grad_clip, when set) is the same on every rank, so every rank agrees
        # on whether a step is bad; a NaN or inf loss makes it NaN too
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
        norm = norm.full_tensor() if hasattr(norm, 'full_tensor') else norm  # FSDP: a DTensor
        done = step + 1
        if math.isfinite(norm.item()):
            optimizer.step()
            losses.append(step_loss)
        else:
            bad_steps += 1
            if bad_steps > max_bad_steps:
                raise TrainingError(
                    f'{stage} stage, step {done}: the loss or its gradient is not finite (loss {loss.item()}, gradient '
                    f'norm {norm.item()}). The last good checkpoint is {rt.last_checkpoint or "none (none written yet)"}'
                    f'; nothing after it was written. Resume from it with init_from=resume (a lower learning rate or '
                    f'grad_clip may help), or set max_bad_steps to skip such batches')
            log(rt, f'{stage} step {done}: non-finite loss or gradient, batch skipped '
                    f'({bad_steps} of max_bad_steps={max_bad_steps})')
        optimizer.zero_grad(set_to_none=True)
        if done % log_interval == 0 or done == last:
            now = time.time()
            dt = (now - t_last) / (done - step_last)
            tok_s = tokens_per_step / dt
            mfu = raw_model.estimate_mfu(tok_s, peak_flops or None)
            mean_loss = torch.stack(losses).mean().item() if losses else float('nan')  # nan: every step was bad
            log(rt, f'{stage} step {done}/{last} | loss {mean_loss:.4f} | lr {optimizer.param_groups[0]["lr"]:.2e} | '
                    f'{tok_s:,.0f} tok/s | mfu {"n/a" if mfu is None else f"{mfu:.1%}"} | '
                    f'data wait {waited / (now - t_last):.0%} | '
                    f'eta {format_time((last - done) * (now - t_start) / (done - first))}' + skip_counts(rt, skipped))
            t_last, step_last, losses, waited = now, done, [], 0.0
        if val_loss is not None and eval_interval and (done % eval_interval == 0 or done == last):
            log(rt, f'{stage} step {done}: val loss {val_loss():.4f}')
        if on_step is not None:
            on_step(done)
    if rt.compile:
        log(rt, f'{stage} stage: torch.compile made {compile_count() - compiles} new graph(s)')


def skip_counts(rt, skipped):
    """' | skipped so far: reason n, ...' summed over the ranks (each rank builds its own rows), or '' when nothing was."""
    reasons = images.SKIP_REASONS
    unknown = set(skipped) - set(reasons)
    if unknown:
        raise ValueError(f'skip reasons {unknown} are not in images.SKIP_REASONS')
    counts = torch.tensor([float(skipped[r]) for r in reasons], device=rt.device)
    if rt.ddp:
        dist.all_reduce(counts)
    found = [f'{r} {int(n):,}' for r, n in zip(reasons, counts.tolist()) if n]
    return ' | skipped so far: ' + ', '.join(found) if found else ''


# -----------------------------------------------------------------------------
# checkpoints during a stage (their format and crash safety: checkpoint.py)

class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss): the message names the step, the stage and what to do."""


def save_stage_checkpoint(rt, folder, raw_model, optimizer, info):
    """Every rank gathers (FSDP), rank 0 writes. The folder becomes the stage's last good checkpoint."""
    weights, optimizer_state = full_state(raw_model, optimizer)
    if rt.master:
        save_checkpoint(folder, weights, optimizer_state, info)
    rt.last_checkpoint = folder


def evaluate_saved(cfg, rt, stage, folder):
    """
    Rank 0 scores a checkpoint just saved on the dataset's own tasks (eval.json beside it) and logs its stable
    scores. A prepared corpus has none: the paper's benchmarks are a separate command (eval.py --tasks).
    """
    if rt.master:
        if not os.path.exists(os.path.join(data.dataset_dir(cfg.dataset, cfg.data_dir), 'text_tasks.json')):
            log(rt, f'{stage} stage: saved {folder} (no built-in tasks for dataset={cfg.dataset}: score it with '
                    f'python eval.py --ckpt={folder} --tasks=... --bench_dir=...)')
        else:
            r = evaluate_checkpoint(folder, rt.device, verbose=False)
            scores = [f'{name} {r[key]:.3f}' for name, key in (('vision', 'vision_stable_score'),
                      ('blind', 'vision_blind_stable_score'), ('text stable score', 'text_stable_score'))
                      if r[key] is not None]
            log(rt, f'{stage} stage: saved {folder} | ' + ' | '.join(scores))
    barrier(rt)


def steps_dir(cfg, stage):
    """A stage's periodic checkpoints: {text_out_dir}/steps, {out_dir}/image_steps, {out_dir}/finetune_steps."""
    return os.path.join(cfg.text_out_dir, 'steps') if stage == 'text' else os.path.join(cfg.out_dir, f'{stage}_steps')


def periodic_checkpoints(cfg, rt, stage, raw_model, optimizer, info_at, last, skip=()):
    """An on_step for train_steps: every ckpt_interval steps (but the last, and `skip`) a checkpoint to resume from."""
    def on_step(done):
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done != last and done not in skip:
            folder = steps_dir(cfg, stage)
            save_stage_checkpoint(rt, os.path.join(folder, f'step_{done:06d}'), raw_model, optimizer, info_at(done))
            if rt.master:
                prune(folder, cfg.keep_last)
            barrier(rt)
    return on_step


def resume_point(cfg, rt, stage, raw_model, keys, also=()):
    """
    With init_from='resume', the newest of the stage's periodic checkpoints and the (step, path) pairs in `also`:
    its weights are loaded into raw_model (before wrap_model), its settings checked against keys. Returns the step
    to start from and the checkpoint's state.pt (None when starting at 0).
    """
    if cfg.init_from != 'resume':
        return 0, None
    found = finished_checkpoints(steps_dir(cfg, stage)) + list(also)
    if not found:
        log(rt, f'{stage} stage: no checkpoint to resume from, starting at step 0')
        return 0, None
    step, path = max(found)
    check_made_with(cfg, path, keys, f'{stage} checkpoint')
    strict = not isinstance(raw_model, VLM) or encoder_saved(raw_model)
    raw_model.load_state_dict(load_file(os.path.join(path, 'model.safetensors')), strict=strict)
    rt.last_checkpoint = path
    log(rt, f'{stage} stage: resuming from {path} at step {step}')
    return step, load_state(path)


def restore_training_state(rt, raw_model, optimizer, state):
    """The optimizer state and RNG states of a resumed checkpoint; the data position is its step."""
    if state is not None:
        load_optimizer_state(raw_model, optimizer, state['optimizer'], sharded=rt.fsdp)
        set_rng_state(state['rng'])


# -----------------------------------------------------------------------------
# stage 1: text pre-training

def check_made_with(cfg, ckpt, keys, what):
    """A checkpoint may be reused only by a run whose values of keys are those it was made with."""
    made_by = read_checkpoint_info(ckpt)['config']
    differ = [k for k in keys if made_by.get(k) != getattr(cfg, k)]
    if differ:
        diffs = ', '.join(f'{k}: {made_by.get(k)!r} there, {getattr(cfg, k)!r} here' for k in differ)
        raise ConfigError(f'{ckpt} holds a {what} made with other settings ({diffs}); choose another folder for '
                          f'this run, or delete {ckpt}')


def train_text(cfg, rt):
    folder = cfg.text_out_dir
    found = finished_checkpoints(folder)
    if found:
        check_made_with(cfg, found[-1][1], TEXT_KEYS, 'text stage')
    targets = {frac_step(f, cfg.text_iters): os.path.join(folder, frac_name(f)) for f in cfg.save_fracs}
    if all(os.path.exists(os.path.join(p, 'config.json')) for p in targets.values()):
        log(rt, f'text stage: already complete in {folder}, reusing it')
        return
    data_folder = master_first(rt, lambda: data.dataset_dir(cfg.dataset, cfg.data_dir))  # generated on first use
    meta = data.load_meta(data_folder)
    enc = data.get_tokenizer(meta['tokenizer'])
    train_tokens, val_tokens = data.open_shard(data_folder, 'train'), data.open_shard(data_folder, 'val')

    torch.manual_seed(cfg.seed)
    gpt_config = GPTConfig(block_size=cfg.block_size, vocab_size=data.padded_vocab_size(enc), qk_norm=cfg.qk_norm,
                           tie_embeddings=cfg.tie_embeddings, **PRESETS[cfg.model])
    raw_model = GPT(gpt_config).to(rt.device)
    log(rt, f'text stage: {cfg.model} GPT, {raw_model.num_params():,} parameters '
            f'({raw_model.num_params(non_embedding=True):,} without the input embedding)')
    first, state = resume_point(cfg, rt, 'text', raw_model, TEXT_KEYS, also=finished_checkpoints(folder))
    model = wrap_model(rt, raw_model)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               rt.device_type)
    restore_training_state(rt, raw_model, optimizer, state)

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

    info_at = lambda done: {'stage': 'text', 'step': done, 'iters': cfg.text_iters, 'tokenizer': meta['tokenizer'],
                            'model_args': asdict(gpt_config), 'config': vars(cfg)}
    periodic = periodic_checkpoints(cfg, rt, 'text', raw_model, optimizer, info_at, cfg.text_iters, skip=targets)

    def on_step(done):
        periodic(done)
        if done not in targets:
            return
        save_stage_checkpoint(rt, targets[done], raw_model, optimizer, info_at(done))
        evaluate_saved(cfg, rt, 'text', targets[done])

    lr_at = lambda step: cosine_lr(step, cfg.learning_rate, cfg.warmup_iters, cfg.text_iters,
                                   cfg.min_lr) / cfg.learning_rate
    train_steps(rt, 'text', model, raw_model, optimizer, batch_loader(rt, make, first, cfg.text_iters), lr_at, first,
                cfg.text_iters, on_step=on_step, val_loss=val_loss, tokens_per_step=cfg.batch_size * cfg.block_size,
                eval_interval=cfg.eval_interval, log_interval=cfg.log_interval, grad_clip=cfg.grad_clip,
                peak_flops=cfg.peak_flops, max_bad_steps=cfg.max_bad_steps)
    check_ranks_agree(rt, raw_model)


# -----------------------------------------------------------------------------
# stages 2 and 3: image injection, instruction fine-tuning

def image_stage_keys(cfg):
    return [k for k in vars(cfg) if k not in RUN_ONLY_KEYS + FINETUNE_KEYS]


def reusable(cfg, folder, keys, rt):
    """True when folder holds a finished checkpoint made with these settings; one made with others is an error."""
    recover(folder)
    if not os.path.exists(os.path.join(folder, 'config.json')):
        return False
    check_made_with(cfg, folder, keys, f'{os.path.basename(folder)} stage')
    log(rt, f'{os.path.basename(folder)} stage: already complete in {folder}, reusing it')
    return True


def encoder_saved(raw_model):
    """A checkpoint stores the encoder's weights unless it is frozen and rebuilt from a recorded source."""
    return not (raw_model.encoder.frozen and raw_model.encoder.weights != 'random')


def vlm_info(cfg, raw_model, stage, step, iters, tokenizer):
    e = raw_model.encoder
    return {'stage': stage, 'step': step, 'iters': iters, 'tokenizer': tokenizer,
            'model_args': asdict(raw_model.gpt.config), 'config': vars(cfg),
            'encoder': {'name': e.name, 'scale': e.scale, 'weights': e.weights, 'img_size': e.img_size,
                        'frozen': e.frozen, 'saved': encoder_saved(raw_model), 'projector': cfg.projector,
                        'inject_layer': raw_model.inject_layer, 'image_token': raw_model.image_token}}


def stage_data(cfg, rt, img_size):
    """
    Tokenizer, text shard and the image source: the shapes world's pictures (rank 0 renders them first, the others
    wait), or images.RealImages over image_data / instruct_data, its images decoded at the encoder's img_size.
    """
    folder = master_first(rt, lambda: data.dataset_dir(cfg.dataset, cfg.data_dir))
    enc = data.get_tokenizer(data.load_meta(folder)['tokenizer'])
    if cfg.image_data or cfg.instruct_data:
        source = master_first(rt, lambda: images.RealImages(
            img_size, cfg.image_data, cfg.caption_key, cfg.instruct_data, cfg.instruct_images,
            cache_dir=os.path.join(cfg.data_dir, 'image_index'), verbose=rt.master))
        log(rt, f'image data: {source.summary()}')
    else:
        source = master_first(rt, lambda: data.ImageWorld(folder, cfg.scene_size, cfg.caption_scenes,
                                                          cfg.conversations))
    return enc, data.open_shard(folder, 'train'), source


def counting_skips(source, make):
    """
    A batch builder (step, rows) -> (x, y, refs) made into one for batch_loader: the refs become model inputs and the
    batch carries the samples its building skipped (a DataLoader worker counts in its own copy of the source).
    """
    def build(step, rows):
        before = Counter(source.skipped)
        x, y, inputs = make(step, rows)
        return x, y, inputs, source.skipped - before
    return build


def image_inputs(source, features, refs):
    """
    The model inputs for a batch's images: cached features of a frozen encoder, or the uint8 pictures; an empty
    tensor for a batch without images, so every step runs the same modules on every rank.
    """
    if features is not None:
        return {'features': torch.from_numpy(np.asarray(features[refs]))}
    return {'images': torch.from_numpy(source.pixels(refs))}


def feature_cache(cfg, rt, world, raw_model):
    """A frozen encoder's features of the shapes world's fixed image set; real image data is encoded as it comes."""
    if not (cfg.cache_features and raw_model.encoder.frozen and isinstance(world, data.ImageWorld)):
        return None
    cache_dir = os.path.join(cfg.data_dir, 'features')
    name = f'shapes-v{data.SHAPES_VERSION}-{cfg.scene_size}px-{cfg.caption_scenes}-{cfg.conversations}'
    return master_first(rt, lambda: cached_features(raw_model.encoder, world.images, name, cache_dir,
                                                    verbose=rt.master))


def finish_stage(cfg, rt, stage, folder, raw_model, optimizer, info):
    check_ranks_agree(rt, raw_model)
    save_stage_checkpoint(rt, folder, raw_model, optimizer, info)
    evaluate_saved(cfg, rt, stage, folder)


def encoder_peak_lr(cfg, peak):
    """
    A pre-trained encoder trains at encoder_lr: far below the LM's, since early gradients come through a projector
    that is still random (measured on the demo: SigLIP unfrozen at 3e-4 lost 0.09 of vision score, at 1e-5 it
    matched frozen). The patch encoder is a projection learned from scratch: it trains at the stage's peak.
    """
    return peak if cfg.encoder == 'patch' else cfg.encoder_lr


def image_schedule(cfg):
    """
    The image stage's peak LR and LR factor per step. Below 1.0 the text schedule continues from the LR it had
    reached at the injection point down to min_lr (the paper's cooldown); at 1.0 it re-warms up to image_lr.
    """
    if cfg.image_inject_frac < 1.0:
        reached = cosine_lr(frac_step(cfg.image_inject_frac, cfg.text_iters), cfg.learning_rate, cfg.warmup_iters,
                            cfg.text_iters, cfg.min_lr)
        peak = cfg.learning_rate
        return peak, lambda step: cosine_lr(step, peak, 0, cfg.image_iters, cfg.min_lr, start=reached) / peak
    peak = cfg.image_lr
    return peak, lambda step: cosine_lr(step, peak, cfg.rewarm_iters, cfg.image_iters, cfg.min_lr) / peak


def train_image(cfg, rt):
    folder = os.path.join(cfg.out_dir, 'image')
    if reusable(cfg, folder, image_stage_keys(cfg), rt):
        return
    text_ckpt = os.path.join(cfg.text_out_dir, frac_name(cfg.image_inject_frac))
    if not os.path.exists(os.path.join(text_ckpt, 'config.json')):
        log(rt, f'image stage: {text_ckpt} does not exist yet, running the text stage first')
        train_text(cfg, rt)
    gpt = build_model(read_checkpoint_info(text_ckpt))
    gpt.load_state_dict(load_file(os.path.join(text_ckpt, 'model.safetensors')))
    torch.manual_seed(cfg.seed)
    # rank 0 first: weights='shapes' pre-trains the encoder when its file is missing, and the others then read it
    encoder = master_first(rt, lambda: build_encoder(cfg.encoder, cfg.encoder_scale, cfg.encoder_weights,
                                                     freeze=cfg.freeze_encoder))
    enc, text_tokens, world = stage_data(cfg, rt, encoder.img_size)
    raw_model = VLM(gpt, encoder, data.special_id(enc, '<|image|>'), cfg.projector, cfg.image_inject_layer)
    raw_model = raw_model.to(rt.device).train()
    log(rt, f'image stage: {cfg.encoder} ({"frozen" if encoder.frozen else "trained"}, {encoder.num_tokens} tokens '
            f'x {encoder.dim}) into {text_ckpt}, {cfg.image_iters} steps at image ratio {cfg.image_ratio}')
    features = feature_cache(cfg, rt, world, raw_model)
    peak, lr_at = image_schedule(cfg)
    first, state = resume_point(cfg, rt, 'image', raw_model, image_stage_keys(cfg))
    model = wrap_model(rt, raw_model)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, peak, (cfg.beta1, cfg.beta2), rt.device_type,
                                               encoder_lr=encoder_peak_lr(cfg, peak))
    restore_training_state(rt, raw_model, optimizer, state)
    tokenizer = enc.name.removeprefix('nanovlp_')
    info_at = lambda done: vlm_info(cfg, raw_model, 'image', done, cfg.image_iters, tokenizer)

    def make(step, rows):
        x, y, refs = data.mixture_batch(world, enc, text_tokens, cfg.batch_size, cfg.block_size, encoder.num_tokens,
                                        cfg.image_ratio, cfg.instruct_ratio, data.seeded_generator(cfg.seed + 1, step),
                                        rows)
        return x, y, image_inputs(world, features, refs)

    train_steps(rt, 'image', model, raw_model, optimizer,
                batch_loader(rt, counting_skips(world, make), first, cfg.image_iters), lr_at,
                first, cfg.image_iters, tokens_per_step=cfg.batch_size * cfg.block_size,
                log_interval=cfg.log_interval, grad_clip=cfg.grad_clip, peak_flops=cfg.peak_flops,
                max_bad_steps=cfg.max_bad_steps,
                on_step=periodic_checkpoints(cfg, rt, 'image', raw_model, optimizer, info_at, cfg.image_iters))
    finish_stage(cfg, rt, 'image', folder, raw_model, optimizer, info_at(cfg.image_iters))


def train_finetune(cfg, rt):
    folder = os.path.join(cfg.out_dir, 'finetune')
    finetune_keys = [k for k in vars(cfg) if k not in RUN_ONLY_KEYS]
    if reusable(cfg, folder, finetune_keys, rt):
        return
    image_ckpt = os.path.join(cfg.out_dir, 'image')
    if not os.path.exists(os.path.join(image_ckpt, 'config.json')):
        log(rt, f'finetune stage: {image_ckpt} does not exist yet, running the image stage first')
        train_image(cfg, rt)
    raw_model = build_model(read_checkpoint_info(image_ckpt))
    state = load_file(os.path.join(image_ckpt, 'model.safetensors'))
    raw_model.load_state_dict(state, strict=encoder_saved(raw_model))
    raw_model = raw_model.to(rt.device).train()
    n_image_tokens = raw_model.encoder.num_tokens
    enc, text_tokens, world = stage_data(cfg, rt, raw_model.encoder.img_size)
    features = feature_cache(cfg, rt, world, raw_model)
    epochs = data.finetune_plan(world, enc, cfg.block_size, n_image_tokens, cfg.finetune_epochs, cfg.seed + 2,
                                verbose=rt.master)
    too_long = world.skipped['longer than block_size']
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
    log(rt, f'finetune stage: {world.n_conversations:,} conversations in {len(epochs[0])} rows, '
            f'{cfg.finetune_epochs} epochs = {iters} steps of {n_conv} conversation + {n_text} text rows')

    def make(step, rows):
        epoch, s = divmod(step, steps_per_epoch)
        start, stop, _ = rows.indices(cfg.batch_size)  # rows 0 .. n_conv-1 are conversations, the rest text
        batch = [data.finetune_row(world, enc, indices, cfg.block_size, n_image_tokens)
                 for indices in epochs[epoch][s * n_conv:(s + 1) * n_conv][start:stop]]
        if stop > n_conv:
            x, y = data.text_batch(text_tokens, n_text, cfg.block_size, data.seeded_generator(cfg.seed + 2, step),
                                   slice(max(start - n_conv, 0), stop - n_conv))
            batch += [(x[i], y[i], []) for i in range(len(x))]
        refs = [r for row in batch for r in row[2]]
        return torch.stack([r[0] for r in batch]), torch.stack([r[1] for r in batch]), image_inputs(world, features, refs)

    peak = cfg.finetune_lr
    first, state = resume_point(cfg, rt, 'finetune', raw_model, finetune_keys)
    model = wrap_model(rt, raw_model)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, peak, (cfg.beta1, cfg.beta2), rt.device_type,
                                               encoder_lr=encoder_peak_lr(cfg, peak))
    restore_training_state(rt, raw_model, optimizer, state)
    tokenizer = enc.name.removeprefix('nanovlp_')
    info_at = lambda done: vlm_info(cfg, raw_model, 'finetune', done, iters, tokenizer)
    lr_at = lambda step: cosine_lr(step, peak, cfg.rewarm_iters, iters, cfg.min_lr) / peak
    train_steps(rt, 'finetune', model, raw_model, optimizer, batch_loader(rt, counting_skips(world, make), first, iters),
                lr_at, first, iters,
                tokens_per_step=cfg.batch_size * cfg.block_size, log_interval=cfg.log_interval,
                grad_clip=cfg.grad_clip, peak_flops=cfg.peak_flops, max_bad_steps=cfg.max_bad_steps,
                on_step=periodic_checkpoints(cfg, rt, 'finetune', raw_model, optimizer, info_at, iters))
    finish_stage(cfg, rt, 'finetune', folder, raw_model, optimizer, info_at(iters))


def summary(cfg):
    """The stable scores of the text checkpoint at the injection point and of each later stage, as a table."""
    rows = [('text ' + frac_name(cfg.image_inject_frac), os.path.join(cfg.text_out_dir, frac_name(cfg.image_inject_frac))),
            ('image', os.path.join(cfg.out_dir, 'image')), ('finetune', os.path.join(cfg.out_dir, 'finetune'))]
    fmt = lambda r, k: ('n/a' if r.get(k) is None else f"{r[k]:.3f} [{r[k + '_ci95'][0]:+.3f}, {r[k + '_ci95'][1]:+.3f}]")
    lines = [f"{'checkpoint':<16}{'vision':<26}{'vision (blind)':<26}{'text':<26}"]
    for name, path in rows:
        path = os.path.join(path, 'eval.json')
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            lines.append(f"{name:<16}{fmt(r, 'vision_stable_score'):<26}{fmt(r, 'vision_blind_stable_score'):<26}"
                         f"{fmt(r, 'text_stable_score'):<26}")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------

def main(cfg):
    rt = setup_runtime(cfg)
    t0 = time.time()
    try:
        stages = cfg.stages.split(',')
        for stage in stages:
            {'text': train_text, 'image': train_image, 'finetune': train_finetune}[stage](cfg, rt)
        table = summary(cfg)
        if rt.master and stages != ['text'] and table.count('\n'):  # a row below the header: a stage was scored
            print(f'\nstable scores with 95% intervals ({cfg.out_dir}):\n{table}')
        log(rt, f'done in {format_time(time.time() - t0)}')
    finally:
        if rt.ddp:
            dist.destroy_process_group()


if __name__ == '__main__':
    try:
        config = get_config(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    try:
        main(config)
    except (ConfigError, TrainingError) as e:
        sys.exit(f'error: {e}')
