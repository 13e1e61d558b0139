"""--wandb_log=True for real: a short training run logs to an offline Weights & Biases run, whose history, read back
from its files (no network), holds the stage's metrics.jsonl: the same steps, losses and learning rates."""
import glob
import json
import os

import pytest

wandb = pytest.importorskip('wandb')  # optional for users; .ci/run installs it so this runs in CI

import train  # noqa: E402

TEXT = ['--stages=text', '--block_size=64', '--batch_size=4', '--text_iters=8', '--save_fracs=[0.5,1.0]',
        '--warmup_iters=2', '--log_interval=1', '--eval_interval=4', '--device=cpu', '--evaluate=']


def log_records(path):
    """
    The records of a .wandb file: LevelDB's log format (a 7-byte file header, ':W&B' and its magic and version, then
    32 KiB blocks of chunks, each a 7-byte header: checksum, little-endian uint16 length, type FULL 1, FIRST 2,
    MIDDLE 3 or LAST 4; a block's last bytes too few for a header are zeros). Read here, not through wandb's
    internal reader, which newer wandb versions no longer ship.
    """
    raw = open(path, 'rb').read()
    assert raw[:4] == b':W&B', f'{path} is not a W&B log'
    pos, pending = 7, b''
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # the block's trailer
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], 'little'), raw[pos + 6]
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def offline_history(run_file):
    """The history rows of an offline run's .wandb file ({key: value}, with _step): each a protocol-buffer Record
    (wandb's own message type) holding one wandb.log call."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in log_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof('record_type') == 'history':
            rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def warnings_of(run_dir):
    """wandb's own warnings and errors about the run (its internal log), to say why a row is missing."""
    path = os.path.join(run_dir, 'logs', 'debug-internal.log')
    lines = open(path, errors='replace').read().splitlines() if os.path.exists(path) else []
    return [line for line in lines if 'WARN' in line or 'ERROR' in line][:20]


@pytest.mark.slow
def test_an_offline_run_holds_the_metrics_of_the_stage(tmp_path, shapes_dir, monkeypatch):
    # offline, every file in tmp_path; generous timeouts for wandb's service process on a loaded machine
    for key, value in (('WANDB_MODE', 'offline'), ('WANDB_DIR', tmp_path), ('WANDB_CONFIG_DIR', tmp_path / 'config'),
                       ('WANDB_CACHE_DIR', tmp_path / 'cache'), ('WANDB_DATA_DIR', tmp_path / 'data'),
                       ('WANDB_SILENT', 'true'), ('WANDB_INIT_TIMEOUT', 300), ('WANDB__SERVICE_WAIT', 300)):
        monkeypatch.setenv(key, str(value))
    out = tmp_path / 'text'
    train.main(train.get_config(TEXT + [f'--data_dir={shapes_dir}', f'--text_out_dir={out}', f'--out_dir={tmp_path}',
                                        '--wandb_log=True', '--wandb_run_name=offline-test']))
    lines = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    run_files = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(run_files) == 1, os.listdir(tmp_path)
    rows = {row['_step']: row for row in offline_history(run_files[0])}
    missing = sorted({line['global_step'] for line in lines} - set(rows))
    assert not missing, (missing, wandb.__version__, warnings_of(os.path.dirname(run_files[0])))

    trained = [line for line in lines if 'loss' in line]
    assert len(trained) == 8 and len({line['step'] for line in trained}) == 8  # every step logged (log_interval=1)
    for line in lines:  # each line's numbers on the run's step axis, under the stage's name
        row = rows[line['global_step']]
        for key, value in line.items():
            if key not in ('stage', 'step') and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert row[f"{line['stage']}/{key}"] == value, (line['step'], key)
    assert sorted(rows) == sorted({line['global_step'] for line in lines})
    assert [rows[line['global_step']]['text/loss'] for line in trained] == [line['loss'] for line in trained]
    assert [rows[line['global_step']]['text/lr'] for line in trained] == [line['lr'] for line in trained]
