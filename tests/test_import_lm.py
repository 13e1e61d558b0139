"""
import_lm.py: a Hugging Face Llama folder becomes a nanoVLP text checkpoint. With `transformers` (a test dependency
only), random Llamas of every layout (multi-head, grouped-query, multi-query; tied and untied; one file and shards)
give the same logits and token ids through nanoVLP as through transformers; without it, Llama folders written here
by hand test the mapping's checks, the tokenizer and the recorded schedule. The end-to-end test imports one, scores
it with eval.py and runs train.py's image and finetune stages from it.
"""
import json
import os
import runpy
import sys

import pytest
import torch
from safetensors.torch import save_file

tokenizers = pytest.importorskip('tokenizers')  # optional: imported only by import_lm.HFTokenizer

import data  # noqa: E402
import import_lm  # noqa: E402
from checkpoint import load_model, read_checkpoint_info  # noqa: E402
from conftest import ROOT  # noqa: E402

SENTENCES = ['Alice plays the flute in the town by the river.', 'Seven plus five is twelve.',
             'The red circle is above the blue square.', 'Bob lives in Mill Creek; he has 3 cats!',
             'one two three four five six seven eight nine ten'] * 4


def write_tokenizer(folder, vocab_size=300):
    """A byte-level BPE trained on a few sentences, as tokenizer.json; <s> is id 0, </s> (the EOS) id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=['<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(os.path.join(folder, 'tokenizer.json'))
    return tok


def llama_folder(folder, n_head=4, n_kv_head=2, tied=False, vocab=320, d=32, inner=80, layers=2, max_pos=256,
                 seed=0, **config):
    """A Llama checkpoint folder written by hand, as transformers' save_pretrained lays it out: random weights."""
    os.makedirs(folder, exist_ok=True)
    c = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=vocab, hidden_size=d,
             intermediate_size=inner, num_hidden_layers=layers, num_attention_heads=n_head,
             num_key_value_heads=n_kv_head, max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, hidden_act='silu', **config)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(c, f)
    gen, hd = torch.Generator().manual_seed(seed), d // n_head
    w = lambda *shape: 0.3 * torch.randn(*shape, generator=gen)
    tensors = {'model.embed_tokens.weight': w(vocab, d), 'model.norm.weight': 1 + w(d)}
    if not tied:
        tensors['lm_head.weight'] = w(vocab, d)
    for i in range(layers):
        p = f'model.layers.{i}.'
        tensors.update({p + 'input_layernorm.weight': 1 + w(d), p + 'post_attention_layernorm.weight': 1 + w(d),
                        p + 'self_attn.q_proj.weight': w(n_head * hd, d),
                        p + 'self_attn.k_proj.weight': w(n_kv_head * hd, d),
                        p + 'self_attn.v_proj.weight': w(n_kv_head * hd, d), p + 'self_attn.o_proj.weight': w(d, d),
                        p + 'mlp.gate_proj.weight': w(inner, d), p + 'mlp.up_proj.weight': w(inner, d),
                        p + 'mlp.down_proj.weight': w(d, inner)})
    save_file(tensors, os.path.join(folder, 'model.safetensors'))
    write_tokenizer(folder)
    return c


def run_import(hf_dir, out, **flags):
    cfg = {k: v for k, v in import_lm.__dict__.items() if k in import_lm.script_config(vars(import_lm))}
    cfg.update(hf_dir=str(hf_dir), out=str(out), **flags)
    return import_lm.import_lm(cfg, verbose=False)


# -----------------------------------------------------------------------------
# the mapping, the checks before anything is read, the tokenizer

def test_weights_map_onto_the_gpt(tmp_path):
    from safetensors.torch import load_file
    c = llama_folder(tmp_path / 'hf', n_head=4, n_kv_head=2)
    info = run_import(tmp_path / 'hf', tmp_path / 'ckpt', step=5)
    hf = load_file(tmp_path / 'hf' / 'model.safetensors')
    ours = load_file(tmp_path / 'ckpt' / 'model.safetensors')
    assert info['model_args'] == dict(block_size=256, vocab_size=384, n_layer=2, n_head=4, n_embd=32, qk_norm=False,
                                      tie_embeddings=False, rope_theta=10000.0, n_kv_head=2, mlp_hidden=80,
                                      norm_eps=1e-5)
    p = 'model.layers.1.'
    qkv = torch.cat([hf[p + f'self_attn.{x}_proj.weight'] for x in 'qkv'])
    assert torch.equal(ours['blocks.1.attn.qkv.weight'], qkv)
    assert torch.equal(ours['blocks.1.mlp.fc.weight'], torch.cat([hf[p + 'mlp.gate_proj.weight'],
                                                                  hf[p + 'mlp.up_proj.weight']]))
    assert torch.equal(ours['blocks.1.mlp.proj.weight'], hf[p + 'mlp.down_proj.weight'])
    assert torch.equal(ours['blocks.1.norm2.weight'], hf[p + 'post_attention_layernorm.weight'])
    # the three new rows and the padding to 64 start at the mean embedding, input and output
    for ours_name, hf_name in (('wte.weight', 'model.embed_tokens.weight'), ('lm_head.weight', 'lm_head.weight')):
        assert torch.equal(ours[ours_name][:c['vocab_size']], hf[hf_name])
        assert torch.allclose(ours[ours_name][c['vocab_size']:], hf[hf_name].mean(0).expand(64, -1))
    model, loaded = load_model(str(tmp_path / 'ckpt'))  # what eval.py and train.py do
    assert loaded['step'] == 5 and model.config.n_kv_head == 2 and not model.config.qk_norm


def test_tokenizer_ids_specials_and_identity(tmp_path):
    llama_folder(tmp_path / 'hf')
    info = run_import(tmp_path / 'hf', tmp_path / 'ckpt')
    enc = data.get_tokenizer(info['tokenizer'])  # rebuilt from what the checkpoint records
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / 'hf' / 'tokenizer.json'))
    text = 'Seven plus five is twelve, said Alice.'
    assert enc.encode_ordinary(text) == reference.encode(text, add_special_tokens=False).ids
    assert enc.encode_ordinary_batch([text, 'Bob']) == [enc.encode_ordinary(text), enc.encode_ordinary('Bob')]
    assert [data.special_id(enc, t) for t in data.SPECIAL_TOKENS] == [1, 320, 321, 322]  # EOS, then new rows
    assert enc.n_vocab == 323 and data.padded_vocab_size(enc) == 384
    # special tokens come only from code: text that spells one, the model's own '</s>' included, stays text
    ids = enc.encode_ordinary('a </s> and <|image|>')
    assert 1 not in ids and 320 not in ids and enc.decode(ids) == 'a </s> and <|image|>'
    assert enc.decode([320] + enc.encode_ordinary('red') + [1]) == '<|image|>red<|endoftext|>'
    assert enc.name.removeprefix('nanovlp_') == os.path.join(str(tmp_path / 'ckpt'), 'nanovlp_tokenizer.json')
    # a second import of the same tokenizer (another checkpoint of the run) is the same tokenizer
    other = run_import(tmp_path / 'hf', tmp_path / 'other', step=9)
    assert import_lm.tokenizer_identity(other['tokenizer']) == import_lm.tokenizer_identity(info['tokenizer']) != 'bytes'
    with pytest.raises(FileNotFoundError, match='import_lm.py writes'):
        data.get_tokenizer(str(tmp_path / 'moved' / 'nanovlp_tokenizer.json'))
    with pytest.raises(ValueError, match='not a tokenizer written by import_lm.py'):
        data.get_tokenizer(str(tmp_path / 'hf' / 'tokenizer.json'))


@pytest.mark.parametrize('change, message', [
    (dict(model_type='mistral'), 'model_type'), (dict(attention_bias=True), 'attention_bias'),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}), 'rope type'), (dict(head_dim=16), 'head_dim'),
    (dict(intermediate_size=96), r'of another shape \[.*mlp.gate_proj.weight \[80, 32\] \(config.json: \[96, 32\]\)'),
    (dict(num_hidden_layers=3), r"missing \['model.layers.2"),
    (dict(num_hidden_layers=1), r"unexpected \['model.layers.1"),
])
def test_a_folder_that_is_not_this_llama_is_refused(tmp_path, monkeypatch, change, message):
    llama_folder(tmp_path / 'hf')
    path = tmp_path / 'hf' / 'config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    monkeypatch.setattr(import_lm, 'convert', lambda *a: pytest.fail('a tensor was read before the check'))
    with pytest.raises(ValueError, match=message):
        run_import(tmp_path / 'hf', tmp_path / 'ckpt')
    assert not os.path.exists(tmp_path / 'ckpt')


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path):
    llama_folder(tmp_path / 'hf')
    os.replace(tmp_path / 'hf' / 'model.safetensors', tmp_path / 'hf' / 'pytorch_model.bin')
    with pytest.raises(ValueError, match=r"pytorch_model.bin: a pickle.*torch.load\('pytorch_model.bin', "
                                         r"weights_only=True\).*save_file"):
        run_import(tmp_path / 'hf', tmp_path / 'ckpt')


# -----------------------------------------------------------------------------
# the study: the image stage starts from the imported checkpoint and continues its schedule

@pytest.fixture(scope='module')
def imported(tmp_path_factory, shapes_dir):
    """A small Llama imported at step 30 of a 100-step run, and the shapes world's text in its tokenizer."""
    root = tmp_path_factory.mktemp('imported')
    llama_folder(root / 'hf')
    run_import(root / 'hf', root / 'ckpt', step=30, total_steps=100, peak_lr=1e-3, min_lr=1e-4, warmup=10,
               eval_items=20, shapes_out=str(root / 'shapes_tok'), data_dir=shapes_dir)
    return root


def config(imported, shapes_dir, *extra):
    import train
    return train.get_config(['--stages=image,finetune', f'--text_checkpoint={imported / "ckpt"}',
                             f'--dataset={imported / "shapes_tok"}', f'--data_dir={shapes_dir}',
                             '--encoder_weights=random', f'--out_dir={imported / "run"}',
                             f'--text_out_dir={imported / "unused"}', '--image_iters=4', *extra])


def test_the_image_stage_continues_the_source_schedule(imported, shapes_dir):
    import train
    meta = data.load_meta(str(imported / 'shapes_tok'))
    assert meta['tokenizer'] == str(imported / 'ckpt' / 'nanovlp_tokenizer.json') and meta['tokens']['train'] > 10_000
    info = read_checkpoint_info(str(imported / 'ckpt'))
    c = info['config']
    assert (info['step'], info['iters']) == (30, 100)
    assert (c['learning_rate'], c['min_lr'], c['warmup_iters']) == (1e-3, 1e-4, 10)
    reached = train.cosine_lr(30, 1e-3, 10, 100, 1e-4)  # the LR the source run had at step 30
    lr = train.image_schedule(config(imported, shapes_dir))
    assert lr(0) == pytest.approx(reached) and lr(4) == pytest.approx(1e-4)  # then a cosine to its min_lr
    cfg = config(imported, shapes_dir, '--image_inject_frac=1.0', '--rewarm_iters=2', '--image_lr=6e-4')
    assert train.image_schedule(cfg)(0) == pytest.approx(6e-4 / 3)  # fully trained: re-warms, as for our own
    assert train.checkpoint_of(cfg, 'text') == str(imported / 'ckpt')


@pytest.mark.parametrize('args, message', [
    (['--stages=text,image,finetune'], 'takes the text stage'), (['--image_inject_frac=0'], 'image_inject_frac=0'),
    (['--dataset=shapes'], 'has the tokenizer'), (['--block_size=512'], 'longer than the context'),
])
def test_text_checkpoint_config_errors(imported, shapes_dir, args, message):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match=message):
        config(imported, shapes_dir, *args)


def test_a_checkpoint_without_a_schedule_can_only_rewarm(tmp_path, imported, shapes_dir):
    from configurator import ConfigError
    run_import(imported / 'hf', tmp_path / 'ckpt')  # no --peak_lr: the schedule is unknown
    args = [f'--text_checkpoint={tmp_path / "ckpt"}']
    with pytest.raises(ConfigError, match='records no LR schedule'):
        config(imported, shapes_dir, *args)
    assert config(imported, shapes_dir, *args, '--image_inject_frac=1.0').text_checkpoint == str(tmp_path / 'ckpt')


@pytest.mark.slow
def test_import_score_and_train_the_image_stages_end_to_end(tmp_path, shapes_dir, monkeypatch, capsys):
    import eval as ev
    import train
    llama_folder(tmp_path / 'hf', n_head=4, n_kv_head=1, tied=True)
    flags = [f'--hf_dir={tmp_path / "hf"}', f'--out={tmp_path / "ckpt"}', '--step=30', '--total_steps=100',
             '--peak_lr=1e-3', '--min_lr=1e-4', '--warmup=10', '--eval_items=10',
             f'--shapes_out={tmp_path / "shapes_tok"}', f'--data_dir={shapes_dir}']
    # python import_lm.py FLAGS, its command line and all, in this process (a new interpreter costs seconds)
    monkeypatch.setattr(sys, 'argv', ['import_lm.py', *flags])
    runpy.run_path(os.path.join(ROOT, 'import_lm.py'), run_name='__main__')
    assert 'step 30 of 100' in capsys.readouterr().out
    # eval.py --ckpt: the shapes world's text tasks, asked in the imported tokenizer
    text = ev.evaluate_checkpoint(str(tmp_path / 'ckpt'), data_dir=shapes_dir, verbose=False)
    assert sorted(text['tasks']) == ['arithmetic', 'facts', 'long_arithmetic', 'rare_facts', 'sequence']
    assert all(t['n'] == 10 and 0 <= t['accuracy'] <= 1 for t in text['tasks'].values())
    assert text['vision_stable_score'] is None and text['text_stable_score'] is not None
    # train.py --stages=image,finetune --text_checkpoint=...: from it, on its tokenizer's shapes world
    out = tmp_path / 'run'
    cfg = train.get_config(['--stages=image,finetune', f'--text_checkpoint={tmp_path / "ckpt"}',
                            f'--dataset={tmp_path / "shapes_tok"}', f'--data_dir={shapes_dir}', f'--out_dir={out}',
                            f'--text_out_dir={tmp_path / "unused"}', '--image_iters=3', '--batch_size=4',
                            '--caption_scenes=40', '--conversations=40', '--finetune_epochs=1', '--rewarm_iters=1',
                            '--log_interval=1', '--encoder=siglip', '--encoder_weights=random', '--device=cpu',
                            '--cache_features=False', '--eval_items=5', '--text_eval_items=10'])
    train.main(cfg)
    with open(out / 'image' / 'metrics.jsonl') as f:
        first = json.loads(f.readline())
    assert first['lr'] == pytest.approx(train.cosine_lr(30, 1e-3, 10, 100, 1e-4))  # the source run's LR at step 30
    vlm, info = load_model(str(out / 'finetune'))
    assert info['tokenizer'] == str(tmp_path / 'ckpt' / 'nanovlp_tokenizer.json')
    assert vlm.gpt.config.n_kv_head == 1 and vlm.gpt.config.tie_embeddings and vlm.image_token == 320
    scores = ev.evaluate_checkpoint(str(out / 'finetune'), data_dir=shapes_dir, verbose=False)
    assert scores['vision_stable_score'] is not None and scores['tasks']['color']['n'] == 5


# -----------------------------------------------------------------------------
# parity with transformers' own Llama

@pytest.mark.slow
@pytest.mark.parametrize('n_kv_head, tied, shards', [(4, False, False), (2, True, False), (1, False, True),
                                                     (2, False, True)])
def test_logits_and_token_ids_equal_transformers(tmp_path, n_kv_head, tied, shards):
    transformers = pytest.importorskip('transformers')
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(n_kv_head)
    reference = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # weights large enough that every part of the model moves the logits
        for name, p in reference.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if 'norm' in name else 0.3 * torch.randn_like(p))
    hf = tmp_path / 'hf'
    reference.save_pretrained(hf, **({'max_shard_size': '100KB'} if shards else {}))
    assert os.path.exists(hf / 'model.safetensors.index.json') == shards
    transformers.PreTrainedTokenizerFast(tokenizer_object=write_tokenizer(tmp_path), bos_token='<s>',
                                         eos_token='</s>').save_pretrained(hf)
    run_import(hf, tmp_path / 'ckpt')
    gpt, info = load_model(str(tmp_path / 'ckpt'))
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (gpt(ids)[0][..., :320] - reference(ids).logits).abs().max().item()
    print(f'n_kv_head={n_kv_head} tied={tied} shards={shards}: max |logit difference| {diff:.2e}')
    assert diff < 1e-4
    enc = data.get_tokenizer(info['tokenizer'])
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    for text in SENTENCES[:5] + ['Numbers 1234 and symbols #@! in a new sentence.']:
        assert enc.encode_ordinary(text) == theirs(text, add_special_tokens=False).input_ids
        assert enc.decode(enc.encode_ordinary(text)) == theirs.decode(theirs(text, add_special_tokens=False).input_ids)
