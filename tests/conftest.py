import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shapes  # noqa: E402

# The README runs the suite on two workers (pytest-xdist, -n 2). Most tests drive tiny models that one thread runs
# as fast as two, so each worker, and every process a test starts, runs on one thread: two workers then share the
# cores instead of four threads contending for two.
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'

with open(os.path.join(ROOT, 'tests', 'reference_records.json')) as _f:
    REFERENCE = json.load(_f)  # genuine published records, and what the reference scorers make of them


SMALL_WORLD = dict(train_bytes=300_000, val_bytes=20_000, n_task_items=24, verbose=False)  # the tests' shapes world


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small shapes world (same generator, fewer bytes), written once per test session; returns its data_dir."""
    data_dir = str(tmp_path_factory.mktemp('data'))
    shapes.prepare_text(data_dir, **SMALL_WORLD)
    return data_dir


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def one_thread():
    """The tiny encoders are too small to gain from threads; on a busy 2-core machine extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def mc(stem, texts, labels, key):
    return {'id': stem[:8], 'question': {'stem': stem, 'choices': [{'text': t, 'label': l} for t, l in zip(texts, labels)]},
            'answerKey': key}


@pytest.fixture
def bench(tmp_path):
    """Every benchmark of eval.py --tasks, a few items each, in its publisher's file layout under tmp_path/bench."""
    b = tmp_path / 'bench'
    jsonl(b / 'arc_easy' / 'ARC-Easy-Test.jsonl', [mc('Which is a liquid?', ['rock', 'water', 'wood', 'iron'],
                                                      'ABCD', 'B'),
                                                   mc('Pick two.', ['one', 'two', 'three'], '123', '2')])
    jsonl(b / 'arc_challenge' / 'ARC-Challenge-Test.jsonl', [mc('Hard?', ['yes', 'no', 'maybe', 'so', 'x'],
                                                                'ABCDE', 'E')])
    jsonl(b / 'openbookqa' / 'test.jsonl', [mc('The sun is a', ['star', 'moon', 'rock', 'car'], 'ABCD', 'A')])
    jsonl(b / 'hellaswag' / 'hellaswag_val.jsonl', [{
        'ind': 4, 'activity_label': 'Making a cake', 'ctx_a': 'A man mixes flour.', 'ctx_b': 'he',
        'ctx': 'A man mixes flour. he', 'endings': ['bakes it.', 'eats the bowl.', 'flies  away.', 'sings [title] loud.'],
        'label': '0', 'split': 'val'}])
    jsonl(b / 'piqa' / 'valid.jsonl', [{'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'eat the lid'},
                                       {'goal': 'Dry hair', 'sol1': 'use water', 'sol2': 'use a towel'}])
    (b / 'piqa' / 'valid-labels.lst').write_text('0\n1\n')
    jsonl(b / 'winogrande' / 'dev.jsonl', [{'qID': 'q1', 'sentence': 'The cup fell off the table because _ was tilted.',
                                            'option1': 'the cup', 'option2': 'the table', 'answer': '2'}])
    image = Image.new('RGB', (32, 32), (200, 30, 30))
    for folder, name in (('vqav2/val2014', 'COCO_val2014_000000000042.jpg'), ('gqa/images', 'n123.jpg'),
                         ('textvqa/train_images', 'abc.jpg'), ('pope/val2014', 'COCO_val2014_000000310196.jpg'),
                         ('vizwiz/val', 'VizWiz_val_00000001.jpg')):
        (b / folder).mkdir(parents=True)
        image.save(b / folder / name, 'JPEG')
    (b / 'vqav2' / 'v2_OpenEnded_mscoco_val2014_questions.json').write_text(json.dumps({'questions': [
        {'image_id': 42, 'question': 'What color is it?', 'question_id': 420},
        {'image_id': 7, 'question': 'Is the image missing?', 'question_id': 70}]}))
    answers = lambda words: [{'answer': w, 'answer_confidence': 'yes', 'answer_id': i + 1} for i, w in enumerate(words)]
    (b / 'vqav2' / 'v2_mscoco_val2014_annotations.json').write_text(json.dumps({'annotations': [
        {'question_id': 420, 'image_id': 42, 'answers': answers(['red'] * 3 + ['maroon'] * 7)},
        {'question_id': 70, 'image_id': 7, 'answers': answers(['yes'] * 10)}]}))
    (b / 'gqa' / 'testdev_balanced_questions.json').write_text(json.dumps({
        '201': {'imageId': 'n123', 'question': 'What color is the square?', 'answer': 'red'}}))
    (b / 'textvqa' / 'TextVQA_0.5.1_val.json').write_text(json.dumps({'dataset_name': 'textvqa', 'data': [
        {'question': 'What does it say?', 'image_id': 'abc', 'question_id': 1, 'answers': ['stop'] * 10}]}))
    for split, records in REFERENCE['pope']['splits'].items():  # genuine: the first two questions of each split
        jsonl(b / 'pope' / f'coco_pope_{split}.json', records['first'])
    (b / 'vizwiz' / 'val.json').write_text(json.dumps([{
        'image': 'VizWiz_val_00000001.jpg', 'question': 'What is this?', 'answerable': 0, 'answer_type': 'unanswerable',
        'answers': [{'answer': 'unanswerable', 'answer_confidence': 'yes'}] * 10}]))
    return str(b)


def write_tar(path, samples):
    """A tar of (member name, bytes), as img2dataset writes its WebDataset shards."""
    with tarfile.open(path, 'w') as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def run_train(args, ranks=0):
    """train.py with args in a subprocess: plain python, or torchrun with `ranks` processes (gloo on the CPU). Its
    stdout, then its stderr (warnings); a failure shows the ends of both."""
    cmd = [sys.executable, 'train.py', *args]
    if ranks:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}', *cmd[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def run_capped(code, cap_gib=1.5, timeout=120):
    """
    Python code in a subprocess whose private memory is capped (RLIMIT_DATA): a memory bomb that regresses fails
    there as a MemoryError, not on the machine. torch's own import takes about 0.6 GiB of it.
    """
    import resource
    cap = int(cap_gib * 2 ** 30)
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)),
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
