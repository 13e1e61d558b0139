import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small shapes world (same generator, fewer bytes), written once per test session; returns its data_dir."""
    data_dir = str(tmp_path_factory.mktemp('data'))
    data.prepare_shapes(data_dir, train_bytes=300_000, val_bytes=20_000, n_task_items=40, verbose=False)
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
