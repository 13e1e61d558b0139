"""
The models of nanoVLP.

GPT: a compact decoder-only language model in the style of the paper's OpenLM decoders: pre-norm blocks, RMSNorm,
rotary position embeddings, a SwiGLU MLP (hidden size 8/3 * d rounded up to a multiple of 256), optional QK-norm,
causal attention through F.scaled_dot_product_attention, and untied input / output embeddings by default. The same
GPT holds a Llama-architecture LM (import_lm.py): grouped-query attention (n_kv_head), the rotary base (rope_theta),
a given SwiGLU width (mlp_hidden), RMSNorm's epsilon (norm_eps), no QK-norm, tied embeddings or not.

    from model import GPT, GPTConfig, PRESETS
    gpt = GPT(GPTConfig(vocab_size=320, **PRESETS['demo']))
    logits, loss = gpt(idx, targets)

The presets follow the paper's Table 2: with a ~50k vocabulary `79m` has 79M parameters and `1b` about 1.44B.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # small enough that the whole study runs on two CPU cores in minutes
    'demo': dict(n_layer=4, n_head=4, n_embd=128),
    # the paper's Table 2 shapes
    '79m': dict(n_layer=8, n_head=4, n_embd=512),
    '1b': dict(n_layer=24, n_head=16, n_embd=2048),
}

# dense bf16 peak FLOP/s per device, for MFU; a CPU has no fixed figure: bench.py measures one and passes it in
PEAK_FLOPS = {'A100': 312e12, 'H100': 989e12, 'H200': 989e12}


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 320
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    qk_norm: bool = True
    tie_embeddings: bool = False
    rope_theta: float = 10000.0  # the rotary base (Llama 2: 10,000; SmolLM2: 100,000; Llama 3: 500,000)
    n_kv_head: Optional[int] = None  # key / value heads, each read by n_head / n_kv_head query heads; None: n_head
    mlp_hidden: Optional[int] = None  # the SwiGLU width; None: OpenLM's rule below (a Llama checkpoint states its own)
    norm_eps: Optional[float] = None  # RMSNorm's epsilon; None: torch's default, the input dtype's machine epsilon

    def __post_init__(self):
        if self.n_kv_head is None:  # multi-head attention: the layout and parameter names of every earlier checkpoint
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            # OpenLM's SwiGLU width: 8/3 of the model width (same parameter count as a 4x GELU MLP), rounded up to 256
            self.mlp_hidden = 256 * math.ceil(8 * self.n_embd / 3 / 256)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f'n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}: n_embd must '
                             f'be a multiple of n_head, and n_head of n_kv_head')


def rope_tables(head_dim, length, theta):
    """cos and sin of the rotation angles, [length, head_dim / 2] each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head's channels; x is [B, T, heads, head_dim], cos / sin are [T, head_dim/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # the queries of every head, then the keys and the values of the n_kv_head heads, in one matmul; with
        # n_kv_head = n_head that is [q; k; v], 3 * n_embd rows, the layout of every checkpoint before GQA
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # QK-norm keeps attention logits bounded at high learning rates (the 1b preset peaks at 1e-2)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, C = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([C, kv, kv], dim=-1)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        mask, causal = None, True
        if cache is not None:
            # the cache holds keys / values of positions < pos; write ours after them and attend to all of it
            k_cache, v_cache = cache
            k_cache[:B, :, pos:pos + T] = k
            v_cache[:B, :, pos:pos + T] = v
            k, v = k_cache[:B, :, :pos + T], v_cache[:B, :, :pos + T]
            if pos > 0:  # query i sits at position pos + i and may see keys 0 .. pos + i
                causal = False
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        # grouped-query: query head h reads key / value head h // (n_head / n_kv_head), as Llama's repeat_kv does
        # (SDPA's enable_gqa, torch >= 2.5; multi-head attention calls SDPA as it always did)
        gqa = {'enable_gqa': True} if self.n_kv_head != self.n_head else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)  # gate and value in one matmul
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, value = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * value)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attn(self.norm1(x), cos, sin, cache, pos)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)  # derived, so not part of the checkpoint
        self.register_buffer('rope_sin', sin, persistent=False)
        self.grad_checkpoint = False  # activation checkpointing per block: a training setting, not in the config
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, keep the stream's variance from growing
        for name, p in self.named_parameters():
            if name.endswith('proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameter count; non_embedding leaves out the input embedding table (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None, pos=0, splice=None):
        """
        idx: [B, T] token ids. targets: [B, T] next-token ids, -1 where no loss is taken.
        cache / pos: a KV cache from make_cache() and the position of idx[:, 0] in it (generation).
        splice: (layer, mask, values) replaces the residual stream by values [B, T, n_embd] where the bool mask [B, T]
        is set, just before block `layer` (0 = the input embeddings). Dense, not a list of N image tokens: every
        batch then has the same shapes, so a compiled model compiles once whatever the number of images.
        Returns (logits [B, T, vocab], loss or None).
        """
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f'sequence of {pos + T} tokens exceeds block_size={self.config.block_size}')
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            if splice is not None and splice[0] == i:
                x = torch.where(splice[1].unsqueeze(-1), splice[2].to(x.dtype), x)
            if self.grad_checkpoint and torch.is_grad_enabled():  # keep each block's input, recompute the rest
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, None if cache is None else cache[i], pos)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def make_cache(self, batch_size, length=None):
        """Preallocated keys and values for every layer: [batch, key / value heads, length, head_dim] each."""
        c = self.config
        p = self.lm_head.weight
        shape = (batch_size, c.n_kv_head, length or c.block_size, c.n_embd // c.n_head)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(c.n_layer)]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not on norms' gains); every group follows the 'lm' schedule."""
        return make_adamw(param_groups(self, weight_decay, learning_rate, 'lm'), learning_rate, betas, device_type)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight in a matmul, plus attention's QK^T and AV over a full context."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_sec, peak_flops=None):
        """Model FLOPs utilization: achieved training FLOP/s over the device's peak (CUDA: looked up by name)."""
        if peak_flops is None:
            peak_flops = device_peak_flops(self.lm_head.weight.device)
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, stop_token=None, splice=None):
        """
        Continue idx [B, T] by max_new_tokens, one token at a time through the KV cache; temperature 0 is greedy.
        splice is applied to the prompt (see forward). Rows that emit stop_token are padded with it afterwards.
        """
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.config.block_size - T)
        cache = self.make_cache(B, T + max_new_tokens)
        logits, _ = self(idx, cache=cache, pos=0, splice=splice)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            out.append(nxt)
            if done.all() or step == max_new_tokens - 1:
                break
            logits, _ = self(nxt[:, None], cache=cache, pos=T + step)
        return torch.cat([idx, torch.stack(out, dim=1)], dim=1) if out else idx


# float32 elements of the logits the loss takes at once: 512 MB. Logits larger than this (the 79m preset's batch of
# 16 x 2,048 rows of 50,304 is 1.65G, 6.6 GB in float32) are scored chunk by chunk and never held whole in float32
LOSS_CHUNK = 2 ** 27


def cross_entropy(logits, targets):
    """
    The mean cross-entropy of logits [N, vocab] (bf16 under autocast) over the targets [N] that are not -1, in
    float32. Up to LOSS_CHUNK elements it is F.cross_entropy on a float32 copy; above, ChunkedCrossEntropy, the same
    value and gradient to float rounding without the float32 copy and the float32 log-softmax it keeps for backward.
    """
    if logits.numel() <= LOSS_CHUNK:
        return F.cross_entropy(logits.float(), targets, ignore_index=-1)
    return ChunkedCrossEntropy.apply(logits, targets, max(1, LOSS_CHUNK // logits.size(-1)))


class ChunkedCrossEntropy(torch.autograd.Function):
    """
    Cross-entropy by chunks of rows, each upcast to float32 on its own. Forward keeps the logits as they are (they
    exist anyway) and each row's log-sum-exp; backward recomputes a chunk's softmax from them and writes its gradient,
    softmax - one_hot, in the logits' dtype: the float32 working set is one chunk, forward and backward.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk):
        scored = targets != -1
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), chunk):
            part, target = logits[start:start + chunk].float(), targets[start:start + chunk]
            lse[start:start + chunk] = part.logsumexp(dim=-1)
            picked = part.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
            total += torch.where(scored[start:start + chunk], lse[start:start + chunk] - picked, 0.0).sum()
        n = scored.sum()
        ctx.save_for_backward(logits, targets, lse, n)
        ctx.chunk = chunk
        return total / n  # no scored target: 0 / 0, NaN, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, n = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.size(0), ctx.chunk):
            stop = start + ctx.chunk
            target, scored = targets[start:stop], (targets[start:stop] != -1)[:, None]
            g = torch.exp(logits[start:stop].float() - lse[start:stop, None])
            g.scatter_add_(1, target.clamp(min=0)[:, None], -scored.float())  # softmax - one_hot at scored rows
            out[start:stop] = (g * torch.where(scored, grad / n, 0.0)).to(out.dtype)
        return out, None, None


def sample_next(logits, temperature, top_k):
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(1)


def param_groups(module, weight_decay, lr, schedule):
    """A module's trainable parameters as AdamW groups: weight decay on matrices only (not on norms' gains or
    biases). 'schedule' names the LR schedule the training loop sets each step's 'lr' from ('lm' or 'encoder')."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay, 'lr': lr, 'schedule': schedule},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0, 'lr': lr, 'schedule': schedule}]


def make_adamw(groups, learning_rate, betas, device_type):
    groups = [g for g in groups if g['params']]
    # the fused kernel is one launch for all parameters; it exists for CUDA
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')


def device_peak_flops(device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# -----------------------------------------------------------------------------
# the vision-language model: image encoder -> projector -> written into the token stream at the <|image|> positions

def make_projector(kind, in_dim, out_dim):
    """The map from encoder features to the LM's width: 'linear', 'mlp' (Linear-GELU-Linear) or 'fused_mlp'."""
    if kind == 'linear':
        return nn.Linear(in_dim, out_dim)
    if kind == 'mlp':
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == 'fused_mlp':  # Prismatic's projector for fused DINO-SigLIP features: widen 4x first, three layers
        return nn.Sequential(nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, out_dim), nn.GELU(),
                             nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}: use 'linear', 'mlp' or 'fused_mlp'")


class VLM(nn.Module):
    """
    A GPT that reads images. An image in a sequence is written as encoder.num_tokens copies of the <|image|> token;
    forward() encodes the images in order of appearance, projects them to the LM's width and writes them at those
    positions, before block `inject_layer` (0: in place of the input embeddings; k > 0: the <|image|> embedding is
    a learned placeholder through blocks 0 .. k-1).
    """

    def __init__(self, gpt, encoder, image_token, projector='mlp', inject_layer=0):
        super().__init__()
        if not 0 <= inject_layer < gpt.config.n_layer:
            raise ValueError(f'image_inject_layer={inject_layer}: the LM has blocks 0 .. {gpt.config.n_layer - 1}')
        self.gpt, self.encoder = gpt, encoder
        self.projector = make_projector(projector, encoder.dim, gpt.config.n_embd)
        self.image_token, self.inject_layer = image_token, inject_layer
        self.config = gpt.config

    @property
    def saves_encoder(self):
        """
        Whether a checkpoint holds the encoder's weights: yes, unless the encoder is frozen and every part of it has
        a recorded source (a weights file or the hub) that rebuilds it exactly. The one place this rule is written.
        """
        w = self.encoder.weights
        return not (self.encoder.frozen and 'random' not in (w.values() if isinstance(w, dict) else [w]))

    def project(self, images=None, features=None):
        """[N images, num_tokens, n_embd] from uint8 images [N, H, W, 3], or from precomputed encoder features."""
        if features is None:
            features = self.encoder.encode(images)
        return self.projector(features.to(next(self.projector.parameters()).dtype))  # cached features are float16

    def splice(self, idx, images=None, features=None):
        """The GPT's splice for idx: the projected images, in order of appearance, at the <|image|> positions."""
        mask = idx == self.image_token
        source = images if features is None else features
        n_images = 0 if source is None else source.shape[0]
        found, expected = int(mask.sum()), n_images * self.encoder.num_tokens
        if found != expected:
            raise ValueError(f'the sequence has {found} <|image|> tokens, but {n_images} images x '
                             f'{self.encoder.num_tokens} tokens per image = {expected}')
        values = idx.new_zeros(*idx.shape, self.config.n_embd, dtype=torch.float32)
        # a training batch without images carries an empty image tensor: its all-False mask gives the compiled GPT
        # the same graph, and every rank runs the encoder and projector each step (FSDP gathers their weights)
        if source is not None:
            if n_images == 0:  # one blank image instead, its projection unused: CUDA's SDPA rejects an empty batch
                source = source.new_zeros(1, *source.shape[1:])
            projected = self.project(features=source) if features is not None else self.project(images=source)
            values = values.masked_scatter(mask.unsqueeze(-1), projected.float())
        return self.inject_layer, mask, values

    def forward(self, idx, targets=None, images=None, features=None):
        if targets is not None:  # predicting an <|image|> placeholder teaches nothing
            targets = targets.masked_fill(targets == self.image_token, -1)
        return self.gpt(idx, targets, splice=self.splice(idx, images, features))

    @torch.no_grad()
    def generate(self, idx, images=None, max_new_tokens=16, temperature=0.0, top_k=None, stop_token=None):
        return self.gpt.generate(idx, max_new_tokens, temperature, top_k, stop_token, splice=self.splice(idx, images))

    def num_params(self, non_embedding=False):
        return self.gpt.num_params(non_embedding) + sum(p.numel() for p in self.projector.parameters()) + \
            sum(p.numel() for p in self.encoder.parameters())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, encoder_lr=None):
        """Param groups: the LM and the projector at learning_rate; a trainable encoder at its own encoder_lr, with
        its own LR schedule (the groups' 'schedule': 'lm' or 'encoder')."""
        if encoder_lr is None and any(p.requires_grad for p in self.encoder.parameters()):
            raise ValueError('a trainable encoder needs its own learning rate: pass encoder_lr')
        parts = (self.gpt, learning_rate, 'lm'), (self.projector, learning_rate, 'lm'), (self.encoder, encoder_lr, 'encoder')
        groups = [g for module, lr, schedule in parts for g in param_groups(module, weight_decay, lr, schedule)]
        return make_adamw(groups, learning_rate, betas, device_type)

    def flops_per_token(self):
        return self.gpt.flops_per_token()

    def estimate_mfu(self, tokens_per_sec, peak_flops=None):
        return self.gpt.estimate_mfu(tokens_per_sec, peak_flops)
