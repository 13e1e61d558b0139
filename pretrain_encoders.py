"""
Pre-train the tiny encoders on the shapes world, each family in the spirit of its paper-scale original, so that
encoder_weights='shapes' (the demo default) means at demo scale what pretrained weights mean at paper scale.

    python pretrain_encoders.py                                # every family whose weights are missing
    python pretrain_encoders.py --families=siglip --force=True # retrain one family
    python pretrain_encoders.py --probe=True                   # linear probes on frozen features: random vs trained

Objectives, one per family (dino_siglip is the two pre-trained halves; patch has nothing to pre-train):
  siglip        SigLIP's pairwise sigmoid loss between the image tower (timm's attention-pooled output) and a small
                text tower that reads the scene's caption: language supervision.
  dinov2        DINO self-distillation: a student matches an EMA teacher's centered, sharpened prototype distribution
                across two augmented views (the class token), plus iBOT's masked-patch form of the same loss (the
                patch tokens), as DINOv2 combines them, with LayerScale started at 1 (at timm's 1e-5 the blocks are
                identities for all of a short run and the targets are uniform from the start). No labels, no captions.
  vit, resnet   supervised classification, the shapes world's ImageNet: which color-shape pairs the scene holds
                (24 labels, multi-label) and how many objects (4 classes), predicted by the model's own timm head;
                the ResNet also has deep supervision on the stage the VLM reads (what each 3x3 grid cell holds).
The weights are the full timm model's state dict (timm's key layout, heads included) in
{data_dir}/shapes/encoders/<family>-seed<seed>-<steps>x<batch>-lr<lr>.safetensors (a new budget, a new file), and load
through encoders.build_encoder(weights=PATH). train.py resolves encoder_weights='shapes' to these paths
(shapes_weights) when it prepares a run.
"""

import copy
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import shapes
from configurator import configure, script_config
from encoders import ENCODERS, RESNET_STAGES, SHAPES_CLASSES, build_encoder, create_timm_model, to_pixels

# -----------------------------------------------------------------------------
# config for `python pretrain_encoders.py`
families = 'siglip,dinov2,vit,resnet'  # comma-separated families to pre-train when their weights are missing (or to
# run the plateau pilot for)
force = False  # pre-train them again even when their weights exist
probe = False  # instead of pre-training: print the linear-probe table (random init vs pre-trained) of every family
data_dir = 'data'  # weights go to {data_dir}/shapes/encoders/<family>-seed<seed>-<budget>.safetensors
seed = 1337  # of the pre-training run (initial weights, batches); train.py uses the weights of its encoder_seed
plateau = []  # e.g. [1, 2, 4]: instead, pre-train every family at these multiples of its step budget and probe each
# -----------------------------------------------------------------------------

# steps x batch per family, on 2 CPU cores: siglip about 2.5 min, dinov2 about 1 min, vit 1.5 min, resnet 0.4 min.
# From the plateau pilot (--plateau=[1,2,4], docs/results.md): resnet is at its probes' plateau; vit gains 0.29
# pairs from 1,600 to 3,200 steps and 0.01 beyond (many small steps: at equal compute 1600 x 32 probed far above
# 400 x 128); siglip and dinov2 still gain at 4x, so their plateau lies beyond what the pilot ran.
BUDGETS = {'siglip': dict(steps=600, batch_size=128, lr=1e-3), 'dinov2': dict(steps=400, batch_size=64, lr=1e-3),
           'vit': dict(steps=3200, batch_size=32, lr=2e-3), 'resnet': dict(steps=300, batch_size=128, lr=3e-3)}
SCENE_SEEDS = {'train': 101, 'probe_train': 102, 'probe_test': 103}  # disjoint from the ImageWorld's seeds
N_PAIRS = len(shapes.COLORS) * len(shapes.SHAPES)
assert N_PAIRS + shapes.MAX_OBJECTS == SHAPES_CLASSES, 'encoders.SHAPES_CLASSES must match the supervised labels'

# -----------------------------------------------------------------------------
# scenes: uniform over 1..4 objects in random cells, unconstrained (the encoder should see every combination)


def make_scenes(n, seed, size=48):
    rng = random.Random(seed)
    scenes = [[shapes.random_object(rng, c) for c in rng.sample(range(9), rng.randint(1, shapes.MAX_OBJECTS))]
              for _ in range(n)]
    images = np.stack([shapes.render(s, size) for s in scenes])
    return scenes, images, rng


def class_labels(scenes):
    """The supervised targets: a multi-hot over color-shape pairs and the object count (0-based)."""
    pairs = torch.zeros(len(scenes), N_PAIRS)
    for i, scene in enumerate(scenes):
        for obj in scene:
            pairs[i, shapes.COLORS.index(obj['color']) * len(shapes.SHAPES) + shapes.SHAPES.index(obj['shape'])] = 1
    return pairs, torch.tensor([len(s) - 1 for s in scenes])

# -----------------------------------------------------------------------------
# the objectives: each is a module holding the timm model plus whatever only pre-training needs (heads, towers),
# built as Objective(model, scenes, rng); forward(pixels, idx) is the loss of the scenes idx


class Objective(nn.Module):
    def after_step(self, progress):
        """Called after each optimizer step, progress = step / steps (an EMA teacher's update)."""


class SupervisedObjective(Objective):
    def __init__(self, model, scenes, rng):
        super().__init__()
        self.model = model
        self.pairs, self.counts = class_labels(scenes)

    def loss(self, logits, idx):
        pair_loss = F.binary_cross_entropy_with_logits(logits[:, :N_PAIRS], self.pairs[idx])
        return pair_loss * N_PAIRS / shapes.MAX_OBJECTS + F.cross_entropy(logits[:, N_PAIRS:], self.counts[idx])

    def forward(self, pixels, idx):
        return self.loss(self.model(pixels), idx)  # timm's head: class token (ViT) or average pool (ResNet)


def cell_labels(scenes):
    """[N, 9]: what each cell of the 3x3 grid holds, its color-shape pair or N_PAIRS for an empty cell."""
    cells = torch.full((len(scenes), 9), N_PAIRS, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene:
            cells[i, obj['cell']] = shapes.COLORS.index(obj['color']) * len(shapes.SHAPES) + shapes.SHAPES.index(obj['shape'])
    return cells


class ResNetObjective(SupervisedObjective):
    """The supervised objective through timm's head, plus deep supervision of the stage the VLM reads: a 1x1 conv on
    the tapped feature map, average-pooled to the scene's 3x3 grid of cells, says what each cell holds (one of the
    24 pairs, or empty), a dense, detection-like target. Without it the tapped stage (layer2 of five) hardly moves:
    random layer2 features already bind color to shape (ReLU conjunctions), and the head four stages up pulls the
    stages near it; 300 or 600 steps left the layer2 probe where random init had it."""

    def __init__(self, model, scenes, rng, dense_weight=1.0):
        super().__init__(model, scenes, rng)
        self.tap = RESNET_STAGES.index(ENCODERS['resnet'].tiny['stage']) + 1  # timm's feature index: 0 is the stem
        self.cell_head = nn.Conv2d(model.feature_info[self.tap]['num_chs'], N_PAIRS + 1, kernel_size=1)
        self.cells, self.dense_weight = cell_labels(scenes), dense_weight

    def forward(self, pixels, idx):
        final, (tapped,) = self.model.forward_intermediates(pixels, indices=[self.tap])
        cells = F.adaptive_avg_pool2d(self.cell_head(tapped), 3).flatten(2)  # [B, 25, 9], cells in row-major order
        return (self.loss(self.model.forward_head(final), idx)
                + self.dense_weight * F.cross_entropy(cells, self.cells[idx]))


def caption_words(text):
    return re.findall(r"[a-z]+|[.,:]", text.lower())


class TextTower(nn.Module):
    """A small transformer over caption words; its output is the mean of the word states, projected."""

    def __init__(self, vocab_size, dim, max_len, n_layer=2, n_head=4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, n_head, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids):
        pad = ids == 0
        x = self.blocks(self.tok(ids) + self.pos[:ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.proj(self.norm((x * keep).sum(1) / keep.sum(1)))


class SigLIPObjective(Objective):
    """SigLIP: every image-caption pair in the batch is a binary problem, matched (+1) or not (-1)."""

    def __init__(self, model, scenes, rng, captions_per_scene=4):
        super().__init__()
        self.model = model
        # several phrasings per scene, one drawn per step, as web captions vary for one picture
        texts = [[caption_words(shapes.caption(s, rng)) for _ in range(captions_per_scene)] for s in scenes]
        vocab = sorted({w for options in texts for t in options for w in t})
        index = {w: i + 1 for i, w in enumerate(vocab)}  # 0 pads
        max_len = max(len(t) for options in texts for t in options)
        self.captions = torch.zeros(len(scenes), captions_per_scene, max_len, dtype=torch.long)
        for i, options in enumerate(texts):
            for j, t in enumerate(options):
                self.captions[i, j, :len(t)] = torch.tensor([index[w] for w in t])
        self.text = TextTower(len(vocab) + 1, model.embed_dim, max_len)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's initialization: t = 10, b = -10
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, pixels, idx):
        pick = torch.randint(self.captions.shape[1], (len(idx),))
        image = F.normalize(self.model(pixels), dim=-1)  # MAP-pooled, as SigLIP pools
        text = F.normalize(self.text(self.captions[idx, pick]), dim=-1)
        logits = image @ text.T * self.log_scale.exp() + self.bias
        labels = 2 * torch.eye(len(idx)) - 1
        return -F.logsigmoid(labels * logits).sum() / len(idx)


def random_view(pixels, min_scale=0.6):
    """A random crop (60-100 % of the side), resized back: DINO's global views, without flips or color jitter,
    which would teach invariance to the very positions and colors the shapes world asks about."""
    b = pixels.shape[0]
    scale = torch.empty(b).uniform_(min_scale, 1.0)
    shift = (torch.rand(b, 2) * 2 - 1) * (1 - scale).unsqueeze(1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode='bilinear', padding_mode='border', align_corners=False)


def sinkhorn(logits, iters=3):
    """DINOv2's centering of the teacher: Sinkhorn-Knopp turns exp(logits) [N, K] into soft assignments whose
    prototypes are used equally over the batch, so the targets can neither collapse onto one prototype nor go
    uniform (the running-mean centering of DINO v1 went uniform within a hundred steps at this scale)."""
    q = torch.exp(logits - logits.max()).T  # [K, N]
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdim=True) * k  # every prototype gets 1/K of the mass
        q /= q.sum(0, keepdim=True) * n  # every sample is a distribution
    return (q * n).T


class DINOObjective(Objective):
    """DINO (class token, across views) + iBOT (masked patch tokens) with an EMA teacher, centered by Sinkhorn-Knopp
    as in DINOv2, with a separate head for each (DINOv2's ibot_separate_head).

    Two things make it learn at demo scale. LayerScale starts at 1, not at timm's 1e-5 (DINOv2's value for 100k+
    step runs of deep models): at 1e-5 every block is an identity, so the class token never reads the image (its
    output had cosine 0.999 between different scenes, teacher logits varied by 1e-4 across a batch, the teacher's
    targets were uniform, log K, from the first step) and 400 steps grew the scales only to 0.01. And the class
    token has its own head: sharing one batch-norm head with the 36 patch tokens of each image left the class
    token's targets uniform even with LayerScale 1 (entropy 5.52 of log K = 5.55; 4.1 with its own head)."""

    def __init__(self, model, scenes, rng, n_prototypes=256, mask_ratio=0.4, student_temp=0.1, teacher_temp=0.04,
                 momentum=0.996, layer_scale=1.0):
        super().__init__()
        dim = model.embed_dim
        self.model = model
        with torch.no_grad():
            for block in model.blocks:
                block.ls1.gamma.fill_(layer_scale)
                block.ls2.gamma.fill_(layer_scale)
        # batch norm in the heads, as in DINO's optional head and BYOL: the outputs are standardized over the batch
        head = lambda: nn.Sequential(nn.Linear(dim, 256), nn.BatchNorm1d(256), nn.GELU(), nn.Linear(256, 64))
        self.cls_head, self.patch_head = head(), head()
        self.prototypes = nn.Linear(64, n_prototypes, bias=False)  # used with unit rows: logits are cosines
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # the EMA teacher starts as a copy of the student; a plain list, so its weights are neither trained nor saved
        self.teacher = [copy.deepcopy(m).requires_grad_(False) for m in self.student()]
        self.mask_ratio, self.student_temp, self.teacher_temp = mask_ratio, student_temp, teacher_temp
        self.momentum = momentum  # of the EMA teacher, raised to 1 over the run on a cosine

    def student(self):
        return self.model, self.cls_head, self.patch_head, self.prototypes

    def tokens(self, vit, cls_head, patch_head, prototypes, pixels, mask=None):
        x = vit.patch_embed(pixels)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(x))))
        patches = x[:, vit.num_prefix_tokens:]  # register tokens dropped
        h_cls = cls_head(x[:, 0])
        h_patch = patch_head(patches.flatten(0, 1)).view(*patches.shape[:2], -1)  # batch norm over every patch
        # cosine logits in [-1, 1], DINO's normalized last layer: the student cannot flatten its output to uniform
        # by shrinking weights, the trivial way to match a teacher it cannot yet predict
        w = F.normalize(prototypes.weight, dim=-1)
        return F.linear(F.normalize(h_cls, dim=-1), w), F.linear(F.normalize(h_patch, dim=-1), w)

    def forward(self, pixels, idx):
        views = torch.cat([random_view(pixels), random_view(pixels)])
        b, n = views.shape[0], self.model.patch_embed.num_patches
        mask = torch.rand(b, n) < self.mask_ratio
        with torch.no_grad():
            t_cls, t_patch = self.tokens(*self.teacher, views)
            t_cls = sinkhorn(t_cls / self.teacher_temp)
            t_patch = sinkhorn(t_patch.flatten(0, 1) / self.teacher_temp).view(t_patch.shape)
        s_cls, s_patch = self.tokens(*self.student(), views, mask)
        s_cls = F.log_softmax(s_cls / self.student_temp, -1)
        s_patch = F.log_softmax(s_patch / self.student_temp, -1)
        # each view's student class token predicts the other view's teacher
        cls_loss = -(t_cls.roll(b // 2, 0) * s_cls).sum(-1).mean()
        patch_loss = -(t_patch * s_patch).sum(-1)[mask].mean()
        return cls_loss + patch_loss

    @torch.no_grad()
    def after_step(self, progress):
        momentum = 1 - (1 - self.momentum) * 0.5 * (1 + math.cos(math.pi * progress))  # to 1 on a cosine
        for teacher, student in zip(self.teacher, self.student()):
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.lerp_(ps, 1 - momentum)


# the families pre-trained on the shapes world, and each one's objective (encoders.ENCODERS: the families; a family
# fused from others, like dino_siglip, uses their weights; one not pretrained, like patch, has nothing to pre-train)
OBJECTIVES = {'siglip': SigLIPObjective, 'dinov2': DINOObjective, 'vit': SupervisedObjective, 'resnet': ResNetObjective}

# -----------------------------------------------------------------------------


def weights_path(family, data_dir, seed):
    """Where a family's shapes weights pre-trained with `seed` are cached: each seed of a study trains its own, so
    the spread over seeds includes the encoder's pre-training run. The name holds the family's budget: weights of
    another budget are never taken for these."""
    b = BUDGETS[family]
    return os.path.join(data_dir, 'shapes', 'encoders',
                        f'{family}-seed{seed}-{b["steps"]}x{b["batch_size"]}-lr{b["lr"]:g}.safetensors')


def pretrain(family, path, seed, steps=None, batch_size=None, lr=None, n_scenes=20000, verbose=True):
    """Pre-train one family on the shapes world and save its timm state dict to path (a .safetensors); returns the
    path. seed draws the initial weights and the batches (the scenes are the same for every seed). Runs under its
    own RNG, so the caller's random state is left as it was."""
    if family not in OBJECTIVES:
        raise ValueError(f'nothing to pre-train for {family!r}: the pre-trained families are {", ".join(OBJECTIVES)}'
                         f' (a fused encoder uses its parts\' weights; patch is learned from scratch); give it an '
                         f'objective in pretrain_encoders.OBJECTIVES, or use encoder_weights=random')
    budget = BUDGETS[family]
    steps, batch_size, lr = steps or budget['steps'], batch_size or budget['batch_size'], lr or budget['lr']
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scenes, images, rng = make_scenes(n_scenes, SCENE_SEEDS['train'])
        model = create_timm_model(family, 'tiny', 'random', 48)
        objective = OBJECTIVES[family](model, scenes, rng)
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        cfg = ENCODERS[family].paper  # the mean and std the family's inputs are normalized with
        images = torch.from_numpy(images)
        t0, losses = time.time(), []
        objective.train()
        for step in range(steps):
            warm = min(1.0, (step + 1) / (steps // 10))
            for group in optimizer.param_groups:
                group['lr'] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(len(images), (batch_size,))
            loss = objective(to_pixels(images[idx], 48, cfg['mean'], cfg['std']), idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            objective.after_step(step / steps)
            losses.append(loss.item())
            if verbose and (step % 50 == 0 or step == steps - 1):
                elapsed = time.time() - t0
                eta = elapsed / (step + 1) * (steps - step - 1)
                print(f'pretrain {family}: step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} '
                      f'({elapsed:.0f}s, ETA {eta:.0f}s)', flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path + '.tmp', metadata={'objective': type(objective).__name__, 'steps': str(steps),
                                              'batch_size': str(batch_size), 'first_loss': f'{losses[0]:.4f}',
                                              'last_loss': f'{np.mean(losses[-20:]):.4f}'})
    os.replace(path + '.tmp', path)  # only complete weights ever carry the final name
    if verbose:
        print(f'pretrain {family}: loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} in {time.time() - t0:.0f}s, '
              f'saved {path}', flush=True)
    return path


def ensure_pretrained(family, data_dir, seed, verbose=True):
    """The path of a family's shapes weights for seed, pre-training them first if they are missing."""
    path = weights_path(family, data_dir, seed)
    if not os.path.isfile(path):
        if verbose:
            print(f'{path} is missing: pre-training the tiny {family} on the shapes world with seed {seed} (once; '
                  f'cached afterwards)')
        pretrain(family, path, seed, verbose=verbose)
    return path


def shapes_weights(encoder, data_dir, seed, verbose=True):
    """
    encoder_weights='shapes' as build_encoder takes it: the family's weights file (pre-trained here when missing),
    a dict of its parts' files for a fused one (dino_siglip), and 'random' for one learned from scratch (patch).
    """
    spec = ENCODERS[encoder]
    if not spec.pretrained:
        return 'random'
    if spec.parts:
        return {part: ensure_pretrained(part, data_dir, seed, verbose) for part in spec.parts}
    return ensure_pretrained(encoder, data_dir, seed, verbose)


# -----------------------------------------------------------------------------
# linear probe: what does the mean of an encoder's tokens say about the scene? Reading single attributes is easy
# here even for random features (a random patch embedding keeps the pixels), so the probe asks for what pre-training
# adds: binding (which color goes with which shape) and counting, from the pooled features, linearly.


@torch.no_grad()
def pooled_features(encoder, images, batch_size=256):
    return torch.cat([encoder.encode(images[i:i + batch_size]).float().mean(1)
                      for i in range(0, len(images), batch_size)])


def linear_probe(encoder, n_train=3000, n_test=1000, ridge=1e-3):
    """Ridge-regression probes on frozen, mean-pooled features, fit on train scenes and scored on test scenes:
    'pairs', the fraction of scenes whose set of color-shape pairs is predicted exactly (24 yes/no outputs), and
    'count', the accuracy of the object count (chance 1/4)."""
    fit = {}
    for split, n in (('probe_train', n_train), ('probe_test', n_test)):
        scenes, images, _ = make_scenes(n, SCENE_SEEDS[split])
        fit[split] = (pooled_features(encoder, images), *class_labels(scenes))
    x, pairs, counts = fit['probe_train']
    mean, std = x.mean(0), x.std(0) + 1e-6
    design = lambda f: torch.cat([(f - mean) / std, torch.ones(len(f), 1)], 1).double()
    x = design(x)
    solve = lambda target: torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype),
                                              x.T @ target.double())
    xt, pairs_t, counts_t = fit['probe_test']
    xt = design(xt)
    exact = (((xt @ solve(pairs)) > 0.5) == (pairs_t > 0.5)).all(1)
    count = (xt @ solve(F.one_hot(counts, shapes.MAX_OBJECTS))).argmax(1) == counts_t
    return {'pairs': exact.float().mean().item(), 'count': count.float().mean().item()}


def plateau_table(scales, seed, folder, families=tuple(OBJECTIVES)):
    """
    Whether each family's step budget reaches its probes' plateau: the family pre-trained at each multiple in
    scales of its BUDGETS steps (the same batch and peak LR, the cosine stretched), into folder, then probed. A
    budget is at the plateau when a longer one gains little on both probes.
    """
    rows = ['| encoder | steps | pairs | count | minutes |', '|---|---|---|---|---|']
    for family in families:
        for scale in scales:
            steps = round(BUDGETS[family]['steps'] * scale)
            t0 = time.time()
            path = pretrain(family, os.path.join(folder, f'{family}-x{scale}.safetensors'), seed, steps=steps,
                            verbose=False)
            torch.manual_seed(0)
            probe = linear_probe(build_encoder(family, weights=path))
            rows.append(f"| {family} | {steps} | {probe['pairs']:.3f} | {probe['count']:.3f} | "
                        f"{(time.time() - t0) / 60:.1f} |")
            print(rows[-1], flush=True)
    return '\n'.join(rows)


def probe_table(data_dir, seed):
    rows = ['| encoder | pairs, random init | pairs, pre-trained | count, random init | count, pre-trained |',
            '|---|---|---|---|---|']
    for family in OBJECTIVES:
        torch.manual_seed(0)
        random_init = linear_probe(build_encoder(family, weights='random'))
        trained = linear_probe(build_encoder(family, weights=ensure_pretrained(family, data_dir, seed)))
        rows.append(f"| {family} | {random_init['pairs']:.3f} | {trained['pairs']:.3f} | "
                    f"{random_init['count']:.3f} | {trained['count']:.3f} |")
        print(rows[-1], flush=True)
    return '\n'.join(rows)


if __name__ == '__main__':
    cfg = configure(sys.argv[1:], script_config(globals()), source=__file__)
    unknown = [f for f in cfg['families'].split(',') if f not in OBJECTIVES]
    if unknown:
        sys.exit(f'config error: families: {", ".join(unknown)} has no shapes pre-training (known: {", ".join(OBJECTIVES)})')
    if cfg['plateau']:
        print(plateau_table(cfg['plateau'], cfg['seed'], os.path.join(cfg['data_dir'], 'shapes', 'plateau'),
                            cfg['families'].split(',')))
    elif cfg['probe']:
        print(probe_table(cfg['data_dir'], cfg['seed']))
    else:
        for name in cfg['families'].split(','):
            path = weights_path(name, cfg['data_dir'], cfg['seed'])
            if cfg['force'] or not os.path.isfile(path):
                pretrain(name, path, cfg['seed'])
            else:
                print(f'{path} exists (--force=True pre-trains it again)')
