"""The paper's benchmarks: each reader on a fixture written in its publisher's format, and the scoring wired to it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmarks
import data
import eval as ev
import likelihood
from conftest import REFERENCE, jsonl, mc
from encoders import build_encoder
from model import GPT, VLM, GPTConfig


def test_text_readers(bench):
    arc = benchmarks.read_task('arc_easy', bench)[0]
    assert arc[0] == {'prompt': 'Question: Which is a liquid?\nAnswer:', 'choices': [' rock', ' water', ' wood', ' iron'],
                      'answer': 1}
    assert arc[1]['answer'] == 1 and benchmarks.read_task('arc_challenge', bench)[0][0]['answer'] == 4
    assert benchmarks.read_task('openbookqa', bench)[0][0]['answer'] == 0
    hs = benchmarks.read_task('hellaswag', bench)[0][0]
    assert hs['prompt'] == 'Making a cake: A man mixes flour. He' and hs['answer'] == 0
    assert hs['choices'][2] == ' flies away.' and '[' not in hs['choices'][3]
    piqa = benchmarks.read_task('piqa', bench)[0]
    assert [p['answer'] for p in piqa] == [0, 1] and piqa[1]['choices'] == [' use water', ' use a towel']
    wino = benchmarks.read_task('winogrande', bench)[0][0]
    assert wino == {'prompt': ['The cup fell off the table because the cup', 'The cup fell off the table because the table'],
                    'choices': [' was tilted.', ' was tilted.'], 'answer': 1}


def test_vision_readers(bench):
    vqa = benchmarks.read_task('vqav2', bench)[0]
    assert vqa[0]['image'].endswith('val2014/COCO_val2014_000000000042.jpg') and len(vqa[0]['answers']) == 10
    assert vqa[0]['question'].startswith('What color is it?\nAnswer the question using a single word')
    assert benchmarks.read_task('gqa', bench)[0][0]['answers'] == ['red']
    assert benchmarks.read_task('textvqa', bench)[0][0]['image'].endswith('train_images/abc.jpg')
    assert [p['split'] for p in benchmarks.read_task('pope', bench)[0]] == ['random', 'random', 'popular', 'popular', 'adversarial', 'adversarial']
    assert benchmarks.read_task('vizwiz', bench)[0][0]['answers'][0] == 'unanswerable'


def test_limit_is_a_fixed_subset(tmp_path):
    jsonl(tmp_path / 'piqa' / 'valid.jsonl', [{'goal': f'g{i}', 'sol1': 'a', 'sol2': 'b'} for i in range(50)])
    (tmp_path / 'piqa' / 'valid-labels.lst').write_text('0\n' * 50)
    a, b = (benchmarks.read_task('piqa', str(tmp_path), limit=7)[0] for _ in range(2))
    assert a == b and len(a) == 7 and len({it['prompt'] for it in a}) == 7


def test_missing_file_says_where_and_what(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'gqa.testdev_balanced_questions.json is missing'):
        benchmarks.read_task('gqa', str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown task 'vqa2'; the tasks are: vision vqav2, gqa.*text arc_easy"):
        ev.benchmark_checkpoint(str(tmp_path / 'no_checkpoint_needed'), ['vqav2', 'vqa2'], str(tmp_path))


def test_text_benchmarks_score_with_known_chance(bench):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=320, n_layer=1, n_head=2, n_embd=32)).eval()
    enc = data.get_tokenizer('bytes')
    out = ev.run_benchmarks(gpt, enc, list(benchmarks.tasks_of('text')), bench)
    assert out['tasks']['arc_easy']['chance'] == pytest.approx((1 / 4 + 1 / 3) / 2)  # items with 4 and 3 choices
    assert out['tasks']['winogrande']['chance'] == 0.5 and out['tasks']['arc_challenge']['chance'] == 0.2
    assert all(0 <= t['accuracy_norm'] <= 1 for t in out['tasks'].values())
    assert out['text_stable_score'] is not None and out['vision_stable_score'] is None
    with pytest.raises(ValueError, match='text-only'):
        ev.run_benchmarks(gpt, enc, ['pope'], bench)


def test_vision_benchmarks_use_their_metrics(bench, monkeypatch):
    enc = data.get_tokenizer('bytes')
    gpt = GPT(GPTConfig(block_size=256, vocab_size=320, n_layer=1, n_head=2, n_embd=32))  # VizWiz's prompt: 170 bytes
    vlm = VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), data.special_id(enc, '<|image|>')).eval()
    replies = {'What color': 'Red.', 'square': 'red', 'say': 'STOP', 'this': 'unanswerable'}

    def fake_answer(model, enc, prompts, images, device):  # known replies: the test is of the scoring, not the model
        assert all(im.shape == (48, 48, 3) and im.dtype == np.uint8 for im in images)
        texts = [enc.decode([t for t in p if t < 256]) for p in prompts]
        return [next(v for k, v in replies.items() if k in t) for t in texts]

    def always_yes(model, seqs, device, **images):  # POPE: 'Yes' likelier than 'No' after every question
        return [(0.0 if enc.decode(cont) == 'Yes' else -1.0, False) for _, cont in seqs]

    monkeypatch.setattr(ev, 'answer', fake_answer)
    monkeypatch.setattr(likelihood, 'continuation_logprobs', always_yes)
    out = ev.run_benchmarks(vlm, enc, ['vqav2', 'gqa', 'textvqa', 'pope', 'vizwiz'], bench)  # grounding: its own file
    t = out['tasks']
    assert t['vqav2']['accuracy'] == pytest.approx(0.9) and t['vqav2']['n'] == 1  # 3 of 10 said red
    assert out['skipped'] == {'vqav2: missing file': 1}  # image 7 does not exist
    assert t['gqa']['accuracy'] == 1.0 and t['textvqa']['accuracy'] == 1.0 and t['vizwiz']['accuracy'] == 1.0
    # the genuine first two questions of each split: yes, then no; always yes gets half of each
    assert t['pope']['accuracy'] == 0.5 and t['pope']['chance'] == 0.5 and t['pope']['centered'] == 0.0
    assert t['pope']['splits']['random'] == {'accuracy': 0.5, 'precision': 0.5, 'recall': 1.0, 'f1': pytest.approx(2 / 3),
                                            'yes_ratio': 1.0, 'chance': 0.5, 'n': 2}
    assert t['pope']['version'].startswith('unknown') and 'Yes' in t['pope']['protocol']


def test_scorers_agree_with_their_references_on_genuine_records():
    """Genuine published records, and what the reference implementations (run on them when the fixture was made)
    score for each prediction: tests/reference_records.json names the source and the reference of each."""
    vqa = REFERENCE['vqav2']
    answers = [a['answer'] for a in vqa['annotation']['answers']]
    assert [benchmarks.vqav2_accuracy(p, answers) for p in vqa['predictions']] == vqa['expected']
    assert [benchmarks.vizwiz_accuracy(p, answers) for p in vqa['predictions']] == vqa['vizwiz_expected']
    tv = REFERENCE['textvqa']
    assert [benchmarks.textvqa_accuracy(p, tv['record']['answers']) for p in tv['predictions']] == tv['expected']


@pytest.mark.parametrize('prediction,answers,vqav2,textvqa', [
    ('two', ['two'] * 10, 0.0, 1.0),  # VQAv2's human answers keep their number words: 'two' is not '2' there
    ('a bottle', ['a bottle'] * 10, 0.0, 1.0),  # ... and their articles
    ('Two', ['2'] * 10, 1.0, 1.0), ('dont', ["don't"] * 10, 1.0, 1.0), ('1,000', ['1000'] * 10, 1.0, 1.0),
    ('black/white', ['black white'] * 10, 1.0, 1.0), ('3.5', ['35'] * 10, 0.0, 0.0)])
def test_vqa_normalization_is_the_official_one(prediction, answers, vqav2, textvqa):
    assert benchmarks.vqav2_accuracy(prediction, answers) == vqav2
    assert benchmarks.textvqa_accuracy(prediction, answers) == textvqa


def test_vizwiz_and_gqa_compare_with_the_answers_as_written():
    assert benchmarks.vizwiz_accuracy('unanswerable', ['Unanswerable'] * 10) == 0.0  # raw human answers
    assert benchmarks.vizwiz_accuracy('Unanswerable.', ['unanswerable'] * 10) == 1.0
    assert benchmarks.gqa_accuracy('The man.', 'the man') == 1.0
    assert benchmarks.gqa_accuracy('man', 'the man') == 0.0 and benchmarks.gqa_accuracy(' man', 'man') == 0.0


@pytest.mark.parametrize('task', ['hellaswag', 'winogrande', 'piqa', 'openbookqa', 'arc_challenge'])
def test_text_items_are_the_harness_requests_for_genuine_records(task, tmp_path):
    ref = REFERENCE[task]
    name = {'hellaswag': 'hellaswag_val.jsonl', 'winogrande': 'dev.jsonl', 'piqa': 'valid.jsonl',
            'openbookqa': 'test.jsonl', 'arc_challenge': 'ARC-Challenge-Test.jsonl'}[task]
    jsonl(tmp_path / task / name, ref['records'])
    if task == 'piqa':
        (tmp_path / task / 'valid-labels.lst').write_text('\n'.join(ref['labels']) + '\n')
    items, _ = benchmarks.read_task(task, str(tmp_path))
    for item, want in zip(items, ref['expected']):
        if task == 'winogrande':
            assert item['prompt'] == want['contexts'] and item['choices'] == [want['continuation']] * 2
        else:
            assert item['prompt'] == want['context'] and item['choices'] == want['continuations']
        assert item['answer'] == want['gold']


def test_acc_norm_counts_characters_without_the_delimiter_and_long_contexts_are_cut_from_the_left():
    enc = data.get_tokenizer('bytes')
    assert likelihood.harness_tokens(enc, 'Answer: ', 'yes') == (enc.encode_ordinary('Answer:'), enc.encode_ordinary(' yes'))
    assert likelihood.harness_tokens(enc, '', 'yes')[0] == [data.special_id(enc, '<|endoftext|>')]

    class Uniform(torch.nn.Module):  # every byte equally likely: log-likelihood is -len(bytes) * log(320)
        config = GPTConfig(block_size=32, vocab_size=320)

        def forward(self, idx):
            return torch.zeros(*idx.shape, 320), None

    items = [{'prompt': 'x' * 100, 'choices': [' a', ' abc'], 'answer': 1}]  # far longer than block_size
    raw, norm = likelihood.multiple_choice(Uniform(), enc, items, 'cpu')
    # per character, without the space: -2 log 320 / 1 < -4 log 320 / 3; with it, a tie that argmax gives to ' a'
    assert raw == [0.0] and norm == [1.0]


def test_pope_reports_the_version_of_its_files(tmp_path):
    for split, n in zip(benchmarks.POPE_SPLITS, (2910, 3000, 3000)):
        first = REFERENCE['pope']['splits'][split]['first']
        jsonl(tmp_path / 'pope' / f'coco_pope_{split}.json', (first * n)[:n])
    _, how = benchmarks.read_task('pope', str(tmp_path))
    assert how['version'].startswith('AoiDragon/POPE@e3e39262') and how['questions']['random'] == 2910
    assert {s: v['lines'] for s, v in REFERENCE['pope']['splits'].items()} == \
        {'random': 2910, 'popular': 3000, 'adversarial': 3000}  # the genuine pinned files, counted when fetched


def test_textvqa_uses_llava_ocr_prompt_when_its_file_is_there(tmp_path):
    tv = REFERENCE['textvqa']
    record = dict(tv['record'], image_id=tv['record']['image_id'])
    (tmp_path / 'textvqa').mkdir()
    (tmp_path / 'textvqa' / 'TextVQA_0.5.1_val.json').write_text(json.dumps({'data': [record]}))
    items, how = benchmarks.read_task('textvqa', str(tmp_path))
    assert items[0]['question'] == record['question'] + benchmarks.SHORT_ANSWER and 'none' in how['prompt']
    (tmp_path / 'textvqa' / 'TextVQA_0.5.1_val.json').write_text(json.dumps(
        {'data': [dict(record, ocr_tokens=tv['ocr_tokens'])]}))
    assert benchmarks.read_task('textvqa', str(tmp_path))[0][0]['question'] == tv['llava_prompt']
    jsonl(tmp_path / 'textvqa' / benchmarks.OCR_FILE, [{'question_id': record['image_id'], 'text': tv['llava_prompt']}])
    items, how = benchmarks.read_task('textvqa', str(tmp_path))
    assert items[0]['question'] == tv['llava_prompt'] and benchmarks.OCR_FILE in how['prompt']


@pytest.mark.parametrize('records,error', [
    ([{'goal': 'g', 'sol1': 'a'}], r"valid.jsonl, record 1: missing field 'sol2'"),
    ([{'goal': 'g', 'sol1': 'a', 'sol2': 3}], r'valid.jsonl, record 1: can only concatenate'),
])
def test_malformed_piqa_records_are_named(tmp_path, records, error):
    jsonl(tmp_path / 'piqa' / 'valid.jsonl', records)
    (tmp_path / 'piqa' / 'valid-labels.lst').write_text('0\n')
    with pytest.raises(ValueError, match=error):
        benchmarks.read_task('piqa', str(tmp_path))


def test_out_of_range_labels_and_unknown_answer_keys_are_named(tmp_path):
    jsonl(tmp_path / 'piqa' / 'valid.jsonl', [{'goal': 'g', 'sol1': 'a', 'sol2': 'b'}])
    (tmp_path / 'piqa' / 'valid-labels.lst').write_text('2\n')
    with pytest.raises(ValueError, match=r"record 1: label None is not one of the 2 choices"):
        benchmarks.read_task('piqa', str(tmp_path))
    jsonl(tmp_path / 'arc_easy' / 'ARC-Easy-Test.jsonl', [mc('Q?', ['a', 'b'], 'AB', 'E')])
    with pytest.raises(ValueError, match=r"ARC-Easy-Test.jsonl, record 1: answerKey 'E' is not among the choice labels"):
        benchmarks.read_task('arc_easy', str(tmp_path))
    hs = dict(REFERENCE['hellaswag']['records'][0], label=7)
    jsonl(tmp_path / 'hellaswag' / 'hellaswag_val.jsonl', [hs])
    with pytest.raises(ValueError, match=r'record 1: label 7 is not one of the 4 choices'):
        benchmarks.read_task('hellaswag', str(tmp_path))
    jsonl(tmp_path / 'pope' / 'coco_pope_random.json', [{'question_id': 1, 'image': 'x.jpg', 'text': 'Q?',
                                                          'label': 'maybe'}])
    with pytest.raises(ValueError, match=r"coco_pope_random.json, record 1: label 'maybe' is neither"):
        benchmarks.read_task('pope', str(tmp_path))
    (tmp_path / 'gqa').mkdir()
    (tmp_path / 'gqa' / 'testdev_balanced_questions.json').write_text('{"1": {"imageId": "n1", "question": "Q?"}}')
    with pytest.raises(ValueError, match=r"testdev_balanced_questions.json, record 1: missing field 'answer'"):
        benchmarks.read_task('gqa', str(tmp_path))


@pytest.mark.slow
def test_command_line_error_is_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, 'eval.py', f'--ckpt={tmp_path}', '--tasks=pope,mmlu'], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown task 'mmlu'; the tasks are")
    assert 'Traceback' not in proc.stderr
