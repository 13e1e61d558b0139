"""
Train nanoVLP stage by stage: text pre-training, then (with an image encoder) image injection and instruction
fine-tuning, each checkpoint scored as it is saved.

    python train.py --stages=text                      # text pre-training on the shapes world: out/text/ckpt_020 ...
    python train.py config/dino_siglip_unfrozen.py     # one cell of the encoder ablation
    torchrun --standalone --nproc_per_node=2 train.py  # DDP: nccl on CUDA, gloo on CPU
    python train.py --help                             # every key below, its default and its comment

Top to bottom: the config keys; the LR schedules (the paper's injection rule); the stages, each a function stating
its model, batches, length and LR (a Stage), and their table (STAGES); the one loop every stage runs through
(train_stage: batch, forward, backward, clip, step, LR, log, checkpoint, evaluate); main.
"""

import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

import data
import prepare
import runtime
from checkpoint import StaleCheckpoint, check_fingerprint, finished_checkpoints, is_checkpoint, load_model, prune
from configurator import ConfigError, config_class, configure, script_config
from encoders import ENCODERS, build_encoder
from eval import saved_scores, stable_score_table
from locks import FolderLocked, acquire_lock, release_lock
from model import GPT, PRESETS, VLM, GPTConfig
from prepare import checkpoint_of, frac_name, frac_step, stage_outputs, steps_dir
from runtime import Clock, Metrics, Progress, TrainingError, log

# -----------------------------------------------------------------------------
# config: every key of a run, its default and what it means (prepare.check_config holds them to their ranges)

# I/O
out_dir = 'out'  # this run's image and finetune stages write to {out_dir}/image and {out_dir}/finetune
text_out_dir = 'out/text'  # the text stage's checkpoints; ablation cells that share it share one text stage
image_out_dir = ''  # the image stage's image/ and image_steps/ ('': out_dir); cells differing only in finetuning share it
stages = 'text,image,finetune'  # comma-separated stages to run, in order; each starts from the one before it
init_from = 'scratch'  # 'scratch', or 'resume': continue an interrupted stage from its newest checkpoint
allow_stale = False  # reuse a finished stage although its fingerprint differs (other code, data or settings)
evaluate = 'all'  # the stages whose saved checkpoints are scored (eval.json): 'all', some ('finetune') or ''
eval_interval = 100  # steps between validation-loss estimates
eval_iters = 10  # batches per validation-loss estimate
eval_items = 500  # items scored per vision task of the shapes world (the same first ones every time; up to 1000)
text_eval_items = 1000  # items scored per text task (scoring by likelihood is cheap: all of them, by default)
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
image_inject_frac = 0.8  # the image injection point: a value of save_fracs, or 0: images from scratch (no text stage)
text_checkpoint = ''  # start the image stage from this text checkpoint (import_lm.py's) instead of text_out_dir's
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
caption_form = 'sentences'  # their captions: 'sentences' (scored whole) or 'questions' (facts, answers scored)
conversations = 6000  # shapes-world instruction conversations (fine-tuning, and instruct_ratio in the image stage)

# finetune stage
finetune_epochs = 6  # passes over the instruction conversations (config/ablate_finetune_epochs.py sweeps 1, 2, 3, 4, 6)
finetune_conversations = 0  # fine-tune on the first this many of them (0: all): the fine-tuning set's size
finetune_lr = 1e-3  # peak LR of fine-tuning (re-warmed)
finetune_text_ratio = 0.25  # fraction of each fine-tuning batch that is plain text, so text is not forgotten
finetune_rehearsal = False  # those rows rehearse the image stage's mixture: captions at its share of rows, then text

# system
device = 'auto'  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float32'
compile = None  # torch.compile the LM (once per stage: every batch has the same shapes); None: on for CUDA only
fsdp = False  # under torchrun, shard the LM (and a trainable encoder) over the ranks with FSDP: for 1b and larger
grad_checkpoint = False  # recompute each block's activations in the backward pass: less memory, about 1/3 more compute
data_workers = None  # DataLoader processes building batches ahead of the step; None: 4 on CUDA, 0 on CPU
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 looks it up (A100, H100) or leaves MFU out (CPU)
seed = 1337  # every stage's initialization and batches (the image and finetune stages', and the others' by default)
text_seed = None  # the text stage's initialization and batches; None: seed
encoder_seed = None  # the shapes encoders' pre-training run (encoder_weights='shapes'); None: seed
# -----------------------------------------------------------------------------

Config = config_class('Config', script_config(globals()), {'compile': bool, 'data_workers': int, 'text_seed': int,
                                                          'encoder_seed': int})


def get_config(args):
    """Defaults, then config files and --key=value flags, then every check that needs no compute."""
    cfg = Config(**configure(args, script_config(globals()), source=__file__, types=Config.__annotations__))
    cfg.text_seed, cfg.encoder_seed = (cfg.seed if s is None else s for s in (cfg.text_seed, cfg.encoder_seed))
    names = cfg.stages.split(',')
    for key, value in (('stages', cfg.stages), ('evaluate', cfg.evaluate)):
        if not set(value.split(',')) - {'', 'all'} <= set(STAGES):
            raise ConfigError(f'{key}={value!r}: unknown stage {sorted(set(value.split(",")) - set(STAGES))[0]!r}; '
                              f'the stages are {", ".join(STAGES)}')
    prepare.check_config(cfg, reads_images=any(STAGES[name].reads_images for name in names))  # ranges, choices, files
    before = STAGES[names[0]].after  # the first stage's input must exist already
    if before and not from_scratch(cfg, names[0]) and not is_checkpoint(checkpoint_of(cfg, before)):
        raise ConfigError(f'{checkpoint_of(cfg, before)} does not exist: run the {before} stage first (the default '
                          f'stages=text,image,finetune runs each in turn)')
    return cfg


# -----------------------------------------------------------------------------
# the learning rate: each schedule is a function of the step that returns the LR itself

def cosine_lr(step, peak, warmup, total, floor):
    """Linear warmup to peak over `warmup` steps (none for 0), then a cosine down to floor at step `total`."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def text_schedule(cfg):
    return lambda step: cosine_lr(step, cfg.learning_rate, cfg.warmup_iters, cfg.text_iters, cfg.min_lr)


def image_schedule(cfg):
    """
    The paper's injection rule. Injected before the end of the text run (0 < frac < 1), images continue its schedule:
    from the LR it had reached at the injection step, a cosine to min_lr over the image steps, the cooldown it would
    have had. Into the fully trained LM (frac 1.0): re-warm to image_lr, then down. From scratch (0): the text's own.
    """
    if cfg.image_inject_frac == 0:
        return lambda step: cosine_lr(step, cfg.learning_rate, cfg.warmup_iters, cfg.image_iters, cfg.min_lr)
    if cfg.image_inject_frac == 1.0:
        return lambda step: cosine_lr(step, cfg.image_lr, cfg.rewarm_iters, cfg.image_iters, cfg.min_lr)
    reached, floor = prepare.injection_lr(cfg, cosine_lr)  # text_checkpoint: the schedule of the run that made it
    return lambda step: cosine_lr(step, reached, 0, cfg.image_iters, floor)


def encoder_schedule(cfg, iters, lm_schedule):
    """
    A trained encoder's LR: a pre-trained one re-warms over rewarm_iters (its first gradients come through a random
    projector) to encoder_lr, then a cosine to encoder_lr * min_lr / learning_rate, not the tail of the LM's cooldown;
    one learned from scratch (patch) is a new part like the projector: the LM's schedule.
    """
    if not ENCODERS[cfg.encoder].pretrained:
        return lm_schedule
    floor = cfg.encoder_lr * cfg.min_lr / cfg.learning_rate
    return lambda step: cosine_lr(step, cfg.encoder_lr, cfg.rewarm_iters, iters, floor)


# -----------------------------------------------------------------------------
# the stages: each function states its pieces in a Stage, which train_stage runs

@dataclass
class Stage:
    model: torch.nn.Module  # what trains (a GPT or a VLM), unwrapped: its parameter names are the checkpoint's
    batch: Callable  # (step, rows) -> inputs, targets, model inputs, tally: the rows `rows` (a slice) of step's batch
    iters: int  # optimizer steps
    lr: Callable  # step -> the LR of the LM and the projector
    encoder_lr: Optional[Callable] = None  # step -> the LR of a trained encoder
    val_loss: Optional[Callable] = None  # () -> the validation loss, every eval_interval steps
    info: dict = field(default_factory=dict)  # what config.json says of the model beyond the run's config

    def optimizer(self, cfg, device_type):
        """AdamW over the trainable parameters, each group tagged with the schedule the loop sets its LR from."""
        encoder = {'encoder_lr': self.encoder_lr(0)} if self.encoder_lr else {}
        return self.model.configure_optimizers(cfg.weight_decay, self.lr(0), (cfg.beta1, cfg.beta2), device_type,
                                               **encoder)


def new_gpt(cfg, rt, prep, seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=data.padded_vocab_size(prep.enc), qk_norm=cfg.qk_norm,
                         tie_embeddings=cfg.tie_embeddings, **PRESETS[cfg.model])).to(rt.device)


def text_stage(cfg, rt, prep):
    gpt = new_gpt(cfg, rt, prep, cfg.text_seed)
    log(rt, f'text stage: {cfg.model} GPT, {gpt.num_params():,} parameters '
            f'({gpt.num_params(non_embedding=True):,} without the input embedding)')
    train_tokens, val_tokens = data.open_shard(prep.folder, 'train'), data.open_shard(prep.folder, 'val')

    def batch(step, rows):
        x, y = data.text_batch(train_tokens, cfg.batch_size, cfg.block_size,
                               data.seeded_generator(cfg.text_seed, step), rows)
        return x, y, {}, Counter()

    def val_loss():  # the same batches every time, so the curve compares like with like
        gen = torch.Generator().manual_seed(0)
        return runtime.mean_loss(rt, gpt, (data.text_batch(val_tokens, rt.micro_batch, cfg.block_size, gen)
                                           for _ in range(cfg.eval_iters)))

    return Stage(gpt, batch, cfg.text_iters, text_schedule(cfg), val_loss=val_loss,
                 info={'model_args': asdict(gpt.config)})


def image_stage(cfg, rt, prep):
    if from_scratch(cfg, 'image'):
        text_ckpt, gpt = 'a new LM (images from scratch)', new_gpt(cfg, rt, prep, cfg.seed)
    else:
        text_ckpt, gpt = stage_input(cfg, rt, prep, 'image')
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg.encoder, cfg.encoder_scale, prep.weights, freeze=cfg.freeze_encoder)
    vlm = VLM(gpt, encoder, data.special_id(prep.enc, '<|image|>'), cfg.projector, cfg.image_inject_layer).to(rt.device)
    log(rt, f'image stage: {cfg.encoder} ({"frozen" if encoder.frozen else "trained"}, {encoder.num_tokens} tokens '
            f'x {encoder.dim}) into {text_ckpt}, {cfg.image_iters} steps at image ratio {cfg.image_ratio}')
    features, text_tokens = prepare.feature_cache(cfg, prep, encoder), data.open_shard(prep.folder, 'train')
    row_ratio = prepare.caption_row_ratio(cfg, prep, encoder.num_tokens, verbose=rt.master)

    def batch(step, rows):
        x, y, refs = data.mixture_batch(prep.source, prep.enc, text_tokens, cfg.batch_size, cfg.block_size,
                                        encoder.num_tokens, row_ratio, cfg.instruct_ratio,
                                        data.seeded_generator(cfg.seed + 1, step), rows)
        return x, y, data.batch_inputs(prep.source, features, refs), data.token_kinds(x, y, prep.enc)

    lr = image_schedule(cfg)
    return Stage(vlm, data.counting_skips(prep.source, batch), cfg.image_iters, lr,
                 encoder_schedule(cfg, cfg.image_iters, lr), info=prepare.vlm_info(cfg, vlm))


def finetune_stage(cfg, rt, prep):
    torch.manual_seed(cfg.seed)
    vlm = stage_input(cfg, rt, prep, 'finetune')[1].train()
    n_image_tokens, source, enc = vlm.encoder.num_tokens, prep.source, prep.enc
    features, text_tokens = prepare.feature_cache(cfg, prep, vlm.encoder), data.open_shard(prep.folder, 'train')
    epochs = data.finetune_plan(source, enc, cfg.block_size, n_image_tokens, cfg.finetune_epochs, cfg.seed + 2,
                                cfg.finetune_conversations, verbose=rt.master)
    n_conv, n_text, steps_per_epoch = data.finetune_split(len(epochs[0]), cfg.batch_size, cfg.finetune_text_ratio)
    iters = steps_per_epoch * cfg.finetune_epochs
    captions = prepare.caption_row_ratio(cfg, prep, n_image_tokens) if cfg.finetune_rehearsal else 0.0
    log(rt, f'finetune stage: {sum(map(len, epochs[0])):,} conversations in {len(epochs[0])} rows, {cfg.finetune_epochs} '
            f'epochs = {iters} steps of {n_conv} conversation + {n_text} text rows ({captions:.0%} captions)')

    def batch(step, rows):
        epoch, s = divmod(step, steps_per_epoch)
        return data.finetune_batch(source, enc, epochs[epoch][s * n_conv:(s + 1) * n_conv], text_tokens, n_text,
                                   captions, cfg.block_size, n_image_tokens, features,
                                   data.seeded_generator(cfg.seed + 2, step), rows)

    lr = lambda step: cosine_lr(step, cfg.finetune_lr, cfg.rewarm_iters, iters, cfg.min_lr)  # re-warmed
    return Stage(vlm, data.counting_skips(source, batch), iters, lr, encoder_schedule(cfg, iters, lr),
                 info=prepare.vlm_info(cfg, vlm))


@dataclass(frozen=True)
class StageKind:
    build: Callable  # (cfg, rt, prep) -> Stage
    after: Optional[str]  # the stage whose checkpoint it starts from; None: fresh weights
    keys: tuple = ()  # config keys it is the first stage to read: they do not define the stages before it
    reads_images: bool = False  # its fingerprint holds the encoder weights and the image data
    scores_vision: bool = True  # its checkpoint's eval.json has the vision scores (a VLM that has learned to answer)
    code: tuple = ()  # modules beyond prepare.STAGE_CODE whose code decides its checkpoints


# the stages, in the order a run takes them (stages='text,image,finetune'); a new stage is one entry here
STAGES = {
    'text': StageKind(text_stage, after=None),
    'image': StageKind(image_stage, after='text', reads_images=True, scores_vision=False, keys=(
        'seed', 'encoder_seed', 'image_inject_frac', 'image_iters', 'image_ratio', 'image_ratio_of', 'instruct_ratio',
        'image_lr', 'rewarm_iters', 'encoder', 'encoder_scale', 'encoder_weights', 'freeze_encoder', 'encoder_lr',
        'projector', 'image_inject_layer', 'cache_features', 'image_data', 'caption_key', 'instruct_data',
        'instruct_images', 'scene_size', 'caption_scenes', 'caption_form', 'conversations', 'text_checkpoint')),
    'finetune': StageKind(finetune_stage, after='image', reads_images=True, keys=(
        'finetune_epochs', 'finetune_conversations', 'finetune_lr', 'finetune_text_ratio', 'finetune_rehearsal')),
}


def fingerprint(cfg, name, prep):
    """The fingerprint stage `name`'s checkpoints carry: the config keys that define it, its code, data, weights."""
    return prepare.fingerprint(cfg, prep, STAGES, name)


def from_scratch(cfg, name):
    """Whether stage `name` starts from fresh weights: the text stage, and the image stage at image_inject_frac=0."""
    return STAGES[name].after is None or (name == 'image' and cfg.image_inject_frac == 0)


def stage_input(cfg, rt, prep, name):
    """The checkpoint stage `name` starts from, loaded: (folder, model). It must exist and be current."""
    before = STAGES[name].after
    folder = checkpoint_of(cfg, before)
    if not is_checkpoint(folder):
        raise ConfigError(f'{folder} does not exist: run the {before} stage first (stages={before},... with the same '
                          f'settings; the default stages=text,image,finetune runs each in turn)')
    if folder != cfg.text_checkpoint:  # one text_checkpoint names was made by no stage of this run
        check_fingerprint(folder, fingerprint(cfg, before, prep), cfg.allow_stale, warn=lambda m: log(rt, m))
    return folder, load_model(folder, rt.device)[0]  # shapes checked against the file, then its verified weights


# -----------------------------------------------------------------------------
# the training loop: every stage runs through it

def train_stage(cfg, rt, clock, prep, name, wandb_run=None, step_offset=0):
    """Reuse stage `name` when it is finished and current, or build it, resume it where it stopped and train it to its
    end, saving and scoring its checkpoints. Returns the steps it trained (wandb's axis runs over stages)."""
    with clock.part(f'{name} set-up'):
        made_by, folders = fingerprint(cfg, name, prep), stage_outputs(cfg, name)
        finished = [f for f in folders.values() if is_checkpoint(f)]
        for folder in finished:  # another run's checkpoints are never overwritten (nor reused) blind
            check_fingerprint(folder, made_by, cfg.allow_stale, warn=lambda m: log(rt, m))
        if len(finished) == len(folders):
            log(rt, f'{name} stage: already complete in {os.path.dirname(finished[0])}, reusing it')
            return 0
        stage = STAGES[name].build(cfg, rt, prep)
        saves = {frac_step(frac, stage.iters): folder for frac, folder in folders.items()}
        # init_from='resume': from the newest of the stage's periodic checkpoints (and the text stage's save_fracs ones)
        found = [] if cfg.init_from != 'resume' else finished_checkpoints(steps_dir(cfg, name)) + (
            finished_checkpoints(cfg.text_out_dir) if name == 'text' else [])
        model, optimizer, first, last_good = runtime.start_training(
            rt, name, stage.model, lambda: stage.optimizer(cfg, rt.device_type), found, made_by, cfg.allow_stale)
    info = lambda done: {'stage': name, 'step': done, 'iters': stage.iters, 'config': vars(cfg), 'fingerprint': made_by,
                         'tokenizer': prep.enc.name.removeprefix('nanovlp_'), **stage.info}
    metrics = Metrics(rt, os.path.join(cfg.text_out_dir if name == 'text' else steps_dir(cfg, name), 'metrics.jsonl'),
                      first, wandb_run, step_offset)  # an image or finetune stage's go into its checkpoint at the end
    batches = runtime.batch_loader(rt, stage.batch, first, stage.iters)
    progress = Progress(rt, name, first, stage.iters, stage.model, cfg.batch_size * cfg.block_size, cfg.peak_flops)
    bad_steps, compiles = 0, runtime.compile_count() if rt.compile else 0
    with clock.part(f'{name} steps'):
        for step in range(first, stage.iters):
            for group in optimizer.param_groups:  # each param group's LR from its schedule
                group['lr'] = (stage.encoder_lr if group['schedule'] == 'encoder' else stage.lr)(step)
            micro_batches = progress.next(batches, rt.micro_steps)  # built ahead by the DataLoader workers
            # the step's loss is the mean over all its scored targets on every rank and micro-step, each micro-batch's
            # weighted by its share of them: the gradient does not depend on how the batch is split
            counts, total = runtime.scored_targets(rt, micro_batches)
            step_loss = 0.0  # this rank's mean over its scored targets, for the log
            for micro, (x, y, inputs, _) in enumerate(micro_batches):
                x, y, inputs = runtime.to_device(rt, x, y, inputs)
                with runtime.gradient_sync(model, now=micro == len(micro_batches) - 1):
                    with rt.autocast():
                        _, loss = model(x, y, **inputs)
                    # DDP and FSDP average the ranks' gradients: scale by world_size to make that average a sum
                    (loss * (counts[micro] * rt.world_size / total)).backward()
                step_loss = step_loss + loss.detach() * counts[micro] / max(sum(counts), 1)
            # the global gradient norm (a NaN loss makes it NaN) is the same on every rank: all agree on a bad step
            norm, done = runtime.clip_grad_norm(model, cfg.grad_clip), step + 1
            if math.isfinite(norm):
                optimizer.step()
                progress.losses.append(step_loss)
            else:  # skipped; past max_bad_steps a TrainingError
                bad_steps = runtime.bad_step(rt, name, done, loss, norm, last_good, bad_steps + 1, cfg.max_bad_steps)
            optimizer.zero_grad(set_to_none=True)
            if done % cfg.log_interval == 0 or done == stage.iters:
                progress.line(done, optimizer, metrics)
            if stage.val_loss and cfg.eval_interval and (done % cfg.eval_interval == 0 or done == stage.iters):
                loss_val = stage.val_loss()
                log(rt, f'{name} step {done}: val loss {loss_val:.4f}')
                metrics.record(stage=name, step=done, val_loss=loss_val)
            if done in saves or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0):
                # a checkpoint the stage is there to write (saved, then scored), or a periodic one to resume from
                folder = saves.get(done, os.path.join(steps_dir(cfg, name), f'step_{done:06d}'))
                if done == stage.iters:
                    runtime.check_ranks_agree(rt, stage.model)
                with clock.part(f'{name} checkpoints'):  # a stage's own folder carries its curves
                    runtime.save_stage_checkpoint(rt, folder, stage.model, optimizer, info(done), last_good, files=[
                        metrics.path] if done in saves and name != 'text' and rt.master else [])
                    if done not in saves and rt.master:
                        prune(steps_dir(cfg, name), cfg.keep_last, written=folder)  # never this run's own
                last_good = folder
                with clock.part(f'{name} evaluation'):  # rank 0 scores it (eval.json beside it), the others wait
                    if done in saves:  # (evaluate: which stages; the others with python eval.py --ckpt=FOLDER)
                        scored = rt.master and (cfg.evaluate == 'all' or name in cfg.evaluate.split(','))
                        log(rt, f'{name} stage: saved {folder} | ' + (saved_scores(folder, cfg, rt.device, STAGES[
                            name].scores_vision) if scored else f'not scored (evaluate={cfg.evaluate})'))
                    runtime.barrier(rt)
    if rt.compile:
        log(rt, f'{name} stage: torch.compile made {runtime.compile_count() - compiles} new graph(s)')
    return stage.iters


# -----------------------------------------------------------------------------

def main(cfg):
    rt = runtime.setup_runtime(cfg)
    clock = Clock(start_up=runtime.process_age())  # the interpreter, torch's import, the config
    wandb_run, locks = runtime.open_wandb(cfg, rt), []
    try:
        for folder in sorted({cfg.out_dir, cfg.text_out_dir, cfg.image_out_dir or cfg.out_dir}) if rt.master else ():
            locks.append(acquire_lock(folder))  # one writer per folder: a second run stops here, naming this one
        names, trained = cfg.stages.split(','), 0
        with clock.part('preparation'):  # rank 0 makes what is missing, then the others open it
            images = any(STAGES[name].reads_images for name in names)
            prep = runtime.master_first(rt, lambda: prepare.prepare_run(cfg, images, verbose=rt.master))
        for name in names:
            if name == 'text' and 'image' in names and from_scratch(cfg, 'image'):
                log(rt, 'text stage: not needed, image_inject_frac=0 trains the LM from scratch on the mixture')
                continue
            trained += train_stage(cfg, rt, clock, prep, name, wandb_run, trained)
        table = stable_score_table([(f'text {frac_name(cfg.image_inject_frac)}' if name == 'text' else name,
                                     checkpoint_of(cfg, name)) for name in STAGES], cfg.out_dir)
        log(rt, (table if names != ['text'] else '') + clock.summary())  # times.json: for ablate.py's table
        if rt.master and (trained or not os.path.exists(os.path.join(cfg.out_dir, 'times.json'))):
            clock.save(os.path.join(cfg.out_dir, 'times.json'))  # a run that only reused stages keeps the time
    finally:
        for path in locks:
            release_lock(path)
        if wandb_run is not None:
            wandb_run.finish()
        runtime.close_runtime(rt)


if __name__ == '__main__':
    try:
        config = get_config(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    try:
        with runtime.sigterm_exits():  # ablate.py stopping its cell: the locks are given back on the way out
            main(config)
    except (ConfigError, TrainingError, StaleCheckpoint, FolderLocked) as e:
        sys.exit(f'error: {e}')
