"""lm_harness.py: a checkpoint scored by lm-evaluation-harness itself, offline, agrees with eval.py item by item."""
import os

import pytest
import torch

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # the task reads a local file: nothing may be downloaded
os.environ.setdefault('HF_HUB_OFFLINE', '1')
lm_eval = pytest.importorskip('lm_eval')  # optional for users; .ci/run installs it so this runs in CI

import benchmarks  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import likelihood  # noqa: E402
import lm_harness  # noqa: E402
from conftest import REFERENCE, jsonl  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

TASK = """task: nanovlp_piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_choice: "{{{{[sol1, sol2]}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """A small random GPT over bytes, saved as a checkpoint: its choices differ, so agreement means something."""
    folder = tmp_path_factory.mktemp('ck') / 'ckpt'
    torch.manual_seed(3)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=320, n_layer=2, n_head=2, n_embd=32))
    info = {'stage': 'text', 'step': 1, 'iters': 1, 'tokenizer': 'bytes', 'model_args': vars(gpt.config),
            'config': {'dataset': 'shapes'}}
    checkpoint.save_checkpoint(str(folder), *checkpoint.full_state(gpt, gpt.configure_optimizers(
        0.1, 1e-3, (0.9, 0.95), 'cpu')), info)
    return str(folder)


@pytest.mark.slow
def test_the_harness_and_eval_py_agree_item_by_item(ckpt, tmp_path):
    genuine = REFERENCE['piqa']['records'][0]
    records = [genuine] + [{'goal': f'How do I {verb} a cup?', 'sol1': f'{verb} it gently', 'sol2': 'eat the cup'}
                           for verb in ('wash', 'fill', 'dry', 'stack', 'carry', 'warm', 'cool')]
    labels = [0, 0, 1, 0, 1, 0, 1, 1]
    jsonl(tmp_path / 'piqa' / 'valid.jsonl', records)  # the publisher's layout, for eval.py
    (tmp_path / 'piqa' / 'valid-labels.lst').write_text(''.join(f'{y}\n' for y in labels))
    jsonl(tmp_path / 'docs.jsonl', [dict(r, label=y) for r, y in zip(records, labels)])  # one file, for the harness
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'piqa_local.yaml').write_text(TASK.format(path=tmp_path / 'docs.jsonl'))
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=lm_harness.NanoVLP(ckpt), tasks=['nanovlp_piqa_local'], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / 'tasks')))
    samples = sorted(out['samples']['nanovlp_piqa_local'], key=lambda s: s['doc_id'])
    model, info = checkpoint.load_model(ckpt)
    items, _ = benchmarks.read_task('piqa', str(tmp_path))
    raw, norm = likelihood.multiple_choice(model, data.get_tokenizer('bytes'), items, 'cpu')
    assert [s['acc'] for s in samples] == raw and [s['acc_norm'] for s in samples] == norm
    assert 0 < sum(raw) < len(raw) or 0 < sum(norm) < len(norm)  # the items are not all alike


def test_rolling_loglikelihood_and_generation(ckpt):
    lm = lm_harness.NanoVLP(ckpt)
    request = lambda *args: type('Request', (), {'args': args})()
    text = 'The favorite color of Bumi is red. ' * 8  # longer than block_size: several windows
    tokens = lm.enc.encode_ordinary(text)
    whole = sum(lp for lp, _ in likelihood.continuation_logprobs(lm.model, [([lm.eot], tokens[:127])], 'cpu'))
    first_window = lm.loglikelihood_rolling([request(text[:127])])[0]
    assert first_window == pytest.approx(whole, abs=1e-3)
    assert lm.loglikelihood_rolling([request(text)])[0] < first_window  # more tokens, more (negative) log-probability
    reply, = lm.generate_until([request('The favorite color', {'until': ['\n', 'e'], 'max_gen_toks': 20})])
    assert 'e' not in reply and len(reply.encode()) <= 20
    (lp, greedy), = lm.loglikelihood([request('The favorite color', ' of')])
    assert lp < 0 and isinstance(greedy, bool)
