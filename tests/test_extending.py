"""
The README's "Where to change what", followed to the letter: a new benchmark, a new encoder and a new stage, each
added the way the README says (here by registering them from the test, as an edit of the module would) and run.
"""
import json
import os

import pytest
import timm
import torch
from PIL import Image

import benchmarks
import data
import eval as ev
import prepare
import train
from encoders import ENCODERS, Encoder, EncoderSpec, build_encoder
from model import GPT, VLM, GPTConfig

TINY_RUN = ['--text_iters=8', '--save_fracs=[0.5,1.0]', '--image_inject_frac=0.5', '--warmup_iters=2',
            '--batch_size=4', '--image_iters=4', '--image_ratio=0.5', '--caption_scenes=40', '--conversations=40',
            '--finetune_epochs=1', '--rewarm_iters=1', '--log_interval=2', '--device=cpu', '--eval_items=20',
            '--encoder_weights=random']


# -----------------------------------------------------------------------------
# a new benchmark: a reader of the publisher's files under BENCH/<task>/, its scorer, an entry in BENCHMARKS

def read_shape_names(folder):
    """A vision benchmark in its publisher's layout: questions.json and the images it names under images/."""
    path = benchmarks.path_in(folder, 'questions.json')
    return benchmarks.items_of(path, benchmarks.read_json(path), lambda r: {
        'image': os.path.join(folder, 'images', r['file']), 'question': r['question'],
        'answers': benchmarks.answer_list([r['answer']])}), {'version': 'test fixture'}


def shape_name_accuracy(prediction, item):
    return float(ev.normalize_answer(prediction) == ev.normalize_answer(item['answers'][0]))


def test_a_new_benchmark_runs_as_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmarks.BENCHMARKS, 'shape_names',
                        benchmarks.Benchmark(read_shape_names, 'vision', 'generate', shape_name_accuracy))
    folder = tmp_path / 'bench' / 'shape_names'
    (folder / 'images').mkdir(parents=True)
    records = []
    for i, (color, answer) in enumerate([((220, 40, 40), 'red'), ((40, 180, 60), 'green'), ((60, 100, 240), 'blue')]):
        Image.new('RGB', (40, 40), color).save(folder / 'images' / f'{i}.png')
        records.append({'file': f'{i}.png', 'question': 'What color is it?', 'answer': answer})
    (folder / 'questions.json').write_text(json.dumps(records))
    enc = data.get_tokenizer('bytes')
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=320, n_layer=1, n_head=2, n_embd=32))
    vlm = VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), data.special_id(enc, '<|image|>')).eval()
    monkeypatch.setattr(ev, 'answer', lambda model, enc, prompts, images, device: ['Red', 'blue', 'Blue.'])
    out = ev.run_benchmarks(vlm, enc, ['shape_names'], str(tmp_path / 'bench'))
    task = out['tasks']['shape_names']
    assert task['scores'] == [1.0, 0.0, 1.0] and task['version'] == 'test fixture' and task['modality'] == 'vision'
    assert out['vision_stable_score'] == pytest.approx(2 / 3) and out['text_stable_score'] is None
    assert 'shape_names' in benchmarks.tasks_of('vision')


# -----------------------------------------------------------------------------
# a new encoder: an entry in ENCODERS; features neither a ViT's patch tokens nor a ResNet stage's map need an
# adapter, a subclass of Encoder with create() and features()

class ConvNeXtFeatures(Encoder):
    """A timm ConvNeXt cut after its second stage: its feature map as H*W tokens."""

    @classmethod
    def create(cls, entry, **kw):
        model = timm.create_model(entry['timm_id'], pretrained=False, **entry['kwargs'])
        return cls(model, **kw)

    def __init__(self, model, **kw):
        grid = kw['img_size'] // 8  # the stem's stride 4, then the second stage's 2
        super().__init__(num_tokens=grid * grid, dim=model.feature_info[1]['num_chs'], **kw)
        self.convnext = model

    def features(self, x):
        x = self.convnext.stages[1](self.convnext.stages[0](self.convnext.stem(x)))
        return x.flatten(2).transpose(1, 2)


@pytest.mark.slow
def test_a_new_encoder_trains_as_the_readme_says(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.setitem(ENCODERS, 'convnext', EncoderSpec(
        ConvNeXtFeatures,
        paper=dict(timm_id='convnext_base.fb_in22k', img_size=224, stride=8, num_tokens=784, dim=256,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        tiny=dict(timm_id='convnext_atto', img_size=48, stride=8, kwargs=dict(depths=(1, 1, 1, 1),
                                                                            dims=(16, 32, 64, 128)))))
    out = str(tmp_path / 'run')
    train.main(train.get_config(TINY_RUN + [f'--data_dir={shapes_dir}', f'--out_dir={out}',
                                            f'--text_out_dir={out}/text', '--encoder=convnext',
                                            '--evaluate=finetune']))
    with open(os.path.join(out, 'finetune', 'eval.json')) as f:
        assert json.load(f)['vision_stable_score'] is not None
    with open(os.path.join(out, 'finetune', 'config.json')) as f:
        assert json.load(f)['encoder']['name'] == 'convnext'


# -----------------------------------------------------------------------------
# a new stage: a function that states its Stage, and an entry in STAGES

def text_cooldown_stage(cfg, rt, prep):
    """A few steps of plain text after fine-tuning, at min_lr: does the text score come back?"""
    vlm = train.stage_input(cfg, rt, prep, 'text_cooldown')[1].train()
    tokens = data.open_shard(prep.folder, 'train')

    def batch(step, rows):
        x, y = data.text_batch(tokens, cfg.batch_size, cfg.block_size, data.seeded_generator(cfg.seed + 3, step), rows)
        return x, y, data.batch_inputs(prep.source, None, []), {}

    return train.Stage(vlm, batch, iters=4, lr=lambda step: cfg.min_lr, info=prepare.vlm_info(cfg, vlm))


@pytest.mark.slow
def test_a_new_stage_runs_as_the_readme_says(tmp_path, shapes_dir, monkeypatch, capsys):
    monkeypatch.setitem(train.STAGES, 'text_cooldown', train.StageKind(text_cooldown_stage, after='finetune',
                                                                        reads_images=True))
    out = str(tmp_path / 'run')
    train.main(train.get_config(TINY_RUN + [f'--data_dir={shapes_dir}', f'--out_dir={out}', '--encoder=siglip',
                                            f'--text_out_dir={out}/text', '--stages=text,image,finetune,text_cooldown',
                                            '--evaluate=text_cooldown']))
    with open(os.path.join(out, 'text_cooldown', 'config.json')) as f:
        info = json.load(f)
    assert info['stage'] == 'text_cooldown' and info['step'] == 4
    with open(os.path.join(out, 'text_cooldown', 'eval.json')) as f:
        assert json.load(f)['text_stable_score'] is not None
    lines = [json.loads(line) for line in open(os.path.join(out, 'text_cooldown', 'metrics.jsonl'))]
    assert [v['step'] for v in lines if 'loss' in v] == [2, 4] and all(v['lr'] == 3e-4 for v in lines if 'lr' in v)
    capsys.readouterr()
    # a finished stage is reused on the next run, as any stage is
    train.main(train.get_config(TINY_RUN + [f'--data_dir={shapes_dir}', f'--out_dir={out}', '--encoder=siglip',
                                            f'--text_out_dir={out}/text', '--stages=text_cooldown']))
    assert 'text_cooldown stage: already complete' in capsys.readouterr().out
