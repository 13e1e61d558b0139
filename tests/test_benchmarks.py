"""The paper's benchmarks: each reader on a fixture written in its publisher's format, and the scoring wired to it."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmarks
import data
import eval as ev
from conftest import jsonl
from encoders import build_encoder
from model import GPT, VLM, GPTConfig


def test_text_readers(bench):
    arc = benchmarks.read_task('arc_easy', bench)
    assert arc[0] == {'prompt': 'Question: Which is a liquid?\nAnswer:', 'choices': [' rock', ' water', ' wood', ' iron'],
                      'answer': 1}
    assert arc[1]['answer'] == 1 and benchmarks.read_task('arc_challenge', bench)[0]['answer'] == 4
    assert benchmarks.read_task('openbookqa', bench)[0]['answer'] == 0
    hs = benchmarks.read_task('hellaswag', bench)[0]
    assert hs['prompt'] == 'Making a cake: A man mixes flour. He' and hs['answer'] == 0
    assert hs['choices'][2] == ' flies away.' and '[' not in hs['choices'][3]
    piqa = benchmarks.read_task('piqa', bench)
    assert [p['answer'] for p in piqa] == [0, 1] and piqa[1]['choices'] == [' use water', ' use a towel']
    wino = benchmarks.read_task('winogrande', bench)[0]
    assert wino == {'prompt': ['The cup fell off the table because the cup', 'The cup fell off the table because the table'],
                    'choices': [' was tilted.', ' was tilted.'], 'answer': 1}


def test_vision_readers(bench):
    vqa = benchmarks.read_task('vqav2', bench)
    assert vqa[0]['image'].endswith('val2014/COCO_val2014_000000000042.jpg') and len(vqa[0]['answers']) == 10
    assert vqa[0]['question'].startswith('What color is it?\nAnswer the question using a single word')
    assert benchmarks.read_task('gqa', bench)[0]['answers'] == ['red']
    assert benchmarks.read_task('textvqa', bench)[0]['image'].endswith('train_images/abc.jpg')
    assert [p['split'] for p in benchmarks.read_task('pope', bench)] == ['random', 'popular', 'adversarial']
    assert benchmarks.read_task('vizwiz', bench)[0]['answers'][0] == 'unanswerable'


def test_limit_is_a_fixed_subset(tmp_path):
    jsonl(tmp_path / 'piqa' / 'valid.jsonl', [{'goal': f'g{i}', 'sol1': 'a', 'sol2': 'b'} for i in range(50)])
    (tmp_path / 'piqa' / 'valid-labels.lst').write_text('0\n' * 50)
    a, b = (benchmarks.read_task('piqa', str(tmp_path), limit=7) for _ in range(2))
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
    out = ev.run_benchmarks(gpt, enc, list(benchmarks.TEXT_TASKS), bench)
    assert out['tasks']['arc_easy']['chance'] == pytest.approx((1 / 4 + 1 / 3) / 2)  # items with 4 and 3 choices
    assert out['tasks']['winogrande']['chance'] == 0.5 and out['tasks']['arc_challenge']['chance'] == 0.2
    assert all(0 <= t['accuracy_norm'] <= 1 for t in out['tasks'].values())
    assert out['text_stable_score'] is not None and out['vision_stable_score'] is None
    with pytest.raises(ValueError, match='text-only'):
        ev.run_benchmarks(gpt, enc, ['pope'], bench)


def test_vision_benchmarks_use_their_metrics(bench, monkeypatch):
    enc = data.get_tokenizer('bytes')
    gpt = GPT(GPTConfig(block_size=128, vocab_size=320, n_layer=1, n_head=2, n_embd=32))
    vlm = VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), data.special_id(enc, '<|image|>')).eval()
    replies = {'What color': 'Red.', 'square': 'red', 'say': 'STOP', 'dog': 'Yes, there is.', 'this': 'unanswerable'}

    def fake_answer(model, enc, prompts, images, device):  # known replies: the test is of the scoring, not the model
        assert all(im.shape == (48, 48, 3) and im.dtype == np.uint8 for im in images)
        texts = [enc.decode([t for t in p if t < 256]) for p in prompts]
        return [next(v for k, v in replies.items() if k in t) for t in texts]

    monkeypatch.setattr(ev, 'answer', fake_answer)
    out = ev.run_benchmarks(vlm, enc, list(benchmarks.VISION_TASKS), bench)
    t = out['tasks']
    assert t['vqav2']['accuracy'] == pytest.approx(0.9) and t['vqav2']['n'] == 1  # 3 of 10 said red
    assert out['skipped'] == {'vqav2: missing file': 1}  # image 7 does not exist
    assert t['gqa']['accuracy'] == 1.0 and t['textvqa']['accuracy'] == 1.0 and t['vizwiz']['accuracy'] == 1.0
    assert t['pope']['accuracy'] == pytest.approx(1 / 3) and t['pope']['chance'] == 0.5
    assert t['pope']['splits']['random'] == {'accuracy': 1.0, 'n': 1, 'f1': 1.0}
    assert t['pope']['splits']['popular']['f1'] == 0.0


@pytest.mark.slow
def test_command_line_error_is_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, 'eval.py', f'--ckpt={tmp_path}', '--tasks=pope,mmlu'], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown task 'mmlu'; the tasks are")
    assert 'Traceback' not in proc.stderr
