import math
import os

import pytest
import torch

from model import GPT, PRESETS, GPTConfig


def tiny(**kw):
    args = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    return GPT(GPTConfig(**args))


@pytest.mark.parametrize('name,expected', [('79m', 78.785e6), ('1b', 1.439e9)])
def test_presets_match_the_paper(name, expected):
    with torch.device('meta'):
        gpt = GPT(GPTConfig(vocab_size=50304, block_size=2048, **PRESETS[name]))
    assert gpt.num_params() == pytest.approx(expected, rel=1e-3)


def test_swiglu_width_is_openlm_rule():
    assert GPTConfig(n_embd=512).mlp_hidden == 1536  # 8/3 * 512 = 1365.3 -> 1536
    assert GPTConfig(n_embd=2048).mlp_hidden == 5632
    assert GPTConfig(n_embd=2048, mlp_hidden=5632 + 1).mlp_hidden == 5633  # a Llama states its own width


def test_tied_embeddings_share_one_tensor():
    gpt = tiny(tie_embeddings=True)
    assert gpt.lm_head.weight is gpt.wte.weight
    assert gpt.num_params() == tiny().num_params() - 64 * 32


def test_weight_decay_only_on_matrices():
    gpt = tiny()
    opt = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(gpt.parameters()))


def test_kv_cache_logits_equal_full_forward():
    gpt = tiny().eval()
    idx = torch.randint(0, 64, (3, 20))
    full, _ = gpt(idx)
    cache = gpt.make_cache(3)
    prefix, _ = gpt(idx[:, :7], cache=cache, pos=0)
    chunk, _ = gpt(idx[:, 7:12], cache=cache, pos=7)  # several tokens at once: needs the offset causal mask
    steps = [gpt(idx[:, t:t + 1], cache=cache, pos=t)[0] for t in range(12, 20)]
    cached = torch.cat([prefix, chunk, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_full_forward_argmax():
    gpt = tiny().eval()
    idx = torch.randint(0, 64, (2, 5))
    out = gpt.generate(idx, max_new_tokens=10)
    ref = idx
    for _ in range(10):  # the slow way: a full forward pass for every new token
        ref = torch.cat([ref, gpt(ref)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generate_stops_and_pads_with_stop_token():
    gpt = tiny().eval()
    idx = torch.randint(0, 64, (2, 5))
    first = gpt.generate(idx, max_new_tokens=1)[:, -1]
    out = gpt.generate(idx, max_new_tokens=6, stop_token=int(first[0]))
    assert (out[0, 5:] == first[0]).all()  # row 0 stopped at once and is padded with the stop token


def test_top_k_one_is_greedy():
    gpt = tiny().eval()
    idx = torch.randint(0, 64, (2, 5))
    assert torch.equal(gpt.generate(idx, 8, temperature=1.0, top_k=1), gpt.generate(idx, 8))


def test_splice_writes_values_at_masked_positions():
    gpt = tiny().eval()
    idx = torch.randint(0, 64, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 2:4] = True
    mask[1, 7] = True
    values = torch.randn(2, 10, 32)
    seen, plain = {}, {}
    hook = gpt.blocks[1].register_forward_pre_hook(lambda m, args: plain.update(x=args[0].detach().clone()))
    gpt(idx)
    hook.remove()
    gpt.blocks[1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    gpt(idx, splice=(1, mask, values))
    assert torch.equal(seen['x'][mask], values[mask])
    assert torch.equal(seen['x'][~mask], plain['x'][~mask])  # elsewhere the stream is untouched


def test_vlm_places_images_in_order_of_appearance():
    from model import VLM
    from encoders import build_encoder
    enc = build_encoder('patch', 'tiny', 'random', img_size=16, freeze=False)
    vlm = VLM(tiny(), enc, image_token=5)
    n = enc.num_tokens
    idx = torch.randint(6, 64, (2, 3 * n + 4))
    idx[0, 1:1 + n] = 5  # image 0 in row 0, images 1 and 2 in row 1
    idx[1, 0:n] = 5
    idx[1, 2 * n:3 * n] = 5
    features = torch.randn(3, n, enc.dim)
    layer, mask, values = vlm.splice(idx, features=features)
    projected = vlm.project(features=features)
    assert torch.equal(values[0, 1:1 + n], projected[0]) and torch.equal(values[1, :n], projected[1])
    assert torch.equal(values[1, 2 * n:3 * n], projected[2]) and not values[~mask].any()
    with pytest.raises(ValueError, match='2 images x'):
        vlm.splice(idx, features=features[:2])


def test_grad_checkpoint_gives_the_same_gradients():
    gpt = tiny()
    idx = torch.randint(0, 64, (2, 10))
    grads = []
    for flag in (False, True):
        gpt.zero_grad()
        gpt.grad_checkpoint = flag
        gpt(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in gpt.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_loss_ignores_minus_one_targets():
    gpt = tiny()
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = gpt(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 64), idx[:, 4:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_too_long_sequence_is_an_error():
    with pytest.raises(ValueError, match='exceeds block_size=32'):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_mfu_arithmetic():
    gpt = tiny()
    c = gpt.config
    flops = 6 * gpt.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
    assert gpt.flops_per_token() == flops
    assert gpt.estimate_mfu(1000.0, peak_flops=flops * 4000.0) == pytest.approx(0.25)
    assert gpt.estimate_mfu(1000.0) is None  # a CPU has no datasheet peak


def test_multi_head_layout_is_every_earlier_checkpoints():
    # n_kv_head unset: the parameters and shapes of checkpoints written before GQA existed, so they still load
    gpt = tiny()
    assert gpt.config.n_kv_head == 2 and gpt.config.mlp_hidden == 256 and gpt.config.norm_eps is None
    assert gpt.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
    old = {k: v for k, v in vars(gpt.config).items() if k not in ('n_kv_head', 'mlp_hidden', 'norm_eps')}
    assert GPTConfig(**old) == gpt.config  # an old checkpoint's model_args, without the new keys


def test_gqa_shapes_and_kv_cache():
    gpt = tiny(n_head=4, n_kv_head=2, mlp_hidden=48, norm_eps=1e-5, qk_norm=False).eval()
    assert gpt.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert gpt.blocks[0].mlp.fc.weight.shape == (2 * 48, 32) and gpt.blocks[0].norm1.eps == 1e-5
    cache = gpt.make_cache(2)
    assert cache[0][0].shape == (2, 2, 32, 8)  # sized by the key / value heads
    idx = torch.randint(0, 64, (2, 12))
    full, _ = gpt(idx)
    first, _ = gpt(idx[:, :5], cache=cache, pos=0)
    rest = [gpt(idx[:, t:t + 1], cache=cache, pos=t)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='n_head of n_kv_head'):
        GPTConfig(n_head=4, n_kv_head=3)


def test_gqa_equals_multi_head_with_shared_keys_and_values():
    # a query head h reads key / value head h // 2: the same model as multi-head attention whose heads 2g and 2g+1
    # have the same key and value weights
    gqa = tiny(n_head=4, n_kv_head=2).eval()
    mha = tiny(n_head=4).eval()
    state = gqa.state_dict()
    for i in range(2):
        q, k, v = state[f'blocks.{i}.attn.qkv.weight'].split([32, 16, 16])
        state[f'blocks.{i}.attn.qkv.weight'] = torch.cat([q, k.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32),
                                                          v.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_cross_entropy(monkeypatch, dtype):
    import model
    logits = (3 * torch.randn(37, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    targets[::4] = -1
    reference = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-1)
    reference.backward()
    expected, logits.grad = logits.grad, None
    monkeypatch.setattr(model, 'LOSS_CHUNK', 8 * 50)  # 8 rows a chunk, the last one of 5 rows
    loss = model.cross_entropy(logits, targets)
    assert loss.grad_fn.name() == 'ChunkedCrossEntropyBackward'
    loss.backward()
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad, expected, atol=tol, rtol=tol)
    assert model.cross_entropy(logits, torch.full_like(targets, -1)).isnan()  # nothing scored: NaN, as F gives


def test_chunked_loss_trains_the_same_model(monkeypatch):
    import model
    runs = []
    for chunk in (model.LOSS_CHUNK, 3 * 64):
        monkeypatch.setattr(model, 'LOSS_CHUNK', chunk)
        torch.manual_seed(0)
        gpt = tiny()
        gpt(torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10)))[1].backward()
        runs.append([p.grad for p in gpt.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*runs))


@pytest.mark.slow
def test_loss_falls_on_shapes_text(shapes_dir):
    import data
    folder = os.path.join(shapes_dir, 'shapes')
    tokens = data.open_shard(folder, 'train')
    gpt = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=2, n_head=2, n_embd=64))
    opt = gpt.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x, y = data.text_batch(tokens, 16, 64, gen)
        _, loss = gpt(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(320), rel=0.05)  # starts near uniform over the vocabulary
    assert sum(losses[-10:]) / 10 < 3.0
