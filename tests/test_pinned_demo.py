"""
The demo's outputs are pinned: a small run of every stage on the default shapes world, seeded, must give the
eval.json (every item's score, every generated answer, the stable scores) and the weights that tests/pinned_demo.json
recorded. A refactor that changes what the pipeline computes fails here; a change that does so on purpose rewrites
the file (the pins are made by running this very configuration and reading its eval.json and weights).
"""
import json
import os

import pytest
from safetensors.torch import load_file

import train

PINS = os.path.join(os.path.dirname(__file__), 'pinned_demo.json')
RUN = ['--text_iters=16', '--save_fracs=[0.5,1.0]', '--image_inject_frac=0.5', '--warmup_iters=2', '--batch_size=4',
       '--image_iters=6', '--image_ratio=0.5', '--caption_scenes=40', '--conversations=40', '--finetune_epochs=1',
       '--rewarm_iters=1', '--log_interval=2', '--encoder=siglip', '--freeze_encoder=True', '--device=cpu',
       '--encoder_weights=random', '--block_size=256']


@pytest.mark.slow
def test_the_demo_gives_the_pinned_eval_json_and_weights(tmp_path):
    out = str(tmp_path / 'run')
    # the default shapes world (its full 3 MB corpus), written into this test's own data_dir
    train.main(train.get_config(RUN + [f'--data_dir={tmp_path}/data', f'--out_dir={out}', f'--text_out_dir={out}/text']))
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
