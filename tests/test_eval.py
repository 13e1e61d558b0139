import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoint
import data
import eval as ev
import likelihood
import stats
from model import GPTConfig


class FixedPreference(nn.Module):
    """A stand-in LM whose next-token distribution always strongly prefers one byte."""

    def __init__(self, favourite):
        super().__init__()
        self.config = GPTConfig(block_size=64, vocab_size=320)
        self.favourite = favourite

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 320)
        logits[..., self.favourite] = 5.0
        return logits, None


def test_multiple_choice_picks_the_likely_continuation():
    enc = data.get_tokenizer('bytes')
    items = [dict(prompt='The pet is a', choices=[' cat', ' bbb', ' dog'], answer=1),
             dict(prompt='x', choices=[' b', ' a'], answer=0)]
    raw, norm = likelihood.multiple_choice(FixedPreference(ord('b')), enc, items, 'cpu')
    assert raw == [1.0, 1.0] and norm == [1.0, 1.0]


def test_length_normalization_changes_the_pick():
    enc = data.get_tokenizer('bytes')
    # one favoured byte then an unlikely one (' b' + 'x'), against a single unlikely byte: the total log-likelihood
    # prefers the shorter choice, the per-byte average the longer one
    items = [dict(prompt='q', choices=['bbbx', 'x'], answer=0)]
    raw, norm = likelihood.multiple_choice(FixedPreference(ord('b')), enc, items, 'cpu')
    assert raw == [0.0] and norm == [1.0]


def test_centered_accuracy_arithmetic():
    assert ev.centered(0.25, 0.25) == 0.0
    assert ev.centered(1.0, 0.25) == 1.0
    assert ev.centered(0.625, 0.25) == pytest.approx(0.5)
    assert ev.centered(0.0, 0.5) == -1.0


def test_task_result_and_stable_score():
    rng = np.random.default_rng(0)
    tasks = {'a': stats.task_result('text', [1, 1, 1, 0], 0.25, rng),   # acc .75 -> centered 2/3
             'b': stats.task_result('text', [1, 0, 0, 0], 0.5, rng),    # acc .25 -> centered -1/2
             'v': stats.task_result('vision', [1, 1], 0.5, rng)}
    assert tasks['a']['centered'] == pytest.approx(2 / 3) and tasks['a']['n'] == 4
    score, ci = stats.stable_score(tasks, 'text', rng)
    assert score == pytest.approx((2 / 3 - 1 / 2) / 2)
    assert ci[0] <= score <= ci[1]
    assert stats.stable_score(tasks, 'missing', rng) == (None, None)


def test_bootstrap_interval_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small = stats.task_result('text', [1, 0] * 10, 0.25, rng)['ci95']
    large = stats.task_result('text', [1, 0] * 1000, 0.25, rng)['ci95']
    assert large[1] - large[0] < (small[1] - small[0]) / 4
    assert large[0] < ev.centered(0.5, 0.25) < large[1]


def test_missing_checkpoint_names_path_and_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'no checkpoint at .*nowhere.*python train.py --stages=text'):
        checkpoint.load_model(str(tmp_path / 'nowhere'))
