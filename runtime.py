"""
The runtime of a training run: device and process group, precision, DDP / FSDP / torch.compile around the model,
the DataLoader of a stage's micro-batches, the optimizer steps themselves (train_steps: the weighted micro-batch
loss, the non-finite guard every rank agrees on, the log lines) and rank-0-only logging. train.py's stages use
these; none of them knows about stages.
"""

import json
import math
import os
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from checkpoint import full_state, resume, save_checkpoint
from configurator import ConfigError
from data import TOKEN_KINDS
from images import SKIP_REASONS
from model import VLM


def setup_runtime(cfg):
    """Device, DDP process group, autocast context; returns a namespace every stage uses."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = cfg.device if cfg.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    rank, local_rank, world_size = 0, 0, 1
    if cfg.fsdp and not ddp:
        raise ConfigError('fsdp=True shards the model over the ranks that torchrun starts: launch with torchrun '
                          '(--nproc_per_node=1 works too), or set fsdp=False')
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
        dist.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
    device_type = 'cuda' if dev.startswith('cuda') else 'cpu'
    dtype = cfg.dtype if cfg.dtype != 'auto' else ('bfloat16' if device_type == 'cuda' else 'float32')
    if dtype == 'bfloat16':
        autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext()
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    per_step = world_size * cfg.gradient_accumulation_steps
    if cfg.batch_size % per_step:
        raise ConfigError(f'batch_size={cfg.batch_size} is not divisible by {world_size} ranks x '
                          f'{cfg.gradient_accumulation_steps} gradient_accumulation_steps; make it a multiple of '
                          f'{per_step}')
    workers = cfg.data_workers if cfg.data_workers is not None else (4 if device_type == 'cuda' else 0)
    rt = SimpleNamespace(ddp=ddp, fsdp=cfg.fsdp, rank=rank, world_size=world_size, master=rank == 0, device=dev,
                           device_type=device_type, autocast=autocast, micro_batch=cfg.batch_size // per_step,
                           micro_steps=cfg.gradient_accumulation_steps, data_workers=workers,
                           grad_checkpoint=cfg.grad_checkpoint, last_checkpoint=None, times={}, timing=[],
                           metrics_path=None, wandb=None, global_step=0,
                           compile=cfg.compile if cfg.compile is not None else device_type == 'cuda')
    if cfg.wandb_log and rt.master:
        import wandb  # optional: imported only when switched on
        rt.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or cfg.out_dir, config=vars(cfg))
    return rt


def close_runtime(rt):
    if rt.wandb is not None:
        rt.wandb.finish()
    if rt.ddp:
        dist.destroy_process_group()


def barrier(rt):
    if rt.ddp:
        dist.barrier()


def master_first(rt, make):
    """make() on rank 0 first (it may write a cache), then on the other ranks, which read what rank 0 wrote."""
    if rt.master:
        result = make()
    barrier(rt)
    return result if rt.master else make()


def log(rt, *args):
    if rt.master:
        print(*args, flush=True)


@contextmanager
def timed(rt, part):
    """
    Add the wall time of the block to rt.times[part], less the time of the timed blocks inside it: the parts of a
    run do not overlap, so they add up to its whole time.
    """
    start = time.time()
    rt.timing.append(0.0)
    try:
        yield
    finally:
        inner, spent = rt.timing.pop(), time.time() - start
        rt.times[part] = rt.times.get(part, 0.0) + spent - inner
        if rt.timing:
            rt.timing[-1] += spent


def process_age():
    """Seconds since this process started (Linux; 0 elsewhere): a run's start-up includes importing torch."""
    try:
        with open('/proc/self/stat') as f:
            started = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22: start time, in clock ticks since boot
        with open('/proc/uptime') as f:
            return max(0.0, float(f.read().split()[0]) - started / os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError, IndexError):
        return 0.0


def time_table(times):
    """The parts of a run and their wall times, longest first, with their shares and the total."""
    total = sum(times.values())
    lines = [f'  {part:<24}{format_time(t):>8}{t / max(total, 1e-9):>7.0%}'
             for part, t in sorted(times.items(), key=lambda kv: -kv[1])]
    return '\n'.join(lines + [f'  {"total":<24}{format_time(total):>8}'])


def format_time(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def tally_counts(rt, tally):
    """
    ({reason: n} of the samples skipped so far, {kind: share} of the tokens so far), each summed over the ranks
    (each rank builds its own rows) in one all-reduce. The tokens are tallied by the image stage (data.token_kinds).
    """
    keys = SKIP_REASONS + TOKEN_KINDS
    unknown = set(tally) - set(keys)
    if unknown:
        raise ValueError(f'tally keys {unknown} are neither in images.SKIP_REASONS nor in data.TOKEN_KINDS')
    counts = torch.tensor([float(tally[k]) for k in keys], device=rt.device)
    if rt.ddp:
        dist.all_reduce(counts)
    counts = dict(zip(keys, counts.tolist()))
    tokens = sum(counts[k] for k in TOKEN_KINDS)
    return ({r: int(counts[r]) for r in SKIP_REASONS if counts[r]},
            {k: counts[k] / tokens for k in TOKEN_KINDS} if tokens else {})


def start_metrics(rt, path, first):
    """Where a stage's log lines go: a fresh file for a stage that starts at step 0, and for a resumed one the lines
    up to the step it resumes from (the lines after it are logged again)."""
    rt.metrics_path = path
    if not rt.master:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kept = []
    if first and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)['step'] <= first]
    with open(path, 'w') as f:
        f.writelines(kept)


def record(rt, **values):
    """
    One log line's values, appended as a JSON object to the stage's metrics.jsonl (rt.metrics_path) and, with
    wandb_log, sent to Weights & Biases: the curves of a run, for ablate.py's plots and for anyone's.
    """
    if not rt.master:
        return
    if rt.metrics_path:
        with open(rt.metrics_path, 'a') as f:
            f.write(json.dumps(values) + '\n')
    if rt.wandb is not None:
        rt.wandb.log({f"{values['stage']}/{k}": v for k, v in values.items() if k not in ('stage', 'step')
                      and isinstance(v, (int, float))}, step=values['global_step'])


def batch_loader(rt, make, first, last):
    """
    The micro-batches of steps first .. last-1 for this rank, in order. make(step, rows) builds the rows `rows` (a
    slice) of step's global batch of batch_size rows; micro-step m of rank r takes slice m * world_size + r, so any
    split over ranks and micro-steps trains on the batches of a single process. DataLoader workers build them ahead
    of the step (forked: they share the in-memory data).
    """
    def build(i):
        step, micro = divmod(i, rt.micro_steps)
        start = (micro * rt.world_size + rt.rank) * rt.micro_batch
        return make(step, slice(start, start + rt.micro_batch))

    workers = rt.data_workers
    return iter(DataLoader(range(first * rt.micro_steps, last * rt.micro_steps), batch_size=None, collate_fn=build,
                           num_workers=workers, prefetch_factor=4 if workers else None,
                           pin_memory=rt.device_type == 'cuda', multiprocessing_context='fork' if workers else None))


@contextmanager
def no_grad_sync(model):
    """Accumulate this micro-step's gradients locally: no all-reduce (DDP) or reduce-scatter (FSDP) until the last."""
    if isinstance(model, DDP):
        with model.no_sync():
            yield
        return
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)


def compile_count():
    """Graphs torch.compile has made in this process: each recompile and each graph break adds one."""
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def check_ranks_agree(rt, raw_model):
    """Under DDP every rank must hold the same weights: compare a fingerprint of them across ranks."""
    if not rt.ddp or rt.fsdp:  # FSDP ranks hold different shards by design
        return
    fingerprint = sum((i + 1) * p.detach().double().sum() for i, p in enumerate(raw_model.parameters()))
    mine = fingerprint.reshape(1).to(rt.device)
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    if any(not torch.equal(other, mine) for other in every):
        raise RuntimeError(f'the ranks hold different weights: fingerprints {[x.item() for x in every]}')
    log(rt, f'weights identical on all {rt.world_size} ranks')


def wrap_model(rt, raw_model):
    """
    Activation checkpointing, FSDP, torch.compile and DDP around raw_model. All but DDP act in place on its modules,
    so raw_model keeps the parameter names a checkpoint uses; the optimizer is built after this (FSDP replaces the
    parameters by their shards). Returns the module to train.
    """
    gpt = raw_model.gpt if isinstance(raw_model, VLM) else raw_model
    gpt.grad_checkpoint = rt.grad_checkpoint
    if rt.fsdp:
        for block in gpt.blocks:  # one unit per block: only one block's weights are gathered whole at a time
            fully_shard(block)
        fully_shard(gpt)
        if isinstance(raw_model, VLM):
            fully_shard(raw_model.projector)
            if not raw_model.encoder.frozen:  # a frozen encoder stays whole on every rank, outside the optimizer
                fully_shard(raw_model.encoder)
    if rt.compile:
        # the LM only, whose inputs have the same shapes every step (images arrive as a dense splice), so it
        # compiles once per stage; an encoder sees a varying number of images and stays eager. Under FSDP each
        # block is compiled instead, between the hooks that gather its weights: one compile serves them all
        for module in gpt.blocks if rt.fsdp else [gpt]:
            module.compile()
    if rt.ddp and not rt.fsdp:
        # DDP copies a gradient whose strides differ from its bucket view's, and warns. A parameter with a size-1
        # dimension can get one: with a single image in the batch, a ViT's class and register tokens [1, n, d] get a
        # slice of torch.cat's gradient, strided like the whole sequence. Such a gradient is laid out anew on arrival
        for p in raw_model.parameters():
            if p.requires_grad and 1 in p.shape:
                p.register_hook(lambda g, p=p: g if g.stride() == p.stride() else g.new_empty(p.shape).copy_(g))
        return DDP(raw_model, device_ids=[rt.device] if rt.device_type == 'cuda' else None)
    return raw_model


# -----------------------------------------------------------------------------
# the optimizer steps of a stage, and its checkpoints

class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss): the message names the step, the stage and what to do."""


def train_steps(rt, stage, model, raw_model, optimizer, batches, schedules, first, last, on_step, val_loss,
                tokens_per_step, cfg):
    """
    Optimizer steps first .. last-1 on the micro-batches (x, y, inputs, skipped) from batches (batch_loader), where
    skipped counts the samples left out while building it (bad images); schedules[name](step) is the LR factor a
    param group multiplies its peak_lr by, name its 'schedule' ('lm', or 'encoder' for a trained encoder's); on_step(step_done) runs after each step (checkpoints). A step whose gradient is
    not finite is not applied; after max_bad_steps of them the run stops (TrainingError).
    """
    bad_steps = 0
    accum = rt.micro_steps
    t_start, t_last, step_last = time.time(), time.time(), first
    losses, waited, tally = [], 0.0, Counter()
    compiles = compile_count() if rt.compile else 0
    for step in range(first, last):
        for group in optimizer.param_groups:
            group['lr'] = group['peak_lr'] * schedules[group.get('schedule', 'lm')](step)
        t = time.time()
        micro_batches = [next(batches) for _ in range(accum)]
        waited += time.time() - t
        # the step's loss is the mean over all its scored targets, on every rank and micro-step: each micro-batch's
        # mean loss is weighted by its share of them (rows of captions and conversations score unequal numbers),
        # so the gradient does not depend on how the batch is split over ranks and micro-steps
        counts = [(y != -1).sum().item() for _, y, _, _ in micro_batches]
        for batch in micro_batches:
            tally.update(batch[3])
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
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float('inf'))
        norm = norm.full_tensor() if hasattr(norm, 'full_tensor') else norm  # FSDP: a DTensor
        done = step + 1
        if math.isfinite(norm.item()):
            optimizer.step()
            losses.append(step_loss)
        else:
            bad_steps += 1
            if bad_steps > cfg.max_bad_steps:
                raise TrainingError(
                    f'{stage} stage, step {done}: the loss or its gradient is not finite (loss {loss.item()}, gradient '
                    f'norm {norm.item()}). The last good checkpoint is {rt.last_checkpoint or "none (none written yet)"}'
                    f'; nothing after it was written. Resume from it with init_from=resume (a lower learning rate or '
                    f'grad_clip may help), or set max_bad_steps to skip such batches')
            log(rt, f'{stage} step {done}: non-finite loss or gradient, batch skipped '
                    f'({bad_steps} of max_bad_steps={cfg.max_bad_steps})')
        optimizer.zero_grad(set_to_none=True)
        if done % cfg.log_interval == 0 or done == last:
            now = time.time()
            dt = (now - t_last) / (done - step_last)
            tok_s = tokens_per_step / dt
            mfu = raw_model.estimate_mfu(tok_s, cfg.peak_flops or None)
            mean_loss = torch.stack(losses).mean().item() if losses else float('nan')  # nan: every step was bad
            (skips, shares), lr = tally_counts(rt, tally), optimizer.param_groups[0]['lr']
            log(rt, f'{stage} step {done}/{last} | loss {mean_loss:.4f} | lr {lr:.2e} | '
                    f'{tok_s:,.0f} tok/s | mfu {"n/a" if mfu is None else f"{mfu:.1%}"} | '
                    f'data wait {waited / (now - t_last):.0%} | '
                    f'eta {format_time((last - done) * (now - t_start) / (done - first))}' +
                    (' | tokens so far: ' + ', '.join(f'{k} {v:.1%}' for k, v in shares.items()) if shares else '') +
                    (' | skipped so far: ' + ', '.join(f'{k} {n:,}' for k, n in skips.items()) if skips else ''))
            encoder_lr = [g['lr'] for g in optimizer.param_groups if g.get('schedule') == 'encoder' and g['params']]
            record(rt, stage=stage, step=done, global_step=rt.global_step + done, loss=mean_loss, lr=lr,
                   **({'encoder_lr': encoder_lr[0]} if encoder_lr else {}),
                   tokens_per_s=tok_s, mfu=mfu, data_wait=waited / (now - t_last), skipped=skips,
                   **({'token_shares': shares} if shares else {}))
            t_last, step_last, losses, waited = now, done, [], 0.0
        if val_loss is not None and cfg.eval_interval and (done % cfg.eval_interval == 0 or done == last):
            loss_val = val_loss()
            log(rt, f'{stage} step {done}: val loss {loss_val:.4f}')
            record(rt, stage=stage, step=done, global_step=rt.global_step + done, val_loss=loss_val)
        on_step(done)
    rt.global_step += last  # wandb wants one step axis over all stages
    if rt.compile:
        log(rt, f'{stage} stage: torch.compile made {compile_count() - compiles} new graph(s)')


def resume_point(rt, stage, raw_model, made_by, found, allow_stale):
    """
    The newest of a stage's finished checkpoints `found` ([(step, path)]), loaded into raw_model (checkpoint.resume),
    for init_from='resume'. Returns the step to start from and its state.pt (0, None: none to resume from).
    """
    if not found:
        log(rt, f'{stage} stage: no checkpoint to resume from, starting at step 0')
        return 0, None
    step, rt.last_checkpoint, state = resume(found, made_by, raw_model, allow_stale, warn=lambda m: log(rt, m))
    log(rt, f'{stage} stage: resuming from {rt.last_checkpoint} at step {step}')
    return step, state


def save_stage_checkpoint(rt, folder, raw_model, optimizer, info, files=()):
    """
    Every rank gathers (FSDP), rank 0 writes (with copies of files, such as the stage's metrics.jsonl). The folder
    becomes the stage's last good checkpoint, so weights that are not finite (a step applied with a NaN update) stop
    the run instead: every rank checks its own.
    """
    finite = torch.tensor(float(all(bool(torch.isfinite(p.to_local() if hasattr(p, 'to_local') else p).all())
                                    for p in raw_model.parameters())), device=rt.device)
    if rt.ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise TrainingError(f'{info["stage"]} stage, step {info["step"]}: the weights hold NaN or inf, so {folder} was '
                            f'not written. The last good checkpoint is {rt.last_checkpoint or "none"}; resume from it '
                            f'with init_from=resume and a lower learning rate')
    weights, optimizer_state = full_state(raw_model, optimizer)
    if rt.master:
        save_checkpoint(folder, weights, optimizer_state, info, files)
    rt.last_checkpoint = folder
