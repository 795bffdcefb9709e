"""
The plumbing every script shares: one-line errors, the device, checkpoint files, prepared data and plots.
Scripts import this and model.py, never each other.
"""

import json
import os
import shutil
import sys
import warnings
from contextlib import nullcontext

import numpy as np
import torch

from model import GPT, ModelConfig

PEAK_TFLOPS = 989.0  # dense bf16 peak of one H100/H200 SXM: the denominator of MFU in train.py and bench.py


def fail(message):
    """Bad input ends the run with one line that says what to fix, never a traceback."""
    sys.exit(f"error: {message}")


def first_line(error):
    """torch's error messages run over many lines; ours quote the first."""
    return str(error).partition('\n')[0]


def check(checks):
    """checks: (ok, message) pairs; the first one that is not ok ends the run with its message."""
    for ok, message in checks:
        if not ok:
            fail(message)


def resolve_device(device):
    """'auto' -> 'cuda' when there is a GPU, else 'cpu'; a CUDA device asked for on a machine without one is
    a one-line error. Returns (device, device type)."""
    if device != 'auto' and device != 'cpu' and not device.startswith('cuda'):
        fail(f"device must be auto, cpu or cuda[:N], not {device!r}")
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if dev.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device!r} but CUDA is not available; use --device=cpu")
    return dev, dev.split(':')[0]


def autocast(device_type, bf16=None):
    """bf16 autocast on CUDA (the default), nothing on the CPU (fp32 is faster there)."""
    if bf16 is None:
        bf16 = device_type == 'cuda'
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ---- files ----

def write_atomic(path, save):
    """save(tmp) then rename: a crash while writing never leaves a half-written file at path."""
    try:
        save(path + '.tmp')
        os.replace(path + '.tmp', path)
    except BaseException:
        if os.path.isfile(path + '.tmp'):
            os.remove(path + '.tmp')
        raise


def save_atomic(obj, path):
    """torch.save through write_atomic; a failed write (disk full, permissions) is one line."""
    try:
        write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError when the disk fills up
        fail(f"could not write {path} ({first_line(e)}); the previous checkpoint is intact")


def link_or_copy(src, dst):
    """dst becomes the same file as src (a hard link when the file system allows, else a copy), atomically."""
    try:
        write_atomic(dst, lambda tmp: os.link(src, tmp))
    except OSError:
        write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def load_torch(path, what='a checkpoint from train.py'):
    """torch.load with weights_only=True (a pickle carrying code is refused), onto the CPU; a missing or broken
    file is one line."""
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them: one line is enough
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        fail(f"no file at {path}; check the path (it should be {what})")
    except Exception as e:
        fail(f"cannot load {path} ({type(e).__name__}: {first_line(e)}); is it {what}?")


def load_checkpoint(path):
    """A checkpoint written by train.py, its ModelConfig, and a GPT (on the CPU) holding its weights."""
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train one first (python train.py config/nano.py) or check --out_dir")
    ckpt = load_torch(path)
    try:
        config = ModelConfig(**ckpt['model_config'])
        model = GPT(config)
        model.load_state_dict(ckpt['model'])
    except Exception as e:
        fail(f"cannot load {path} ({type(e).__name__}: {first_line(e)}); is it a checkpoint from train.py?")
    return ckpt, config, model


def load_data(data_dir, splits=('train', 'val')):
    """A folder written by data/prepare.py -> (meta.json as a dict, {split: token memmap}). Opening a memmap is
    cheap; readers that sample for a long time open a fresh one now and then (see train.py's get_batch)."""
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            meta = json.load(f)
        tokens = {split: np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r')
                  for split in splits}
    except (OSError, KeyError, ValueError, TypeError) as e:
        fail(f"no usable prepared data in {data_dir!r} ({type(e).__name__}: {first_line(e)}); "
             "run `python data/prepare.py`")
    return meta, tokens


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
