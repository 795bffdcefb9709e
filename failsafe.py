"""
How every Ava script ends when it cannot go on: in one line that says what to fix, with a non-zero
exit, and with nothing half-written. fail() is that line; stop_on_signals() makes SIGINT (Ctrl-C)
and SIGTERM end a script the same way, with exit code 128 + the signal; write_atomic() writes every
output file through a temporary file and a rename, so that a crash, a signal or a full disk leaves
the previous file as it was, and says in one line when the disk is full.

Torch-free and quick to import: data/prepare.py needs no torch, and a script installs the signal
handler before it imports anything heavy (Ctrl-C during torch's import is one line too).
"""

import errno
import json
import os
import shutil
import signal
import sys
import time


def fail(message, code=1):
    """Bad input ends the run with one line that says what to fix, never a traceback. Under
    torchrun every rank checks the same input, so only rank 0 prints the line; every rank also
    writes it to the error file torchrun reads (TORCHELASTIC_ERROR_FILE), so that torchrun's failure
    summary ends with it instead of a pointer to its documentation."""
    line = f"error: {message}"
    if os.environ.get('TORCHELASTIC_ERROR_FILE'):
        try:
            with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
                json.dump(dict(message=line, timestamp=int(time.time())), f)
        except OSError:
            pass
    if os.environ.get('RANK', '0') != '0':
        for signum in (signal.SIGINT, signal.SIGTERM):  # torchrun's stop must not rewrite the file
            signal.signal(signum, signal.SIG_DFL)
        time.sleep(3)  # torchrun stops every rank once one exits: rank 0 prints its line first
        sys.exit(code)
    if code == 1:  # Python prints the line; a caller in the same process reads it from SystemExit
        sys.exit(line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def first_line(error):
    """torch's error messages run over many lines; ours quote the first."""
    return str(error).partition('\n')[0]


def check(checks):
    """checks: (ok, message) pairs; the first one that is not ok ends the run with its message."""
    for ok, message in checks:
        if not ok:
            fail(message)


def stop_on_signals(leaves=lambda: ''):
    """From now on SIGINT (Ctrl-C) and SIGTERM end the script with one line and exit code 128 +
    the signal. The exit is a SystemExit raised where the script was, so the stack unwinds: a
    write_atomic() under way removes its temporary file, and a script's own `finally` or `except
    BaseException` can remove what it started (a run folder still empty). leaves() -> what the
    line adds about the outputs, e.g. '; out/x is as it was'. Python drops an exception raised in
    a __del__ or a weakref callback (torch runs some while it imports): a timer then stops the
    script again a moment later, in ordinary code, without repeating the line."""
    said = []  # the signal announced

    def stop(signum, frame):
        if said:  # the timer's SIGALRM, or a second signal
            sys.exit(128 + said[0])
        said.append(signum)
        fail(f"stopped by {signal.Signals(signum).name}{leaves()}", code=128 + signum)

    def unraisable(info):
        if said and isinstance(info.exc_value, SystemExit):
            signal.setitimer(signal.ITIMER_REAL, 0.001)
        else:
            sys.__unraisablehook__(info)
    sys.unraisablehook = unraisable
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(signum, stop)


def write_atomic(path, write, fallback=None, optional=False):
    """write(tmp), then rename tmp to path: path is never half-written, whatever stops the writing.
    A failed write (a full disk, no permission) removes tmp and is one line that says why and what
    survives: fallback (the file a reader falls back on, such as ckpt.pt) or path itself, when they
    exist. optional=True, for an output not worth ending a run for (a plot): the line is a note and
    the call returns False."""
    path = os.fspath(path)
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if fallback and os.path.exists(fallback):
            kept = f"{fallback} is intact"
        else:
            kept = f"the previous {path} is intact" if os.path.exists(path) else "nothing was saved"
        message = f"could not write {path} ({why_not_written(e, path, written)}); {kept}"
        if not optional:
            fail(message)
        print(f"note: {message}; going on")
        return False
    finally:
        if os.path.isfile(tmp):
            os.remove(tmp)


def why_not_written(error, path, written):
    """The reason a write of `written` bytes to path failed, in words. A full disk is named as
    such: torch's and numpy's errors do not say it, but a disk with no more room than the failed
    write took (now freed) is full."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    code = getattr(error, 'errno', None)
    full = code == errno.ENOSPC if code else free <= written + 2**24
    if full:
        return (f"the disk is full: {free / 2**20:.1f} MiB free in {folder}; free some space or "
                "choose another folder")
    return getattr(error, 'strerror', None) or first_line(error)
