"""
The runtime of a training run: device and process group, precision, DDP / FSDP / torch.compile around the model,
the DataLoader of a stage's micro-batches, and rank-0-only logging. train.py's stages use these; none of them knows
about stages.
"""

import os
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from configurator import ConfigError
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
    return SimpleNamespace(ddp=ddp, fsdp=cfg.fsdp, rank=rank, world_size=world_size, master=rank == 0, device=dev,
                           device_type=device_type, autocast=autocast, micro_batch=cfg.batch_size // per_step,
                           micro_steps=cfg.gradient_accumulation_steps, data_workers=workers,
                           grad_checkpoint=cfg.grad_checkpoint, last_checkpoint=None,
                           compile=cfg.compile if cfg.compile is not None else device_type == 'cuda')


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


def format_time(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


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
        return DDP(raw_model, device_ids=[rt.device] if rt.device_type == 'cuda' else None)
    return raw_model
