"""
One bad benchmark item never stops a run (issue 32, item 9): an image named "" or with a NUL byte, a question longer
than the model's block, a continuation longer than the block are each skipped and counted, or scored in windows; a
file that is not UTF-8 is an error that names it and the line.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import benchmarks
import data
import eval as ev
import likelihood
from conftest import jsonl, mc
from encoders import build_encoder
from images import BadImage
from model import GPT, VLM, GPTConfig
from PIL import Image

ENC = data.get_tokenizer('bytes')


def vlm(block_size=256):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=block_size, vocab_size=data.padded_vocab_size(ENC), n_layer=1, n_head=2, n_embd=32))
    return VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), data.special_id(ENC, '<|image|>')).eval()


def vizwiz_record(image, question='What is this?'):
    return {'image': image, 'question': question, 'answerable': 1, 'answer_type': 'other',
            'answers': [{'answer': 'cup', 'answer_confidence': 'yes'}] * 10}


def test_an_image_named_empty_or_with_a_nul_byte_is_a_counted_skip(tmp_path):
    (tmp_path / 'vizwiz' / 'val').mkdir(parents=True)
    Image.new('RGB', (32, 32), (200, 30, 30)).save(tmp_path / 'vizwiz' / 'val' / 'VizWiz_val_00000001.jpg')
    records = [vizwiz_record('VizWiz_val_00000001.jpg'), vizwiz_record(''), vizwiz_record('VizWiz\0val.jpg'),
               vizwiz_record('  ')]
    (tmp_path / 'vizwiz' / 'val.json').write_text(json.dumps(records))
    out = ev.run_benchmarks(vlm(), ENC, ['vizwiz'], str(tmp_path))  # IsADirectoryError, 'embedded null byte' before
    assert out['skipped'] == {'vizwiz: no image file named': 2, 'vizwiz: NUL byte in the image name': 1}
    assert out['tasks']['vizwiz']['n'] == 1
    records = [{'question_id': 1, 'image': '', 'text': 'Is there a cup?', 'label': 'yes'},
               {'question_id': 2, 'image': 'x.jpg', 'text': 'Is there a cup?', 'label': 'no'}]
    for split in benchmarks.POPE_SPLITS:
        jsonl(tmp_path / 'pope' / f'coco_pope_{split}.json', records)
    items, how = benchmarks.read_task('pope', str(tmp_path))
    assert len(items) == 3 and how['skipped'] == {'no image file named': 3}


def test_a_reader_that_names_a_folder_or_a_nul_byte_still_gets_a_counted_skip(tmp_path):
    """For a reader that does not check its names (a new benchmark's, say): the image is read as a BadImage."""
    (tmp_path / 'task' / 'images').mkdir(parents=True)
    for name, reason in (('', 'not a regular file'), ('a\0b.jpg', 'unusable file name')):
        with pytest.raises(BadImage, match=reason):
            ev.benchmark_image({'image': str(tmp_path / 'task' / 'images' / name)}, str(tmp_path / 'task'), 48)


def test_a_question_longer_than_the_block_is_a_counted_skip(tmp_path):
    b = tmp_path
    (b / 'vqav2' / 'val2014').mkdir(parents=True)
    Image.new('RGB', (32, 32)).save(b / 'vqav2' / 'val2014' / 'COCO_val2014_000000000042.jpg')
    long = 'Is the ' + 'very ' * 60 + 'red cup on the table?'
    assert len(long) == 328  # 417 tokens with the image's 36 and the instruction
    (b / 'vqav2' / 'v2_OpenEnded_mscoco_val2014_questions.json').write_text(json.dumps({'questions': [
        {'image_id': 42, 'question': 'What color is it?', 'question_id': 1},
        {'image_id': 42, 'question': long, 'question_id': 2}]}))
    answers = [{'answer': 'red', 'answer_confidence': 'yes', 'answer_id': i} for i in range(10)]
    (b / 'vqav2' / 'v2_mscoco_val2014_annotations.json').write_text(json.dumps({'annotations': [
        {'question_id': 1, 'image_id': 42, 'answers': answers},
        {'question_id': 2, 'image_id': 42, 'answers': answers}]}))
    (b / 'pope' / 'val2014').mkdir(parents=True)
    Image.new('RGB', (32, 32)).save(b / 'pope' / 'val2014' / 'x.jpg')
    for split in benchmarks.POPE_SPLITS:
        jsonl(b / 'pope' / f'coco_pope_{split}.json', [
            {'question_id': 1, 'image': 'x.jpg', 'text': long, 'label': 'no'},
            {'question_id': 2, 'image': 'x.jpg', 'text': 'Cup?', 'label': 'no'}])
    out = ev.run_benchmarks(vlm(256), ENC, ['vqav2', 'pope'], str(b))
    assert out['skipped'] == {'vqav2: prompt longer than block_size': 1, 'pope: prompt longer than block_size': 3}
    assert out['tasks']['vqav2']['n'] == 1 and out['tasks']['pope']['n'] == 3
    model = vlm(256)
    prompt = data.question_prompt(ENC, long + benchmarks.SHORT_ANSWER, model.encoder.num_tokens)
    assert len(prompt) > 256 and ev.askable(ENC, model, {'question': 'What color?'}, 'generate') is not None


def test_a_file_that_is_not_utf8_is_an_error_naming_it_and_the_line(tmp_path):
    (tmp_path / 'arc_easy').mkdir()
    lines = [json.dumps(mc('Which is a liquid?', ['rock', 'water'], 'AB', 'B')),
             json.dumps(mc('Which is a café?', ['rock', 'café'], 'AB', 'B'), ensure_ascii=False)]
    (tmp_path / 'arc_easy' / 'ARC-Easy-Test.jsonl').write_bytes('\n'.join(lines).encode('latin-1'))
    with pytest.raises(ValueError, match=r"arc_easy/ARC-Easy-Test.jsonl, line 2: not UTF-8 text \(byte \d+ of the "
                                         r"line is b'\\xe9'\)"):
        benchmarks.read_task('arc_easy', str(tmp_path))
    jsonl(tmp_path / 'piqa' / 'valid.jsonl', [{'goal': 'g', 'sol1': 'a', 'sol2': 'b'}])
    (tmp_path / 'piqa' / 'valid-labels.lst').write_bytes(b'\xe9\n')
    with pytest.raises(ValueError, match=r'piqa/valid-labels.lst, line 1: not UTF-8'):
        benchmarks.read_task('piqa', str(tmp_path))


class Tiny(torch.nn.Module):
    """A GPT with a 16-token block: every continuation over 16 tokens needs windows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.gpt = GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).eval()
        self.config = self.gpt.config

    def forward(self, idx):
        assert idx.shape[1] <= 16  # never more than the block
        return self.gpt(idx)


def window_logprob(model, ctx, cont):
    """The log-probability of cont after the last tokens of ctx, in one forward pass (ctx + cont fit the block)."""
    full = torch.tensor([ctx + cont])
    logprobs = F.log_softmax(model(full[:, :-1])[0].float(), dim=-1)[0]
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_a_continuation_longer_than_the_block_is_scored_in_windows(tmp_path):
    model = Tiny()
    ctx, cont = ENC.encode_ordinary('Question: how?\nAnswer:'), ENC.encode_ordinary(' ' + 'x' * 40)  # 41 > 16
    (lp, greedy), = likelihood.continuation_logprobs(model, [(ctx, cont)], 'cpu')  # IndexError: index -... before
    full = ctx + cont  # windows of 16 predicted tokens, each after the 16 tokens (or as many as fit) before it
    pieces = [(full[:len(ctx) + 16][-17:-16], cont[:16]), (full[len(ctx) + 15:len(ctx) + 16], cont[16:32]),
              (full[len(ctx) + 32 - 8:len(ctx) + 32], cont[32:])]
    assert likelihood.windows(ctx, cont, 16) == pieces
    assert lp == pytest.approx(sum(window_logprob(model, c, t) for c, t in pieces), abs=1e-4)
    short = ENC.encode_ordinary(' yes')  # one that fits: one window, the context cut from the left
    (lp_short, _), = likelihood.continuation_logprobs(model, [(ctx, short)], 'cpu')
    assert lp_short == pytest.approx(window_logprob(model, ctx[-(17 - len(short)):], short), abs=1e-5)

    jsonl(tmp_path / 'piqa' / 'valid.jsonl', [{'goal': 'Open a jar', 'sol1': 'twist ' * 20, 'sol2': 'pull'},
                                              {'goal': 'Dry hair', 'sol1': 'towel', 'sol2': 'water'}])
    (tmp_path / 'piqa' / 'valid-labels.lst').write_text('0\n1\n')
    out = ev.run_benchmarks(model, ENC, ['piqa'], str(tmp_path))
    assert out['tasks']['piqa']['n'] == 2 and out['tasks']['piqa']['windowed'] == 1
    with pytest.raises(ValueError, match='at least one token'):
        likelihood.windows([], cont, 16)
