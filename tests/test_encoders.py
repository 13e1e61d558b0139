"""Tests for encoders.py: shapes, preprocessing, features equal to timm's, weights, freezing. Offline, CPU only."""

import os

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import encoders
from encoders import ENCODERS, DinoSigLIP, build_encoder

VITS = ('siglip', 'dinov2', 'vit')


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def build(name, **kw):
    kw.setdefault('freeze', name != 'patch')  # the patch encoder cannot be frozen
    return build_encoder(name, **kw)


def images(b=2, h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def tiny_timm(family, img_size=48):
    """The full timm model of a tiny family, weights jolted so that every block matters (DINOv2's layer scale
    starts at 1e-5, which would hide a wrong block count behind a tight tolerance)."""
    cfg = ENCODERS[family].tiny
    kwargs = dict(cfg['kwargs'], **({} if family == 'resnet' else {'img_size': img_size}))
    model = timm.create_model(cfg['timm_id'], pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if 'running_var' in name:
                b.uniform_(0.5, 2.0)
            elif 'running_mean' in name:
                b.normal_(0, 0.1)
    return model


def save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize('name', ENCODERS)
def test_shapes_and_preprocess(name):
    torch.manual_seed(0)
    enc = build(name)
    x = images()
    from_numpy, from_torch = enc.preprocess(x), enc.preprocess(torch.from_numpy(x))
    for a, b in zip(*(p if isinstance(p, tuple) else (p,) for p in (from_numpy, from_torch))):
        assert a.shape == (2, 3, enc.img_size, enc.img_size) and a.dtype == torch.float32
        assert torch.equal(a, b)
    out = enc(from_numpy)
    assert out.shape == (2, enc.num_tokens, enc.dim) and out.dtype == torch.float32
    assert (enc.num_tokens, enc.img_size) == (36, 48)
    assert torch.equal(out, enc.encode(x))
    assert enc.frozen == (name != 'patch') and enc.training == (name == 'patch')
    with pytest.raises(ValueError, match=r'expected uint8 \[B,H,W,3\], got float32 \[2,40,56,3\]'):
        enc.preprocess(x.astype(np.float32))
    with pytest.raises(ValueError, match=r'got uint8 \[2,3,40,56\]'):
        enc.preprocess(torch.from_numpy(x).permute(0, 3, 1, 2))


def test_preprocess_values():
    gray = np.full((1, 48, 48, 3), 51, dtype=np.uint8)  # 51 / 255 = 0.2
    torch.manual_seed(0)
    siglip, dino = build('siglip').preprocess(gray), build('dinov2').preprocess(gray)
    assert torch.allclose(siglip, torch.full_like(siglip, (0.2 - 0.5) / 0.5), atol=1e-6)
    mean, std = torch.tensor(encoders.IMAGENET_MEAN), torch.tensor(encoders.IMAGENET_STD)
    assert torch.allclose(dino[0, :, 0, 0], (0.2 - mean) / std, atol=1e-6)
    # resizing a constant image (down, antialiased, and up) keeps it constant; a flipped view is accepted
    big = np.full((1, 97, 30, 3), 51, dtype=np.uint8)
    assert torch.allclose(build('siglip').preprocess(big[:, ::-1]), siglip, atol=1e-6)


@pytest.mark.parametrize('name', VITS + ('resnet',))
def test_features_equal_timm(name, tmp_path):
    torch.manual_seed(1)
    full = tiny_timm(name)
    enc = build(name, weights=save(full, tmp_path / f'{name}.safetensors'))
    pixels = enc.preprocess(images(b=3))
    with torch.no_grad():
        if name == 'resnet':  # timm's feature index of layerN is N
            ref = full.forward_intermediates(pixels, indices=[encoders.RESNET_STAGES.index(enc.stage) + 1],
                                             intermediates_only=True)[0].flatten(2).transpose(1, 2)
        else:
            ref = full.forward_intermediates(pixels, indices=[len(full.blocks) - 2], norm=False,
                                             intermediates_only=True, output_fmt='NLC')[0]
    out = enc(pixels)
    assert ref.shape == out.shape == (3, 36, enc.dim)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    # and the last block really is gone: the full model's final tokens differ
    if name != 'resnet':
        last = full.forward_intermediates(pixels, indices=[len(full.blocks) - 1], norm=False,
                                          intermediates_only=True, output_fmt='NLC')[0]
        assert not torch.allclose(out, last, atol=1e-3)
        assert len(enc.vit.blocks) == len(full.blocks) - 1


def test_dino_siglip_is_concat(tmp_path):
    torch.manual_seed(2)
    paths = {f: save(tiny_timm(f), tmp_path / f'{f}.safetensors') for f in ('dinov2', 'siglip')}
    fused = build('dino_siglip', weights=paths)
    dino, siglip = build('dinov2', weights=paths['dinov2']), build('siglip', weights=paths['siglip'])
    x = images(b=3)
    assert fused.dim == dino.dim + siglip.dim == 160 and fused.num_tokens == 36
    assert torch.equal(fused.encode(x), torch.cat([dino.encode(x), siglip.encode(x)], dim=-1))
    assert not torch.equal(*fused.preprocess(x))  # each half normalizes with its own mean/std
    with pytest.raises(ValueError, match='6x6.*8x8'):
        DinoSigLIP(build('dinov2', img_size=48), build('siglip', img_size=64))
    with pytest.raises(ValueError, match='ambiguous'):
        build('dino_siglip', weights=paths['dinov2'])


class Tagger(nn.Module):
    """An encoder with a trainable head on top, standing in for the VLM."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.head = enc, nn.Linear(enc.dim, 3)

    def forward(self, x):
        return self.head(self.enc.encode(x)).pow(2).mean()


@pytest.mark.parametrize('name', ('resnet', 'dino_siglip'))
def test_frozen_encoder_never_changes(name):
    torch.manual_seed(3)
    model = Tagger(build(name, freeze=True)).train()
    before = {k: v.clone() for k, v in model.enc.state_dict().items()}
    head_before = model.head.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x = images(b=4)
    pixels = model.enc.preprocess(x)
    pixels = tuple(p.requires_grad_() for p in pixels) if name == 'dino_siglip' else pixels.requires_grad_()
    assert not model.enc(pixels).requires_grad  # computed under no_grad, not merely from frozen weights
    for _ in range(2):
        opt.zero_grad()
        model(x).backward()
        opt.step()
    after = model.enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included for the ResNet
    if name == 'resnet':
        assert any('running_var' in k for k in before)
    assert not model.enc.training and not any(m.training for m in model.enc.modules())
    assert not any(p.requires_grad for p in model.enc.parameters())
    assert not torch.equal(head_before, model.head.weight)


@pytest.mark.parametrize('name', ('vit', 'siglip', 'dinov2', 'resnet', 'patch'))
def test_unfrozen_encoder_trains_every_parameter(name):
    torch.manual_seed(4)
    model = Tagger(build(name, freeze=False)).train()
    assert model.enc.training and not model.enc.frozen
    before = {k: v.clone() for k, v in model.enc.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images(b=4)).backward()
    # DDP hangs on a parameter that never gets a gradient: the truncation must leave none behind
    assert all(p.grad is not None for p in model.enc.parameters())
    opt.step()
    assert any(not torch.equal(before[k], p) for k, p in model.enc.named_parameters())


def test_unfrozen_resnet_keeps_its_batchnorm_statistics():
    torch.manual_seed(6)
    model = Tagger(build('resnet', freeze=False)).train()
    stats = {k: v.clone() for k, v in model.enc.state_dict().items() if 'running' in k}
    gains = {k: v.clone() for k, v in model.enc.named_parameters() if 'bn' in k}
    assert stats and gains
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in (images(b=4), torch.full((1, 48, 48, 3), 255, dtype=torch.uint8)):  # real images, then a blank one
        opt.zero_grad()
        model(x).backward()
        opt.step()
    assert all(torch.equal(stats[k], model.enc.state_dict()[k]) for k in stats)
    assert any(not torch.equal(gains[k], p) for k, p in model.enc.named_parameters() if k in gains)
    assert model.enc.training  # the rest of it trains as usual


def test_safetensors_errors(tmp_path):
    torch.manual_seed(5)
    state = tiny_timm('vit').state_dict()
    missing = {k: v for k, v in state.items() if k != 'cls_token'}
    save_file(missing, str(tmp_path / 'missing.safetensors'))
    with pytest.raises(ValueError, match=r"1 missing keys \[cls_token\].*0 unexpected"):
        build('vit', weights=str(tmp_path / 'missing.safetensors'))
    extra = dict(state, **{'bogus.weight': torch.zeros(2)})
    save_file(extra, str(tmp_path / 'extra.safetensors'))
    with pytest.raises(ValueError, match=r"extra\.safetensors.*1 unexpected keys \[bogus\.weight\]"):
        build('vit', weights=str(tmp_path / 'extra.safetensors'))
    with pytest.raises(FileNotFoundError, match='nowhere.safetensors'):
        build('vit', weights=str(tmp_path / 'nowhere.safetensors'))
    save_file(dict(state, cls_token=torch.zeros(1, 1, 32)), str(tmp_path / 'narrow.safetensors'))
    with pytest.raises(ValueError, match=r'wrong shape: cls_token \[1, 1, 32\] \(model: \[1, 1, 64\]\)'):
        build('vit', weights=str(tmp_path / 'narrow.safetensors'))
    save_file(state, str(tmp_path / 'vit.safetensors'))
    no_dino = r'9 missing keys \[reg_token, blocks\.0\.ls1\.gamma.*2 unexpected keys \[head\.bias'
    with pytest.raises(ValueError, match=no_dino):  # a supervised ViT file is no DINOv2
        build('dinov2', weights=str(tmp_path / 'vit.safetensors'))
    with pytest.raises(ValueError, match="unknown encoder weights"):
        build('vit', weights='imagenet')


def test_pos_embed_resampled_on_load(tmp_path):
    torch.manual_seed(6)
    path = save(tiny_timm('dinov2', img_size=64), tmp_path / 'dinov2_64.safetensors')  # 8x8 positions
    enc = build('dinov2', weights=path)
    assert enc.num_tokens == 36 and enc.vit.pos_embed.shape == (1, 36, 64)
    assert enc.encode(images()).shape == (2, 36, 64)


def test_hub_without_network(monkeypatch):
    create = timm.create_model

    def offline(*args, pretrained=False, **kw):
        if pretrained:
            raise OSError('no network')
        return create(*args, **kw)

    monkeypatch.setattr(timm, 'create_model', offline)
    with pytest.raises(RuntimeError, match=r'failed.*local \.safetensors path') as info:
        build('siglip', scale='paper', weights='hub')
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ValueError, match="scale='paper'"):
        build('vit', weights='hub')


def test_shapes_weights_are_pretrained_once_under_data_dir(tmp_path, monkeypatch):
    import pretrain_encoders
    torch.manual_seed(7)
    full = tiny_timm('resnet')
    calls = []

    def fake_pretrain(family, path, seed, verbose=True):  # stands in for minutes of training; writes what pretrain() would
        calls.append((family, path, seed))
        return save(full, path)

    monkeypatch.setattr(pretrain_encoders, 'pretrain', fake_pretrain)
    os.makedirs(tmp_path / 'shapes' / 'encoders')
    path = pretrain_encoders.shapes_weights('resnet', str(tmp_path), 3, verbose=False)  # missing: pre-trained first
    assert path == str(tmp_path / 'shapes' / 'encoders' / 'resnet-seed3-300x128-lr0.003.safetensors')  # its budget
    assert calls == [('resnet', path, 3)]
    enc = build('resnet', weights=path)
    assert enc.weights == path and torch.equal(enc.resnet.conv1.weight, full.conv1.weight)
    assert pretrain_encoders.shapes_weights('resnet', str(tmp_path), 3, verbose=False) == path  # cached: not retrained
    assert len(calls) == 1
    other = pretrain_encoders.shapes_weights('resnet', str(tmp_path), 4, verbose=False)  # each seed trains its own
    assert other != path and calls[-1] == ('resnet', other, 4)
    monkeypatch.setitem(pretrain_encoders.BUDGETS, 'resnet', dict(pretrain_encoders.BUDGETS['resnet'], steps=600))
    longer = pretrain_encoders.shapes_weights('resnet', str(tmp_path), 3, verbose=False)  # another budget: not reused
    assert longer.endswith('resnet-seed3-600x128-lr0.003.safetensors') and calls[-1] == ('resnet', longer, 3)
    assert pretrain_encoders.shapes_weights('patch', str(tmp_path), 3) == 'random'  # learned from scratch
    halves = pretrain_encoders.shapes_weights('dino_siglip', str(tmp_path), 3, verbose=False)
    assert set(halves) == {'dinov2', 'siglip'} and [c[0] for c in calls[3:]] == ['dinov2', 'siglip']
    with pytest.raises(ValueError, match="unknown encoder weights 'shapes'"):
        build('resnet', weights='shapes')  # build_encoder takes random, hub or a path: train.py resolves 'shapes'


def test_random_init_uses_callers_rng():
    sd = lambda seed: (torch.manual_seed(seed), build('siglip').state_dict())[1]
    a, b, c = sd(8), sd(8), sd(9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['vit.patch_embed.proj.weight'], c['vit.patch_embed.proj.weight'])
    assert 'vit.blocks.2.attn.qkv.weight' in a and 'vit.blocks.3.attn.qkv.weight' not in a  # timm key layout, cut


def test_img_size_override():
    torch.manual_seed(10)
    assert build('vit', img_size=64).encode(images()).shape == (2, 64, 64)
    resnet = build('resnet', img_size=50)  # the ResNet's stride-2 layers round up: ceil(50 / 8) = 7
    assert resnet.num_tokens == 49 and resnet.encode(images()).shape == (2, 49, 128)
    assert build('patch', img_size=64).num_tokens == 64


def test_argument_errors():
    with pytest.raises(ValueError, match='siglip, dinov2, dino_siglip, vit, resnet, patch'):
        build_encoder('clip')
    with pytest.raises(ValueError, match='freeze_encoder=False'):
        build_encoder('patch', freeze=True)
    with pytest.raises(ValueError, match="must be 'random'"):
        build_encoder('patch', weights='/some/file.safetensors', freeze=False)
    assert build_encoder('patch', weights='random', freeze=False).weights == 'random'
    with pytest.raises(ValueError, match='scale'):
        build_encoder('vit', scale='huge')


def test_paper_table():
    for family, row in ((f, s.paper) for f, s in ENCODERS.items() if s.paper):
        if row['timm_id'] is not None:
            assert timm.is_model(row['timm_id']) and row['timm_id'] in timm.list_pretrained(row['timm_id'])
        with torch.device('meta'):  # the real architectures, without allocating their weights
            enc = build(family, scale='paper')
        assert (enc.num_tokens, enc.dim, enc.img_size) == (row['num_tokens'], row['dim'], row['img_size'])
    with torch.device('meta'):
        fused = build('dino_siglip', scale='paper')
    assert (fused.num_tokens, fused.dim) == (729, 1024 + 1152)
