"""
The demo's outputs are pinned: a small run of every stage on the tests' shapes world, seeded, must give the
eval.json (every item's score, every generated answer, the stable scores) and the weights that tests/pinned_demo.json
recorded. A refactor that changes what the pipeline computes fails here; a change that does so on purpose rewrites
the file: `python tests/test_pinned_demo.py` runs this very configuration and writes its eval.json and weights there.

The weights are pinned by each tensor's L2 norm, to a relative 1e-5. Another CPU's float kernels moved a signed sum
of 49k weights (about 0.07, near zero) by 2.6e-5, about 1e-7 a weight; that moves a norm by some 1e-8 of itself. A
step that computes anything else moves the norms by more: the second test moves one weight of the text stage's
5th step by 1e-3, which moves the image checkpoint's norms by some 4e-5 of themselves (and the finetune one's by 7e-5).
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))  # also run as a script
import shapes  # noqa: E402
import train  # noqa: E402
from conftest import SMALL_WORLD  # noqa: E402

PINS = os.path.join(os.path.dirname(__file__), 'pinned_demo.json')
RUN = ['--text_iters=16', '--save_fracs=[0.5,1.0]', '--image_inject_frac=0.5', '--warmup_iters=2', '--batch_size=4',
       '--image_iters=6', '--image_ratio=0.5', '--caption_scenes=40', '--conversations=40', '--finetune_epochs=1',
       '--rewarm_iters=1', '--log_interval=2', '--encoder=siglip', '--freeze_encoder=True', '--device=cpu',
       '--encoder_weights=random', '--block_size=256', '--eval_items=20']
CHECKPOINTS = ('text/ckpt_050', 'text/ckpt_100', 'image', 'finetune')
NORM_TOLERANCE = 1e-5  # relative


def outputs(folder, names=CHECKPOINTS):
    """What is pinned of a run in folder: per checkpoint, its stable scores, every item's score, every answer, and
    each weight tensor's L2 norm."""
    found = {}
    for name in names:
        with open(os.path.join(folder, name, 'eval.json')) as f:
            result = json.load(f)
        weights = load_file(os.path.join(folder, name, 'model.safetensors'))
        found[name] = {'weight_norms': {k: float(v.double().norm()) for k, v in weights.items()},
                       'stable_scores': {k: result[k] for k in ('vision_stable_score', 'vision_blind_stable_score',
                                                                 'text_stable_score')},
                       'scores': {t: v['scores'] for t, v in result['tasks'].items()},
                       'predictions': {t: v['predictions'] for t, v in result['tasks'].items() if 'predictions' in v}}
    return found


def differences(pinned, found):
    """Where a run's outputs differ from the pins: scores and answers exactly, norms beyond NORM_TOLERANCE."""
    diffs = []
    for name, run in found.items():  # a run of the first stages is compared on theirs
        pin = pinned[name]
        diffs += [f'{name}: {key}' for key in ('stable_scores', 'scores', 'predictions') if run[key] != pin[key]]
        if sorted(run['weight_norms']) != sorted(pin['weight_norms']):
            diffs.append(f'{name}: other tensors')
            continue
        diffs += [f'{name}: {k} norm {run["weight_norms"][k]:.6g}, pinned {v:.6g}' for k, v in pin['weight_norms'].items()
                  if abs(run['weight_norms'][k] - v) > NORM_TOLERANCE * abs(v)]
    return diffs


def run_demo(folder, data_dir, names=CHECKPOINTS, stages='text,image,finetune'):
    train.main(train.get_config(RUN + [f'--data_dir={data_dir}', f'--out_dir={folder}', f'--text_out_dir={folder}/text',
                                       f'--stages={stages}']))
    return outputs(folder, names)


def pinned():
    with open(PINS) as f:
        return json.load(f)['checkpoints']


@pytest.mark.slow
def test_the_demo_gives_the_pinned_eval_json_and_weights(tmp_path, shapes_dir):
    assert differences(pinned(), run_demo(str(tmp_path / 'run'), shapes_dir)) == []


@pytest.mark.slow
def test_the_pin_fails_when_one_weight_of_one_step_moves(tmp_path, shapes_dir, monkeypatch):
    step, calls = torch.optim.AdamW.step, []

    def nudged(self, *args, **kwargs):  # the text stage's 5th update moves one weight by 1e-3, once
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                self.param_groups[0]['params'][3].view(-1)[7] += 1e-3
        return result

    monkeypatch.setattr(torch.optim.AdamW, 'step', nudged)
    diffs = differences(pinned(), run_demo(str(tmp_path / 'run'), shapes_dir, CHECKPOINTS[:3], 'text,image'))
    assert any(d.startswith('image: ') and 'norm' in d for d in diffs), diffs


def pin(folder, source):
    """Write tests/pinned_demo.json from the run in folder (the stages of RUN), saying where it was made."""
    with open(PINS, 'w') as f:
        json.dump({'source': source, 'checkpoints': outputs(folder)}, f, indent=1)


if __name__ == '__main__':  # re-pin after a change that moves the demo's outputs on purpose
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'run')
        shapes.prepare_text(tmp, **SMALL_WORLD)  # the shapes_dir of tests/conftest.py
        run_demo(out, tmp)
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
        pin(out, f'eval.json and model.safetensors of the run in tests/test_pinned_demo.py, made on main after '
                 f'{commit} (the tests\' small shapes world, 20 items per task)')
