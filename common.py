"""
What the scripts share, by concern: the device and autocast (with PEAK_TFLOPS, MFU's
denominator), files written atomically, checkpoints read back (load_torch, load_checkpoint),
prepared data (load_data, trained_data_dir, Batches), and a run's metrics and plots (read_metrics,
pyplot). Settings and one-line errors live in configurator.py, the tokenizer in tokenizer.py.
Scripts import this and model.py, never each other.
"""

import errno
import json
import os
import shutil
import warnings
from contextlib import nullcontext

import numpy as np
import torch

from configurator import check, fail, first_line
from model import GPT, ModelConfig

# the scripts import these from here until they import them from tokenizer.py
from tokenizer import GPT2_PAT, bytes_to_unicode, load_run_tokenizer, load_tokenizer  # noqa: F401

# used only below the rule "moving to checkpoint.py, decode.py and sample.py"
import fcntl
import glob
import math
import re
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
import yaml

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

def write_atomic(path, save):
    """save(tmp) then rename: a crash while writing never leaves a half-written file at path."""
    try:
        save(path + '.tmp')
        os.replace(path + '.tmp', path)
    except BaseException:
        if os.path.isfile(path + '.tmp'):
            os.remove(path + '.tmp')
        raise


def save_atomic(obj, path, previous=None):
    """torch.save through write_atomic; a failed write (disk full, permissions) is one line that
    says whether the disk is full and what survives: `previous` (the file a reader falls back on,
    such as ckpt.pt) or path itself, when they exist."""
    written = []

    def save(tmp):
        try:
            torch.save(obj, tmp)
        except BaseException:
            written.append(os.path.getsize(tmp) if os.path.exists(tmp) else 0)
            raise
    try:
        write_atomic(path, save)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError when the disk fills up
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        # torch's error does not say why; a disk with no more room than the failed write took
        # (now deleted) is full
        code = getattr(e, 'errno', None)
        full = code == errno.ENOSPC if code else free <= sum(written) + 2**24
        why = (f"the disk is full: {free / 2**20:.1f} MiB free in {folder}; free some space or "
               "choose another folder" if full else first_line(e))
        if previous and os.path.exists(previous):
            kept = f"the previous checkpoint {previous} is intact"
        else:
            kept = f"the previous {path} is intact" if os.path.exists(path) else "nothing was saved"
        fail(f"could not write {path} ({why}); {kept}")


def link_or_copy(src, dst):
    """dst becomes the same file as src (a hard link where the file system allows, else a copy)."""
    try:
        write_atomic(dst, lambda tmp: os.link(src, tmp))
    except OSError:
        write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


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

def read_metrics(path):
    """The records of a metrics.jsonl, up to a line that is cut off or not a record (a kill while
    writing), which is dropped with the rest after it, and a note."""
    with open(path) as f:
        lines = f.readlines()
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get('iter'), int):
            print(f"note: {path} line {n + 1} of {len(lines)} is cut off or not a record (a "
                  "killed run?): the metrics from there on are dropped")
            return [json.loads(line) for line in lines[:n]]
    return [json.loads(line) for line in lines]


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


# ---- moving to checkpoint.py, decode.py and sample.py ----

# -- checkpoint.py: training state on disk, used by train.py --

def gather_rng(batch_rng, dev):
    """Every rank's random streams (a collective under torchrun), so each continues its own."""
    mine = dict(batch=batch_rng.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(dev) if dev.startswith('cuda') else torch.empty(0))
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def save_checkpoint(out_dir, reason, model, optimizer, keep, **state):
    """ckpt_<iter>.pt, written atomically by rank 0: the weights, the optimizer (stage 0; from
    stage 1 each rank first writes its own shard, ckpt_<iter>.rank<r>.pt) and `state` (iter_num,
    config,
    monitors, RNG streams ...). Then ckpt.pt, and best.pt after a new best, point at it; only the
    newest `keep` ckpt_<iter>.pt stay. Every rank calls it. -> the path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(out_dir, f"ckpt_{state['iter_num']:06d}.pt")
    with optimizer.full_params():  # (collective at stage 3) a CPU copy of the full weights
        weights = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}
    sharded = optimizer.stage > 0
    if sharded:  # every shard is on disk before rank 0's checkpoint refers to it
        save_atomic(optimizer.state_dict(), path[:-3] + f'.rank{rank}.pt')
        if dist.is_initialized():
            dist.barrier()
    if rank == 0:
        zero = dict(stage=optimizer.stage, world_size=optimizer.world_size) if sharded else None
        save_atomic(dict(model=weights, optimizer=None if sharded else optimizer.state_dict(),
                         zero=zero, reason=reason, **state), path,
                    previous=os.path.join(out_dir, 'ckpt.pt'))
        try:
            link_or_copy(path, os.path.join(out_dir, 'ckpt.pt'))
            if reason == 'best':
                link_or_copy(path, os.path.join(out_dir, 'best.pt'))
        except OSError as e:
            fail(f"could not point ckpt.pt at {path} ({e.strerror}); {path} itself is complete")
        history = sorted(f for f in os.listdir(out_dir) if re.fullmatch(r'ckpt_\d+\.pt', f))
        for old in history[:-keep]:  # with its optimizer shards, if any
            for f in [old] + glob.glob(os.path.join(out_dir, old[:-3] + '.rank*.pt')):
                os.remove(os.path.join(out_dir, f))
    if dist.is_initialized():
        dist.barrier()  # no rank runs ahead of a checkpoint
    return path


def load_optimizer(optimizer, ckpt, out_dir):
    """ckpt's optimizer state: the whole state (stage 0), which every stage takes its slice of; or
    one shard file per rank of the run that saved it, read as they are (same layout) or re-cut."""
    if ckpt['optimizer'] is not None:
        return optimizer.load_state_dict(ckpt['optimizer'])
    stage, world_size = ckpt['zero']['stage'], ckpt['zero']['world_size']
    if (stage == 3) != (optimizer.stage == 3):
        fail(f"the checkpoint's optimizer state is cut for zero_stage={stage}: resume with "
             f"--zero_stage={stage} (any number of processes) or --reset_optimizer=True")
    prefix = os.path.join(out_dir, f"ckpt_{ckpt['iter_num']:06d}")
    files = [f'{prefix}.rank{r}.pt' for r in range(world_size)]
    try:
        if (stage, world_size) == (optimizer.stage, optimizer.world_size):
            optimizer.load_state_dict(load_torch(files[optimizer.rank], 'an optimizer shard'))
        else:
            optimizer.load_shards([load_torch(f, 'an optimizer shard') for f in files])
    except (ValueError, RuntimeError, KeyError) as e:
        fail(f"cannot load the optimizer shards {files[0]} ... ({type(e).__name__}: "
             f"{first_line(e)})")


def restore(ckpt, model, optimizer, monitors, batch_rng, seed, dev, out_dir, optimizer_too=True):
    """Put a run back where ckpt left it: weights and random streams; the optimizer and the
    monitors ({name: object with load_state_dict}) unless optimizer_too is False.
    -> (iter_num, best_val_loss)."""
    with optimizer.full_params():
        model.load_state_dict(ckpt['model'])
    rank, world_size, it = optimizer.rank, optimizer.world_size, ckpt['iter_num']
    if len(ckpt['rng']) == world_size:  # each rank continues its own random streams
        batch_rng.set_state(ckpt['rng'][rank]['batch'])
        torch.set_rng_state(ckpt['rng'][rank]['torch'])
        if dev.startswith('cuda') and len(ckpt['rng'][rank]['cuda']):
            torch.cuda.set_rng_state(ckpt['rng'][rank]['cuda'], dev)
    else:  # another world size: new streams, distinct from the ones already used
        print(f"resuming {len(ckpt['rng'])} ranks' run on {world_size}: data streams re-seeded")
        batch_rng.manual_seed(seed + rank + 1000 * it)
        torch.manual_seed(seed + rank + 1000 * it)
    if optimizer_too:
        load_optimizer(optimizer, ckpt, out_dir)
        for name, monitor in monitors.items():
            monitor.load_state_dict(ckpt['monitors'][name])
    return it, ckpt['best_val_loss']


def lock_run_folder(out_dir):
    """Hold out_dir/train.lock for the life of this process, so that two trainings never write
    into one run folder. It is an flock, which the OS drops when its process ends however it ends
    (kill -9 included): a lock left by a dead run never blocks. The file names the pid that holds
    it. -> the open file (closing it releases the lock)."""
    f = open(os.path.join(out_dir, 'train.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        fail(f"another training (pid {f.read().strip() or '?'}) is writing to {out_dir}; wait "
             "for it to end, or choose another --out_dir")
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def start_run_folder(out_dir, settings, model_config, metadata, iter_num):
    """config.yaml (the settings and the model that run) and metadata.json for this run; on
    resume, metrics.jsonl cut back to the checkpoint's iteration (see read_metrics). Each file is
    written whole or not at all. -> the records kept."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    records = []
    if settings['init_from'] == 'resume' and os.path.exists(path):
        records = [r for r in read_metrics(path) if r['iter'] <= iter_num]  # to the checkpoint
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                cwd=here).stdout.strip() or None
    except OSError:
        commit = None
    files = {
        'config.yaml': yaml.safe_dump({**settings, 'model': asdict(model_config)},
                                      sort_keys=False),
        'metadata.json': json.dumps(dict(git_commit=commit, torch=torch.__version__,
                                         start_iter=iter_num,
                                         start_time=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                                         **metadata), indent=2),
        'metrics.jsonl': ''.join(json.dumps(r) + '\n' for r in records)}
    for name, text in files.items():
        try:
            write_atomic(os.path.join(out_dir, name), lambda tmp: Path(tmp).write_text(text))
        except OSError as e:
            fail(f"cannot write {name} in out_dir={out_dir} ({e.strerror}); free some space or "
                 "choose another --out_dir")
    return records


def log_record(records, path, wandb, record):
    """One metrics record: kept for the plots, appended to metrics.jsonl, mirrored to wandb."""
    records.append(record)
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        fail(f"cannot append to {path} ({e.strerror}); free some space, then --init_from=resume "
             "continues from the last checkpoint, if one was saved")
    if wandb:
        wandb.log(record, step=record['iter'])


def training_figure(records):
    """A run's curves from its metrics records: the evaluated cross-entropy, and apart from it the
    training objective (cross-entropy + router and MTP losses), learning rate, gradient norm."""
    plt = pyplot()
    steps = [r for r in records if 'loss' in r]
    evals = [r for r in records if 'val_loss' in r]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for split in ('train', 'val'):
        axes[0].plot([r['iter'] for r in evals], [r[f'{split}_loss'] for r in evals], 'o-',
                     label=split)
    axes[0].legend()
    curves = [('loss', 'training objective (CE + router + MTP losses)', 'linear'),
              ('lr', 'learning rate', 'log'),
              ('grad_norm', 'gradient norm (before clipping)', 'log')]
    for ax, (key, title, scale) in zip(axes[1:], curves):
        ax.plot([r['iter'] for r in steps], [r[key] for r in steps], lw=0.8)
        ax.set(title=title, yscale=scale)
    axes[0].set(title='cross-entropy (nats), evaluated')
    for ax in axes:
        ax.set(xlabel='iteration')
    fig.tight_layout()
    return fig


def save_figure(fig, path):
    """fig as a PNG at path, written atomically; plots are not worth ending a run for, so a failed
    write (a full disk) is a note."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format='png'))
    except OSError as e:
        print(f"note: could not write {path} ({e.strerror}); training goes on")
    pyplot().close(fig)


def plot_run(records, folder):
    """training.png (training_figure) and expert_load.png (each layer's experts' load over time)."""
    plt = pyplot()
    save_figure(training_figure(records), os.path.join(folder, 'training.png'))
    steps = [r for r in records if r.get('load')]
    if not steps:
        return
    loads = np.array([np.ravel(r['load']) for r in steps])  # (time, L*E)
    L, E = np.shape(steps[-1]['load'])
    fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * L * E)))
    extent = (steps[0]['iter'], max(steps[-1]['iter'], steps[0]['iter'] + 1), L * E - 0.5, -0.5)
    image = ax.imshow(loads.T * E, aspect='auto', cmap='coolwarm', vmin=0, vmax=2,
                      interpolation='nearest', extent=extent)
    ax.set_yticks(range(0, L * E, E), [f'layer {i}' for i in range(L)])
    ax.set(title='expert load / even share (1 = balanced); rows: experts of each layer',
           xlabel='iteration')
    fig.colorbar(image)
    fig.tight_layout()
    save_figure(fig, os.path.join(folder, 'expert_load.png'))


# -- decode.py: CUDA graphs of the training step (train.py and bench.py, --cuda_graph=True) --

class GraphedSteps:
    """The micro-steps of one optimizer step (forwards and backwards) captured once as a CUDA
    graph, then replayed: thousands of launches become one, and the GPU stops waiting on Python.
    Shapes are fixed: each call copies its batches into the captured ones. The gradients land in
    the captured .grad tensors, which each call puts back on the parameters (so zero_grad between
    calls is fine); the optimizer step stays outside, as do host syncs. The warm-up runs before
    the capture are real forwards: a caller undoes what they count (routers' expert counts)."""

    def __init__(self, loss_of, params, xs, ys, warmup=3):
        """loss_of(x, y) -> one micro-step's loss; xs, ys (A, B, T): A micro-steps' batches."""
        self.params = [p for p in params if p.requires_grad]
        self.xs, self.ys, self.loss_of = xs.clone(), ys.clone(), loss_of
        side = torch.cuda.Stream()  # capture wants the warm-up off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.micro_steps()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None  # the captured backward allocates them, in the graph's memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the launches; runs nothing
            self.loss = self.micro_steps()
        self.grads = [p.grad for p in self.params]

    def micro_steps(self):
        """-> the last micro-step's loss (detached), as train.py's eager loop reports it."""
        for x, y in zip(self.xs, self.ys):
            loss = self.loss_of(x, y)
            (loss / len(self.xs)).backward()
        return loss.detach()

    def __call__(self, xs, ys):
        self.xs.copy_(xs)
        self.ys.copy_(ys)
        self.graph.replay()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return self.loss


# -- sample.py: safetensors, without the package --

# safetensors' dtype names. The format is little-endian, as every machine torch runs on is.
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}


def save_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file, written atomically: 8 bytes (little-endian u64) of
    header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__':
    {str: str}} padded with spaces to 8 bytes, then each tensor's raw bytes in header order. Ava
    writes it itself: weights then need neither pickle nor a dependency (transformers reads it)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {'__metadata__': dict(metadata or {})}, [], 0
    for name, t in tensors.items():
        raw = t.detach().to('cpu').contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # the data starts 8-aligned, as safetensors' own writer does

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(len(text).to_bytes(8, 'little'))
            f.write(text)
            for raw in blobs:
                f.write(raw)
    write_atomic(os.fspath(path), write)


def load_safetensors(path):
    """A .safetensors file -> ({name: tensor on the CPU}, metadata dict). A malformed file raises
    ValueError."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], 'little')
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if len(data) < 8 + n or not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
    metadata, body, tensors = header.pop('__metadata__', {}), memoryview(data)[8 + n:], {}
    for name, spec in header.items():
        dtype = SAFETENSORS_DTYPES.get(spec.get('dtype'))
        begin, end = spec.get('data_offsets', (0, -1))
        size = math.prod(spec.get('shape', ())) * (dtype.itemsize if dtype else 0)
        if dtype is None or end - begin != size or not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: tensor {name!r} has a bad dtype, shape or offsets: {spec}")
        raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8) if size else None
        tensors[name] = (raw.view(dtype) if size else torch.empty(0, dtype=dtype)).view(
            spec['shape'])
    return tensors, metadata
