"""
Train an Ava MoE language model. One readable script, nanoGPT style: settings are the globals below,
overridden by a config file and --key=value arguments. The monitors are inline: each is a few lines in the
loop, or a small helper class right above it that the tests drive with synthetic numbers.

    python data/prepare.py                                   # once: Shakespeare -> data/shakespeare/
    python train.py config/nano.py                           # CPU, a few minutes
    python train.py config/nano.py --max_iters=200 --router=softmax --capacity_factor=1.25
    python train.py config/nano.py --init_from=resume        # continue from out_dir/ckpt.pt
    python train.py config/nano.py --lr_find=True            # LR range test: a plot and a suggestion, no checkpoint
    torchrun --standalone --nproc_per_node=2 train.py config/nano.py --gradient_accumulation_steps=2   # data parallel
"""

import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from configurator import configure_or_exit
from model import GPT, ModelConfig
from zero import ShardedAdamW

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/nano'          # run folder: ckpt.pt, best.pt, config.yaml, metadata.json, metrics.jsonl, plots/
init_from = 'scratch'         # 'scratch' or 'resume' (from out_dir/ckpt.pt)
reset_optimizer = False       # with resume: keep the weights, start AdamW and the LR monitors afresh
eval_interval = 100           # every this many iterations: train/val loss, checkpoint, plots
eval_iters = 20               # batches per split for that estimate (always the same batches, so curves compare)
log_interval = 10             # one log line and one metrics.jsonl record every this many iterations
keep_checkpoints = 3          # keep the newest N ckpt_<iter>.pt files (ckpt.pt and best.pt are always kept)
wandb_log = False             # mirror metrics.jsonl to Weights & Biases (optional: pip install wandb)
wandb_project = 'ava'
# data
data_dir = 'data/shakespeare' # a folder written by data/prepare.py: train.bin, val.bin, meta.json, tokenizer.json
batch_size = 32               # sequences per micro-step (at the full block_size)
block_size = 128              # tokens per sequence
gradient_accumulation_steps = 1
seq_len_start = 0             # progressive sequence length: start at this many tokens (0 = off) ...
seq_len_warmup = 0.25         # ... and reach block_size after this fraction of max_iters; tokens per step stay equal
# model: every field of ModelConfig in model.py is a setting too (n_layer, n_experts, router, ...),
# with the defaults written there; vocab_size comes from the data set's meta.json
globals().update({f.name: f.default for f in fields(ModelConfig) if f.name not in ('vocab_size', 'block_size')})
# AdamW
learning_rate = 1e-3          # peak learning rate
weight_decay = 0.1            # decoupled; only on matrices (not norms or embeddings)
beta1 = 0.9
beta2 = 0.95
# schedule: linear warmup, then cosine decay to min_lr, optionally restarted num_cycles times
max_iters = 600
warmup = 0.03                 # < 1: a fraction of max_iters; >= 1: a number of iterations
num_cycles = 1                # cosine cycles (warm restarts, Loshchilov & Hutter 2017); 1 = plain cosine
lr_decay_iters = 0            # where the (last) cosine reaches min_lr; 0 = max_iters
min_lr = 1e-4                 # ~learning_rate / 10 (Chinchilla)
# adaptive LR (the seed's plateau rule): scales the scheduled LR, within [min_lr, max_lr]
adaptive_lr = False
lr_check_interval = 50        # compare the smoothed loss with the best every this many iterations
plateau_patience = 200        # iterations without an improvement before the LR changes
plateau_threshold = 0.01      # a relative loss drop that counts as an improvement
plateau_factor = 1.15         # boost on a plateau when gradients are stable (else cut x0.7)
max_lr = 0.0                  # ceiling of the adaptive LR; 0 = 2 x learning_rate
# gradient health
grad_clip = 1.0               # final global-norm clip; 0 = off
grad_clip_start = 2.0         # the clip warms from this to grad_clip over the LR warmup
explosion_threshold = 3.0     # a norm above this x its running mean is an explosion: clipped to the mean
max_bad_steps = 3             # non-finite steps in a row before reloading the last checkpoint
# LR range test (Smith 2017): exponential sweep, then exit
lr_find = False
lr_find_start = 1e-8
lr_find_end = 1e-2
lr_find_iters = 100
# monitors
dead_expert_window = 200      # warn when an expert's load stays below 1/(10 E) for this many iterations
# distributed: `torchrun --nproc_per_node=N train.py ...` trains data parallel on N processes (NCCL on GPUs, gloo on CPU)
zero_stage = 0                # 0: torch DDP (every rank holds all optimizer state); 1/2/3: zero.py's ShardedAdamW
dist_timeout = 300            # seconds a collective waits for a missing rank before the run fails instead of hanging
# system
device = 'auto'               # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
compile = False               # torch.compile the model (worth it on GPU for long runs)
seed = 1337
debug_nan_at = -1             # tests only: make the loss NaN from this iteration ...
debug_nan_steps = 1           # ... for this many iterations
# -----------------------------------------------------------------------------
MEMORY_LEVELS = (0.75, 0.80, 0.85, 0.90)  # fractions of device memory: log, empty cache, warn, emergency stop


def fail(message):
    """Bad input ends the run with one line that says what to fix, never a traceback."""
    sys.exit(f"error: {message}")


def first_line(error):
    """torch's error messages run over many lines; ours quote the first."""
    return str(error).partition('\n')[0]


def load_checkpoint(path):
    """A checkpoint written by train.py, its ModelConfig, and a GPT (on the CPU) holding its weights.
    Anything wrong with the file (missing, truncated, a pickle carrying code, another model's weights) is one line."""
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them: one line is enough
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        cfg = ModelConfig(**ckpt['model_config'])
        net = GPT(cfg)
        net.load_state_dict(ckpt['model'])
        return ckpt, cfg, net
    except FileNotFoundError:
        fail(f"no checkpoint at {path}; train one first (python train.py config/nano.py) or check --out_dir")
    except Exception as e:
        fail(f"cannot load {path} ({type(e).__name__}: {first_line(e)}); is it a checkpoint from train.py?")


def validate(s):
    """Every setting checked before any work; the first problem is returned as a line that names the key."""
    checks = [
        (s['init_from'] in ('scratch', 'resume'), "init_from must be 'scratch' or 'resume'"),
        (s['learning_rate'] > 0, "learning_rate must be > 0"),
        (0 <= s['min_lr'] <= s['learning_rate'], "min_lr must be between 0 and learning_rate"),
        (s['max_lr'] == 0 or s['max_lr'] >= s['learning_rate'], "max_lr must be 0 (2 x learning_rate) or >= it"),
        (min(s['max_iters'], s['warmup'], s['lr_decay_iters']) >= 0, "max_iters, warmup, lr_decay_iters must be >= 0"),
        (s['num_cycles'] >= 1, "num_cycles must be >= 1"),
        (min(s['batch_size'], s['block_size'], s['gradient_accumulation_steps']) >= 1,
         "batch_size, block_size and gradient_accumulation_steps must be >= 1"),
        (min(s['eval_interval'], s['eval_iters'], s['log_interval'], s['keep_checkpoints']) >= 1,
         "eval_interval, eval_iters, log_interval and keep_checkpoints must be >= 1"),
        (0 <= s['seq_len_start'] <= s['block_size'], "seq_len_start must be between 0 (off) and block_size"),
        (s['seq_len_start'] == 0 or (s['block_size'] % s['seq_len_start'] == 0
                                     and (s['block_size'] // s['seq_len_start']).bit_count() == 1),
         "block_size / seq_len_start must be a power of 2 (sequences double in length, batches halve)"),
        (0 <= s['weight_decay'] and 0 <= s['beta1'] < 1 and 0 <= s['beta2'] < 1, "need weight_decay >= 0, betas in [0, 1)"),
        (s['grad_clip'] >= 0 and s['grad_clip_start'] >= s['grad_clip'], "need 0 <= grad_clip <= grad_clip_start"),
        (s['explosion_threshold'] > 1, "explosion_threshold must be > 1"),
        (s['max_bad_steps'] >= 1, "max_bad_steps must be >= 1"),
        (s['plateau_factor'] > 1 and s['plateau_patience'] >= 1 and s['lr_check_interval'] >= 1,
         "need plateau_factor > 1, plateau_patience >= 1, lr_check_interval >= 1"),
        (0 < s['lr_find_start'] < s['lr_find_end'] and s['lr_find_iters'] >= 10,
         "need 0 < lr_find_start < lr_find_end and lr_find_iters >= 10"),
        (s['device'] in ('auto', 'cpu') or s['device'].startswith('cuda'), "device must be auto, cpu or cuda[:N]"),
        (s['zero_stage'] in (0, 1, 2, 3) and s['dist_timeout'] > 0, "need zero_stage in 0..3 and dist_timeout > 0"),
    ]
    return next((message for ok, message in checks if not ok), None)


def as_iters(value, max_iters):
    """warmup-style settings: below 1 a fraction of max_iters, otherwise a number of iterations."""
    return int(value * max_iters) if value < 1 else int(value)


def scheduled_lr(it, peak, floor, warmup_iters, decay_iters, cycles):
    """Linear warmup to peak, then cosine from peak to floor, restarted `cycles` times before decay_iters."""
    if it < warmup_iters:
        return peak * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return floor
    cycle_len = (decay_iters - warmup_iters) / cycles
    progress = ((it - warmup_iters) % cycle_len) / cycle_len  # 0 -> 1 inside the current cycle
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def clip_at(it, warmup_iters, start, final):
    """The gradient clip threshold warms from `start` to `final`: loose while Adam's statistics settle."""
    return final if it >= warmup_iters else start + (final - start) * it / max(1, warmup_iters)


def seq_len_at(it, start, end, ramp_iters):
    """Progressive sequence length: start, 2 start, 4 start ... end, each doubling an equal share of ramp_iters."""
    if start == 0 or it >= ramp_iters:
        return end
    return start * 2 ** int(math.log2(end // start) * it / ramp_iters)


class GradNormMonitor:
    """Running mean of the global gradient norm. A norm above threshold x mean is an explosion: the step is
    clipped to the mean instead of the usual threshold. The first `warmup` norms only build the mean."""

    def __init__(self, threshold, warmup=10, beta=0.9):
        self.threshold, self.warmup, self.beta = threshold, warmup, beta
        self.mean, self.count, self.explosions = 0.0, 0, 0

    def check(self, norm, clip):
        """-> (the threshold to clip this step to, whether it exploded); updates the running mean."""
        exploded = self.count >= self.warmup and norm > self.threshold * self.mean
        if exploded:
            self.explosions += 1
            clip = min(clip, self.mean)
        else:  # an explosion does not drag the mean up
            self.count += 1
            self.mean = norm if self.count == 1 else self.beta * self.mean + (1 - self.beta) * norm
        return clip, exploded

    def state_dict(self):
        return dict(mean=self.mean, count=self.count, explosions=self.explosions)

    def load_state_dict(self, state):
        self.__dict__.update(state)


class PlateauLR:
    """The seed's adaptive LR. Every check, compare the smoothed loss with the best seen: a relative drop above
    `threshold` is progress. After `patience` iterations without progress, multiply the LR by `boost` if the
    recent gradient norms were stable (coefficient of variation < 0.3: the plateau is flat, push on), else
    by 0.7 (noisy: calm down). The scale multiplies the schedule; the caller clamps to [min_lr, max_lr]."""

    def __init__(self, patience, threshold, boost, cut=0.7, smoothing=0.9):
        self.patience, self.threshold, self.boost, self.cut, self.smoothing = patience, threshold, boost, cut, smoothing
        self.scale, self.smoothed, self.best, self.last_progress = 1.0, None, float('inf'), 0

    def update(self, it, loss, grad_norms):
        """Called every lr_check_interval iterations; returns a message when the LR scale changed."""
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self.smoothed < self.best * (1 - self.threshold):
            self.best, self.last_progress = self.smoothed, it
            return None
        if it - self.last_progress < self.patience:
            return None
        self.last_progress = it  # wait another `patience` before the next change
        norms = np.asarray(grad_norms)
        stable = len(norms) > 1 and norms.std() / norms.mean() < 0.3
        self.scale *= self.boost if stable else self.cut
        return f"plateau for {self.patience} iterations (smoothed loss {self.smoothed:.4f}, gradients " \
               f"{'stable' if stable else 'noisy'}): LR scale x{self.boost if stable else self.cut} -> {self.scale:.3f}"

    def state_dict(self):
        return dict(scale=self.scale, smoothed=self.smoothed, best=self.best, last_progress=self.last_progress)

    def load_state_dict(self, state):
        self.__dict__.update(state)


class DeadExpertTracker:
    """Warns once when an expert's mean load stays below 1/(10 E) for `window` iterations in a row."""

    def __init__(self, window):
        self.window, self.dead_since = window, {}

    def update(self, it, loads):
        """loads: (L, E) mean load fractions since the last call. Returns the warnings to print."""
        warnings = []
        floor = 1 / (10 * loads.shape[1])
        for key, load in np.ndenumerate(loads):  # key = (layer, expert)
            if load >= floor:
                self.dead_since.pop(key, None)
            elif self.dead_since.setdefault(key, it) is not None and it - self.dead_since[key] >= self.window:
                warnings.append(f"warning: layer {key[0]} expert {key[1]} has had load < {floor:.3f} for "
                                f"{it - self.dead_since[key]} iterations (dead expert)")
                self.dead_since[key] = None  # said once; reset when it recovers
        return warnings


def memory_level(fraction):
    """How many of MEMORY_LEVELS a memory fraction has reached: 0 (fine) .. 4 (emergency)."""
    return sum(fraction >= level for level in MEMORY_LEVELS)


def suggest_lr(lrs, losses):
    """The LR range test's suggestion: where the smoothed loss falls fastest against log(lr), looking only
    before the loss minimum (past it, training diverges)."""
    lrs, losses = np.asarray(lrs), np.asarray(losses)
    end = int(np.argmin(losses)) + 1
    if end < 3:
        return float(lrs[0])
    slope = np.gradient(losses[:end], np.log(lrs[:end]))
    return float(lrs[int(np.argmin(slope))])


def write_atomic(path, save):
    """save(tmp) then rename: a crash while writing never leaves a half-written file at path."""
    save(path + '.tmp')
    os.replace(path + '.tmp', path)


def link_or_copy(src, dst):
    """dst becomes the same file as src (a hard link when the file system allows, else a copy), atomically."""
    try:
        write_atomic(dst, lambda tmp: os.link(src, tmp))
    except OSError:
        write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def plot_run(records, path_prefix):
    """Training curves (loss, LR, gradient norm) and the expert-load heatmap (layer x expert over time)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = [r for r in records if 'loss' in r]
    evals = [r for r in records if 'val_loss' in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r['iter'] for r in steps], [r['loss'] for r in steps], lw=0.8, label='train (step)')
    axes[0].plot([r['iter'] for r in evals], [r['train_loss'] for r in evals], 'o-', label='train (eval)')
    axes[0].plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', label='val')
    axes[0].set(title='loss (nats)', xlabel='iteration')
    axes[0].legend()
    axes[1].plot([r['iter'] for r in steps], [r['lr'] for r in steps])
    axes[1].set(title='learning rate', xlabel='iteration', yscale='log')
    axes[2].plot([r['iter'] for r in steps], [r['grad_norm'] for r in steps])
    axes[2].set(title='gradient norm (before clipping)', xlabel='iteration', yscale='log')
    fig.tight_layout()
    fig.savefig(path_prefix + 'training.png', dpi=80)
    plt.close(fig)
    loads = np.array([np.ravel(r['load']) for r in steps if r.get('load')])  # (time, L*E)
    if len(loads):
        L, E = np.shape(steps[-1]['load'])
        fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * L * E)))
        image = ax.imshow(loads.T * E, aspect='auto', cmap='coolwarm', vmin=0, vmax=2, interpolation='nearest',
                          extent=(steps[0]['iter'], max(steps[-1]['iter'], steps[0]['iter'] + 1), L * E - 0.5, -0.5))
        ax.set_yticks(range(0, L * E, E), [f'layer {i}' for i in range(L)])
        ax.set(title='expert load / even share (1 = balanced); rows: experts of each layer', xlabel='iteration')
        fig.colorbar(image)
        fig.tight_layout()
        fig.savefig(path_prefix + 'expert_load.png', dpi=80)
        plt.close(fig)


def main():
    settings = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
    problem = validate(settings)
    if problem:
        fail(problem)
    model_settings = {f.name: settings[f.name] for f in fields(ModelConfig) if f.name not in ('vocab_size', 'block_size')}
    try:  # the model's settings are checked up front too
        model_defaults = ModelConfig(vocab_size=1, block_size=block_size, **model_settings)
    except ValueError as e:
        fail(e)

    # device and precision: bf16 autocast on CUDA, plain fp32 on CPU
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    device_type = 'cuda' if dev.startswith('cuda') else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        fail(f"device={device!r} but CUDA is not available; use --device=cpu")
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device_type == 'cuda' else nullcontext()
    # data parallelism under torchrun: one process per device, each with its own data stream (nanoGPT style)
    ddp = 'RANK' in os.environ
    rank, world_size = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    if ddp:
        if device_type == 'cuda':
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', timeout=timedelta(seconds=dist_timeout))
        if gradient_accumulation_steps % world_size:
            fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
                 f"{world_size} processes (they share the accumulation steps)")
        if rank != 0:  # one log is enough: the other ranks print only errors (stderr)
            sys.stdout = open(os.devnull, 'w')
    accumulation = gradient_accumulation_steps // world_size  # micro-steps per rank per iteration
    if device_type == 'cuda':
        kernels.build()  # JIT-compile the CUDA kernels once (rank 0 first under torchrun); else the _ref twins run
    torch.manual_seed(seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # data: train.bin / val.bin are flat token arrays (uint16 or uint32), read through np.memmap
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            meta = json.load(f)
        split_tokens = {split: np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r').size
                        for split in ('train', 'val')}
    except (OSError, KeyError, ValueError, TypeError) as e:
        fail(f"no usable prepared data in {data_dir} ({type(e).__name__}: {e}); run `python data/prepare.py`")
    for split, n in split_tokens.items():
        if n <= block_size + 1:
            fail(f"{split}.bin has {n} tokens, too few for block_size={block_size}; lower block_size or add data")

    def get_batch(split, generator, seq_len=block_size, rows=batch_size):
        """rows random windows of seq_len+1 tokens -> inputs x and next-token targets y, each (rows, seq_len)."""
        # a new memmap per batch: a long-lived one slowly grows memory (https://stackoverflow.com/q/45132940)
        data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r')
        ix = torch.randint(len(data) - seq_len - 1, (rows,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[i:i + seq_len].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + seq_len].astype(np.int64) for i in ix]))
        if device_type == 'cuda':  # pinned memory lets the copy to the GPU run asynchronously
            return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        return x.to(dev), y.to(dev)

    # model: from scratch, or everything (weights, optimizer, iteration, RNG streams, monitors) from a checkpoint
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    checkpoint = None
    if init_from == 'scratch' and os.path.exists(ckpt_path) and not lr_find:
        fail(f"{out_dir} already holds a run: continue it with --init_from=resume, or pick another --out_dir")
    if init_from == 'resume':
        checkpoint, model_config, model = load_checkpoint(ckpt_path)
        print(f"resuming from {ckpt_path} at iteration {checkpoint['iter_num']} (model settings from the checkpoint)")
        if model_config.vocab_size != meta['vocab_size']:
            fail(f"the checkpoint's vocab_size {model_config.vocab_size} != {meta['vocab_size']} of {data_dir}")
    else:
        model_config = ModelConfig(**{**asdict(model_defaults), 'vocab_size': meta['vocab_size']})
        model = GPT(model_config)
    if model_config.block_size < block_size:
        fail(f"block_size={block_size} is longer than the checkpoint's block_size={model_config.block_size}")
    model.to(dev)
    n_active = model.num_params(active=True)
    print(f"parameters: {model.num_params() / 1e6:.2f}M total, {n_active / 1e6:.2f}M active per token")
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes x {accumulation} micro-steps x "
          f"{batch_size} x {block_size}); train split {split_tokens['train']:,} tokens, val {split_tokens['val']:,}")
    if 'unigram_entropy_nats' in meta:
        print(f"baseline: unigram entropy of the corpus is {meta['unigram_entropy_nats']:.3f} nats/token")

    # AdamW with decoupled weight decay on matrices and expert weights only (norm gains and embeddings are not shrunk)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith('wte')]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith('wte')]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    sharded = zero_stage > 0  # zero.py: optimizer state (stage 1), gradients (2) and parameters (3) split over ranks
    if sharded:
        if compile and zero_stage == 3:
            fail("zero_stage=3 gathers parameters with hooks that torch.compile does not support; use --compile=False")
        if not ddp:
            print(f"zero_stage={zero_stage} in a single process: one rank holds every shard (plain AdamW maths)")
        optimizer = ShardedAdamW(groups, learning_rate, (beta1, beta2), stage=zero_stage,
                                 model=model if zero_stage == 3 else None)
    else:
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
    full_params = optimizer.full_params if sharded else nullcontext  # stage 3: parameters readable only inside
    warmup_iters = as_iters(warmup, max_iters)
    ceiling = max_lr or 2 * learning_rate
    grad_monitor = GradNormMonitor(explosion_threshold)
    plateau = PlateauLR(plateau_patience, plateau_threshold, plateau_factor)
    dead_experts = DeadExpertTracker(dead_expert_window)
    batch_rng = torch.Generator().manual_seed(seed + rank)  # this rank's data stream: its own RNG, saved in checkpoints
    if ddp:
        torch.manual_seed(seed + rank)  # dropout and router jitter differ between ranks, like their data
    iter_num, best_val_loss = 0, float('inf')
    recent_norms, recent_losses = [], []  # since the last adaptive-LR check

    def load_optimizer_shards(saved_iter, saved_stage, saved_world_size):
        """The same layout: this rank's own file. Another world size (same stage, or 1 <-> 2): every rank reads
        all the files and takes its new slice (zero.py's load_shards)."""
        if not sharded:
            fail(f"the checkpoint's optimizer state is sharded (zero_stage={saved_stage}): resume with "
                 f"--zero_stage={saved_stage} (any number of processes) or --reset_optimizer=True")
        files = [os.path.join(out_dir, f'ckpt_{saved_iter:06d}.rank{r}.pt') for r in range(saved_world_size)]
        try:
            if (saved_stage, saved_world_size) == (zero_stage, world_size):
                optimizer.load_state_dict(torch.load(files[rank], map_location='cpu', weights_only=True))
            else:
                optimizer.load_shards([torch.load(f, map_location='cpu', weights_only=True) for f in files])
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            fail(f"cannot load the optimizer shards {files[0]} ... ({type(e).__name__}: {first_line(e)})")

    def restore(ckpt, optimizer_too=True):
        """Put the run back where ckpt left it: weights always, the rest unless reset_optimizer."""
        nonlocal iter_num, best_val_loss
        with full_params():
            model.load_state_dict(ckpt['model'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        if len(ckpt['rng']) == world_size:  # each rank continues its own random streams
            batch_rng.set_state(ckpt['rng'][rank]['batch'])
            torch.set_rng_state(ckpt['rng'][rank]['torch'])
            if device_type == 'cuda' and len(ckpt['rng'][rank]['cuda']):
                torch.cuda.set_rng_state(ckpt['rng'][rank]['cuda'], dev)
        else:  # another world size: new streams, distinct from the ones already used
            print(f"resuming {len(ckpt['rng'])} ranks' run on {world_size}: data streams re-seeded")
            batch_rng.manual_seed(seed + rank + 1000 * iter_num)
            torch.manual_seed(seed + rank + 1000 * iter_num)
        if optimizer_too and ckpt['optimizer'] is not None:  # the whole state (stage 0): every zero_stage loads it
            (optimizer.load_full_state_dict if sharded else optimizer.load_state_dict)(ckpt['optimizer'])
        elif optimizer_too:  # ZeRO: one shard file per rank of the run that saved it
            load_optimizer_shards(ckpt['iter_num'], ckpt['zero']['stage'], ckpt['zero']['world_size'])
        if optimizer_too:
            plateau.load_state_dict(ckpt['monitors']['plateau'])
            grad_monitor.load_state_dict(ckpt['monitors']['grad'])
            recent_norms[:], recent_losses[:] = ckpt['monitors']['recent_norms'], ckpt['monitors']['recent_losses']

    if checkpoint:
        restore(checkpoint, optimizer_too=not reset_optimizer)
        checkpoint = None  # free the memory
    try:
        os.makedirs(os.path.join(out_dir, 'plots'), exist_ok=True)
        if rank == 0:
            shutil.copy(os.path.join(data_dir, 'tokenizer.json'), os.path.join(out_dir, 'tokenizer.json'))  # sample.py
    except OSError as e:
        fail(f"cannot write to out_dir={out_dir} ({e.strerror}); choose another --out_dir")
    train_model = torch.compile(model) if compile else model
    if ddp and zero_stage == 0:  # DDP all-reduces the gradients during backward, bucket by bucket
        train_model = DDP(train_model, device_ids=[dev] if device_type == 'cuda' else None)

    @torch.no_grad()
    def estimate_loss():
        """Mean cross-entropy over eval_iters batches per split; the same batches every time (a fixed seed)."""
        model.eval()
        out = {}
        for split in ('train', 'val'):
            rng = torch.Generator().manual_seed(seed + 1)
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = get_batch(split, rng)
                with autocast:
                    _, loss = model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def rng_state():
        return dict(batch=batch_rng.get_state(), torch=torch.get_rng_state(),
                    cuda=torch.cuda.get_rng_state(dev) if device_type == 'cuda' else torch.empty(0))

    def save_checkpoint(reason):
        """ckpt_<iter>.pt written atomically by rank 0, then ckpt.pt (and best.pt after a new best val loss) pointed
        at it; only the newest keep_checkpoints ckpt_<iter>.pt stay. Every rank calls it. Returns the path."""
        rng = [rng_state()]
        if ddp:  # every rank's random streams, so that each continues its own on resume
            rng = [None] * world_size
            dist.all_gather_object(rng, rng_state())
        path = os.path.join(out_dir, f'ckpt_{iter_num:06d}.pt')
        with full_params():  # (collective at stage 3) a CPU copy of the full weights
            weights = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}
        if sharded:  # ZeRO: each rank writes its own optimizer shard, before rank 0's checkpoint refers to it
            shard_path = path[:-3] + f'.rank{rank}.pt'
            try:
                write_atomic(shard_path, lambda tmp: torch.save(optimizer.state_dict(), tmp))
            except (OSError, RuntimeError) as e:
                fail(f"could not write {shard_path} ({first_line(e)}); the previous checkpoint is intact")
            if ddp:
                dist.barrier()
        if rank == 0:
            state = dict(model=weights, optimizer=None if sharded else optimizer.state_dict(),
                         zero=dict(stage=zero_stage, world_size=world_size) if sharded else None,
                         model_config=asdict(model_config),
                         config=settings, iter_num=iter_num, best_val_loss=best_val_loss, reason=reason, rng=rng,
                         monitors=dict(plateau=plateau.state_dict(), grad=grad_monitor.state_dict(),
                                       recent_norms=recent_norms, recent_losses=recent_losses))
            try:
                write_atomic(path, lambda tmp: torch.save(state, tmp))
                link_or_copy(path, ckpt_path)
                if reason == 'best':
                    link_or_copy(path, os.path.join(out_dir, 'best.pt'))
            except (OSError, RuntimeError) as e:  # disk full, permissions ... (torch.save raises RuntimeError)
                fail(f"could not write {path} ({first_line(e)}); the previous checkpoint is intact")
            history = sorted(f for f in os.listdir(out_dir) if re.fullmatch(r'ckpt_\d+\.pt', f))
            for old in history[:-keep_checkpoints]:  # with its optimizer shards, if any
                for f in [old] + glob.glob(os.path.join(out_dir, old[:-3] + '.rank*.pt')):
                    os.remove(os.path.join(out_dir, f))
        if ddp:
            dist.barrier()  # no rank runs ahead of a checkpoint
        return path

    def emergency_exit(why, code):
        path = save_checkpoint('emergency')
        print(f"{why}: saved an emergency checkpoint {path} (also {ckpt_path}); "
              f"continue with --init_from=resume", file=sys.stderr)
        sys.exit(code)

    if lr_find and ddp:
        fail("run the LR range test in one process (python train.py ... --lr_find=True), not under torchrun")
    if lr_find:  # the LR range test: exponential sweep, smoothed loss, suggestion, plot; no checkpoint
        lrs, smoothed, avg, best = [], [], 0.0, float('inf')
        for i in range(lr_find_iters):
            lr = lr_find_start * (lr_find_end / lr_find_start) ** (i / (lr_find_iters - 1))
            for group in optimizer.param_groups:
                group['lr'] = lr
            x, y = get_batch('train', batch_rng)
            with autocast:
                _, loss = train_model(x, y)
            loss.backward()
            if sharded:
                optimizer.reduce_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            avg = 0.9 * avg + 0.1 * loss.item()
            lrs.append(lr)
            smoothed.append(avg / (1 - 0.9 ** (i + 1)))  # bias-corrected EMA
            best = min(best, smoothed[-1])
            if not math.isfinite(smoothed[-1]) or smoothed[-1] > 4 * best:
                break  # diverged: the rest of the sweep says nothing
        suggestion = suggest_lr(lrs, smoothed)
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lrs, smoothed)
        ax.axvline(suggestion, color='r', ls='--', label=f'suggested {suggestion:.1e}')
        ax.set(xscale='log', xlabel='learning rate', ylabel='smoothed loss')
        ax.legend()
        fig.savefig(os.path.join(out_dir, 'lr_find.png'), dpi=80)
        with open(os.path.join(out_dir, 'lr_find.json'), 'w') as f:
            json.dump(dict(lrs=lrs, smoothed_loss=smoothed, suggested_lr=suggestion), f)
        print(f"LR range test: {len(lrs)} steps from {lrs[0]:.1e} to {lrs[-1]:.1e}; steepest descent at "
              f"lr={suggestion:.2e} (try --learning_rate={suggestion:.1e}); wrote lr_find.png/.json in {out_dir}")
        return

    # SIGTERM / SIGINT (Ctrl-C): finish the current iteration, save, exit non-zero
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # run folder: resolved config, metadata, metrics (appended on resume), optional wandb mirror; rank 0 only
    metrics_path, records, wandb = os.path.join(out_dir, 'metrics.jsonl'), [], None
    if rank == 0:
        import yaml
        with open(os.path.join(out_dir, 'config.yaml'), 'w') as f:
            yaml.safe_dump({**settings, 'model': asdict(model_config)}, f, sort_keys=False)
        try:
            commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        except OSError:
            commit = None
        with open(os.path.join(out_dir, 'metadata.json'), 'w') as f:
            json.dump(dict(git_commit=commit, torch=torch.__version__, device=dev, world_size=world_size,
                           zero_stage=zero_stage, device_name=torch.cuda.get_device_name(dev) if device_type == 'cuda' else 'cpu',
                           start_time=time.strftime('%Y-%m-%dT%H:%M:%S%z'), init_from=init_from, start_iter=iter_num),
                      f, indent=2)
        resumed = init_from == 'resume' and os.path.exists(metrics_path)
        records = [json.loads(line) for line in open(metrics_path)] if resumed else []
        records = [r for r in records if r['iter'] <= iter_num]  # drop what happened after the checkpoint
        with open(metrics_path, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in records)
        if wandb_log:
            try:
                import wandb
                wandb.init(project=wandb_project, config=settings, resume='allow')
            except ImportError:
                print("wandb_log=True but wandb is not installed (pip install wandb); metrics stay in metrics.jsonl")

    def log(record):
        if rank != 0:
            return
        records.append(record)
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if wandb:
            wandb.log(record, step=record['iter'])

    # training loop: the last pass (iter_num == max_iters) only evaluates and saves
    run_start, start_iter, bad_steps, skipped = time.time(), iter_num, 0, 0
    t0, t0_iter = time.time(), iter_num  # timing window for tok/s
    load_sum, load_steps, nan_injected, reloads = None, 0, 0, 0
    try:  # a CUDA out-of-memory anywhere in the loop (eval included) ends the run with an emergency checkpoint
        while True:
            lr = min(ceiling, max(min_lr, scheduled_lr(iter_num, learning_rate, min_lr, warmup_iters,
                                                       lr_decay_iters or max_iters, num_cycles) * plateau.scale))
            for group in optimizer.param_groups:
                group['lr'] = lr

            if iter_num % eval_interval == 0 or iter_num == max_iters:
                losses = estimate_loss()
                improved = losses['val'] < best_val_loss
                best_val_loss = min(best_val_loss, losses['val'])
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val']))
                if iter_num > start_iter or iter_num == max_iters:
                    print(f"saved {save_checkpoint('best' if improved else 'eval')}")
                    if rank == 0:
                        plot_run(records, os.path.join(out_dir, 'plots', ''))
                t0, t0_iter = time.time(), iter_num  # evaluation time is not training time
            if iter_num >= max_iters:
                break

            # one optimizer step; sequences grow from seq_len_start with tokens per micro-step held constant
            seq_len = seq_len_at(iter_num, seq_len_start, block_size, as_iters(seq_len_warmup, max_iters))
            for micro_step in range(accumulation):
                if ddp and zero_stage == 0:  # all-reduce gradients only after the last micro-step (what no_sync() sets)
                    train_model.require_backward_grad_sync = micro_step == accumulation - 1
                x, y = get_batch('train', batch_rng, seq_len, batch_size * block_size // seq_len)
                with autocast:
                    _, loss = train_model(x, y)
                if 0 <= debug_nan_at <= iter_num and nan_injected < debug_nan_steps and micro_step == 0:
                    loss, nan_injected = loss * float('nan'), nan_injected + 1
                (loss / accumulation).backward()
            if sharded:  # reduce-scatter the gradients into each rank's shard, then one all-reduce for the norm
                optimizer.reduce_gradients()
                grad_norm = optimizer.grad_norm()
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf')).item()  # sync point
            if not math.isfinite(grad_norm):  # skip: the weights and Adam's moments stay as they were
                optimizer.zero_grad(set_to_none=True)
                bad_steps, skipped = bad_steps + 1, skipped + 1
                plateau.scale *= 0.5
                print(f"iter {iter_num}: non-finite loss/gradient, step skipped ({skipped} so far), "
                      f"LR scale -> {plateau.scale:.3f}")
                if bad_steps >= max_bad_steps and os.path.exists(ckpt_path):
                    reloads += 1
                    if reloads > 3:
                        fail(f"training diverged again after {reloads - 1} reloads of {ckpt_path}; lower learning_rate")
                    scale = plateau.scale
                    restore(load_checkpoint(ckpt_path)[0])
                    plateau.scale, bad_steps = scale * 0.5, 0
                    print(f"{max_bad_steps} bad steps in a row: reloaded {ckpt_path} (iteration {iter_num}), "
                          f"LR scale -> {plateau.scale:.3f}")
                else:
                    iter_num += 1
                continue
            bad_steps = 0
            clip, exploded = grad_monitor.check(grad_norm, clip_at(iter_num, warmup_iters, grad_clip_start, grad_clip)
                                                if grad_clip > 0 else float('inf'))
            if grad_norm > clip:
                if sharded:
                    optimizer.clip_grads_(clip, grad_norm)
                else:
                    torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip, torch.tensor(grad_norm))
                if exploded:
                    print(f"iter {iter_num}: gradient norm {grad_norm:.2f} is {grad_norm / grad_monitor.mean:.1f}x its "
                          f"running mean: explosion, clipped to {clip:.2f}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            stats = model.router_stats()
            if stats:  # per-expert load summed on the device, read once per log line
                loads = torch.stack([s['load'] for s in stats])  # (L, E)
                load_sum, load_steps = (loads if load_sum is None else load_sum + loads), load_steps + 1
            loss_value = loss.item()
            recent_norms.append(grad_norm)
            recent_losses.append(loss_value)

            if adaptive_lr and iter_num % lr_check_interval == 0:
                message = plateau.update(iter_num, float(np.mean(recent_losses)), recent_norms)
                recent_norms.clear()
                recent_losses.clear()
                if message:
                    print(f"iter {iter_num}: {message}")
            del recent_norms[:-lr_check_interval], recent_losses[:-lr_check_interval]

            if iter_num % log_interval == 0:
                if device_type == 'cuda':
                    torch.cuda.synchronize()
                dt = (time.time() - t0) / (iter_num - t0_iter)  # seconds per iteration
                t0, t0_iter = time.time(), iter_num
                record = dict(iter=iter_num, loss=loss_value, lr=lr, grad_norm=grad_norm, clip=clip, dt=dt,
                              tok_s=tokens_per_iter / dt, seq_len=seq_len, skipped=skipped,
                              explosions=grad_monitor.explosions)
                line = (f"iter {iter_num}: loss {record['loss']:.4f}, lr {lr:.2e}, grad norm {grad_norm:.2f}, "
                        f"dt {dt * 1000:.0f}ms, tok/s {record['tok_s']:,.0f}")
                if seq_len_start:
                    line += f", seq_len {seq_len}"
                if device_type == 'cuda':  # model FLOPs utilisation against H100 SXM bf16 dense peak, 989 TFLOP/s
                    record['mfu'] = model.flops_per_token(seq_len) * tokens_per_iter / dt / 989e12
                    memory = torch.cuda.mem_get_info(dev)
                    fraction = torch.cuda.memory_reserved(dev) / memory[1]
                    record.update(mem_alloc=torch.cuda.memory_allocated(dev) / memory[1], mem_reserved=fraction,
                                  mem_peak=torch.cuda.max_memory_allocated(dev) / memory[1])
                    line += f", mfu {record['mfu'] * 100:.1f}%, mem {fraction:.0%}"
                    level = memory_level(fraction)
                    if level >= 1:
                        print(f"iter {iter_num}: memory at {fraction:.0%} of the device")
                    if level in (2, 3):
                        torch.cuda.empty_cache()
                    if level == 4:
                        emergency_exit(f"memory at {fraction:.0%} of the device (>= {MEMORY_LEVELS[-1]:.0%})", 3)
                else:  # resident set size of this process
                    with open('/proc/self/statm') as f:
                        record['rss_gb'] = int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e9
                if model.mtp_losses:
                    record['mtp_losses'] = [l.item() for l in model.mtp_losses]
                    line += ", mtp " + "/".join(f"{l:.2f}" for l in record['mtp_losses'])
                if stats:
                    mean_load = (load_sum / load_steps).cpu().numpy()  # (L, E) mean load since the last log line
                    load_sum, load_steps = None, 0
                    record.update(load=mean_load.tolist(), dropped=[s['dropped'].item() for s in stats],
                                  entropy=[s['entropy'].item() for s in stats],
                                  aux_loss=[s['aux_loss'].item() for s in stats],
                                  z_loss=[s['z_loss'].item() for s in stats])
                    imbalance = float((mean_load.max(axis=1) * mean_load.shape[1]).max())  # worst layer's max/mean
                    line += f", load max/mean {imbalance:.2f}"
                    if max(record['dropped']) > 0:
                        line += f", dropped {np.mean(record['dropped']):.1%}"
                    for warning in dead_experts.update(iter_num, mean_load):
                        print(warning)
                print(line)
                log(record)

            if ddp:  # a signal may reach only some ranks: they all stop together, or none does
                flag = torch.tensor([stop_signal[0] if stop_signal else 0], device=dev)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_signal[:] = [int(flag)] if flag else []
            if stop_signal:
                emergency_exit(f"stopped by signal {signal.Signals(stop_signal[0]).name} at iteration {iter_num}",
                               128 + stop_signal[0])
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)  # frees the partial gradients; the weights are untouched
        emergency_exit(f"CUDA out of memory at iteration {iter_num} (try a smaller batch_size)", 3)

    print(f"done: {iter_num - start_iter} iterations in {time.time() - run_start:.0f}s, best val loss {best_val_loss:.4f}"
          f", {skipped} skipped steps, {grad_monitor.explosions} gradient explosions")
    if wandb:
        wandb.finish()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
        # Everything is written: leave now. On CPU, gloo's threads sometimes abort the process while Python tears
        # down ("terminate called without an active exception", ~1 run in 20 here), which torchrun reports as a
        # failed run; skipping the teardown avoids that.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == '__main__':
    configure_or_exit(globals())
    main()
