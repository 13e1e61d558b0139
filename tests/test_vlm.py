import numpy as np
import pytest
import torch

from encoders import build_encoder, cached_features
from model import GPT, VLM, GPTConfig

IMAGE = 257


def make_vlm(encoder='vit', freeze=True, inject_layer=0, projector='mlp', n_layer=2):
    gpt = GPT(GPTConfig(block_size=96, vocab_size=320, n_layer=n_layer, n_head=2, n_embd=32))
    return VLM(gpt, build_encoder(encoder, freeze=freeze), IMAGE, projector, inject_layer)


def images(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 3), dtype=np.uint8))


def sequence(n_images, text=5, batch=2):
    """Rows of text, then n_images runs of 36 <|image|> tokens (spread over the rows), then text."""
    rows = []
    per_row = [n_images // batch + (r < n_images % batch) for r in range(batch)]
    for k in per_row:
        row = list(range(10, 10 + text)) + [IMAGE] * 36 * k + list(range(40, 40 + text))
        rows.append(row + [0] * (5 + 36 * max(per_row) + 5 - len(row)))
    return torch.tensor(rows)


def test_features_land_exactly_at_image_positions():
    vlm = make_vlm().eval()
    idx, imgs = sequence(3), images(3)
    seen = {}
    vlm.gpt.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    vlm(idx, images=imgs)
    expected = vlm.projector(vlm.encoder.encode(imgs)).flatten(0, 1)  # image 0, 1 in row 0, image 2 in row 1
    torch.testing.assert_close(seen['x'][idx == IMAGE], expected)
    torch.testing.assert_close(seen['x'][idx != IMAGE], vlm.gpt.wte(idx[idx != IMAGE]))


def test_count_mismatch_names_both_counts():
    vlm = make_vlm()
    with pytest.raises(ValueError, match=r'72 <\|image\|> tokens, but 3 images x 36 tokens per image = 108'):
        vlm(sequence(2), images=images(3))


def test_targets_at_image_positions_are_ignored():
    vlm = make_vlm().eval()
    idx, imgs = sequence(2), images(2)
    targets = torch.roll(idx, -1, dims=1)
    logits, loss = vlm(idx, targets, images=imgs)
    keep = targets != IMAGE
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_inject_layer_two_learns_and_projector_gets_gradients():
    # a task only the image can solve: after the image, say which of two bytes its mean brightness stands for
    torch.manual_seed(0)
    vlm = make_vlm(encoder='patch', freeze=False, inject_layer=2, n_layer=3)
    opt = vlm.configure_optimizers(0.0, 1e-2, (0.9, 0.95), 'cpu', encoder_lr=1e-2)
    losses = []
    for step in range(60):
        bright = torch.rand(8) < 0.5
        imgs = torch.where(bright[:, None, None, None], 220, 30).to(torch.uint8).expand(8, 48, 48, 3).contiguous()
        idx = torch.cat([torch.full((8, 36), IMAGE), torch.where(bright, 65, 66)[:, None]], dim=1)
        targets = torch.full_like(idx, -1)
        targets[:, 35] = idx[:, 36]
        _, loss = vlm(idx, targets, images=imgs)
        loss.backward()
        if step == 0:
            assert vlm.projector[0].weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.2 < losses[0]


def test_generate_with_images_matches_full_forward():
    vlm = make_vlm().eval()
    idx, imgs = sequence(2)[:1], images(1)
    idx = idx[:, :41]  # text, one image, text
    out = vlm.generate(idx, imgs, max_new_tokens=6)
    ref = idx
    for _ in range(6):
        ref = torch.cat([ref, vlm(ref, images=imgs)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_optimizer_groups_follow_freezing():
    frozen = make_vlm(freeze=True)
    opt = frozen.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    assert not any(id(p) in in_opt for p in frozen.encoder.parameters())
    assert all(id(p) in in_opt for p in frozen.projector.parameters())
    unfrozen = make_vlm(freeze=False)
    opt = unfrozen.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', encoder_lr=1e-4)
    enc_ids = {id(p) for p in unfrozen.encoder.parameters()}
    enc_groups = [g for g in opt.param_groups if any(id(p) in enc_ids for p in g['params'])]
    assert enc_groups and all(g['lr'] == 1e-4 and g['schedule'] == 'encoder' for g in enc_groups)
    with pytest.raises(ValueError, match='encoder_lr'):
        unfrozen.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')


def test_frozen_encoder_unchanged_by_vlm_training():
    vlm = make_vlm(encoder='resnet', freeze=True)
    before = {k: v.clone() for k, v in vlm.encoder.state_dict().items()}
    opt = vlm.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    vlm.train()
    idx = sequence(2)
    _, loss = vlm(idx, torch.roll(idx, -1, 1), images=images(2))
    loss.backward()
    opt.step()
    assert not vlm.encoder.training
    assert all(torch.equal(before[k], v) for k, v in vlm.encoder.state_dict().items())  # BN stats included


@pytest.mark.parametrize('projector,depth', [('linear', 1), ('mlp', 2), ('fused_mlp', 3)])
def test_projectors(projector, depth):
    vlm = make_vlm(projector=projector)
    linears = [m for m in vlm.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth and linears[-1].out_features == 32
    if projector == 'fused_mlp':
        assert linears[0].out_features == 4 * vlm.encoder.dim


def test_cached_features_equal_live_and_are_reused(tmp_path):
    enc = build_encoder('dino_siglip', freeze=True)
    imgs = images(10).numpy()
    cached = cached_features(enc, imgs, 'test-set', str(tmp_path), batch_size=4, verbose=False)
    live = enc.encode(imgs).numpy()
    np.testing.assert_allclose(cached.astype(np.float32), live, rtol=2e-3, atol=2e-3)
    [path] = list(tmp_path.iterdir())
    mtime = path.stat().st_mtime_ns
    again = cached_features(enc, imgs, 'test-set', str(tmp_path), verbose=False)
    assert path.stat().st_mtime_ns == mtime and np.array_equal(again, cached)  # read back, not recomputed
    other = build_encoder('dino_siglip', freeze=True)  # other random weights: another cache file
    cached_features(other, imgs, 'test-set', str(tmp_path), verbose=False)
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match='only for a frozen encoder'):
        cached_features(build_encoder('vit', freeze=False), imgs, 'test-set', str(tmp_path))


def test_vlm_forward_with_cached_features_equals_images(tmp_path):
    vlm = make_vlm().eval()
    imgs = images(2)
    feats = torch.from_numpy(np.array(cached_features(vlm.encoder, imgs.numpy(), 's', str(tmp_path), verbose=False)))
    idx = sequence(2)
    a, _ = vlm(idx, images=imgs)
    b, _ = vlm(idx, features=feats)
    torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
