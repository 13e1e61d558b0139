"""
Image encoders for nanoVLP: thin adapters over timm models that turn uint8 images into a grid of feature tokens.

    from encoders import build_encoder
    enc = build_encoder('dino_siglip', scale='tiny', weights='random', freeze=True)
    feats = enc.encode(images)            # images: uint8 [B, H, W, 3], numpy or torch -> [B, enc.num_tokens, enc.dim]

Families: siglip, dinov2, dino_siglip (the two fused channel-wise), vit (supervised), resnet, and patch (no
pretrained encoder at all, just a learned patch projection). scale='paper' builds the models of the paper (see
ENCODERS); scale='tiny' builds the same timm model classes shrunk to a few hundred thousand parameters, so the
whole study runs on a laptop CPU. Weights: 'random', 'hub' (timm download) or a path to a .safetensors file holding
the full timm model's state dict (pretrain_encoders.py writes such files for the tiny encoders: train.py's
encoder_weights='shapes' is one of them).

Features follow Prismatic's convention, which the paper builds on: a ViT gives the tokens after its second-to-last
block with the class / register tokens removed and no final norm; a ResNet gives one stage's feature map, flattened.
"""

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

# the supervised ViT and ResNet are pre-trained on the shapes world's labels (pretrain_encoders.py): which of the
# 24 color-shape pairs a scene holds, and its object count (4 classes). Their timm heads have that many outputs.
SHAPES_CLASSES = 24 + 4

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# The encoders of the paper (ENCODERS[name].paper). 'stride' is the patch size of a ViT, the total stride of the
# ResNet stage we tap. mean/std are those the weights were trained with (timm's pretrained_cfg); note that the
# supervised augreg ViT (Prismatic's 'in1k-vit-l') was trained on 0.5/0.5-normalized inputs, not ImageNet statistics.
_PAPER = {
    'siglip': dict(timm_id='vit_so400m_patch14_siglip_384.webli', img_size=384, stride=14,
                   num_tokens=729, dim=1152, mean=HALF, std=HALF),
    'dinov2': dict(timm_id='vit_large_patch14_reg4_dinov2.lvd142m', img_size=384, stride=14,
                   num_tokens=729, dim=1024, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    'vit': dict(timm_id='vit_large_patch16_224.augreg_in21k_ft_in1k', img_size=224, stride=16,
                num_tokens=196, dim=1024, mean=HALF, std=HALF),
    # layer3 (stride 16, 14x14 at 224 px) rather than layer4: its 7x7 grid would give the LM only 49 tokens
    'resnet': dict(timm_id='resnet50.a1_in1k', img_size=224, stride=16, stage='layer3',
                   num_tokens=196, dim=1024, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # no timm model: a linear map of each raw 16x16x3 patch to a vector of the same width
    'patch': dict(timm_id=None, img_size=224, stride=16, num_tokens=196, dim=768, mean=HALF, std=HALF),
}

# The tiny encoders (ENCODERS[name].tiny): the very same timm entries with the size overridden, so a tiny checkpoint
# has the key layout of the paper-scale one. Every family gives a 6x6 grid at 48 px. The ViTs are built with depth 4
# and use 3 blocks.
_TINY = {
    'siglip': dict(timm_id='vit_so400m_patch14_siglip_384', img_size=48, stride=8,  # no class token, MAP head
                   kwargs=dict(patch_size=8, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0)),
    'dinov2': dict(timm_id='vit_large_patch14_reg4_dinov2', img_size=48, stride=8,  # class + 4 register tokens
                   kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)),
    'vit': dict(timm_id='vit_large_patch16_224', img_size=48, stride=8,  # class token
                kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=SHAPES_CLASSES)),
    'resnet': dict(timm_id='resnet50', img_size=48, stride=8, stage='layer2',  # bottlenecks, 128 channels out
                   kwargs=dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16,
                               num_classes=SHAPES_CLASSES)),
    'patch': dict(timm_id=None, img_size=48, stride=8),
}

RESNET_STAGES = ('layer1', 'layer2', 'layer3', 'layer4')

# -----------------------------------------------------------------------------
# preprocessing: uint8 NHWC -> normalized float NCHW at the encoder's resolution, in pure torch so it runs on the GPU


def to_pixels(images, img_size, mean, std):
    """uint8 [B, H, W, 3] (numpy or torch, any device) -> float [B, 3, img_size, img_size], normalized."""
    if isinstance(images, np.ndarray):
        dtype, shape = str(images.dtype), list(images.shape)
        ok = images.dtype == np.uint8
        if ok:
            images = torch.from_numpy(np.ascontiguousarray(images))  # torch refuses negative strides (img[:, ::-1])
    elif torch.is_tensor(images):
        dtype, shape = str(images.dtype).removeprefix('torch.'), list(images.shape)
        ok = images.dtype == torch.uint8
    else:
        raise ValueError(f"expected uint8 [B,H,W,3] as a numpy array or torch tensor, got {type(images).__name__}")
    if not ok or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected uint8 [B,H,W,3], got {dtype} [{','.join(map(str, shape))}]")
    x = images.permute(0, 3, 1, 2).float().div_(255)
    h, w = x.shape[-2:]
    if (h, w) != (img_size, img_size):
        # non-square images are squashed, not cropped: a crop could cut off the object a caption talks about
        x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False,
                          antialias=max(h, w) > img_size)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

# -----------------------------------------------------------------------------
# the adapters


class Encoder(nn.Module):
    """What every adapter shares: preprocessing, freezing, encode(). Subclasses implement features(pixels)."""
    sized = False  # whether its timm model is built for one input size (img_size passed to timm.create_model)

    def __init__(self, name, scale, weights, img_size, num_tokens, dim, mean, std):
        super().__init__()
        self.name, self.scale, self.weights = name, scale, weights
        self.img_size, self.num_tokens, self.dim = img_size, num_tokens, dim
        self.mean, self.std = mean, std
        self.frozen = False

    def set_frozen(self, frozen):
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self.train()  # a frozen encoder drops into eval() right here

    def train(self, mode=True):
        # a parent's .train() must not wake a frozen encoder: BatchNorm statistics and dropout stay as loaded
        return super().train(mode and not self.frozen)

    def preprocess(self, images):
        return to_pixels(images, self.img_size, self.mean, self.std)

    def forward(self, pixels):
        if self.frozen:
            with torch.no_grad():  # no graph through an encoder that nobody trains
                return self.features(pixels)
        return self.features(pixels)

    def encode(self, images):
        if isinstance(images, np.ndarray):  # resize where the model lives, not on the host
            images = torch.from_numpy(np.ascontiguousarray(images)).to(next(self.parameters()).device)
        return self(self.preprocess(images))

    def extra_repr(self):
        return (f"name={self.name}, scale={self.scale}, weights={self.weights!r}, img_size={self.img_size}, "
                f"num_tokens={self.num_tokens}, dim={self.dim}, frozen={self.frozen}")


class ViTFeatures(Encoder):
    """A timm VisionTransformer cut after its second-to-last block; returns the patch tokens of that block."""
    sized = True

    @classmethod
    def create(cls, entry, **kw):
        return cls(create_timm_model(kw['name'], kw['scale'], kw['weights'], kw['img_size']), **kw)

    def __init__(self, model, **kw):
        super().__init__(num_tokens=model.patch_embed.num_patches, dim=model.embed_dim, **kw)
        # drop the last block, the final norm and the head / MAP pooling: an unfrozen encoder then has no
        # parameter that gets no gradient (DDP would stall on it), and a frozen one does no wasted work
        model.prune_intermediate_layers([len(model.blocks) - 2], prune_norm=True, prune_head=True)
        self.vit = model

    def features(self, x):
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)  # adds position embeddings and prepends the class / register tokens as timm does
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return x[:, vit.num_prefix_tokens:]


class ResNetFeatures(Encoder):
    """A timm ResNet cut after one stage; returns its feature map as H*W tokens of C channels."""

    @classmethod
    def create(cls, entry, **kw):
        return cls(create_timm_model(kw['name'], kw['scale'], kw['weights'], kw['img_size']), entry['stage'], **kw)

    def __init__(self, model, stage, **kw):
        tap = RESNET_STAGES.index(stage) + 1  # timm's feature index: 0 is the stem
        grid = -(-kw['img_size'] // model.feature_info[tap]['reduction'])  # every stride-2 layer of a ResNet rounds up
        super().__init__(num_tokens=grid * grid, dim=model.feature_info[tap]['num_chs'], **kw)
        model.prune_intermediate_layers([tap], prune_head=True)  # later stages become empty, the head goes
        self.resnet, self.stage = model, stage

    def train(self, mode=True):
        # trained the way detection and segmentation fine-tune such backbones: BatchNorm keeps the running statistics
        # it was pre-trained with (its scale and shift still train). A step's few images, and the blank image of a
        # step without any, would otherwise pull those statistics away from what the weights expect
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def features(self, x):
        return self.resnet.forward_features(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]


class PatchProjection(Encoder):
    """No pretrained encoder: each patch x patch x 3 block of pixels goes through one learned linear map."""

    @classmethod
    def create(cls, entry, **kw):
        return cls(entry['stride'], **kw)

    def __init__(self, patch, **kw):
        grid = kw['img_size'] // patch
        dim = 3 * patch * patch  # as wide as a raw patch, so the linear map can keep every pixel
        super().__init__(num_tokens=grid * grid, dim=dim, **kw)
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)  # a Linear over each flattened patch
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)

    def features(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed


class DinoSigLIP(Encoder):
    """DINOv2 and SigLIP side by side on the same patch grid; their tokens are concatenated channel-wise."""

    def __init__(self, dino, siglip):
        if dino.num_tokens != siglip.num_tokens:
            g = lambda e: f"{int(e.num_tokens ** 0.5)}x{int(e.num_tokens ** 0.5)}"
            raise ValueError(f"dino_siglip needs one patch grid, but dinov2 gives {g(dino)} at {dino.img_size} px "
                             f"and siglip gives {g(siglip)} at {siglip.img_size} px; choose an img_size that both "
                             f"patch sizes turn into the same grid")
        super().__init__('dino_siglip', dino.scale, {'dinov2': dino.weights, 'siglip': siglip.weights},
                         dino.img_size, dino.num_tokens, dino.dim + siglip.dim, None, None)
        self.dino, self.siglip = dino, siglip
        self.frozen = dino.frozen and siglip.frozen
        self.train()

    def preprocess(self, images):
        return self.dino.preprocess(images), self.siglip.preprocess(images)

    def forward(self, pixels):  # the halves decide about no_grad themselves
        dino_pixels, siglip_pixels = pixels
        return torch.cat([self.dino(dino_pixels), self.siglip(siglip_pixels)], dim=-1)

# -----------------------------------------------------------------------------
# weights


def load_safetensors(model, path):
    """Load a full timm state dict from a .safetensors file into model, strictly; errors say what does not fit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors' own error names neither the file nor what to do
        raise ValueError(f"{path} is not a readable .safetensors file ({e}): write it again, or point "
                         f"encoder_weights at another") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        show = lambda keys: ', '.join(keys[:5]) + (', ...' if len(keys) > 5 else '')
        raise ValueError(f"{path} does not fit {type(model).__name__} {model.pretrained_cfg.get('architecture')}: "
                         f"{len(missing)} missing keys [{show(missing)}], "
                         f"{len(unexpected)} unexpected keys [{show(unexpected)}]")
    pos = state.get('pos_embed')
    if pos is not None and pos.shape != expected['pos_embed'].shape:
        # timm's hub DINOv2 is 518 px (37x37 positions); resample to our grid just as timm does on a hub load
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state['pos_embed'] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    wrong = [f"{k} {list(v.shape)} (model: {list(expected[k].shape)})" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensors have the wrong shape: {'; '.join(wrong[:5])}")
    model.load_state_dict(state)


def create_timm_model(family, scale, weights, img_size):
    """The full timm model of a family at a scale, with its weights; truncation happens later, in the adapter."""
    cfg = ENCODERS[family].at(scale)
    kwargs = dict(cfg.get('kwargs', {}))
    if ENCODERS[family].adapter.sized:  # a ViT's position table is made for one size; a ResNet takes any
        kwargs['img_size'] = img_size
    if weights == 'hub':
        if scale != 'paper':
            raise ValueError(f"weights='hub' exists only for scale='paper'; at scale='{scale}' use 'random' or a "
                             f".safetensors path (pretrain_encoders.py writes one per tiny family)")
        try:
            return timm.create_model(cfg['timm_id'], pretrained=True, **kwargs)
        except Exception as e:
            raise RuntimeError(f"downloading the timm weights of {cfg['timm_id']} failed ({type(e).__name__}: {e}); "
                               f"without a network, pass a local .safetensors path as weights instead "
                               f"(e.g. model.safetensors of hf-hub:timm/{cfg['timm_id']})") from e
    if weights == 'random':
        path = None
    elif isinstance(weights, str) and weights.endswith('.safetensors'):
        path = weights
    else:
        raise ValueError(f"unknown encoder weights {weights!r}: use 'random', 'hub' or a .safetensors path")
    model = timm.create_model(cfg['timm_id'], pretrained=False, **kwargs)  # random init from the caller's RNG
    if path is not None:
        load_safetensors(model, path)
    return model

# -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """One family of ENCODERS: the adapter that turns its model into tokens, and what to build at each scale."""
    adapter: type  # an Encoder subclass with create(entry, name, scale, weights, img_size, mean, std), or for a
    # fusion of `parts` one built from their encoders
    paper: dict = field(default_factory=dict)  # scale='paper': timm id, resolution, stride, tokens, width, mean, std
    tiny: dict = field(default_factory=dict)  # scale='tiny': the same timm entry shrunk (kwargs), 6x6 tokens at 48 px
    pretrained: bool = True  # has weights of its own (hub, a file, the shapes pre-training); False: learned from
    # scratch with the LM, so nothing to freeze or load, and it follows the LM's LR schedule (train.encoder_lr)
    parts: tuple = ()  # the families whose features it fuses (dino_siglip); weights then come as {part: weights}

    def at(self, scale):
        return self.paper if scale == 'paper' else self.tiny


# every encoder train.py's encoder key accepts, in the order the study lists them
ENCODERS = {
    'siglip': EncoderSpec(ViTFeatures, _PAPER['siglip'], _TINY['siglip']),
    'dinov2': EncoderSpec(ViTFeatures, _PAPER['dinov2'], _TINY['dinov2']),
    'dino_siglip': EncoderSpec(DinoSigLIP, parts=('dinov2', 'siglip')),
    'vit': EncoderSpec(ViTFeatures, _PAPER['vit'], _TINY['vit']),
    'resnet': EncoderSpec(ResNetFeatures, _PAPER['resnet'], _TINY['resnet']),
    'patch': EncoderSpec(PatchProjection, _PAPER['patch'], _TINY['patch'], pretrained=False),
}


def build_encoder(name, scale='tiny', weights='random', img_size=None, freeze=True):
    """Build the image encoder `name` (a key of ENCODERS); see the module docstring for the arguments."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}")
    if scale not in ('tiny', 'paper'):
        raise ValueError(f"unknown encoder scale {scale!r}; use 'tiny' or 'paper'")
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    spec = ENCODERS[name]
    if spec.parts:
        if isinstance(weights, dict):
            if set(weights) != set(spec.parts):
                raise ValueError(f"{name} weights as a dict need exactly the keys {', '.join(spec.parts)}, "
                                 f"got {sorted(weights)}")
        elif weights in ('random', 'hub'):
            weights = {part: weights for part in spec.parts}
        else:
            raise ValueError(f"{name} holds {len(spec.parts)} models, so one weights path {weights!r} is ambiguous; "
                             f"pass weights={{{', '.join(f'{p!r}: PATH' for p in spec.parts)}}} (or 'random', 'hub')")
        return spec.adapter(*(build_encoder(part, scale, weights[part], img_size, freeze) for part in spec.parts))
    if not spec.pretrained:
        if freeze:
            raise ValueError(f"the {name} encoder is learned from scratch with nothing pretrained to freeze; "
                             f"set freeze_encoder=False")
        if weights != 'random':
            raise ValueError(f"the {name} encoder is trained from scratch, so its weights must be 'random', "
                             f"got {weights!r}")
    entry = spec.at(scale)
    img_size = img_size or entry['img_size']
    encoder = spec.adapter.create(entry, name=name, scale=scale, weights=weights, img_size=img_size,
                                  mean=spec.paper['mean'], std=spec.paper['std'])
    return encoder.set_frozen(freeze)


# -----------------------------------------------------------------------------
# feature cache: a frozen encoder maps a fixed image set to the same features on every step and every run


def encoder_fingerprint(encoder):
    """A short hash of an encoder's family, resolution and exact weights: the part of a cache key it determines."""
    h = hashlib.sha1(f'{encoder.name}-{encoder.scale}-{encoder.img_size}'.encode())
    for name, tensor in encoder.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def cached_features(encoder, images, image_set, cache_dir, create=True, batch_size=256, verbose=True):
    """
    Features of a fixed image set (uint8 [N, H, W, 3], named image_set) from a frozen encoder, as a read-only
    float16 memmap [N, num_tokens, dim] under cache_dir. The file is keyed by the encoder's weights, resolution and
    the image set, computed once (only when create is set: a run makes it while it prepares), and read back. The
    image_set name carries the rest of the key, what else the features depend on: prepare.feature_cache puts the
    digest of this module's code (and of timm, torch and the pictures' file) in it, so that an edit here that
    changes the features is never followed by a read of the old ones.
    """
    if not encoder.frozen:
        raise ValueError('features can be cached only for a frozen encoder: a trained one changes them every step')
    shape = (len(images), encoder.num_tokens, encoder.dim)
    path = os.path.join(cache_dir, f'{encoder.name}-{encoder.img_size}px-{encoder_fingerprint(encoder)}-'
                                   f'{image_set}.f16')
    if not os.path.exists(path):
        if not create:
            raise FileNotFoundError(f'feature cache {path} is missing: the run prepares it for the encoder its '
                                    f'config builds, and this encoder has other weights')
        os.makedirs(cache_dir, exist_ok=True)
        device = next(encoder.parameters()).device
        out = np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=np.float16, shape=shape)
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)
            out[start:start + batch_size] = encoder.encode(batch).float().cpu().numpy()
        out.flush()
        del out
        os.replace(path + '.tmp', path)  # only a complete cache file ever has the final name
        if verbose:
            print(f'cached {encoder.name} features of {len(images):,} images: {path}')
    features = np.load(path, mmap_mode='r')
    if features.shape != shape:
        raise ValueError(f'feature cache {path} holds {features.shape}, expected {shape}: delete it')
    return features
