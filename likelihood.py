"""
Log-likelihood scoring, the one place it is written: a continuation's summed log-probability after a context, as
lm-evaluation-harness computes it (its tokenization, its rolling windows, its is_greedy), with an image per sequence
for a VLM; the likeliest of a few replies; multiple choice with acc and acc_norm. eval.py's text tasks and closed
vision tasks, POPE, probe.py and both harness adapters score through it.
"""
import numpy as np
import torch
import torch.nn.functional as F

import data


def harness_tokens(enc, context, continuation):
    """
    Context and continuation tokens as lm-evaluation-harness makes them: trailing spaces of the context move to the
    continuation, the continuation is what the joined text adds after the context's tokens, and an empty context is
    <|endoftext|>.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [data.special_id(enc, '<|endoftext|>')], enc.encode_ordinary(continuation)
    ctx = enc.encode_ordinary(context)
    return ctx, enc.encode_ordinary(context + continuation)[len(ctx):]


def windows(ctx, cont, block):
    """
    (context, continuation) pieces of a sequence that each fit block_size inputs: the continuation in consecutive
    pieces of at most block_size tokens, each after as many of the tokens before it as fit (lm-evaluation-harness's
    rolling windows). A continuation that fits is one piece, its context cut from the left as the harness cuts it.
    """
    if cont and not ctx:
        raise ValueError('a continuation is scored after a context of at least one token (<|endoftext|>)')
    full = ctx + cont
    return [(full[max(0, min(start + block, len(full)) - block - 1):start], full[start:start + block])
            for start in range(len(ctx), len(full), block)]


@torch.no_grad()
def continuation_logprobs(model, seqs, device, images=None, max_elements=2 ** 25, features=None, feature_of=None):
    """
    For each (context tokens, continuation tokens) in seqs: the summed log-probability of the continuation after the
    context, and whether each of its tokens is the most likely one (lm-evaluation-harness's is_greedy). A sequence
    is scored in windows (windows()): its context cut from the left to fit, a continuation longer than block_size in
    pieces. Batched longest-first, as many rows as keep the logits under max_elements floats; images (a VLM's, one
    per sequence) go with their rows, and a sequence with an image must fit whole (its image tokens cannot be cut);
    or the encoder's features of sequence i's image, features[feature_of[i]] (sequences that share an image encode
    it once).
    """
    block, vocab = model.config.block_size, model.config.vocab_size
    rows = [(w_ctx, w_cont, i) for i, (ctx, cont) in enumerate(seqs) for w_ctx, w_cont in windows(ctx, cont, block)]
    if images is not None or features is not None:
        longest = max((len(c) + len(t) for c, t in seqs), default=0)
        if longest > block + 1:
            raise ValueError(f'a sequence of {longest} tokens with an image does not fit block_size={block} + 1: '
                             f'its image tokens would be cut (skip such items before scoring them)')
    order = sorted(range(len(rows)), key=lambda r: -(len(rows[r][0]) + len(rows[r][1])))
    out = [(0.0, True)] * len(seqs)
    start = 0
    while start < len(order):
        T = len(rows[order[start]][0]) + len(rows[order[start]][1]) - 1
        chunk = order[start:start + max(1, max_elements // (T * vocab))]
        start += len(chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, k in enumerate(chunk):
            full = rows[k][0] + rows[k][1]
            x[r, :len(full) - 1] = torch.tensor(full[:-1])
        kwargs = {}
        if images is not None:
            kwargs['images'] = torch.from_numpy(np.stack([images[rows[k][2]] for k in chunk])).to(device)
        elif features is not None:
            kwargs['features'] = features[[feature_of[rows[k][2]] for k in chunk]].to(device)
        logprobs = F.log_softmax(model(x.to(device), **kwargs)[0].float(), dim=-1).cpu()
        for r, k in enumerate(chunk):
            ctx, cont, i = rows[k]
            pos, target = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)
            lp, greedy = out[i]
            out[i] = (lp + logprobs[r, pos, target].sum().item(),
                      greedy and bool((logprobs[r, pos].argmax(-1) == target).all()))
    return out


@torch.no_grad()
def likeliest(model, prompts, images, choices, device, batch_size=64):
    """For each prompt (tokens) with its image (uint8 [H, W, 3]), the index of its likeliest choice (token lists),
    the first on a tie. Each image is encoded once, not once per choice."""
    if not prompts:
        return []
    features = torch.cat([model.encoder.encode(np.stack(images[i:i + batch_size])).cpu()
                          for i in range(0, len(images), batch_size)])
    seqs = [(p, c) for p, cs in zip(prompts, choices) for c in cs]
    logprobs = [lp for lp, _ in continuation_logprobs(model, seqs, device, features=features,
                                                      feature_of=[i for i, cs in enumerate(choices) for _ in cs])]
    ends = np.cumsum([len(cs) for cs in choices])
    return [int(np.argmax(logprobs[end - len(cs):end])) for end, cs in zip(ends, choices)]


def choice_requests(enc, item):
    """An item's (context, continuation) tokens, one per choice: its prompt, or one prompt per choice (Winogrande's
    partial scoring)."""
    prompts = item['prompt'] if isinstance(item['prompt'], list) else [item['prompt']] * len(item['choices'])
    return [harness_tokens(enc, prompt, choice) for prompt, choice in zip(prompts, item['choices'])]


def multiple_choice(model, enc, items, device):
    """
    Per item: 1.0 when the choice of highest log-likelihood is the answer (acc), and the same with each choice's
    log-likelihood divided by its length in characters, the leading space (the harness's target delimiter) not
    counted (acc_norm). An item gives its prompt, or one prompt per choice (Winogrande's partial scoring).
    """
    seqs, where = [], []
    for i, item in enumerate(items):
        requests = choice_requests(enc, item)
        where.append((len(seqs), len(seqs) + len(requests)))
        seqs += requests
    logprobs = [lp for lp, _ in continuation_logprobs(model, seqs, device)]
    raw, norm = [], []
    for (first, stop), item in zip(where, items):
        lps = logprobs[first:stop]
        lengths = [len(c.removeprefix(' ')) or 1 for c in item['choices']]
        raw.append(float(np.argmax(lps) == item['answer']))
        norm.append(float(np.argmax(np.array(lps) / lengths) == item['answer']))
    return raw, norm
