"""
A training run on disk, for train.py: checkpoints (each rank's random streams, the optimizer state
whole or one shard per rank), resume, and the run folder (its lock, config.yaml, metadata.json,
metrics.jsonl and plots/), which a run that ends before its first checkpoint leaves as it was.
"""

import fcntl
import filecmp
import glob
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from common import link_or_copy, load_torch, pyplot, read_metrics, save_atomic, trained_data_dir
from failsafe import check, fail, first_line, write_atomic
from model import ModelConfig

# model settings a resumed run may change: they weigh losses or regularise, the weights still fit
ADJUSTABLE_ON_RESUME = ('dropout', 'router_jitter', 'capacity_factor', 'aux_loss_coef',
                        'z_loss_coef', 'mtp_weight')


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
    config, monitors, RNG streams ...). Then ckpt.pt, and best.pt after a new best, point at it;
    only the newest `keep` ckpt_<iter>.pt stay. Every rank calls it. -> the path."""
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
                    fallback=os.path.join(out_dir, 'ckpt.pt'))
        link_or_copy(path, os.path.join(out_dir, 'ckpt.pt'))
        if reason == 'best':
            link_or_copy(path, os.path.join(out_dir, 'best.pt'))
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


def check_resumable(ckpt, config, meta, data_dir, out_dir, block_size, max_iters):
    """A run resumes on the data set and tokenizer it trained with (meta: data_dir's meta.json),
    at most at its block_size, with iterations left to train; else one line that says how."""
    it, trained_on = ckpt['iter_num'], trained_data_dir(ckpt)
    run_tokenizer = os.path.join(out_dir, 'tokenizer.json')
    check([(config.vocab_size == meta['vocab_size'], f"the checkpoint's vocab_size "
            f"{config.vocab_size} != {meta['vocab_size']} of {data_dir}; resume with the data it "
            f"trained on (--data_dir={trained_on})"),
           (not os.path.exists(run_tokenizer) or filecmp.cmp(
               run_tokenizer, os.path.join(data_dir, 'tokenizer.json'), shallow=False),
            f"{data_dir}/tokenizer.json is not the tokenizer this run trained with "
            f"({run_tokenizer}); resume with its data (--data_dir={trained_on})"),
           (config.block_size >= block_size, f"block_size={block_size} is longer than the "
            f"checkpoint's block_size={config.block_size}"),
           (max_iters > it, f"max_iters={max_iters} but the checkpoint is at iteration {it}: "
            "nothing to train; resume with a larger --max_iters")])


def resumed_model_config(saved, overrides):
    """The ModelConfig a resumed run trains: the checkpoint's (saved, a dict) with the model
    settings given explicitly (overrides: from the command line or a config file) applied where
    ADJUSTABLE_ON_RESUME allows, each named in a note. Any other that differs from the checkpoint
    cannot run on its weights: a one-line error."""
    asked = {k: v for k, v in overrides.items()
             if k in saved and k not in ('vocab_size', 'block_size')}
    try:
        config = ModelConfig(**{**saved, **asked})
    except ValueError as e:
        fail(e)
    changed = {k: v for k, v in asdict(config).items() if v != saved[k]}
    fixed = [k for k in changed if k not in ADJUSTABLE_ON_RESUME]
    check([(not fixed, "resume trains the checkpoint's model: " + ", ".join(
        f"{k}={changed[k]!r} contradicts its {k}={saved[k]!r}" for k in fixed) +
        "; drop the override, or train from scratch into another --out_dir")])
    if changed:
        print("note: resuming with " + ", ".join(f"{k}={v!r} (the checkpoint had {saved[k]!r})"
                                                 for k, v in changed.items()))
    return config


# ---- the run folder ----

def checkpoint_size(model, out_dir, resumed=None):
    """The bytes a checkpoint of this run takes, for the room check before it starts: those of the
    checkpoint it resumes (resumed: its iteration), optimizer shards included; for a new run, the
    weights and AdamW's two fp32 moments per parameter. Plus 1 MiB for the rest a checkpoint holds
    (RNG states, settings, monitors)."""
    if resumed is not None:
        shards = glob.glob(os.path.join(out_dir, f'ckpt_{resumed:06d}.rank*.pt'))
        size = sum(os.path.getsize(f) for f in [os.path.join(out_dir, 'ckpt.pt'), *shards])
    else:
        size = (sum(t.nbytes for t in model.state_dict().values())
                + 8 * sum(p.numel() for p in model.parameters()))
    return size + 2**20


def outermost_missing(path):
    """The outermost folder of path that does not exist (os.makedirs makes it and the ones inside
    it), or None when path exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.lexists(path):
        path, missing = os.path.dirname(path), path
    return missing


def lock_run_folder(out_dir):
    """Hold out_dir/train.lock for the life of this process, so that two trainings never write
    into one run folder. It is an flock, which the OS drops when its process ends however it ends
    (kill -9 included): a lock left by a dead run never blocks. The file names the pid that holds
    it. -> (the open file, whose closing releases the lock; the file's bytes before, or None when
    there was no file)."""
    path = os.path.join(out_dir, 'train.lock')
    existed = os.path.exists(path)
    f = open(path, 'a+b')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().decode(errors='replace').strip()
        fail(f"another training (pid {holder or '?'}) is writing to {out_dir}; wait for it to "
             "end, or choose another --out_dir")
    f.seek(0)
    before = f.read() if existed else None
    f.truncate(0)
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f, before


class RunFolder:
    """out_dir as rank 0 keeps it: the lock (one training at a time), tokenizer.json (sample.py
    reads it there), config.yaml, metadata.json, metrics.jsonl and plots/. A start that fails
    changes nothing there: the run's files wait in memory until its first checkpoint is on disk
    (commit), and a run that ends before that (bad input found late, a signal during the first
    evaluation, a full disk at that checkpoint) leaves out_dir as it found it (close)."""

    def __init__(self, out_dir, data_dir):
        self.out_dir, self.data_dir = out_dir, data_dir
        self.made = self.lock = self.lock_before = None
        self.files, self.records, self.committed = {}, [], False

    def open(self, room):
        """Make out_dir (and the folders above it that are missing), take its lock, and check that
        its disk has room (bytes) for a checkpoint."""
        self.made = outermost_missing(self.out_dir)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            self.lock, self.lock_before = lock_run_folder(self.out_dir)
        except OSError as e:
            fail(f"cannot write to out_dir={self.out_dir} ({e.strerror}); choose another --out_dir")
        free = shutil.disk_usage(self.out_dir).free
        check([(free >= room, f"{free / 2**20:.1f} MiB free on the disk of out_dir={self.out_dir}"
                f", but a checkpoint of this run needs {room / 2**20:.1f} MiB; free some space "
                "or choose another --out_dir")])

    def start(self, settings, model_config, metadata, iter_num):
        """The run's files, as its first checkpoint will write them: config.yaml (the settings and
        the model that run), metadata.json, and on resume metrics.jsonl's records to the
        checkpoint's iteration (see read_metrics)."""
        path = os.path.join(self.out_dir, 'metrics.jsonl')
        if settings['init_from'] == 'resume' and os.path.exists(path):
            self.records = [r for r in read_metrics(path) if r['iter'] <= iter_num]
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                    cwd=here).stdout.strip() or None
        except OSError:
            commit = None
        self.files = {
            'config.yaml': yaml.safe_dump({**settings, 'model': asdict(model_config)},
                                          sort_keys=False),
            'metadata.json': json.dumps(dict(git_commit=commit, torch=torch.__version__,
                                             start_iter=iter_num,
                                             start_time=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                                             **metadata), indent=2)}

    def commit(self):
        """Once the run's first checkpoint is on disk (later calls do nothing): the data set's
        tokenizer, the run's files and the records so far, each written whole or not at all, and
        plots/."""
        if self.committed:
            return
        self.committed = True  # the run has begun: what follows no longer undoes it
        source, kept = (os.path.join(d, 'tokenizer.json') for d in (self.data_dir, self.out_dir))
        if not os.path.exists(kept) or not filecmp.cmp(source, kept, shallow=False):
            write_atomic(kept, lambda tmp: shutil.copyfile(source, tmp))
        metrics = ''.join(json.dumps(r) + '\n' for r in self.records)
        for name, text in {**self.files, 'metrics.jsonl': metrics}.items():
            write_atomic(os.path.join(self.out_dir, name), lambda tmp: Path(tmp).write_text(text))
        try:
            os.makedirs(os.path.join(self.out_dir, 'plots'), exist_ok=True)
        except OSError as e:
            fail(f"cannot write to out_dir={self.out_dir} ({e.strerror})")

    def log(self, record):
        """One metrics record: kept for the plots, and appended to metrics.jsonl once the run has
        begun (commit writes the ones before)."""
        self.records.append(record)
        if not self.committed:
            return
        path = os.path.join(self.out_dir, 'metrics.jsonl')
        try:
            with open(path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            fail(f"cannot append to {path} ({e.strerror}); free some space, then "
                 "--init_from=resume continues from the last checkpoint")

    def close(self):
        """A run that ends before its first checkpoint leaves out_dir as it found it: the folders
        it made are removed; in a folder that was there, train.lock gets its bytes back (or goes,
        if this run made it). Nothing else was written."""
        if self.committed:
            return
        if self.made:
            shutil.rmtree(self.made, ignore_errors=True)
        elif self.lock and self.lock_before is None:
            os.remove(os.path.join(self.out_dir, 'train.lock'))
        elif self.lock:
            self.lock.truncate(0)  # (appends: the bytes go to the start)
            self.lock.write(self.lock_before)
            self.lock.flush()


def start_wandb(project, settings):
    """Weights & Biases, to mirror metrics.jsonl, when it is installed (it is optional): -> the
    wandb module, or None with a note."""
    try:
        import wandb
    except ImportError:
        print("wandb_log=True but wandb is not installed (pip install wandb); metrics stay in "
              "metrics.jsonl")
        return None
    wandb.init(project=project, config=settings, resume='allow')
    return wandb


# ---- plots ----

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
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format='png'), optional=True)
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
