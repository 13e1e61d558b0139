"""
Grounding (RefCOCO, RefCOCO+, RefCOCOg, OCID-Ref) as TRI-ML vlm-evaluation runs it: the readers on files in the
publishers' layouts, the scorer and the slim subsets checked against what vlm-evaluation's own code produced
(tests/fixtures/vlm_evaluation_grounding.json names the commit, the files and the functions), the refer pickles read
without running anything, and the paper's vision suite through eval.py.
"""
import json
import os
import pickle
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks
import grounding
import checkpoint
import data
import eval as ev
from encoders import build_encoder
from model import GPT, VLM, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, 'tests', 'fixtures', 'vlm_evaluation_grounding.json')) as _f:
    REF = json.load(_f)  # vlm-evaluation's outputs on the synthetic files and predictions it also holds
GROUNDING = ('refcoco', 'refcoco+', 'refcocog', 'ocid_ref')


def write_refer(bench, files=REF['refcoco']['files'], images=True):
    """The refer download (refs pickles, instances.json) and COCO train2014 images under bench/refcoco/."""
    root = bench / 'refcoco'
    for dataset, f in files.items():
        (root / dataset).mkdir(parents=True, exist_ok=True)
        (root / dataset / f['refs_file']).write_bytes(pickle.dumps(f['refs'], protocol=2))  # as refer's were made
        (root / dataset / 'instances.json').write_text(json.dumps(f['instances']))
    if images:
        (root / 'train2014').mkdir(exist_ok=True)
        for image_id, (w, h) in REF['refcoco']['image_sizes'].items():
            Image.new('RGB', (w, h), (int(image_id) % 255, 90, 40)).save(
                root / 'train2014' / f'COCO_train2014_{int(image_id):012d}.jpg')
    return root


def write_ocid(bench, records=REF['ocid_ref']['records'], images=True):
    root = bench / 'ocid_ref'
    root.mkdir(parents=True, exist_ok=True)
    (root / 'val_expressions.json').write_text(json.dumps(records))
    if images:
        for r in records.values():
            path = root / 'OCID-dataset' / r['scene_path']
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', grounding.OCID_SIZE, (r['take_id'] * 12, 60, 90)).save(path)
    return root


# -----------------------------------------------------------------------------
# the scorer and the boxes, item by item against vlm-evaluation's functions

def test_the_scorer_is_vlm_evaluations_on_generated_predictions():
    rows = REF['scorer']
    assert len(rows) == 2000 and REF['source']['commit'].startswith('d9f58967')
    parsed = [grounding.parse_box(text) for text, *_ in rows]
    assert parsed == [box for _, _, box, *_ in rows]  # malformed, reversed, out of range, non-numeric: None alike
    assert [None if p is None else grounding.box_iou(p, gt) for p, (_, gt, *_) in zip(parsed, rows)] == \
        [iou for _, _, _, iou, _, _ in rows]  # exactly: the same arithmetic
    for threshold, column in ((0.5, 4), (0.25, 5)):
        assert [grounding.grounding_accuracy(text, gt, threshold) for text, gt, *_ in rows] == \
            [float(row[column]) for row in rows]
    assert 300 < sum(p is None for p in parsed) < 1700
    assert 100 < sum(row[4] for row in rows) < sum(row[5] for row in rows)  # both sides of both thresholds


def test_boxes_are_normalized_and_rounded_as_vlm_evaluation_does():
    for case in REF['normalization']:
        if 'refcoco' in case:
            x, y, w, h = case['xywh']
            assert grounding.normalized_box(x, y, x + w, y + h, case['size']) == case['refcoco']
        else:
            assert grounding.normalized_box(*case['xyxy'], case['size']) == case['ocidref']
    with pytest.raises(benchmarks.Skip, match='box outside its image'):
        grounding.normalized_box(10, 10, 30, 50, (20, 100))
    with pytest.raises(benchmarks.Skip, match='box outside its image'):
        grounding.normalized_box(10, 10, 10, 50, (20, 100))  # empty


@pytest.mark.parametrize('text,box', [('[0.1, 0.2, 0.5, 0.6]', [0.1, 0.2, 0.5, 0.6]), ('[0.5, 0.2, 0.1, 0.6]', None),
                                      ('(0.1, 0.2, 0.5, 0.6)', None), ('[0.1, 0.2, 1.5, 0.6]', None),
                                      ('a dog', None), ("__import__('os').system('x')", None),
                                      ('[0, 0, 1, 1]', [0, 0, 1, 1])])
def test_a_box_is_a_python_list_of_four_normalized_corners(text, box):
    assert grounding.parse_box(text) == box


# -----------------------------------------------------------------------------
# the readers: vlm-evaluation's index from the same files, and its slim subsets

def test_refcoco_readers_give_vlm_evaluations_index(tmp_path):
    root = write_refer(tmp_path, images=False)
    items = {}
    for task in ('refcoco', 'refcoco+', 'refcocog'):
        got, how = benchmarks.read_task(task, str(tmp_path))
        assert how['version'].startswith('unknown') and how['refs'] == sum(
            r['split'] == 'val' for r in REF['refcoco']['files'][task]['refs'])  # synthetic: not the real counts
        items.update((it['key'], it) for it in got)
    index = {(e['refer_dataset'], e['ref_id'], e['sent_id']): e for e in REF['refcoco']['index']}
    assert items.keys() == index.keys()  # every sentence of every val ref, no other split
    for key, e in index.items():
        it = items[key]
        assert it['box'] == e['bbox'] and it['question'] == grounding.GROUNDING_PROMPT.format(e['ref_expression'])
        assert it['image'] == str(root / e['img_path'].removeprefix('download/refcoco/'))
    genuine = items[('RefCOCO', 1000, 100)]  # MarkHershey/refer's annotation 3007 on image 98304 (640 x 424)
    assert genuine['box'] == [0.41, 0.51, 0.45, 0.55] and genuine['size'] == [640, 424]
    assert not any(k[1] == 0 for k in items)  # the genuine ref 0 is in train
    slim = grounding.refcoco_slim(str(root), REF['refcoco']['slim_n'])
    assert slim == {(e['refer_dataset'], e['ref_id'], e['sent_id']) for e in REF['refcoco']['slim']}
    got, how = benchmarks.read_task('refcocog', str(tmp_path), slim=REF['refcoco']['slim_n'])
    assert {it['key'] for it in got} == {k for k in slim if k[0] == 'RefCOCOg'} and 'slim-4' in how['subset']


def test_ocid_reader_gives_vlm_evaluations_index_and_slim_subset(tmp_path):
    root = write_ocid(tmp_path, images=False)
    items, how = benchmarks.read_task('ocid_ref', str(tmp_path))
    index = {e['example_id']: e for e in REF['ocid_ref']['index']}
    assert [it['key'][1] for it in items] == [int(k) for k in REF['ocid_ref']['records']]  # the file's order
    for it in items:
        e = index[it['key'][1]]
        assert (it['box'], it['group']) == (e['bbox'], e['clutter_split'])
        assert it['image'] == str(root / e['img_path'].removeprefix('download/ocid-ref/'))
    assert {k[1] for k in grounding.ocid_slim(str(root), REF['ocid_ref']['slim_n'])} == set(REF['ocid_ref']['slim'])
    assert how['version'].startswith('unknown: 70 expressions')


def test_items_that_cannot_be_asked_are_counted_and_malformed_ones_named(tmp_path):
    files = json.loads(json.dumps(REF['refcoco']['files']))
    refs, instances = files['refcoco']['refs'], files['refcoco']['instances']
    val = [r for r in refs if r['split'] == 'val']
    instances['annotations'] = [a for a in instances['annotations'] if a['id'] != val[1]['ann_id']]
    width = {im['id']: im['width'] for im in instances['images']}
    for a in instances['annotations']:
        if a['id'] == val[2]['ann_id']:
            a['bbox'][2] = width[a['image_id']] + 1  # reaches past the image's right edge
    write_refer(tmp_path, {'refcoco': files['refcoco']}, images=False)
    items, how = benchmarks.read_task('refcoco', str(tmp_path))
    assert how['skipped'] == {'ref without its annotation or image in instances.json': len(val[1]['sentences']),
                              'box outside its image': len(val[2]['sentences'])}
    refs[3]['sentences'][0].pop('sent')
    write_refer(tmp_path, {'refcoco': files['refcoco']}, images=False)
    with pytest.raises(ValueError, match=r"refs\(unc\).p, record 4: missing field 'sent'"):
        benchmarks.read_task('refcoco', str(tmp_path))

    records = json.loads(json.dumps(REF['ocid_ref']['records']))
    first, second, third = list(records)[:3]
    records[first]['take_id'] = 21
    records[second]['scene_path'] = ''
    records[third]['bbox'] = '[600, 10, 700, 20]'
    write_ocid(tmp_path, records, images=False)
    assert benchmarks.read_task('ocid_ref', str(tmp_path))[1]['skipped'] == {
        'take_id outside 0-20': 1, 'no image file named': 1, 'box outside its image': 1}
    records[third]['bbox'] = [1, 2, 3, 4]  # a list, where the file holds a JSON string
    write_ocid(tmp_path, records, images=False)
    with pytest.raises(ValueError, match=r'val_expressions.json, record 3: the JSON object must be str'):
        benchmarks.read_task('ocid_ref', str(tmp_path))


# -----------------------------------------------------------------------------
# the refer pickles: plain data only, nothing run

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious refs(unc).p would carry
        return os.system, (f'touch {self.marker}',)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'refcoco' / 'refcoco' / 'refs(unc).p'
    write_refer(tmp_path, images=False)
    for protocol in (0, 2, 5):
        bad.write_bytes(pickle.dumps([{'ref_id': 1}, Payload(marker)], protocol=protocol))
        with pytest.raises(ValueError, match=r'refs\(unc\).p: refused unread, its opcode (GLOBAL|STACK_GLOBAL) '):
            benchmarks.read_task('refcoco', str(tmp_path))
        assert not marker.exists()
    # behind the opcode check, the unpickler itself can make no object
    with pytest.raises(pickle.UnpicklingError, match='names the global posix.system'):
        import io
        grounding.PlainUnpickler(io.BytesIO(pickle.dumps(Payload(marker), protocol=2))).load()
    assert not marker.exists()
    bad.write_bytes(pickle.dumps([{'a': 1}] * 3, protocol=2)[:-7])  # truncated
    with pytest.raises(ValueError, match=r'refs\(unc\).p is not a readable pickle'):
        benchmarks.read_task('refcoco', str(tmp_path))
    bad.write_bytes(b'\x80\x02X\xff\xff\xff\x7f' + b'a' * 10)  # claims a 2 GB string
    with pytest.raises(ValueError, match=r'not a readable pickle'):
        benchmarks.read_task('refcoco', str(tmp_path))
    bad.write_bytes(pickle.dumps({'refs': []}, protocol=2))
    with pytest.raises(ValueError, match=r'refs\(unc\).p: expected the list of refs'):
        benchmarks.read_task('refcoco', str(tmp_path))
    assert grounding.read_plain_pickle(str(bad)) == {'refs': []}


# -----------------------------------------------------------------------------
# eval.py: the grounding tasks on a checkpoint, and the paper's vision suite

def tiny_vlm(block_size=256):
    enc = data.get_tokenizer('bytes')
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=block_size, vocab_size=data.padded_vocab_size(enc), n_layer=1, n_head=2, n_embd=32))
    return VLM(gpt, build_encoder('patch', 'tiny', 'random', freeze=False), data.special_id(enc, '<|image|>')).eval()


def save_vlm(folder, vlm):
    encoder = {'name': 'patch', 'scale': 'tiny', 'weights': 'random', 'img_size': 48, 'frozen': False, 'saved': True,
               'projector': 'mlp', 'inject_layer': 0, 'image_token': vlm.image_token}
    info = {'stage': 'finetune', 'step': 1, 'tokenizer': 'bytes', 'model_args': asdict(vlm.gpt.config), 'config': {},
            'encoder': encoder}
    opt = vlm.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', encoder_lr=1e-4)
    checkpoint.save_checkpoint(str(folder), *checkpoint.full_state(vlm, opt), info)
    return str(folder)


def test_eval_scores_grounding_from_the_publishers_files(tmp_path, monkeypatch):
    """Known replies (the reference box, a box a sixteenth of it, text): each task's accuracy, its groups, the
    predictions that are no box, and an image whose size is not its annotation's, skipped and counted."""
    bench = tmp_path / 'bench'
    write_refer(bench)
    write_ocid(bench)
    first = REF['refcoco']['index'][0]
    Image.new('RGB', (20, 30)).save(bench / 'refcoco' / first['img_path'].removeprefix('download/refcoco/'))
    vlm, enc = tiny_vlm(), data.get_tokenizer('bytes')
    bad_image = str(bench / 'refcoco' / first['img_path'].removeprefix('download/refcoco/'))
    kept = [[it for it in benchmarks.read_task(task, str(bench))[0] if it['image'] != bad_image] for task in GROUNDING]
    asked = []

    def reply(n, box):
        small = [box[0], box[1], box[0] + (box[2] - box[0]) / 4, box[1] + (box[3] - box[1]) / 4]  # IoU 1/16
        return [str(box), ' ' + str(small) + '\n', 'a cup'][n % 3]

    def known_answers(model, enc, prompts, images, device, max_new_tokens=16):  # called once per task, in order
        assert max_new_tokens == 128 and all(im.shape == (48, 48, 3) for im in images)
        items = kept[len(asked)]
        asked.append([enc.decode([t for t in p if t < 256]) for p in prompts])
        assert [text.endswith(it['question']) for text, it in zip(asked[-1], items)] == [True] * len(items)
        return [reply(n, it['box']) for n, it in enumerate(items)]

    monkeypatch.setattr(ev, 'answer', known_answers)
    out = ev.run_benchmarks(vlm, enc, list(GROUNDING), str(bench))
    task_of = {'RefCOCO': 'refcoco', 'RefCOCO+': 'refcoco+', 'RefCOCOg': 'refcocog'}
    mis_sized = {}
    for e in REF['refcoco']['index']:  # every sentence of a ref on that image, in whichever dataset
        if e['img_path'] == first['img_path']:
            key = f"{task_of[e['refer_dataset']]}: image size differs from its annotation"
            mis_sized[key] = mis_sized.get(key, 0) + 1
    assert out['skipped'] == mis_sized
    for task, questions in zip(GROUNDING, asked):
        t = out['tasks'][task]
        assert t['scores'] == [float(n % 3 == 0) for n in range(len(questions))]  # only the reference box counts
        assert t['accuracy'] == pytest.approx(np.mean(t['scores'])) and t['chance'] == 0.0
        assert t['invalid'] == sum(p == 'a cup' for p in t['predictions']) == len(questions) // 3
        assert t['n'] == len(questions) and t['n'] + sum(n for k, n in mis_sized.items() if k.startswith(task + ':')) \
            == len(benchmarks.read_task(task, str(bench))[0])
    assert sum(g['n'] for g in out['tasks']['ocid_ref']['groups'].values()) == 70
    assert set(out['tasks']['ocid_ref']['groups']) <= {'Minimum Clutter', 'Medium Clutter', 'Maximum Clutter'}
    assert out['vision_stable_score'] == pytest.approx(np.mean([out['tasks'][t]['accuracy'] for t in GROUNDING]))


@pytest.mark.slow
def test_the_command_line_scores_a_checkpoint_on_the_grounding_files(tmp_path):
    """python eval.py --tasks=refcoco,refcoco+,refcocog,ocid_ref on a tiny random VLM and the publishers' layouts."""
    import subprocess
    import sys
    ckpt, bench = save_vlm(tmp_path / 'ckpt', tiny_vlm()), tmp_path / 'bench'
    write_refer(bench)
    write_ocid(bench)
    proc = subprocess.run([sys.executable, 'eval.py', f'--ckpt={ckpt}', f'--bench_dir={bench}',
                           '--tasks=refcoco,refcoco+,refcocog,ocid_ref', '--limit=3'], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.load(open(os.path.join(ckpt, 'eval_bench.json')))
    for task in GROUNDING:  # the random model's generated texts, scored as vlm-evaluation scores them
        t = result['tasks'][task]
        items = benchmarks.read_task(task, str(bench), limit=3)[0]
        assert t['n'] == 3 and t['scores'] == [benchmarks.BENCHMARKS[task].score(p, it)
                                               for p, it in zip(t['predictions'], items)]
        assert f'{task} protocol:' in proc.stdout and f'{task}: {t["invalid"]} of 3 generated texts are no box'
    assert 'vision stable score over refcoco, refcoco+, refcocog, ocid_ref' in proc.stdout


def test_the_paper_suite_scores_its_seven_benchmarks(tmp_path, bench):
    """--tasks=paper: VQAv2, GQA, VizWiz, TextVQA, POPE, RefCOCO and OCID-Ref, the stable score over the seven."""
    from pathlib import Path
    ckpt = save_vlm(tmp_path / 'ckpt', tiny_vlm())
    write_refer(Path(bench))
    write_ocid(Path(bench))
    result = ev.benchmark_checkpoint(ckpt, ['paper'], bench, limit=2)
    assert list(result['tasks']) == ['vqav2', 'gqa', 'vizwiz', 'textvqa', 'pope', 'refcoco', 'ocid_ref']
    assert result['vision_stable_score_tasks'] == list(result['tasks'])  # each scored at least one item
    assert result['vision_stable_score'] == pytest.approx(np.mean([t['centered'] for t in result['tasks'].values()]))
    saved = json.load(open(os.path.join(ckpt, 'eval_bench.json')))
    assert saved['vision_stable_score'] == result['vision_stable_score']


def test_the_paper_suite_is_a_task_set():
    assert benchmarks.expand_tasks(['paper', 'refcoco+', 'pope']) == [
        'vqav2', 'gqa', 'vizwiz', 'textvqa', 'pope', 'refcoco', 'ocid_ref', 'refcoco+']
    with pytest.raises(ValueError, match=r"unknown task 'papers'.*the sets paper"):
        benchmarks.check_tasks(['papers'])
    with pytest.raises(ValueError, match=r'gqa has no slim subsets; the grounding tasks do \(refcoco, refcoco\+'):
        benchmarks.read_task('gqa', '/nonexistent', slim=10)
