"""
What the scripts share, by concern: the device and autocast (with PEAK_TFLOPS, MFU's
denominator), files written atomically, checkpoints read back (load_torch, load_checkpoint),
prepared data (load_data, trained_data_dir, Batches), and a run's metrics and plots (read_metrics,
pyplot). Settings and one-line errors live in configurator.py, the tokenizer in tokenizer.py.
Scripts import this and model.py, never each other.
"""

import json
import os
import shutil
import warnings
from contextlib import nullcontext

import numpy as np
import torch

from failsafe import check, fail, first_line, write_atomic
from model import GPT, ModelConfig


# ---- the device ----

PEAK_TFLOPS = 989.0  # dense bf16 peak of one H100/H200 SXM: MFU's denominator (train, bench)


def resolve_device(device):
    """'auto' -> 'cuda' when there is a GPU, else 'cpu'; a CUDA device asked for on a machine
    without one is a one-line error. -> (device, device type)."""
    if device not in ('auto', 'cpu') and not device.startswith('cuda'):
        fail(f"device must be auto, cpu or cuda[:N], not {device!r}")
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if dev.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device!r} but CUDA is not available; use --device=cpu")
    return dev, dev.split(':')[0]


def autocast(device_type, bf16=None):
    """bf16 autocast, by default on CUDA only (on the CPU fp32 is faster)."""
    bf16 = device_type == 'cuda' if bf16 is None else bf16
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ---- files and checkpoints ----

def save_atomic(obj, path, fallback=None):
    """torch.save through failsafe.write_atomic: never half-written; a full disk is one line."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp), fallback)


def link_or_copy(src, dst):
    """dst becomes the same file as src (a hard link where the file system allows, else a copy);
    when that fails, src itself is complete."""
    def link(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    write_atomic(dst, link, fallback=src)


def load_torch(path, what='a checkpoint from train.py'):
    """torch.load onto the CPU with weights_only=True (a pickle carrying code is refused); a missing
    or broken file is one line."""
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        fail(f"no file at {path}; check the path (it should be {what})")
    except Exception as e:
        fail(f"cannot load {path} ({type(e).__name__}: {first_line(e)}); is it {what}?")


def load_checkpoint(path):
    """A checkpoint written by train.py -> (it, its ModelConfig, a GPT on the CPU holding it)."""
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train one first (python train.py config/nano.py) or check "
             "--out_dir")
    ckpt = load_torch(path)
    try:
        config = ModelConfig(**ckpt['model_config'])
        model = GPT(config)
        model.load_state_dict(ckpt['model'])
    except Exception as e:
        fail(f"cannot load {path} ({type(e).__name__}: {first_line(e)}); is it a checkpoint from "
             "train.py?")
    return ckpt, config, model


# ---- prepared data ----

def load_data(data_dir, splits=('train', 'val')):
    """A folder written by data/prepare.py -> (meta.json as a dict, {split: token memmap}). What
    is wrong with it (the folder, meta.json, a split's file) is named in one line."""
    where, again = f"no usable prepared data in {data_dir!r}", "run `python data/prepare.py`"
    if not os.path.isdir(data_dir):
        fail(f"{where} (no such folder); {again} or fix --data_dir")
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            meta = json.load(f)
        dtype = np.dtype(meta['dtype'])
        check([(np.issubdtype(dtype, np.integer) and isinstance(meta['vocab_size'], int)
                and meta['vocab_size'] > 0, f"{where}: meta.json has no integer dtype and "
                f"vocab_size > 0; {again}")])
    except (OSError, KeyError, ValueError, TypeError) as e:
        fail(f"{where}: meta.json is missing or broken ({type(e).__name__}: {first_line(e)}); "
             f"{again}")
    tokens = {}
    for split in splits:
        path = os.path.join(data_dir, f'{split}.bin')
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        check([(size >= 0, f"{where}: {split}.bin is missing; {again}"),
               (size > 0 and size % dtype.itemsize == 0, f"{where}: {split}.bin has {size} bytes, "
                f"not a whole number of {dtype} tokens (empty or cut off); {again}")])
        tokens[split] = np.memmap(path, dtype=dtype, mode='r')
    return meta, tokens


def trained_data_dir(ckpt):
    """The data set a checkpoint was trained on, as its config names it: train.py stores an absolute
    path, so sample.py and rlhf.py find it from any folder; a relative one is read from the current
    folder, else from the repository root (where the README runs every command)."""
    path = (ckpt.get('config') or {}).get('data_dir', '')
    if path and not os.path.isabs(path) and not os.path.isdir(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    return path


class Batches:
    """Random windows of a prepared split (train.bin / val.bin: flat token arrays, np.memmap)."""

    def __init__(self, data_dir, dtype, batch_size, block_size, device):
        self.data_dir, self.dtype, self.device = data_dir, dtype, device
        self.batch_size, self.block_size = batch_size, block_size

    def get(self, split, generator, seq_len=None, rows=None):
        """rows windows of seq_len+1 tokens -> inputs x, next-token targets y: (rows, seq_len)."""
        seq_len, rows = seq_len or self.block_size, rows or self.batch_size
        # a new memmap per batch: a long-lived one slowly grows memory (stackoverflow q/45132940)
        data = np.memmap(os.path.join(self.data_dir, f'{split}.bin'), dtype=self.dtype, mode='r')
        ix = torch.randint(len(data) - seq_len - 1, (rows,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[i:i + seq_len].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + seq_len].astype(np.int64) for i in ix]))
        if self.device.startswith('cuda'):  # pinned memory: the copy to the GPU runs asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ---- a run's metrics and plots ----

def read_metrics(path, whole=lambda record: isinstance(record.get('iter'), int)):
    """The records (dicts) of a metrics.jsonl, up to a line that is cut off or not a whole record
    (a kill while writing), which is dropped with the rest after it, and a note. whole(record) says
    whether a record holds what its reader needs (train.py's: an integer 'iter')."""
    with open(path, errors='replace') as f:
        lines = f.readlines()
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not whole(record):
            print(f"note: {path} line {n + 1} of {len(lines)} is cut off or not a record (a "
                  "killed run?): the records from there on are dropped")
            return [json.loads(line) for line in lines[:n]]
    return [json.loads(line) for line in lines]


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
