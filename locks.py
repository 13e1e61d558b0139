"""
One writer per folder: a run locks the folders it writes (train.py: out_dir, text_out_dir, image_out_dir), so two
runs never overwrite each other's checkpoints.

The lock is an exclusive flock on {folder}/LOCK, held on an open descriptor for as long as the run lives. The kernel
drops it when the run ends, however it ends, so a stale lock is taken over atomically by the flock itself, by exactly
one of any number of runs. LOCK records its holder (pid, host, start time) for the message a second run gets; what
nanoVLP did not write in its place (a folder, a FIFO, a symlink, other contents) is an error naming it, never a hang.
"""

import errno
import fcntl
import json
import os
import socket
import stat
import time


class FolderLocked(RuntimeError):
    """Another live run holds the lock of a folder this run would write: the message names it."""


LOCK_KIND = 'flock'  # what a LOCK written by this version says of itself: its holder keeps a flock on it
_held = {}  # {path of a LOCK this process holds: the descriptor that holds its flock}


def acquire_lock(folder):
    """
    Lock folder for this process: an exclusive flock on {folder}/LOCK, held on an open descriptor for as long as
    the run lives. The kernel drops a flock the moment its process ends, however it ends, so a lock whose run is gone
    is free, and taking it over is the flock itself: one atomic step that exactly one of any number of runs wins,
    never a check followed by a write. The holder never refreshes it, however slow its steps. The file records the
    holder's pid, host and start time, for the message a second run gets (FolderLocked). Also refused, as
    FolderLocked naming the path and what to do: a LOCK written on another host (whose flock may not reach this
    one) or by an earlier nanoVLP whose process still runs, and anything in LOCK's place that nanoVLP did not write
    (a folder, a FIFO, a symlink, other contents). Returns the lock's path, for release_lock.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FolderLocked(f'cannot lock {folder}: {e.strerror}; choose another out_dir / text_out_dir') from None
    path = os.path.join(folder, 'LOCK')
    for _ in range(100):
        fd = open_lock(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live run holds it
                raise FolderLocked(busy(folder, path, lock_record(read_lock(fd)))) from None
            except OSError as e:  # ENOLCK: a file system without locks
                raise FolderLocked(f'cannot lock {path}: {e.strerror}; put out_dir on a local disk') from None
            if not same_file(fd, path):
                os.close(fd)  # its holder released it (removed, then unlocked) after we opened it: open the new one
                continue
            text = read_lock(fd)
            record = lock_record(text)
            if text and record is None:
                raise FolderLocked(f'{path} holds something nanoVLP did not write ({text[:80]!r}): if no run is '
                                   f'writing to {folder}, delete {path} and start again')
            if record and (record['host'] != socket.gethostname() or (
                    record.get('lock') != LOCK_KIND and record['pid'] != os.getpid() and pid_running(record['pid']))):
                raise FolderLocked(busy(folder, path, record))
            # empty (its run died before writing it), or ours and unlocked: its run is gone. Taken over
            me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
                  'lock': LOCK_KIND}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except OSError as e:  # a full disk
                raise FolderLocked(f'cannot write {path}: {e.strerror}') from None
        except BaseException:
            os.close(fd)  # and with it our flock, if we took it
            raise
        _held[path] = fd
        return path
    raise FolderLocked(f'{path}: the lock changed hands 100 times while this run tried to take it; try again')


def open_lock(path):
    """A descriptor of path, created if absent: a regular file, never a symlink followed or a FIFO waited on."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        kind = {errno.ELOOP: 'a symlink', errno.EISDIR: 'a folder', errno.ENXIO: 'a socket'}.get(e.errno)
        raise FolderLocked(f'{path} is {kind}, not the lock file nanoVLP writes: if no run is writing there, '
                           f'delete it and start again' if kind else
                           f'cannot open {path} ({e.strerror}): check the folder\'s permissions') from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FolderLocked(f'{path} is {"a FIFO" if stat.S_ISFIFO(mode) else "a device"}, not the lock file nanoVLP '
                           f'writes: delete it and start again')
    return fd


def same_file(fd, path):
    """Whether path still names the file open on fd."""
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def read_lock(fd):
    """A LOCK's text, read from the descriptor (at most 4 KiB: nanoVLP writes one short line)."""
    raw = os.pread(fd, 4097, 0)
    return raw.decode('utf-8', errors='replace') if len(raw) <= 4096 else raw[:80].decode('utf-8', 'replace') + '...'


def lock_record(text):
    """The record a LOCK holds, {'pid', 'host', 'started'[, 'lock']}, or None when it is not one nanoVLP wrote."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get('pid'), int) and not isinstance(record['pid'], bool)
            and 0 < record['pid'] < 2 ** 31 and isinstance(record.get('host'), str) and record['host']):
        return None
    return record


def busy(folder, path, record):
    if record is None:  # it has just taken the lock and not yet written who it is
        return f'{folder} is being written by another run (it has just started): wait for it to finish, or choose ' \
               f'another out_dir / text_out_dir'
    gone = f', or delete {path} if that run is gone' if record['host'] != socket.gethostname() or \
        record.get('lock') != LOCK_KIND else ''
    return (f'{folder} is being written by another run (pid {record["pid"]} on {record["host"]}, since '
            f'{record.get("started")}): wait for it to finish, or choose another out_dir / text_out_dir{gone}')


def pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive under another user
    return True


def release_lock(path):
    """Give up a lock this process holds: the file goes first, then the flock (so no run locks a removed file)."""
    fd = _held.pop(path, None)
    if fd is None:
        return
    try:
        if same_file(fd, path):
            os.remove(path)
    finally:
        os.close(fd)
