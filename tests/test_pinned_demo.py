"""
The demo's outputs are pinned: a small run of every stage on the tests' shapes world, seeded, must give the
eval.json (every item's score, every generated answer, the stable scores) and the weights that tests/pinned_demo.json
recorded. A refactor that changes what the pipeline computes fails here; a change that does so on purpose rewrites
the file: `python tests/test_pinned_demo.py` runs this very configuration and writes its eval.json and weights there.
"""
import json
import os
import sys

import pytest
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


@pytest.mark.slow
def test_the_demo_gives_the_pinned_eval_json_and_weights(tmp_path, shapes_dir):
    out = str(tmp_path / 'run')
    train.main(train.get_config(RUN + [f'--data_dir={shapes_dir}', f'--out_dir={out}', f'--text_out_dir={out}/text']))
    with open(PINS) as f:
        pins = json.load(f)['checkpoints']
    for name, pinned in pins.items():
        with open(os.path.join(out, name, 'eval.json')) as f:
            result = json.load(f)
        assert {k: result[k] for k in pinned['stable_scores']} == pinned['stable_scores'], name
        assert {t: v['scores'] for t, v in result['tasks'].items()} == pinned['scores'], name
        assert {t: v['predictions'] for t, v in result['tasks'].items() if 'predictions' in v} == \
            pinned['predictions'], name
        weights = load_file(os.path.join(out, name, 'model.safetensors'))
        assert sorted(weights) == sorted(pinned['weight_sums']), name
        for key, total in pinned['weight_sums'].items():  # a tolerance for another CPU's float kernels, no more
            assert float(weights[key].double().sum()) == pytest.approx(total, rel=1e-4, abs=1e-5), (name, key)


def pin(folder, source):
    """Write tests/pinned_demo.json from the run in folder (the stages of RUN), saying where it was made."""
    pins = {}
    for name in ('text/ckpt_050', 'text/ckpt_100', 'image', 'finetune'):
        with open(os.path.join(folder, name, 'eval.json')) as f:
            result = json.load(f)
        weights = load_file(os.path.join(folder, name, 'model.safetensors'))
        pins[name] = {'weight_sums': {k: float(v.double().sum()) for k, v in weights.items()},
                      'stable_scores': {k: result[k] for k in ('vision_stable_score', 'vision_blind_stable_score',
                                                                'text_stable_score')},
                      'scores': {t: v['scores'] for t, v in result['tasks'].items()},
                      'predictions': {t: v['predictions'] for t, v in result['tasks'].items() if 'predictions' in v}}
    with open(PINS, 'w') as f:
        json.dump({'source': source, 'checkpoints': pins}, f, indent=1)


if __name__ == '__main__':  # re-pin after a change that moves the demo's outputs on purpose
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'run')
        shapes.prepare_text(tmp, **SMALL_WORLD)  # the shapes_dir of tests/conftest.py
        train.main(train.get_config(RUN + [f'--data_dir={tmp}', f'--out_dir={out}', f'--text_out_dir={out}/text']))
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
        pin(out, f'eval.json and model.safetensors of the run in tests/test_pinned_demo.py, made on main after '
                 f'{commit} (the tests\' small shapes world, 20 items per task)')
