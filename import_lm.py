"""
A Hugging Face Llama-architecture causal LM, at any point of its pre-training, as a nanoVLP text checkpoint: the
image stage starts from it as it starts from a checkpoint of our own text stage.

    python import_lm.py --hf_dir=hf/TinyLlama-1.1B-step-480k --out=out/tinyllama_480k --step=480000 \
        --total_steps=1431000 --peak_lr=4e-4 --min_lr=4e-5 --warmup=2000 --shapes_out=data/shapes_tinyllama
    python eval.py --ckpt=out/tinyllama_480k                        # the shapes world's text tasks
    python train.py --stages=image,finetune --text_checkpoint=out/tinyllama_480k --dataset=data/shapes_tinyllama

hf_dir holds config.json, the weights as safetensors (model.safetensors, or shards listed in
model.safetensors.index.json; a pickled pytorch_model.bin is refused, with how to convert it) and tokenizer.json.
Every tensor's name and shape is checked against config.json in the safetensors headers before one is read. The
weights map one to one onto model.GPT: the q, k and v projections stacked into qkv, gate and up into the SwiGLU's
fc, the rest renamed. The tokenizer becomes {out}/nanovlp_tokenizer.json (HFTokenizer; the checkpoint records
its path): <|endoftext|> is the model's end-of-sequence token, and <|image|>, <|user|>, <|assistant|> three new
embedding rows, started at the mean of the trained ones (so is the padding of the table to a multiple of 64). The
source run's LR schedule (warmup, then a cosine, as train.py's) and the checkpoint's step are recorded, and the image
stage continues it from there (train.image_schedule; image_inject_frac=1.0 re-warms instead). shapes_out writes the
shapes world's text tokenized with the model's tokenizer, a dataset train.py and eval.py take as --dataset.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open

import data
import shapes
from checkpoint import file_digest, save_checkpoint, swap_in
from configurator import configure, script_config
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config for `python import_lm.py`
hf_dir = ''  # the Hugging Face folder: config.json, *.safetensors (with model.safetensors.index.json), tokenizer.json
out = ''  # the nanoVLP checkpoint folder to write; train.py --text_checkpoint=OUT and eval.py --ckpt=OUT read it
step = 0  # the optimizer step of the source run this checkpoint was saved at
total_steps = 0  # the source run's length in steps (its cosine ends there); 0: step, a run's final checkpoint
peak_lr = 0.0  # the source run's peak LR; 0: unknown (then only image_inject_frac=1.0, a re-warm, can use it)
min_lr = 0.0  # the LR its cosine decays to
warmup = 0  # its linear warmup steps
lr_at_step = 0.0  # the LR it had at step, for a schedule that is not warmup + cosine (SmolLM2's warmup-stable-decay);
# 0: the cosine's. The image stage's cooldown starts there
block_size = 0  # the context nanoVLP uses it at; 0: the model's max_position_embeddings
dataset = 'shapes'  # the dataset whose text tasks eval.py scores it on ('shapes': the shapes world's, any tokenizer)
eval_items = 500  # items per task eval.py scores
shapes_out = ''  # also write the shapes world's text tokenized with this tokenizer to this folder (train.py --dataset=)
data_dir = 'data'  # where the shapes world is, or is written first (for shapes_out)
# -----------------------------------------------------------------------------

TOKENIZER_FILE = 'nanovlp_tokenizer.json'
NEW_TOKENS = data.SPECIAL_TOKENS[1:]  # <|image|>, <|user|>, <|assistant|>: new rows; <|endoftext|> is the model's EOS
FLOAT_DTYPES = ('F32', 'F16', 'BF16')
IGNORED = ('.rotary_emb.inv_freq',)  # buffers some older checkpoints saved: derived from config.json, not weights



# -----------------------------------------------------------------------------
# an imported LM's tokenizer (data.get_tokenizer rebuilds it from the path a checkpoint records)

TOKENIZER_FORMAT = 'nanovlp-hf-tokenizer-1'  # the 'format' of a file HFTokenizer reads


def write_hf_tokenizer(path, tokenizer_json, special_tokens, n_vocab):
    """
    Write an imported LM's tokenizer for HFTokenizer: its Hugging Face tokenizer.json (the text) and the ids of
    data.SPECIAL_TOKENS in the model's vocabulary of n_vocab ids, in one file. Nothing else goes in (not where it came
    from): two imports of the same tokenizer write the same file, so one tokenized dataset serves both.
    """
    missing = [t for t in data.SPECIAL_TOKENS if not 0 <= special_tokens.get(t, -1) < n_vocab]
    if missing:
        raise ValueError(f'special tokens {missing} need ids below n_vocab={n_vocab}')
    spec = {'format': TOKENIZER_FORMAT, 'n_vocab': n_vocab, 'special_tokens': special_tokens,
            'tokenizer': json.loads(tokenizer_json)}
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(spec, f, ensure_ascii=False, sort_keys=True)
    os.replace(path + '.tmp', path)


def tokenizer_identity(name):
    """What makes two tokenizer names one tokenizer: a built-in's name, a tokenizer file's content (not its path)."""
    if not name.endswith('.json'):
        return name
    return hashlib.sha256(json.dumps(HFTokenizer.read_spec(name), sort_keys=True).encode()).hexdigest()


class HFTokenizer:
    """
    An imported LM's tokenizer: a Hugging Face tokenizer.json run by the `tokenizers` package (optional: imported
    only here), behind the part of tiktoken.Encoding's interface nanoVLP uses (name, n_vocab, encode_ordinary,
    encode_ordinary_batch, encode_single_token, decode). Its ids are the model's. The special tokens are not added
    to the Hugging Face tokenizer: <|endoftext|> is the model's end-of-sequence id and <|image|>, <|user|>,
    <|assistant|> the new embedding rows import_lm.py appended; they come only from the code that builds samples.
    encode_ordinary adds no BOS and reads the model's own special tokens in a text ('</s>') as plain text, as
    tiktoken's encode_ordinary does.
    """

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f'tokenizer {path} is a Hugging Face tokenizer: it needs the optional package tokenizers '
                              f'(pip install tokenizers)') from None
        spec = self.read_spec(path)
        self.name = 'nanovlp_' + os.path.abspath(path)  # what a checkpoint records: get_tokenizer(name) rebuilds it
        self.n_vocab = spec['n_vocab']
        self.special_tokens = dict(spec['special_tokens'])
        self._special_text = {i: t for t, i in self.special_tokens.items()}
        self._tokenizer = Tokenizer.from_str(json.dumps(spec['tokenizer']))
        self._tokenizer.encode_special_tokens = True
        largest = self._tokenizer.get_vocab_size(with_added_tokens=True)
        clash = [t for t in data.SPECIAL_TOKENS[1:] if self.special_tokens[t] < largest]
        if clash or self.n_vocab < largest:
            raise ValueError(f'{path}: the tokenizer has {largest} ids, but n_vocab={self.n_vocab} and {clash} take '
                             f'ids below that; import the model again')

    @staticmethod
    def read_spec(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'tokenizer {path}: no such file. It is the tokenizer import_lm.py writes beside '
                                    f'an imported checkpoint (CKPT/nanovlp_tokenizer.json), recorded by its path: was '
                                    f'the folder moved? Move it back, or import the model again')
        spec = data.read_json(path)
        if not isinstance(spec, dict) or spec.get('format') != TOKENIZER_FORMAT:
            raise ValueError(f'{path} is not a tokenizer written by import_lm.py (a Hugging Face tokenizer.json is '
                             f'imported with its model: python import_lm.py --hf_dir=DIR --out=CKPT)')
        return spec

    def encode_ordinary(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts, num_threads=8):
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_single_token(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise KeyError(token)
        return found

    def decode(self, ids):
        """Text of ids; a special token's id gives its name, as tiktoken's decode does."""
        out, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in self._special_text:
                out.append(self._tokenizer.decode(run, skip_special_tokens=False) if run else '')
                out.append(self._special_text.get(i, ''))
                run = []
            elif 0 <= i < self.n_vocab:
                run.append(i)
            else:
                raise KeyError(f'token id {i} is outside the vocabulary of {self.n_vocab}')
        return ''.join(out)


def read_llama_config(hf_dir):
    """config.json of hf_dir, checked to be a Llama that model.GPT computes exactly: returns it."""
    path = os.path.join(hf_dir, 'config.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: --hf_dir is a Hugging Face model folder (config.json, '
                                f'*.safetensors, tokenizer.json)')
    c = data.read_json(path)
    missing = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
               if not isinstance(c.get(k), int) or c[k] < 1]
    if missing:
        raise ValueError(f'{path}: {", ".join(missing)} missing or not a positive int: not a model config.json')
    if c.get('model_type') != 'llama':
        raise ValueError(f'{path}: model_type={c.get("model_type")!r}; import_lm.py reads Llama-architecture LMs '
                         f'(model_type "llama": TinyLlama, SmolLM, Llama 2 and 3, OpenLLaMA ...)')
    refused = {'hidden_act': (c.get('hidden_act', 'silu'), 'silu'),
               'attention_bias': (c.get('attention_bias', False), False), 'mlp_bias': (c.get('mlp_bias', False), False)}
    head_dim = c['hidden_size'] // c['num_attention_heads']
    refused['head_dim'] = (c.get('head_dim') or head_dim, head_dim)
    rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
    refused['rope type'] = (rope.get('rope_type', rope.get('type', 'default')), 'default')
    for key, (value, supported) in refused.items():
        if value != supported:
            raise ValueError(f'{path}: {key}={value!r}; nanoVLP\'s GPT computes {key}={supported!r} only (no biases, '
                             f'SwiGLU, heads of hidden_size / num_attention_heads, rotary embeddings without scaling)')
    return c


def model_args(c, context=0):
    """model.GPTConfig's arguments for a Llama config.json: the vocabulary grows by NEW_TOKENS, padded to 64."""
    vocab = c['vocab_size'] + len(NEW_TOKENS)
    rope = c.get('rope_parameters') or {}
    return dict(block_size=context or c.get('max_position_embeddings', 2048), vocab_size=64 * -(-vocab // 64),
                n_layer=c['num_hidden_layers'], n_head=c['num_attention_heads'], n_embd=c['hidden_size'],
                qk_norm=False, tie_embeddings=bool(c.get('tie_word_embeddings', False)),
                rope_theta=float(rope.get('rope_theta', c.get('rope_theta', 10000.0))),
                n_kv_head=c.get('num_key_value_heads') or c['num_attention_heads'],
                mlp_hidden=c['intermediate_size'], norm_eps=float(c.get('rms_norm_eps', 1e-6)))


def hf_shapes(c):
    """{tensor name: shape} of a Llama checkpoint, as config.json declares it."""
    d, hd, inner = c['hidden_size'], c['hidden_size'] // c['num_attention_heads'], c['intermediate_size']
    q, kv = c['num_attention_heads'] * hd, (c.get('num_key_value_heads') or c['num_attention_heads']) * hd
    shapes_ = {'model.embed_tokens.weight': [c['vocab_size'], d], 'model.norm.weight': [d]}
    if not c.get('tie_word_embeddings', False):
        shapes_['lm_head.weight'] = [c['vocab_size'], d]
    for i in range(c['num_hidden_layers']):
        p = f'model.layers.{i}.'
        shapes_.update({p + 'input_layernorm.weight': [d], p + 'post_attention_layernorm.weight': [d],
                        p + 'self_attn.q_proj.weight': [q, d], p + 'self_attn.k_proj.weight': [kv, d],
                        p + 'self_attn.v_proj.weight': [kv, d], p + 'self_attn.o_proj.weight': [d, q],
                        p + 'mlp.gate_proj.weight': [inner, d], p + 'mlp.up_proj.weight': [inner, d],
                        p + 'mlp.down_proj.weight': [d, inner]})
    return shapes_


def weight_files(hf_dir):
    """{tensor name: safetensors file} of hf_dir, from model.safetensors.index.json or the one model.safetensors."""
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.isfile(index):
        where = {k: os.path.join(hf_dir, f) for k, f in data.read_json(index)['weight_map'].items()}
    elif os.path.isfile(os.path.join(hf_dir, 'model.safetensors')):
        single = os.path.join(hf_dir, 'model.safetensors')
        with safe_open(single, 'pt') as f:
            where = {k: single for k in f.keys()}
    else:
        pickled = sorted(f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth')))
        raise ValueError(
            f'{hf_dir} has no model.safetensors (nor model.safetensors.index.json)' +
            (f' but {", ".join(pickled[:3])}: a pickle, which can run code when loaded, so nanoVLP does not read it. '
             f'Convert it once, in a Python you trust with that file: python -c "import torch; from safetensors.torch '
             f'import save_file; sd = torch.load(\'{pickled[0]}\', weights_only=True); save_file({{k: v.contiguous() '
             f'for k, v in sd.items()}}, \'model.safetensors\')" in that folder (several shards: transformers\' '
             f'AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)); many '
             f'checkpoints also publish model.safetensors on the hub (a "refs/pr" revision)' if pickled else ''))
    missing = sorted({f for f in where.values() if not os.path.isfile(f)})
    if missing:
        raise FileNotFoundError(f'{hf_dir}: weight files {missing[:3]} are listed but missing: download them')
    return where


def check_weights(c, where):
    """
    Every tensor config.json declares, in the safetensors headers (nothing read but the headers), of its shape and
    a float dtype; nothing else there but what IGNORED lists. A ValueError names what differs.
    """
    expected, found = hf_shapes(c), {}
    for path in sorted(set(where.values())):
        with safe_open(path, 'pt') as f:
            for k in f.keys():
                piece = f.get_slice(k)
                found[k] = (list(piece.get_shape()), piece.get_dtype())
    if c.get('tie_word_embeddings', False):
        found.pop('lm_head.weight', None)  # some tied checkpoints store the copy; Llama ties it to the embedding
    wrong = [f'{k} {found[k][0]} (config.json: {v})' for k, v in expected.items() if k in found and found[k][0] != v]
    dtypes = [f'{k} {found[k][1]}' for k in expected if k in found and found[k][1] not in FLOAT_DTYPES]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not k.endswith(IGNORED))
    if wrong or dtypes or missing or unexpected:
        raise ValueError(f'the weights in {os.path.dirname(path)} are not the Llama its config.json describes: '
                         f'{len(wrong)} of another shape {wrong[:3]}, {len(dtypes)} not float {dtypes[:3]}, '
                         f'missing {missing[:3]}, unexpected {unexpected[:3]} (quantized or another architecture?)')


def convert(c, where, args):
    """The nanoVLP GPT's weights (float32) from the Llama's: renamed, q/k/v and gate/up stacked, rows added."""
    handles = {}

    def get(name):
        if where[name] not in handles:
            handles[where[name]] = safe_open(where[name], 'pt')
        return handles[where[name]].get_tensor(name).float()

    def grown(table):  # new rows, and the padding, at the mean of the trained ones
        extra = table.mean(dim=0, keepdim=True).expand(args['vocab_size'] - len(table), -1)
        return torch.cat([table, extra]).contiguous()

    state = {'wte.weight': grown(get('model.embed_tokens.weight')), 'norm_f.weight': get('model.norm.weight')}
    state['lm_head.weight'] = state['wte.weight'].clone() if args['tie_embeddings'] else grown(get('lm_head.weight'))
    for i in range(args['n_layer']):
        p, b = f'model.layers.{i}.', f'blocks.{i}.'
        state[b + 'norm1.weight'] = get(p + 'input_layernorm.weight')
        state[b + 'norm2.weight'] = get(p + 'post_attention_layernorm.weight')
        state[b + 'attn.qkv.weight'] = torch.cat([get(p + f'self_attn.{x}_proj.weight') for x in 'qkv'])
        state[b + 'attn.proj.weight'] = get(p + 'self_attn.o_proj.weight')
        state[b + 'mlp.fc.weight'] = torch.cat([get(p + 'mlp.gate_proj.weight'), get(p + 'mlp.up_proj.weight')])
        state[b + 'mlp.proj.weight'] = get(p + 'mlp.down_proj.weight')
    with torch.device('meta'):  # the GPT these weights are for, by name and shape, before anything is written
        skeleton = {k: list(v.shape) for k, v in GPT(GPTConfig(**args)).state_dict().items()}
    assert skeleton == {k: list(v.shape) for k, v in state.items()}, 'the mapping misses a tensor of model.GPT'
    return state


def import_tokenizer(c, hf_dir, path):
    """Write hf_dir's tokenizer.json with the special tokens placed (data.write_hf_tokenizer); returns it loaded."""
    source = os.path.join(hf_dir, 'tokenizer.json')
    if not os.path.isfile(source):
        raise FileNotFoundError(f'{source} not found: nanoVLP reads a model\'s tokenizer from tokenizer.json; write '
                                f'it with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)')
    eos = c.get('eos_token_id')
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int):
        raise ValueError(f'{hf_dir}/config.json names no eos_token_id: <|endoftext|> must be the model\'s own')
    vocab = c['vocab_size']
    with open(source, encoding='utf-8') as f:
        text = f.read()
    specials = {'<|endoftext|>': eos, **{t: vocab + i for i, t in enumerate(NEW_TOKENS)}}
    write_hf_tokenizer(path, text, specials, vocab + len(NEW_TOKENS))
    return data.get_tokenizer(path)  # which checks that the tokenizer's own ids stay below the new ones


def write_shapes_dataset(enc, folder, data_dir, verbose=True):
    """
    The shapes world's text (its corpus, as {data_dir}/shapes holds it in bytes) tokenized with enc, and its text
    tasks, in folder: a dataset for train.py --dataset and eval.py; its pictures are rendered there when a run
    needs them. Written beside folder and swapped in whole, as corpora.py does.
    """
    source = shapes.prepare_text(data_dir, verbose=verbose)
    byte_enc = data.get_tokenizer('bytes')
    eot_byte, eot = data.special_id(byte_enc, '<|endoftext|>'), data.special_id(enc, '<|endoftext|>')
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    tmp = folder.rstrip('/') + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {'version': data.load_meta(source).get('version'), 'tokenizer': enc.name.removeprefix('nanovlp_'),
            'vocab_size': enc.n_vocab, 'dtype': np.dtype(dtype).name, 'tokens': {}, 'source': os.path.abspath(source)}
    for split in ('train', 'val'):
        tokens = np.asarray(data.open_shard(source, split))
        ends = np.flatnonzero(tokens == eot_byte)
        docs = [tokens[a + 1:b].astype(np.uint8).tobytes().decode('utf-8') for a, b in zip(np.r_[-1, ends], ends)]
        ids = [t for doc in enc.encode_ordinary_batch(docs) for t in doc + [eot]]
        meta['tokens'][split] = data.write_shard(os.path.join(tmp, f'{split}.bin'), ids, dtype)
    shutil.copy(os.path.join(source, 'text_tasks.json'), tmp)
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    swap_in(tmp, folder)
    if verbose:
        print(f'{folder}: the shapes world\'s text in {meta["tokens"]["train"]:,} train / {meta["tokens"]["val"]:,} '
              f'val tokens of {enc.name.removeprefix("nanovlp_")}')
    return meta


def import_lm(cfg, verbose=True):
    """Write the checkpoint cfg (this script's config) describes; returns its config.json."""
    c = read_llama_config(cfg['hf_dir'])
    where = weight_files(cfg['hf_dir'])
    check_weights(c, where)
    total = cfg['total_steps'] or cfg['step']
    if not 0 <= cfg['warmup'] <= total or cfg['step'] > total or min(cfg['peak_lr'], cfg['min_lr']) < 0 or \
            cfg['min_lr'] > cfg['peak_lr']:
        raise ValueError(f'the source schedule is not one: step={cfg["step"]}, total_steps={total}, warmup='
                         f'{cfg["warmup"]}, peak_lr={cfg["peak_lr"]}, min_lr={cfg["min_lr"]} (0 <= warmup <= '
                         f'total_steps, step <= total_steps, 0 <= min_lr <= peak_lr)')
    args = model_args(c, cfg['block_size'])
    staging = tempfile.mkdtemp(prefix='nanovlp_import_')
    try:
        tok = os.path.join(staging, TOKENIZER_FILE)  # copied into the checkpoint under this name, which it records
        enc = import_tokenizer(c, cfg['hf_dir'], tok)
        state = convert(c, where, args)
        info = {'stage': 'text', 'step': cfg['step'], 'iters': total, 'model_args': args,
                'tokenizer': os.path.join(os.path.abspath(cfg['out']), TOKENIZER_FILE),
                # what eval.py reads of a run's config, and the source run's schedule under train.py's names
                'config': {'dataset': cfg['dataset'], 'eval_items': cfg['eval_items'],
                           'text_eval_items': cfg['eval_items'], 'block_size': args['block_size'],
                           'learning_rate': cfg['peak_lr'], 'min_lr': cfg['min_lr'], 'warmup_iters': cfg['warmup'],
                           'text_iters': total},
                'lr_at_step': cfg['lr_at_step'] or None,
                'imported': {'hf_dir': os.path.abspath(cfg['hf_dir']), 'architectures': c.get('architectures'),
                             'files': {os.path.basename(p): file_digest(p) for p in sorted(set(where.values()))},
                             'tokenizer.json': file_digest(os.path.join(cfg['hf_dir'], 'tokenizer.json')),
                             'special_tokens': enc.special_tokens}}
        save_checkpoint(cfg['out'], state, {}, info, files=[tok])  # no optimizer state: a new run makes its own
    finally:
        shutil.rmtree(staging)
    if cfg['shapes_out']:
        write_shapes_dataset(data.get_tokenizer(info['tokenizer']), cfg['shapes_out'], cfg['data_dir'], verbose)
    if verbose:
        n = sum(v.numel() for k, v in state.items() if not (args['tie_embeddings'] and k == 'lm_head.weight'))
        print(f'{cfg["out"]}: {n:,} parameters, {args["n_layer"]} layers, {args["n_head"]} heads '
              f'({args["n_kv_head"]} key / value), d={args["n_embd"]}, SwiGLU {args["mlp_hidden"]}, rotary base '
              f'{args["rope_theta"]:g}, context {args["block_size"]}, vocabulary {c["vocab_size"]:,} + '
              f'{len(NEW_TOKENS)} new ({enc.special_tokens}), padded to {args["vocab_size"]:,}; step {cfg["step"]:,} '
              f'of {total:,}')
    return info


if __name__ == '__main__':
    config = configure(sys.argv[1:], script_config(globals()), source=__file__)
    if not config['hf_dir'] or not config['out']:
        sys.exit('usage: python import_lm.py --hf_dir=DIR --out=CKPT_DIR [--step=N --total_steps=N --peak_lr=X '
                 '--min_lr=X --warmup=N] [--shapes_out=DIR] (--help lists the keys)')
    try:
        import_lm(config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f'error: {e}')
