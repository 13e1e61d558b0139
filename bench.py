"""
Benchmark what a training run spends its time on: the LM's step, the VLM's image-stage step with its encoder, and
the image data pipeline that feeds it.

    python bench.py                                  # the demo LM on this machine, eager and compiled
    python bench.py --encoder=siglip                 # the demo image stage: encoder unfrozen, frozen, frozen + cached
    python bench.py --encoder=siglip --encoder_scale=paper --model=79m --block_size=2048 --vocab_size=50304 \
        --batch_size=10 --device=cuda                # the paper's image stage (on a CPU: --batch_size=2, slowly)
    python bench.py --model=1b --block_size=2048 --batch_size=4 --vocab_size=50304 --modes=compiled
    python bench.py --data='shards/*.tar'            # images/s per DataLoader worker against PIL's own ceiling
    python bench.py --nanogpt=../nanoGPT/model.py    # our LM beside nanoGPT's at the same shapes, eager, CPU
    python bench.py --suite=gpu                      # every GPU figure of docs/performance.md, as its table (< 8 min)

MFU is measured against a peak: on CUDA the datasheet's dense bf16 figure (model.PEAK_FLOPS), and in every case the
matmul throughput this device really reaches, measured here first, so a CPU gets an MFU too. It counts the
encoder's FLOPs where the step runs it (forward; forward and backward when it trains). On CUDA the step runs in
bf16 autocast with fused AdamW, and attention is held to the flash kernel of SDPA (an error if it cannot be used).
Each mode reports the graphs torch.compile made during it: 1 for a compiled mode (no recompiles, no graph breaks).
"""

import io
import math
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

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
encoder = ''  # an encoder of encoders.ENCODERS: time the image stage's step; '': the LM alone
encoder_scale = 'tiny'  # 'tiny' or 'paper' (random weights: the timing is the same)
image_ratio = 0.1  # share of a step's rows that are image-caption rows, as train.py's image_ratio (at least one)
images_per_row = 2  # images in each image-caption row: 2 of SigLIP's 729 tokens and their captions fill 2,048
grad_checkpoint = False  # recompute each block's activations in the backward pass
compile = False  # torch.compile the LM in the image-stage modes too, as train.py does on CUDA (LM alone: 'compiled')
projector = 'mlp'  # the image stage's projector: linear, mlp, fused_mlp (the DINO-SigLIP cells')
seed = 0  # of the random weights and batches
nanogpt = ''  # path to nanoGPT's model.py: time its GPT beside ours, same shapes, steps interleaved (eager)
# the data pipeline (--data): what one DataLoader worker builds per second, and how many a step needs
data = ''  # img2dataset .tar shards (a folder, a glob or one file): time decoding their images at the encoder's size
instruct_data = ''  # a LLaVA json: time building its conversations' rows too
instruct_images = ''  # the folder its image paths start from; '': the json's own folder
tokenizer = 'gpt2'  # of the captions and conversations: 'gpt2' (real data) or 'bytes'
samples = 200  # images (and conversations) timed
step_tokens_per_s = 0.0  # tokens/s per GPU of the training step the workers feed; 0: time the model's LM step here
# the GPU suite (--suite=gpu): every GPU figure of docs/performance.md, as its table, in under 8 minutes on one H100
suite = ''  # 'gpu': the 79m and 1b text steps, the paper's image stage (SigLIP, DINO-SigLIP; frozen, trained), workers
suite_scale = 'paper'  # 'paper' (needs CUDA; without it, says so and exits 0) or 'tiny': the same plan on demo shapes
# -----------------------------------------------------------------------------
IMAGE_TOKEN = 257


def measured_peak_flops(device, dtype, repeats=10, n=None):
    """FLOP/s of a large square matmul (n x n): the most this device does in practice."""
    n = n or (8192 if device.type == 'cuda' else 2048)
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


def encoder_step(encoder, images, autocast, steps, sync):
    """Seconds the encoder's share of a step takes: its forward, and its backward when it trains."""
    for i in range(steps + 1):
        if i == 1:
            sync()
            t = time.perf_counter()
        with autocast:
            out = encoder.encode(images)
        if not encoder.frozen:
            out.float().sum().backward()
    sync()
    encoder.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / steps


def encoder_flops(name, scale, n_images):
    """Forward FLOPs of the encoder on n_images, counted on the meta device (no weights, no compute)."""
    with torch.device('meta'):
        enc = build_encoder(name, scale, 'random', freeze=True)
        pixels = enc.preprocess(torch.zeros(n_images, enc.img_size, enc.img_size, 3, dtype=torch.uint8))
        with FlopCounterMode(display=False) as counter:
            enc(pixels)
    return counter.get_total_flops()


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


# -----------------------------------------------------------------------------
# the training step: the LM alone, or the image stage's VLM

def setup_device(cfg):
    dev = torch.device(cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu'))
    dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else ('bfloat16' if dev.type == 'cuda' else 'float32')
    return SimpleNamespace(
        device=dev, dtype=dtype, sync=torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None),
        autocast=torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext(),
        flash=lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION) if dev.type == 'cuda' and dtype == 'bfloat16'
        else nullcontext())


def build_lm(cfg, d):
    """The LM of cfg's shapes, random, built on the device (a 1b model initialized on the CPU takes a while)."""
    torch.manual_seed(cfg['seed'])
    with torch.device(d.device):
        return GPT(GPTConfig(block_size=cfg['block_size'], vocab_size=cfg['vocab_size'], **PRESETS[cfg['model']]))


def time_mode(cfg, d, mode, lm=None):
    """
    One mode's training step: seconds per step, the images it encodes, the model, and the encoder's seconds. lm: an
    LM built (and compiled) before, trained on here: the GPU suite's image rows share one compiled 79m LM.
    """
    torch.manual_seed(cfg['seed'])
    gpt = lm if lm is not None else build_lm(cfg, d)
    x = torch.randint(0, 256, (cfg['batch_size'], cfg['block_size']), device=d.device)
    inputs, images, enc = {}, None, None
    if cfg['encoder']:
        with torch.device(d.device):
            enc = build_encoder(cfg['encoder'], cfg['encoder_scale'], freeze=mode != 'unfrozen')
            gpt = VLM(gpt, enc, IMAGE_TOKEN, cfg['projector'])
        image_rows = max(1, round(cfg['batch_size'] * cfg['image_ratio']))
        if cfg['images_per_row'] * enc.num_tokens > cfg['block_size']:
            raise SystemExit(f'{cfg["images_per_row"]} images of {enc.num_tokens} tokens do not fit block_size='
                             f'{cfg["block_size"]}')
        x[:image_rows, :cfg['images_per_row'] * enc.num_tokens] = IMAGE_TOKEN  # an image row starts with its images
        images = torch.randint(0, 256, (image_rows * cfg['images_per_row'], enc.img_size, enc.img_size, 3),
                               dtype=torch.uint8, device=d.device)
        if mode == 'cached':  # what a feature cache hands the step: float16 features, no encoder call
            with torch.no_grad():
                inputs['features'] = enc.to(d.device).encode(images).half()
        else:
            inputs['images'] = images
    gpt = gpt.to(d.device)
    raw = gpt.gpt if isinstance(gpt, VLM) else gpt
    raw.grad_checkpoint = cfg['grad_checkpoint']
    extra = {'encoder_lr': 1e-4} if cfg['encoder'] else {}
    optimizer = gpt.configure_optimizers(0.1, 1e-4, (0.9, 0.95), d.device.type, **extra)
    if lm is None and (mode == 'compiled' or cfg['compile']):
        raw.compile()  # as train.py does: the LM in place, an encoder eager
    if d.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(d.device)
    compiles = compile_count()
    with d.flash():
        dt = bench_step(gpt, optimizer, x, d.autocast, cfg['steps'], cfg['warmup'], d.sync, **inputs)
        enc_dt = encoder_step(enc, images, d.autocast, cfg['steps'], d.sync) if enc and mode != 'cached' else 0.0
    n_images = 0 if images is None else len(images)
    return SimpleNamespace(dt=dt, enc_dt=enc_dt, n_images=n_images, model=gpt, compiles=compile_count() - compiles)


def measure(cfg, d, mode, peak, sheet, lm=None):
    """
    One mode's figures (time_mode): tokens/s, images/s, the encoder's share of the step, MFU against the measured
    and the datasheet peak, peak memory, graphs compiled, parameters.
    """
    r = time_mode(cfg, d, mode, lm)
    tokens = cfg['batch_size'] * cfg['block_size']
    # FLOPs of a step: the LM's (6 per weight per token, attention), the encoder's forward where it runs, and
    # twice that again for its backward when it trains (the projector's are a rounding error)
    flops = r.model.flops_per_token() * tokens
    if r.n_images and mode != 'cached':
        flops += encoder_flops(cfg['encoder'], cfg['encoder_scale'], r.n_images) * (3 if mode == 'unfrozen' else 1)
    if d.device.type == 'cuda':
        memory, memory_kind = torch.cuda.max_memory_allocated(d.device) / 2 ** 30, 'peak memory'
    else:  # the process's high-water mark so far: an upper bound for this mode
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 'peak RSS'
    return SimpleNamespace(mode=mode, params=r.model.num_params(), dt=r.dt, tokens_s=tokens / r.dt,
                           images_s=r.n_images / r.dt, encoder_share=r.enc_dt / r.dt if r.n_images else None,
                           mfu=flops / r.dt / peak, mfu_sheet=flops / r.dt / sheet if sheet else None,
                           memory=memory, memory_kind=memory_kind, compiles=r.compiles)


def bench_model(cfg):
    d = setup_device(cfg)
    peak, sheet = report_device(d)
    modes = cfg['modes'] or ('unfrozen,frozen,cached' if cfg['encoder'] else 'eager,compiled')
    for mode in modes.split(','):
        m = measure(cfg, d, mode, peak, sheet)
        name = cfg['model'] + (f' + {cfg["encoder"]}' if cfg['encoder'] else '')
        line = f'{name} {mode:>8}: {m.params / 1e6:.2f}M params | {m.dt * 1000:.1f} ms/step | {m.tokens_s:,.0f} tok/s'
        if m.encoder_share is not None:
            line += f' | {m.images_s:,.2f} images/s | encoder {m.encoder_share:.0%} of the step'
        line += f' | MFU {m.mfu:.1%} of measured peak' + (f', {m.mfu_sheet:.1%} of datasheet' if sheet else '')
        print(line + f' | {m.memory_kind} {m.memory:.2f} GiB | graphs compiled {m.compiles}')


def report_device(d, n=None):
    """Print the device and its peaks; returns (measured matmul peak, datasheet peak or None) in FLOP/s."""
    peak = measured_peak_flops(d.device, getattr(torch, d.dtype), n=n)
    sheet = device_peak_flops(d.device)
    where = torch.cuda.get_device_name(d.device) if d.device.type == 'cuda' else f'{torch.get_num_threads()} threads'
    print(f'device {d.device} ({where}), {d.dtype}: measured matmul peak {peak / 1e12:.3f} TFLOP/s'
          + (f', datasheet {sheet / 1e12:.0f} TFLOP/s' if sheet else '')
          + (', fused AdamW, flash attention' if d.device.type == 'cuda' else ''))
    return peak, sheet


# -----------------------------------------------------------------------------
# the data pipeline: images/s per DataLoader worker, against PIL alone on the same bytes

def pil_ceiling(raw, size):
    """PIL's own decode and resize of one image, nothing else: the most a worker could do per image."""
    from PIL import Image
    img = Image.open(io.BytesIO(raw))
    img.draft('RGB', img.size)  # decode as RGB directly where the format can (JPEG)
    img = img.convert('RGB')
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.BICUBIC, reducing_gap=3.0)


def rate(fn, items):
    t = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - t)


def bench_data(cfg):
    import data as data_lib
    import images
    from prepare import encoder_shape
    torch.set_num_threads(1)  # a DataLoader worker is one process on one core
    shape = encoder_shape(SimpleNamespace(encoder=cfg['encoder'] or 'siglip', encoder_scale=cfg['encoder_scale'],
                                          freeze_encoder=True))
    size, n_tokens = shape.img_size, shape.num_tokens
    source = images.RealImages(size, cfg['data'], instruct_data=cfg['instruct_data'] or None,
                               instruct_images=cfg['instruct_images'] or None)
    print(f'{source.summary()}; decoding at {size} px ({cfg["encoder"] or "siglip"}, {cfg["encoder_scale"]})')
    refs = torch.randperm(source.n_captions, generator=torch.Generator().manual_seed(cfg['seed']))[:cfg['samples']]
    # both timings over the images that decode (a broken one fails fast and would flatter either rate); reading
    # them once first puts the shards in the page cache for both
    refs = [r for r in refs.tolist() if source.usable(r)]
    if not refs:
        raise SystemExit(f'data={cfg["data"]!r}: none of the images drawn decodes ({dict(source.skipped)})')
    raws = [source.raw_image(r) for r in refs]
    source.decoded = {}  # what usable() kept: each image is decoded anew in the timing
    ceiling = rate(lambda raw: pil_ceiling(raw, size), raws)

    def worker_images(ref):  # what a worker does per image of a batch: read, check, decode, resize, pad, hand over
        source.usable(ref)
        source.pixels([ref])
    ours = rate(worker_images, refs)
    print(f'images/s per worker: {ours:,.1f} (read from the shard, decoded, resized, padded to {size}x{size}); '
          f'PIL decode and resize alone: {ceiling:,.1f}; {ours / ceiling:.0%} of that ceiling'
          + (f'; skipped {dict(source.skipped)}' if source.skipped else ''))
    enc = data_lib.get_tokenizer(cfg['tokenizer'])
    if source.n_conversations:
        convs = list(range(min(cfg['samples'], source.n_conversations)))
        conv_rate = rate(lambda i: data_lib.finetune_row(source, enc, [i], cfg['block_size'], n_tokens), convs)
        print(f'conversations/s per worker: {conv_rate:,.1f} (tokenized, image decoded, one packed row each)')
    # a step's images: its caption rows, each packed with as many samples as fit, as the image stage builds them
    gen = torch.Generator().manual_seed(cfg['seed'])
    rows = [data_lib.fill_row(lambda: data_lib.draw_sample(source, enc, 'caption', gen, n_tokens, cfg['block_size']),
                              cfg['block_size'])[0] for _ in range(20)]
    per_row = sum(len(s[2]) for row in rows for s in row) / len(rows)
    per_step = cfg['batch_size'] * cfg['image_ratio'] * per_row
    tokens_s = cfg['step_tokens_per_s']
    if not tokens_s:
        d = setup_device(cfg)
        tokens_s = cfg['batch_size'] * cfg['block_size'] / time_mode(cfg | {'encoder': ''}, d, 'compiled'
                                                                      if d.device.type == 'cuda' else 'eager').dt
        print(f'the {cfg["model"]} LM step on {d.device}: {tokens_s:,.0f} tokens/s')
    need = per_step * tokens_s / (cfg['batch_size'] * cfg['block_size'])
    workers = math.ceil(need / ours)
    print(f'{per_row:.2f} images per caption row of {cfg["block_size"]} tokens; at image_ratio={cfg["image_ratio"]} '
          f'and {tokens_s:,.0f} tokens/s per GPU a step consumes {need:,.1f} images/s: {workers} worker(s) '
          f'per GPU decode that fast (data_workers; data wait then stays near 0, under 5 %)')
    return SimpleNamespace(per_worker=ours, ceiling=ceiling, need=need, workers=workers, tokens_s=tokens_s)


# -----------------------------------------------------------------------------
# the GPU suite: every GPU figure of docs/performance.md in one command, printed as the table that page holds

TEXT_ROWS = {'79m': dict(batch_size=16, target=0.45), '1b': dict(batch_size=4, target=0.50)}  # target: datasheet MFU
IMAGE_ROWS = [('siglip', 'mlp', 'SigLIP'), ('dino_siglip', 'fused_mlp', 'DINO-SigLIP')]  # frozen and trained, on 79m
FROZEN_SHARE = 0.8  # a frozen encoder's image stage keeps at least this share of the 79m text step's tokens/s


def write_image_shards(folder, n_shards, per_shard, max_side, seed=0):
    """
    img2dataset-style tar shards of JPEG photographs' stand-ins: smooth color waves with noise, 256 .. max_side px a
    side, about 150 KB at 1,024 px (DataComp's own cannot be downloaded by a benchmark). Returns their glob.
    """
    import tarfile
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for shard in range(n_shards):
        with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w') as tar:
            for i in range(per_shard):
                w, h = (int(x) for x in rng.integers(min(256, max_side), max_side + 1, 2))
                yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
                img = sum(np.sin(2 * np.pi * (rng.random() * 4 * xx + rng.random() * 4 * yy + rng.random()))[..., None]
                          * rng.random(3) for _ in range(4))
                img = (img - img.min()) / (img.max() - img.min() + 1e-9) * 200 + rng.normal(0, 12, (h, w, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
                for name, payload in ((f'{shard:05d}{i:04d}.jpg', buf.getvalue()),
                                      (f'{shard:05d}{i:04d}.txt', f'a photo number {i} of shard {shard}'.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, '*.tar')


def gpu_suite(cfg):
    """
    The 79m and 1b text steps (compiled), the paper-scale image stage of the 79m LM with SigLIP and DINO-SigLIP,
    frozen and trained (one compiled LM shared by the four, as one graph), and the DataLoader workers a GPU needs at
    the frozen SigLIP stage's pace; each against its target. Returns the rows, or None without CUDA. suite_scale=
    'tiny' runs the same plan at demo shapes and tiny encoders, eager, on any device: the table's test on a CPU.
    """
    tiny = cfg['suite_scale'] == 'tiny'
    if not tiny and not torch.cuda.is_available():
        print('bench.py --suite=gpu: no CUDA device on this machine, so the GPU figures cannot be measured here '
              '(docs/performance.md says which were measured, where and when); --suite_scale=tiny runs the same plan '
              'at demo shapes on this device')
        return None
    start = time.perf_counter()
    base = dict(cfg, block_size=2048, vocab_size=50304, encoder_scale='paper', image_ratio=0.1, images_per_row=2,
                modes='', encoder='', data='', compile=False, grad_checkpoint=False)
    if tiny:
        base.update(block_size=256, vocab_size=320, encoder_scale='tiny', steps=1, warmup=1)
    d = setup_device(base)
    peak, sheet = report_device(d, n=512 if tiny else None)
    mode = 'eager' if tiny else 'compiled'
    rows = []
    for model_name in ('79m', '1b'):
        text_cfg = dict(base, model='demo' if tiny else model_name,
                        batch_size=4 if tiny else TEXT_ROWS[model_name]['batch_size'])
        lm = build_lm(text_cfg, d)
        if not tiny:
            lm.compile()
        m = measure(text_cfg, d, mode, peak, sheet, lm)
        shape = f'`{text_cfg["model"]}`, batch {text_cfg["batch_size"]} x {text_cfg["block_size"]:,}, {mode}'
        rows.append((f'`{model_name}` text step', shape, m, ('mfu', TEXT_ROWS[model_name]['target'])))
        if model_name == '79m':
            text_speed = m.tokens_s
            for encoder, projector, title in IMAGE_ROWS:  # the image stage on the same compiled LM: one more graph
                for image_mode in ('frozen', 'unfrozen'):
                    image_cfg = dict(text_cfg, encoder=encoder, projector=projector)
                    m = measure(image_cfg, d, image_mode, peak, sheet, lm)
                    rows.append((f'image stage, {title} {"frozen" if image_mode == "frozen" else "trained"}',
                                 f'{shape}, {base["encoder_scale"]} encoder, {base["image_ratio"]:.0%} image rows x '
                                 f'{base["images_per_row"]} images', m,
                                 ('share', FROZEN_SHARE * text_speed) if image_mode == 'frozen' else None))
        del lm
        if d.device.type == 'cuda':
            torch.cuda.empty_cache()
    frozen_speed = rows[1][2].tokens_s  # the frozen SigLIP image stage, which the workers feed
    with tempfile.TemporaryDirectory() as folder:
        shards = write_image_shards(folder, 2, 3 if tiny else 50, 96 if tiny else 1024)
        data_cfg = dict(base, data=shards, encoder='siglip', tokenizer='bytes', samples=6 if tiny else 100,
                        step_tokens_per_s=frozen_speed, batch_size=16)
        pipeline = bench_data(data_cfg)
    elapsed = time.perf_counter() - start
    print(suite_table(rows, pipeline, sheet, base))
    print(f'\nthe suite took {elapsed / 60:.1f} min' + ('' if tiny else ' (budget: 8 min on one H100 / H200)'))
    return rows, pipeline


def suite_table(rows, pipeline, sheet, base):
    """The suite's figures as docs/performance.md's markdown table: one row per figure, its target and whether met."""
    lines = ['| figure | setting | tokens/s | images/s (encoder share) | MFU of datasheet | MFU of measured peak | '
             'peak memory | graphs | target | met |', '|' + '---|' * 10]
    for name, setting, m, target in rows:
        if target is None:
            goal, met = '', ''
        elif target[0] == 'mfu':
            goal, met = f'≥ {target[1]:.0%} MFU of datasheet', 'n/a' if m.mfu_sheet is None else \
                ('yes' if m.mfu_sheet >= target[1] else 'no')
        else:
            goal, met = f'≥ {FROZEN_SHARE}x the `79m` text step ({target[1]:,.0f} tokens/s)', \
                'yes' if m.tokens_s >= target[1] else 'no'
        images = '' if m.encoder_share is None else f'{m.images_s:,.1f} ({m.encoder_share:.0%})'
        sheet_mfu = 'n/a' if m.mfu_sheet is None else f'{m.mfu_sheet:.1%}'
        lines.append(f'| {name} | {setting} | {m.tokens_s:,.0f} | {images} | {sheet_mfu} | {m.mfu:.1%} | '
                     f'{m.memory:.2f} GiB | {m.compiles} | {goal} | {met} |')
    lines.append(f'| DataLoader workers per GPU | SigLIP at {"tiny" if base["encoder_scale"] == "tiny" else "384 px"}, '
                 f'image_ratio {base["image_ratio"]}, at the frozen SigLIP stage\'s {pipeline.tokens_s:,.0f} '
                 f'tokens/s | '
                 f'| {pipeline.per_worker:,.1f} per worker ({pipeline.per_worker / pipeline.ceiling:.0%} of PIL\'s '
                 f'ceiling); {pipeline.need:,.1f} needed | | | | | | {pipeline.workers} worker(s) |')
    return '\n'.join(lines)


def main(cfg):
    if cfg['nanogpt']:
        return against_nanogpt(cfg, cfg['nanogpt'])
    if cfg['suite'] == 'gpu':
        return gpu_suite(cfg)
    if cfg['suite']:
        raise SystemExit(f"--suite={cfg['suite']}: the suite is 'gpu'")
    if cfg['data']:
        return bench_data(cfg)
    return bench_model(cfg)


if __name__ == '__main__':
    main(configure(sys.argv[1:], script_config(globals()), source=__file__))
