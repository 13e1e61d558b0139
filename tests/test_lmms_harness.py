"""lmms_harness.py: a checkpoint scored by lmms-eval itself, offline, on local tasks read from their publishers' files,
finds the answers and scores eval.py finds on the same items."""
import json
import os
from dataclasses import asdict

import pytest
import torch
from PIL import Image

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # the tasks read local files: nothing may be downloaded
os.environ.setdefault('HF_HUB_OFFLINE', '1')
lmms_eval = pytest.importorskip('lmms_eval')  # optional for users; .ci/run installs it so this runs in CI

import checkpoint  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
from conftest import REFERENCE, jsonl  # noqa: E402
from encoders import build_encoder  # noqa: E402
from model import GPT, VLM, GPTConfig  # noqa: E402

UTILS = '''"""Local lmms-eval tasks over the publishers' files (written by tests/test_lmms_harness.py)."""
import os

from PIL import Image

import benchmarks

BENCH = {bench!r}


def pope_visual(doc):
    return [Image.open(os.path.join(BENCH, 'pope', 'val2014', doc['image'])).convert('RGB')]


def pope_text(doc):
    return doc['text'] + benchmarks.SHORT_ANSWER


def pope_target(doc):
    return 0 if doc['label'] == 'yes' else 1


def textvqa_visual(doc):
    return [Image.open(os.path.join(BENCH, 'textvqa', 'train_images', doc['image_id'] + '.jpg')).convert('RGB')]


def textvqa_text(doc):
    return benchmarks.ocr_prompt(doc['question'], doc.get('ocr_tokens'))


def textvqa_results(doc, results):
    return {{'textvqa_accuracy': benchmarks.textvqa_accuracy(results[0], doc['answers'])}}
'''

POPE = '''task: nanovlp_pope_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {bench}/pope/coco_pope_random.json
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.pope_visual
doc_to_text: !function utils.pope_text
doc_to_choice: ['Yes', 'No']
doc_to_target: !function utils.pope_target
target_delimiter: ""
metric_list:
  - metric: acc
'''

TEXTVQA = '''task: nanovlp_textvqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {bench}/textvqa/TextVQA_0.5.1_val.json
  field: data
test_split: validation
output_type: generate_until
doc_to_visual: !function utils.textvqa_visual
doc_to_text: !function utils.textvqa_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: 16
  until: []
process_results: !function utils.textvqa_results
metric_list:
  - metric: textvqa_accuracy
    aggregation: mean
    higher_is_better: true
'''


def tiny_vlm_checkpoint(folder):
    """A small random VLM over bytes, saved as a checkpoint (as tests/test_sample.py saves one)."""
    enc = data.get_tokenizer('bytes')
    torch.manual_seed(5)
    gpt = GPT(GPTConfig(block_size=256, vocab_size=data.padded_vocab_size(enc), n_layer=2, n_head=2, n_embd=32))
    image_token = data.special_id(enc, '<|image|>')
    vlm = VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), image_token)
    encoder = {'name': 'patch', 'scale': 'tiny', 'weights': 'random', 'img_size': 48, 'frozen': False, 'saved': True,
               'projector': 'mlp', 'inject_layer': 0, 'image_token': image_token}
    info = {'stage': 'finetune', 'step': 1, 'tokenizer': 'bytes', 'model_args': asdict(gpt.config), 'config': {},
            'encoder': encoder}
    opt = vlm.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', encoder_lr=1e-4)
    checkpoint.save_checkpoint(str(folder), *checkpoint.full_state(vlm, opt), info)
    return str(folder)


def publisher_files(bench):
    """POPE's random split (JSON lines; the genuine first two questions and four more) and TextVQA's val file, with
    their images, in the publishers' layouts."""
    genuine = REFERENCE['pope']['splits']['random']['first']
    questions = genuine + [dict(genuine[i % 2], question_id=10 + i, text=f'Is there a {thing} in the image?',
                                label='yes' if i % 2 else 'no', image=f'COCO_val2014_00000000000{i}.jpg')
                           for i, thing in enumerate(('cup', 'dog', 'red car', 'small bird'))]
    jsonl(bench / 'pope' / 'coco_pope_random.json', questions)
    for split in ('popular', 'adversarial'):  # eval.py reads the three splits; lmms-eval's task, the random one
        (bench / 'pope' / f'coco_pope_{split}.json').write_text('')
    (bench / 'pope' / 'val2014').mkdir(parents=True)
    for i, q in enumerate(questions):
        Image.new('RGB', (40 + 8 * i, 32), (30 * i, 200 - 20 * i, 90)).save(bench / 'pope' / 'val2014' / q['image'])
    (bench / 'textvqa' / 'train_images').mkdir(parents=True)
    records = []
    for i, question in enumerate(('what does the sign say?', 'what brand is it?', 'what is the number here?',
                                  'what is written on the shirt of the man?')):
        Image.new('RGB', (36, 36 + 6 * i), (250 - 40 * i, 20 * i, 120)).save(bench / 'textvqa' / 'train_images' /
                                                                              f'img{i}.jpg')
        records.append({'question': question, 'image_id': f'img{i}', 'question_id': i, 'answers': ['stop'] * 10,
                        'ocr_tokens': ['STOP', 'Main St'] if i == 1 else []})
    return records


@pytest.mark.slow
def test_lmms_eval_finds_eval_py_answers_and_scores(tmp_path):
    ckpt = tiny_vlm_checkpoint(tmp_path / 'ckpt')
    bench = tmp_path / 'bench'
    records = publisher_files(bench)
    model, info = checkpoint.load_model(ckpt)
    enc = data.get_tokenizer('bytes')
    textvqa = bench / 'textvqa' / 'TextVQA_0.5.1_val.json'
    textvqa.write_text(json.dumps({'data': records}))
    first = ev.run_benchmarks(model, enc, ['textvqa'], str(bench))['tasks']['textvqa']['predictions']
    for record, said in zip(records[::2], first[::2]):  # half of the questions answered as the model answers them
        record['answers'] = [said] * 7 + ['stop'] * 3
    textvqa.write_text(json.dumps({'data': records}))
    ours = ev.run_benchmarks(model, enc, ['textvqa', 'pope'], str(bench))['tasks']

    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'utils.py').write_text(UTILS.format(bench=str(bench)))
    (tmp_path / 'tasks' / 'pope_local.yaml').write_text(POPE.format(bench=bench))
    (tmp_path / 'tasks' / 'textvqa_local.yaml').write_text(TEXTVQA.format(bench=bench))
    import lmms_harness
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    out = simple_evaluate(model=lmms_harness.NanoVLPLMMs(ckpt), tasks=['nanovlp_textvqa_local', 'nanovlp_pope_local'],
                          task_manager=TaskManager(include_path=str(tmp_path / 'tasks')), log_samples=True,
                          bootstrap_iters=0)
    samples = {task: sorted(s, key=lambda s: s['doc_id']) for task, s in out['samples'].items()}

    tv = samples['nanovlp_textvqa_local']
    assert [s['filtered_resps'][0] for s in tv] == ours['textvqa']['predictions']  # the same answers, item by item
    assert [s['textvqa_accuracy'] for s in tv] == ours['textvqa']['scores']
    assert 0 < sum(ours['textvqa']['scores']) < len(tv)
    accuracy = out['results']['nanovlp_textvqa_local']['textvqa_accuracy,none']
    assert accuracy == pytest.approx(ours['textvqa']['accuracy'])

    pope = samples['nanovlp_pope_local']
    assert [s['acc'] for s in pope] == ours['pope']['scores']  # the likelier of Yes and No, item by item
    lmms_yes = [s['filtered_resps'][0][0] <= s['filtered_resps'][1][0] for s in pope]  # the loss of Yes, of No
    assert ['yes' if y else 'no' for y in lmms_yes] == ours['pope']['predictions']
    assert out['results']['nanovlp_pope_local']['acc,none'] == pytest.approx(sum(ours['pope']['scores']) / 6)


@pytest.mark.slow  # importing lmms-eval takes seconds
def test_pil_images_become_the_pixels_eval_py_reads(tmp_path):
    import lmms_harness
    from images import decode_image
    for mode, size in (('RGB', (50, 30)), ('L', (30, 50)), ('RGBA', (40, 40)), ('P', (33, 20))):
        image = Image.new(mode, size, 90 if mode in ('L', 'P') else (200, 30, 30, 128)[:len(mode)])
        image.save(tmp_path / f'x.{mode}.png')
        want = decode_image((tmp_path / f'x.{mode}.png').read_bytes(), 24)
        assert (lmms_harness.pil_pixels(Image.open(tmp_path / f'x.{mode}.png'), 24) == want).all()
