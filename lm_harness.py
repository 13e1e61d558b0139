"""
A nanoVLP checkpoint as an lm-evaluation-harness model, so the harness the paper used for text scores it on any of
its tasks. lm-evaluation-harness is optional (pip install lm_eval) and imported only here.

    python lm_harness.py --model nanovlp --model_args ckpt=out/finetune --tasks arc_easy,hellaswag
    python lm_harness.py --model nanovlp --model_args ckpt=out/text/ckpt_100,device=cuda --tasks piqa --limit 100

The arguments are lm_eval's own: this script registers the model `nanovlp`, then runs lm_eval's command line. From
Python, pass NanoVLP(ckpt) to lm_eval.simple_evaluate. Requests are scored by the functions eval.py scores with
(likelihood.py's harness_tokens and continuation_logprobs), so a task eval.py --tasks also has gets the same numbers.
"""

import sys

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise ImportError('lm_harness.py needs the optional package lm-evaluation-harness: pip install lm_eval') from e

import torch

import checkpoint
import data
import eval as ev
import likelihood


@register_model('nanovlp')
class NanoVLP(LM):
    """loglikelihood, loglikelihood_rolling and generate_until over a checkpoint (a GPT, or a VLM asked text only)."""

    def __init__(self, ckpt, device='cpu', max_gen_toks=256, **kwargs):
        super().__init__()
        if str(device).startswith('cuda') and not torch.cuda.is_available():
            print(f'lm_harness: device={device} but no CUDA device here; running on the CPU', flush=True)
            device = 'cpu'  # lm_eval's command line passes cuda unless told otherwise
        self.model, info = checkpoint.load_model(ckpt, device)
        self.enc = data.get_tokenizer(info['tokenizer'])
        self.eot = data.special_id(self.enc, '<|endoftext|>')
        self.torch_device, self.max_gen_toks = device, int(max_gen_toks)  # LM has a device property of its own
        self.block = self.model.config.block_size

    def loglikelihood(self, requests):
        """[(log-probability of the continuation after the context, whether greedy decoding gives it)]."""
        seqs = [likelihood.harness_tokens(self.enc, context, continuation) for context, continuation in
                (r.args for r in requests)]
        return likelihood.continuation_logprobs(self.model, seqs, self.torch_device)

    def loglikelihood_rolling(self, requests):
        """
        The log-probability of each whole string after <|endoftext|>: its tokens in disjoint windows of block_size,
        each predicted with as many of the tokens before it as fit (the harness's rolling windows, eval.windows).
        """
        seqs = [([self.eot], self.enc.encode_ordinary(text)) for (text,) in (r.args for r in requests)]
        return [lp for lp, _ in likelihood.continuation_logprobs(self.model, seqs, self.torch_device)]

    @torch.no_grad()
    def generate_until(self, requests):
        """Greedy continuations, cut at the first of the request's `until` strings (and at <|endoftext|>)."""
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get('until') or []
            until = [until] if isinstance(until, str) else until
            new = min(int(kwargs.get('max_gen_toks', self.max_gen_toks)), self.block - 1)
            idx = self.enc.encode_ordinary(context)[-(self.block - new):] or [self.eot]
            x = torch.tensor([idx], device=self.torch_device)
            reply = ev.decode_reply(self.enc, self.model.generate(x, max_new_tokens=new, stop_token=self.eot)[0,
                                    len(idx):].tolist())
            cut = min([reply.find(u) for u in until if u and u in reply], default=len(reply))
            out.append(reply[:cut])
        return out


if __name__ == '__main__':
    from lm_eval.__main__ import cli_evaluate
    sys.exit(cli_evaluate())
