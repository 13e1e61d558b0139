"""
Benchmark the training step: tokens/s, MFU and peak memory, eager and torch.compiled, on random tokens.

    python bench.py                                  # the demo LM on this machine, eager and compiled
    python bench.py --encoder=siglip                 # the demo VLM: encoder unfrozen, frozen, frozen + cached features
    python bench.py --model=79m --block_size=2048 --batch_size=16 --vocab_size=50304 --device=cuda
    python bench.py --model=1b --block_size=2048 --batch_size=4 --vocab_size=50304 --modes=compiled
    python bench.py --nanogpt=../nanoGPT/model.py          # our LM beside nanoGPT's at the same shapes, eager, CPU

MFU is measured against a peak: on CUDA the datasheet's dense bf16 figure (model.PEAK_FLOPS), and in every case the
matmul throughput this device really reaches, measured here first, so a CPU gets an MFU too. On CUDA the step runs
in bf16 autocast with fused AdamW, and attention is held to the flash kernel of SDPA (an error if it cannot be used).
Each mode reports the graphs torch.compile made during it: 1 for a compiled mode (no recompiles, no graph breaks).
"""

import resource
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import configure, script_config
from encoders import build_encoder
from model import GPT, PRESETS, VLM, GPTConfig, device_peak_flops
from runtime import compile_count

# -----------------------------------------------------------------------------
# config for `python bench.py`
model = 'demo'  # a preset of model.PRESETS: demo, 79m, 1b
block_size = 256  # context length of the random batches
batch_size = 16  # sequences per step
vocab_size = 320  # 320: the byte vocabulary of the shapes world; 50304: GPT-2's, padded
device = 'auto'  # 'auto' (cuda when available), 'cpu', 'cuda'
dtype = 'auto'  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float32'
steps = 10  # timed steps per mode
warmup = 3  # untimed steps first (compilation, allocator)
modes = ''  # comma-separated: eager, compiled (LM); unfrozen, frozen, cached (VLM); '': all of the model's
encoder = ''  # an encoder of encoders.ENCODERS: time the VLM step with images; '': the LM alone
encoder_scale = 'tiny'  # 'tiny' or 'paper'
images_per_row = 2  # images at the start of every row of the VLM's batch
grad_checkpoint = False  # recompute each block's activations in the backward pass
seed = 0  # of the random weights and batches
nanogpt = ''  # path to nanoGPT's model.py: time its GPT beside ours, same shapes, steps interleaved (eager)
# -----------------------------------------------------------------------------
IMAGE_TOKEN = 257


def measured_peak_flops(device, dtype, repeats=10):
    """FLOP/s of a large square matmul: the most this device does in practice."""
    n = 8192 if device.type == 'cuda' else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def bench_step(model, optimizer, x, autocast, steps, warmup, sync, **inputs):
    """Seconds per training step, after warmup steps (which include compilation)."""
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t = time.perf_counter()
        with autocast:
            _, loss = model(x, x, **inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t) / steps


def matmul_flops_per_token(model, block_size, n_layer, n_embd):
    """6 FLOPs per weight of every matmul (the input embedding is a lookup) plus attention's 12 * L * d * T."""
    names = dict(model.named_parameters())
    weights = sum(p.numel() for n, p in names.items() if p.dim() == 2 and not n.endswith(('wte.weight', 'wpe.weight')))
    if 'lm_head.weight' not in names:  # tied to the input embedding: it is a matmul all the same
        weights += names['transformer.wte.weight'].numel()
    return 6 * weights + 12 * n_layer * n_embd * block_size


def against_nanogpt(cfg, path, rounds=20):
    """Our GPT and nanoGPT's at the same shapes on the CPU, eager, one step of each in turn (machine noise hits
    both alike); prints the medians, the FLOPs per token of each and the ratio of their FLOP/s."""
    import importlib.util
    import statistics
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    torch.manual_seed(cfg['seed'])
    shape = dict(block_size=cfg['block_size'], vocab_size=cfg['vocab_size'], **PRESETS[cfg['model']])
    models = {'nanoVLP': GPT(GPTConfig(**shape)), 'nanoGPT': theirs.GPT(theirs.GPTConfig(**shape, dropout=0.0, bias=False))}
    x = torch.randint(0, min(256, cfg['vocab_size']), (cfg['batch_size'], cfg['block_size']))
    times = {name: [] for name in models}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
                  for name, m in models.items()}
    for i in range(cfg['warmup'] + rounds):
        for name, m in models.items():
            times[name].append(bench_step(m, optimizers[name], x, nullcontext(), 1, 0, lambda: None))
    flop_s = {}
    for name, m in models.items():
        dt = statistics.median(times[name][cfg['warmup']:])
        flops = matmul_flops_per_token(m, cfg['block_size'], shape['n_layer'], shape['n_embd'])
        flop_s[name] = flops * cfg['batch_size'] * cfg['block_size'] / dt
        print(f'{name}: {dt * 1000:.1f} ms/step, {flops / 1e6:.2f} MFLOP/token, {flop_s[name] / 1e9:.1f} GFLOP/s')
    print(f'nanoVLP reaches {flop_s["nanoVLP"] / flop_s["nanoGPT"]:.2f}x nanoGPT\'s FLOP/s '
          f'({torch.get_num_threads()} threads, eager, median of {rounds} interleaved steps)')


def main(cfg):
    if cfg['nanogpt']:
        return against_nanogpt(cfg, cfg['nanogpt'])
    dev = torch.device(cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu'))
    dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else ('bfloat16' if dev.type == 'cuda' else 'float32')
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
    flash = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION) if dev.type == 'cuda' and dtype == 'bfloat16' else nullcontext()
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    peak = measured_peak_flops(dev, getattr(torch, dtype))
    sheet = device_peak_flops(dev)
    print(f'device {dev} ({torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"}), '
          f'{dtype}: measured matmul peak {peak / 1e12:.3f} TFLOP/s'
          + (f', datasheet {sheet / 1e12:.0f} TFLOP/s' if sheet else '')
          + (', fused AdamW, flash attention' if dev.type == 'cuda' else ''))
    modes = cfg['modes'] or ('unfrozen,frozen,cached' if cfg['encoder'] else 'eager,compiled')
    for mode in modes.split(','):
        torch.manual_seed(cfg['seed'])
        gpt = GPT(GPTConfig(block_size=cfg['block_size'], vocab_size=cfg['vocab_size'], **PRESETS[cfg['model']]))
        x = torch.randint(0, 256, (cfg['batch_size'], cfg['block_size']), device=dev)
        inputs, n_images = {}, 0
        if cfg['encoder']:
            enc = build_encoder(cfg['encoder'], cfg['encoder_scale'], freeze=mode != 'unfrozen')
            gpt = VLM(gpt, enc, IMAGE_TOKEN)
            n_images = cfg['batch_size'] * cfg['images_per_row']
            x[:, :cfg['images_per_row'] * enc.num_tokens] = IMAGE_TOKEN  # each row starts with its images
            images = torch.randint(0, 256, (n_images, enc.img_size, enc.img_size, 3), dtype=torch.uint8, device=dev)
            if mode == 'cached':  # what a feature cache hands the step: float16 features, no encoder call
                inputs['features'] = enc.to(dev).encode(images).half()
            else:
                inputs['images'] = images
        gpt = gpt.to(dev)
        lm = gpt.gpt if isinstance(gpt, VLM) else gpt
        lm.grad_checkpoint = cfg['grad_checkpoint']
        extra = {'encoder_lr': 1e-4} if cfg['encoder'] else {}
        optimizer = gpt.configure_optimizers(0.1, 1e-4, (0.9, 0.95), dev.type, **extra)
        if mode == 'compiled':
            lm.compile()  # as train.py does: the LM in place, an encoder eager
        if dev.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(dev)
        compiles = compile_count()
        with flash():
            dt = bench_step(gpt, optimizer, x, autocast, cfg['steps'], cfg['warmup'], sync, **inputs)
        compiles = compile_count() - compiles
        tok_s = cfg['batch_size'] * cfg['block_size'] / dt
        if dev.type == 'cuda':
            mem = f'peak memory {torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB'
        else:  # the process's high-water mark so far: an upper bound for this mode
            mem = f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB'
        name = cfg['model'] + (f' + {cfg["encoder"]}' if cfg['encoder'] else '')
        line = (f'{name} {mode:>8}: {gpt.num_params() / 1e6:.2f}M params | {dt * 1000:.1f} ms/step | '
                f'{tok_s:,.0f} tok/s' + (f' | {n_images / dt:,.0f} images/s' if n_images else '') +
                f' | LM MFU {gpt.estimate_mfu(tok_s, peak):.1%} of measured peak')
        if sheet:
            line += f', {gpt.estimate_mfu(tok_s, sheet):.1%} of datasheet'
        print(line + f' | {mem} | graphs compiled {compiles}')


if __name__ == '__main__':
    main(configure(sys.argv[1:], script_config(globals()), source=__file__))
