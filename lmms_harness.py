"""
A nanoVLP checkpoint as an lmms-eval model, so that lmms-eval's tasks (images and all) score it. lmms-eval is optional
(pip install lmms-eval) and imported only here.

    python lmms_harness.py --model nanovlp --model_args ckpt=out/finetune --tasks pope --include_path my_tasks/
    python lmms_harness.py --model nanovlp --model_args ckpt=out/finetune,device=cuda --tasks textvqa_val --limit 100

The arguments are lmms-eval's own: this script registers the model `nanovlp`, then runs lmms-eval's command line. From
Python, pass NanoVLPLMMs(ckpt) to lmms_eval.evaluator.simple_evaluate. A request with an image is asked as eval.py
asks a benchmark question (the chat format: the image's tokens, <|user|> the task's text <|assistant|>), its image
decoded as eval.py decodes a benchmark's; a request without one is scored as lm_harness.py scores text. Answers come
from the functions eval.py answers with (its answer, likelihood.continuation_logprobs), so a task eval.py --tasks
also has gets the same answers item by item.
"""

import io
import sys

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as e:
    raise ImportError('lmms_harness.py needs the optional package lmms-eval: pip install lmms-eval') from e

import numpy as np
import torch

import checkpoint
import data
import eval as ev
import likelihood
from images import BadImage, decode_image, to_rgb
from model import VLM


def pil_pixels(image, size):
    """A PIL image (what a task's doc_to_visual gives) as eval.py's uint8 [size, size, 3]: stored losslessly and
    decoded by images.decode_image, so that its checks, conversion, resizing and padding are the ones eval.py's
    benchmark images get."""
    buf = io.BytesIO()
    try:
        image.save(buf, 'PNG')
    except (OSError, ValueError):  # a mode PNG cannot hold (CMYK): converted as decode_image would convert it
        buf = io.BytesIO()
        to_rgb(image).save(buf, 'PNG')
    return decode_image(buf.getvalue(), size)


@register_model('nanovlp')
class NanoVLPLMMs(lmms):
    """loglikelihood and generate_until over a checkpoint, with at most one image per request (a VLM's)."""

    def __init__(self, ckpt, device='cpu', max_new_tokens=16, batch_size=1, **kwargs):
        super().__init__()
        if str(device).startswith('cuda') and not torch.cuda.is_available():
            print(f'lmms_harness: device={device} but no CUDA device here; running on the CPU', flush=True)
            device = 'cpu'
        self.model, info = checkpoint.load_model(ckpt, device)
        self.enc = data.get_tokenizer(info['tokenizer'])
        self.eot = data.special_id(self.enc, '<|endoftext|>')
        self.torch_device, self.max_new_tokens = device, int(max_new_tokens)

    def image_of(self, doc_to_visual, doc_id, task, split):
        """The request's image as pixels, or None for a text-only request."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1:
            raise ValueError(f'{task}, doc {doc_id}: {len(visuals)} images; a nanoVLP prompt holds one')
        if not isinstance(self.model, VLM):
            raise ValueError(f'{task} asks about images; this checkpoint has no image encoder')
        try:
            return pil_pixels(visuals[0], self.model.encoder.img_size)
        except BadImage as e:  # lmms-eval has no way to skip a request: it is an error that names it
            raise ValueError(f'{task}, doc {doc_id}: its image is unusable ({e})') from None

    def prompt(self, context, room, task, doc_id):
        """The chat-format prompt for a request with an image; one that leaves no room for its answer in the block
        is an error that names it (eval.py skips and counts such an item; lmms-eval cannot)."""
        tokens = data.question_prompt(self.enc, context, self.model.encoder.num_tokens)
        if len(tokens) + room > self.model.config.block_size:
            raise ValueError(f'{task}, doc {doc_id}: a prompt of {len(tokens)} tokens leaves no room for its answer '
                             f'in block_size={self.model.config.block_size}')
        return tokens

    def loglikelihood(self, requests):
        """
        [(loss, whether greedy decoding gives the continuation)]: the loss is lmms-eval's convention, the negative
        log-likelihood (its multiple_choice takes the choice of least loss), here summed over the continuation's
        tokens, as eval.py and lm-evaluation-harness sum them, so the choice is eval.py's. The continuation follows
        the chat-format prompt for a request with an image (as eval.py scores POPE), the raw context for one without
        (as lm_harness.py).
        """
        with_image, text_only, out = [], [], [None] * len(requests)
        for n, (context, target, doc_to_visual, doc_id, task, split) in enumerate(r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            image = self.image_of(doc_to_visual, doc_id, task, split)
            if image is None:
                text_only.append((n, likelihood.harness_tokens(self.enc, context, continuation)))
            else:
                cont = self.enc.encode_ordinary(continuation)
                with_image.append((n, (self.prompt(context, len(cont) - 1, task, doc_id), cont), image))
        for n, (lp, greedy) in zip([n for n, _ in text_only], likelihood.continuation_logprobs(
                self.model, [s for _, s in text_only], self.torch_device)):
            out[n] = (-lp, greedy)
        if with_image:
            scored = likelihood.continuation_logprobs(self.model, [s for _, s, _ in with_image], self.torch_device,
                                              images=[im for _, _, im in with_image])
            for (n, _, _), (lp, greedy) in zip(with_image, scored):
                out[n] = (-lp, greedy)
        return out

    @torch.no_grad()
    def generate_until(self, requests):
        """Greedy answers (eval.answer), cut at the first of the request's `until` strings."""
        out = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get('until') or []
            until = [until] if isinstance(until, str) else until
            new = int(gen_kwargs.get('max_new_tokens', self.max_new_tokens))
            image = self.image_of(doc_to_visual, doc_id, task, split)
            if image is None:
                block = self.model.config.block_size
                idx = self.enc.encode_ordinary(context)[-(block - min(new, block - 1)):] or [self.eot]
                reply = ev.decode_reply(self.enc, self.model.generate(
                    torch.tensor([idx], device=self.torch_device), max_new_tokens=new,
                    stop_token=self.eot)[0, len(idx):].tolist())
            else:
                reply, = ev.answer(self.model, self.enc, [self.prompt(context, 1, task, doc_id)], np.stack([image]),
                                   self.torch_device, new)
            cut = min([reply.find(u) for u in until if u and u in reply], default=len(reply))
            out.append(reply[:cut])
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError('nanoVLP answers one turn per request')


def register_cli():
    """Make `--model nanovlp` resolvable by lmms-eval's command line (its registry of model classes by path)."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id='nanovlp', simple_class_path=
                                                      f'{NanoVLPLMMs.__module__}.NanoVLPLMMs'), overwrite=True)


if __name__ == '__main__':
    register_cli()
    from lmms_eval.__main__ import cli_evaluate
    sys.exit(cli_evaluate())
