"""
What a training run runs on: the device and process group (Runtime, fixed for the run), precision, DDP / FSDP /
torch.compile around a model, the DataLoader of a stage's micro-batches, the pieces of an optimizer step that
distributed training changes (scored-target counts, gradient sync, the clipped norm), saving and resuming a stage's
checkpoints, and rank-0 logging (log lines, metrics.jsonl, wandb, the time of each part of a run).

train.py's loop uses these; nothing here knows about stages, images or evaluation.
"""

import json
import math
import os
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from checkpoint import full_state, load_optimizer_state, resume, save_checkpoint, set_rng_state
from configurator import ConfigError
from data import SKIP_REASONS, TOKEN_KINDS
from model import VLM


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss): the message names the step, the stage and what to do."""


@dataclass(frozen=True)
class Runtime:
    """The fixed facts of a run: where it runs, as which rank, in which precision, how a step's batch is split."""
    ddp: bool  # launched by torchrun: one process per rank
    fsdp: bool  # the LM sharded over the ranks (else DDP replicates it)
    rank: int
    world_size: int
    device: str  # 'cpu', 'cuda:0', ...
    device_type: str  # 'cpu' or 'cuda'
    dtype: str  # 'float32' or 'bfloat16' (autocast)
    micro_batch: int  # rows per micro-step per rank
    micro_steps: int  # micro-steps per optimizer step (gradient accumulation)
    data_workers: int  # DataLoader processes
    compile: bool
    grad_checkpoint: bool

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """The precision context of a forward pass: bfloat16 autocast, or nothing for float32."""
        if self.dtype == 'bfloat16':
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return nullcontext()


def setup_runtime(cfg):
    """The device, the process group (under torchrun) and the split of a step's batch over ranks and micro-steps."""
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
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    per_step = world_size * cfg.gradient_accumulation_steps
    if cfg.batch_size % per_step:
        raise ConfigError(f'batch_size={cfg.batch_size} is not divisible by {world_size} ranks x '
                          f'{cfg.gradient_accumulation_steps} gradient_accumulation_steps; make it a multiple of '
                          f'{per_step}')
    return Runtime(ddp=ddp, fsdp=cfg.fsdp, rank=rank, world_size=world_size, device=dev, device_type=device_type,
                   dtype=cfg.dtype if cfg.dtype != 'auto' else ('bfloat16' if device_type == 'cuda' else 'float32'),
                   micro_batch=cfg.batch_size // per_step, micro_steps=cfg.gradient_accumulation_steps,
                   data_workers=cfg.data_workers if cfg.data_workers is not None else (4 if device_type == 'cuda' else 0),
                   compile=cfg.compile if cfg.compile is not None else device_type == 'cuda',
                   grad_checkpoint=cfg.grad_checkpoint)


def close_runtime(rt):
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


@contextmanager
def sigterm_exits():
    """
    Inside it SIGTERM (ablate.py stopping its cell, a scheduler) ends the process as ctrl-C does, by an exception:
    through every finally block on the way out, which give the locks back. A SIGKILL cannot be caught; the kernel
    drops its flocks all the same. Only the main thread may set a handler: elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def log(rt, *args):
    if rt.master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# where a run's time goes

class Clock:
    """The wall time of each part of a run (clock.part('text steps') around a block), parts never overlapping."""

    def __init__(self, start_up=0.0):
        self.times = {'start-up': start_up} if start_up else {}
        self._inner = []  # per open part: the time of the parts inside it, which it does not count

    @contextmanager
    def part(self, name):
        start = time.time()
        self._inner.append(0.0)
        try:
            yield
        finally:
            inner, spent = self._inner.pop(), time.time() - start
            self.times[name] = self.times.get(name, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    def summary(self):
        """The run's time and its parts, longest first, with their shares."""
        total = sum(self.times.values())
        lines = [f'  {part:<24}{format_time(t):>8}{t / max(total, 1e-9):>7.0%}'
                 for part, t in sorted(self.times.items(), key=lambda kv: -kv[1])]
        return '\n'.join([f'done in {format_time(total)}; where the time went:'] + lines +
                         [f'  {"total":<24}{format_time(total):>8}'])

    def save(self, path):
        """{part: seconds} as JSON (ablate.py's table shows each cell's time)."""
        with open(path, 'w') as f:
            json.dump(self.times, f)


def process_age():
    """Seconds since this process started (Linux; 0 elsewhere): a run's start-up includes importing torch."""
    try:
        with open('/proc/self/stat') as f:
            started = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22: start time, in clock ticks since boot
        with open('/proc/uptime') as f:
            return max(0.0, float(f.read().split()[0]) - started / os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError, IndexError):
        return 0.0


def format_time(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


# -----------------------------------------------------------------------------
# a stage's log lines: printed, appended to its metrics.jsonl, sent to wandb

def open_wandb(cfg, rt):
    """A Weights & Biases run when wandb_log is on (rank 0; the package is optional), else None."""
    if not (cfg.wandb_log and rt.master):
        return None
    import wandb  # optional: imported only when switched on
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or cfg.out_dir, config=vars(cfg))


class Metrics:
    """
    A stage's log lines as JSON objects in its metrics.jsonl (rank 0), and with wandb on one step axis over all
    stages (global_step). A stage that starts at step 0 starts a fresh file; a resumed one keeps the lines up to
    the step it resumes from (the lines after it are logged again).
    """

    def __init__(self, rt, path, first, wandb_run=None, step_offset=0):
        self.path = path if rt.master else None
        self.wandb, self.step_offset = wandb_run, step_offset
        if self.path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kept = []
        if first and os.path.exists(path):
            with open(path, errors='replace') as f:
                kept = [line.rstrip('\n') + '\n' for line in f if Metrics.step_of(line) <= first]
        with open(path, 'w') as f:
            f.writelines(kept)

    @staticmethod
    def step_of(line):
        """The step of a line of metrics.jsonl; infinity (dropped on resume) for one a kill tore, or not a record."""
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return math.inf
        step = record.get('step') if isinstance(record, dict) else None
        return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf

    def record(self, **values):
        if self.path is None:
            return
        values['global_step'] = self.step_offset + values['step']
        with open(self.path, 'a') as f:
            f.write(json.dumps(values) + '\n')
        if self.wandb is not None:
            self.wandb.log({f"{values['stage']}/{k}": v for k, v in values.items() if k not in ('stage', 'step')
                            and isinstance(v, (int, float))}, step=values['global_step'])


def tally_counts(rt, tally):
    """
    ({reason: n} of the samples skipped so far, {kind: share} of the tokens so far), each summed over the ranks
    (each rank builds its own rows) in one all-reduce. The tokens are tallied by the image stage (data.token_kinds).
    """
    keys = SKIP_REASONS + TOKEN_KINDS
    unknown = set(tally) - set(keys)
    if unknown:
        raise ValueError(f'tally keys {unknown} are neither in data.SKIP_REASONS nor in data.TOKEN_KINDS')
    counts = torch.tensor([float(tally[k]) for k in keys], device=rt.device)
    if rt.ddp:
        dist.all_reduce(counts)
    counts = dict(zip(keys, counts.tolist()))
    tokens = sum(counts[k] for k in TOKEN_KINDS)
    return ({r: int(counts[r]) for r in SKIP_REASONS if counts[r]},
            {k: counts[k] / tokens for k in TOKEN_KINDS} if tokens else {})


class Progress:
    """A stage's log lines: loss, LR, tokens/s, MFU, data wait, ETA, skipped samples and token shares since the last."""

    def __init__(self, rt, stage, first, last, raw_model, tokens_per_step, peak_flops):
        self.rt, self.stage, self.first, self.last = rt, stage, first, last
        self.raw_model, self.tokens_per_step, self.peak_flops = raw_model, tokens_per_step, peak_flops
        self.t_start = self.t_last = time.time()
        self.step_last, self.losses, self.waited, self.tally = first, [], 0.0, Counter()

    def next(self, batches, n):
        """The next n micro-batches, the time spent waiting for them counted, their tallies added up."""
        t = time.time()
        micro_batches = [next(batches) for _ in range(n)]
        self.waited += time.time() - t
        for batch in micro_batches:
            self.tally.update(batch[3])
        return micro_batches

    def line(self, done, optimizer, metrics):
        rt, now = self.rt, time.time()
        lr = optimizer.param_groups[0]['lr']
        encoder_lr = next((g['lr'] for g in optimizer.param_groups if g['schedule'] == 'encoder'), None)
        tok_s = self.tokens_per_step * (done - self.step_last) / (now - self.t_last)
        mfu = self.raw_model.estimate_mfu(tok_s, self.peak_flops or None)
        mean_loss = torch.stack(self.losses).mean().item() if self.losses else float('nan')  # nan: every step was bad
        (skips, shares), wait = tally_counts(rt, self.tally), self.waited / (now - self.t_last)
        log(rt, f'{self.stage} step {done}/{self.last} | loss {mean_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | '
                f'mfu {"n/a" if mfu is None else f"{mfu:.1%}"} | data wait {wait:.0%} | '
                f'eta {format_time((self.last - done) * (now - self.t_start) / (done - self.first))}' +
                (' | tokens so far: ' + ', '.join(f'{k} {v:.1%}' for k, v in shares.items()) if shares else '') +
                (' | skipped so far: ' + ', '.join(f'{k} {n:,}' for k, n in skips.items()) if skips else ''))
        metrics.record(stage=self.stage, step=done, loss=mean_loss, lr=lr,
                       **({'encoder_lr': encoder_lr} if encoder_lr is not None else {}),
                       tokens_per_s=tok_s, mfu=mfu, data_wait=wait, skipped=skips,
                       **({'token_shares': shares} if shares else {}))
        self.t_last, self.step_last, self.losses, self.waited = now, done, [], 0.0


# -----------------------------------------------------------------------------
# batches, and the parts of an optimizer step that distributed training changes

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


def to_device(rt, x, y, inputs):
    return (x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True),
            {k: v.to(rt.device, non_blocking=True) for k, v in inputs.items()})


def scored_targets(rt, micro_batches):
    """Each micro-batch's scored targets (y != -1) and their total over every rank and micro-step of the step."""
    counts = [(y != -1).sum().item() for _, y, _, _ in micro_batches]
    total = torch.tensor(float(sum(counts)), device=rt.device)
    if rt.ddp:
        dist.all_reduce(total)
    return counts, total.clamp(min=1)


@contextmanager
def gradient_sync(model, now):
    """Reduce the gradients over the ranks after this backward pass only when `now` (a step's last micro-step):
    the others accumulate locally (DDP's no_sync, FSDP's requires_gradient_sync)."""
    if now:
        yield
        return
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


def clip_grad_norm(model, max_norm):
    """The global gradient norm before clipping to max_norm (0: no clipping), the same float on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float('inf'))
    return (norm.full_tensor() if hasattr(norm, 'full_tensor') else norm).item()  # FSDP: a DTensor


@torch.no_grad()
def mean_loss(rt, model, batches):
    """The mean loss of model over batches of (inputs, targets), in eval mode and eager (no second compile for a
    graph without gradients), the model put back in train mode after."""
    model.eval()
    losses = []
    with torch.compiler.set_stance('force_eager'):
        for x, y in batches:
            with rt.autocast():
                losses.append(model(x.to(rt.device), y.to(rt.device))[1].item())
    model.train()
    return sum(losses) / len(losses)


def compile_count():
    """Graphs torch.compile has made in this process: each recompile and each graph break adds one."""
    return torch._dynamo.utils.counters['stats']['unique_graphs']


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


# -----------------------------------------------------------------------------
# a stage's checkpoints

def save_stage_checkpoint(rt, folder, raw_model, optimizer, info, last_good, files=()):
    """
    Every rank gathers (FSDP), rank 0 writes (with copies of files, such as the stage's metrics.jsonl). The folder
    becomes the stage's last good checkpoint, so weights that are not finite (a step applied with a NaN update) stop
    the run instead, naming last_good: every rank checks its own.
    """
    finite = torch.tensor(float(all(bool(torch.isfinite(p.to_local() if hasattr(p, 'to_local') else p).all())
                                    for p in raw_model.parameters())), device=rt.device)
    if rt.ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise TrainingError(f'{info["stage"]} stage, step {info["step"]}: the weights hold NaN or inf, so {folder} was '
                            f'not written. The last good checkpoint is {last_good or "none"}; resume from it '
                            f'with init_from=resume and a lower learning rate')
    weights, optimizer_state = full_state(raw_model, optimizer)
    if rt.master:
        save_checkpoint(folder, weights, optimizer_state, info, files)


def start_training(rt, stage, raw_model, make_optimizer, found, made_by, allow_stale):
    """
    The module to train and its optimizer (make_optimizer()), resumed from the newest of the finished
    checkpoints `found` ([(step, path)], init_from='resume'; none: from step 0): its weights loaded into raw_model
    first (checkpoint.resume, which checks its fingerprint), then the model wrapped (wrap_model), the optimizer built
    on the wrapped parameters and given its state, and the RNGs set. Returns (model, optimizer, first step, the
    checkpoint it resumed from or None).
    """
    first, folder, state = 0, None, None
    if found:
        first, folder, state = resume(found, made_by, raw_model, allow_stale, warn=lambda m: log(rt, m))
        log(rt, f'{stage} stage: resuming from {folder} at step {first}')
    model = wrap_model(rt, raw_model)
    optimizer = make_optimizer()
    if state is not None:
        load_optimizer_state(raw_model, optimizer, state['optimizer'], sharded=rt.fsdp)
        set_rng_state(state['rng'])
    return model, optimizer, first, folder


def bad_step(rt, stage, done, loss, norm, last_good, bad_steps, max_bad_steps):
    """A step whose loss or gradient is not finite, the run's bad_steps-th, was skipped: said, and bad_steps
    returned; past max_bad_steps a TrainingError instead."""
    if bad_steps > max_bad_steps:
        last = last_good or 'none (none written yet)'
        raise TrainingError(f'{stage} stage, step {done}: the loss or its gradient is not finite (loss {loss.item()}, '
                            f'gradient norm {norm}). The last good checkpoint is {last}; nothing after it was written. '
                            f'Resume from it with init_from=resume (a lower learning rate or grad_clip may help), or '
                            f'set max_bad_steps to skip such batches')
    log(rt, f'{stage} step {done}: non-finite loss or gradient, batch skipped ({bad_steps} of '
            f'max_bad_steps={max_bad_steps})')
    return bad_steps
