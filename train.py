"""
Train an Ava MoE language model. One script, read top to bottom as nanoGPT's: settings (the
globals below, overridden by a config file and --key=value arguments), setup, data, model,
optimizer, one loop. The monitors sit in the loop, or in small classes above it that the tests
drive with made-up numbers.

    python data/prepare.py                                 # once: Shakespeare -> data/shakespeare/
    python train.py config/nano.py                         # CPU, a few minutes
    python train.py config/nano.py --max_iters=200 --router=softmax --capacity_factor=1.25
    python train.py config/nano.py --init_from=resume      # continue exactly from out_dir/ckpt.pt
    python train.py config/small.py --cuda_graph=True      # GPU: each iteration as one CUDA graph
    torchrun --standalone --nproc_per_node=2 train.py config/nano.py --gradient_accumulation_steps=2
"""

import filecmp
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, fields
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import ava_kernels
from common import (PEAK_TFLOPS, Batches, GraphedSteps, autocast, check, fail, first_line,
                    gather_rng, load_checkpoint, load_data, load_run_tokenizer, lock_run_folder,
                    log_record, plot_run, resolve_device, restore, save_checkpoint,
                    start_run_folder, trained_data_dir, write_atomic)
from configurator import configure_or_exit, settings_of
from model import GPT, ModelConfig
from zero import ShardedAdamW

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/nano'        # the run folder: ckpt.pt, best.pt, config.yaml, metrics.jsonl, plots/
init_from = 'scratch'       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
reset_optimizer = False     # with resume: keep the weights, start AdamW and the monitors afresh
eval_interval = 100         # every this many iterations: train/val loss, checkpoint, plots
eval_iters = 20             # batches per split for that estimate (the same batches every time)
log_interval = 10           # one log line and one metrics.jsonl record every this many iterations
keep_checkpoints = 3        # keep the newest N ckpt_<iter>.pt (ckpt.pt and best.pt always stay)
wandb_log = False           # mirror metrics.jsonl to Weights & Biases (optional: pip install wandb)
wandb_project = 'ava'
# data
data_dir = 'data/shakespeare'  # by data/prepare.py: train.bin, val.bin, meta.json, tokenizer.json
batch_size = 32             # sequences per micro-step (at the full block_size)
block_size = 128            # tokens per sequence
gradient_accumulation_steps = 1
seq_len_start = 0           # progressive sequence length: start at this many tokens (0 = off) ...
seq_len_warmup = 0.25       # ... reach block_size after this share of max_iters; same tokens/step
# model: every field of ModelConfig in model.py is a setting too (n_layer, n_experts, router, ...),
# with the defaults written there; vocab_size comes from the data set's meta.json
globals().update({f.name: f.default for f in fields(ModelConfig)
                  if f.name not in ('vocab_size', 'block_size')})
# AdamW
learning_rate = 1e-3        # peak learning rate
weight_decay = 0.1          # decoupled; only on matrices (not norms or embeddings)
beta1 = 0.9
beta2 = 0.95
# schedule: linear warmup, then cosine decay to min_lr, optionally restarted num_cycles times
max_iters = 600
warmup = 0.03               # < 1: a fraction of max_iters; >= 1: a number of iterations
num_cycles = 1              # cosine cycles (warm restarts, Loshchilov & Hutter 2017); 1 = plain
lr_decay_iters = 0          # where the (last) cosine reaches min_lr; 0 = max_iters
min_lr = 1e-4               # ~learning_rate / 10 (Chinchilla)
# adaptive LR (a plateau rule): scales the scheduled LR, within [min_lr, max_lr]
adaptive_lr = False
lr_check_interval = 50      # compare the smoothed loss with the best every this many iterations
plateau_patience = 200      # iterations without an improvement before the LR changes
plateau_threshold = 0.01    # a relative loss drop that counts as an improvement
plateau_factor = 1.15       # boost on a plateau when gradients are stable (else cut x0.7)
max_lr = 0.0                # ceiling of the adaptive LR; 0 = 2 x learning_rate
# gradient health
grad_clip = 1.0             # final global-norm clip; 0 = off
grad_clip_start = 2.0       # the clip warms from this to grad_clip over the LR warmup
explosion_threshold = 3.0   # a norm above this x its running mean explodes: clipped to the mean
max_bad_steps = 3           # non-finite steps in a row before reloading the last checkpoint
# monitors
dead_expert_window = 200    # warn when an expert's load stays below 1/(10 E) this many iterations
peak_tflops = PEAK_TFLOPS   # one GPU's dense bf16 peak, MFU's denominator (as in bench.py)
# distributed: `torchrun --nproc_per_node=N train.py ...` trains data parallel on N processes
zero_stage = 0              # zero.py: 0 all-reduce; 1 shards AdamW's state; 2 + grads; 3 + weights
dist_timeout = 300          # seconds a collective waits for a missing rank before the run fails
# system
device = 'auto'             # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
compile = False             # torch.compile the model (worth it on GPU for long runs)
cuda_graph = False          # replay each iteration's forwards and backwards as one CUDA graph
seed = 1337
debug_nan_at = -1           # tests only: make the loss NaN from this iteration ...
debug_nan_steps = 1         # ... for this many iterations
# -----------------------------------------------------------------------------
MEMORY_LEVELS = (0.75, 0.80, 0.85, 0.90)  # of device memory: note, empty cache, warn, stop


def validity_checks(s):
    """Every setting checked before any work: (ok, message) pairs, each message naming the key."""
    power_of_2 = s['seq_len_start'] == 0 or (s['block_size'] % s['seq_len_start'] == 0 and (
        s['block_size'] // s['seq_len_start']).bit_count() == 1)
    return [
        (s['init_from'] in ('scratch', 'resume'), "init_from must be 'scratch' or 'resume'"),
        (s['learning_rate'] > 0, "learning_rate must be > 0"),
        (0 <= s['min_lr'] <= s['learning_rate'], "min_lr must be between 0 and learning_rate"),
        (s['max_lr'] == 0 or s['max_lr'] >= s['learning_rate'],
         "max_lr must be 0 (2 x learning_rate) or >= it"),
        (min(s['max_iters'], s['warmup'], s['lr_decay_iters']) >= 0,
         "max_iters, warmup, lr_decay_iters must be >= 0"),
        (s['num_cycles'] >= 1, "num_cycles must be >= 1"),
        (min(s['batch_size'], s['block_size'], s['gradient_accumulation_steps']) >= 1,
         "batch_size, block_size and gradient_accumulation_steps must be >= 1"),
        (min(s['n_layer'], s['n_head'], s['n_embd'], s['n_experts'], s['sinkhorn_iters']) >= 1,
         "n_layer, n_head, n_embd, n_experts and sinkhorn_iters must be >= 1"),
        (0 <= s['dropout'] < 1, f"dropout must be in [0, 1), got {s['dropout']}"),
        (min(s['eval_interval'], s['eval_iters'], s['log_interval'], s['keep_checkpoints']) >= 1,
         "eval_interval, eval_iters, log_interval and keep_checkpoints must be >= 1"),
        (0 <= s['seq_len_start'] <= s['block_size'],
         "seq_len_start must be between 0 (off) and block_size"),
        (power_of_2, "block_size / seq_len_start must be a power of 2 (sequences double in length, "
         "batches halve)"),
        (0 <= s['weight_decay'] and 0 <= s['beta1'] < 1 and 0 <= s['beta2'] < 1,
         "need weight_decay >= 0, betas in [0, 1)"),
        (0 <= s['grad_clip'] <= s['grad_clip_start'], "need 0 <= grad_clip <= grad_clip_start"),
        (s['explosion_threshold'] > 1, "explosion_threshold must be > 1"),
        (s['max_bad_steps'] >= 1, "max_bad_steps must be >= 1"),
        (s['plateau_factor'] > 1 and s['plateau_patience'] >= 1 and s['lr_check_interval'] >= 1,
         "need plateau_factor > 1, plateau_patience >= 1, lr_check_interval >= 1"),
        (s['zero_stage'] in (0, 1, 2, 3) and s['dist_timeout'] > 0,
         "need zero_stage in 0..3 and dist_timeout > 0"),
        (s['peak_tflops'] > 0, "peak_tflops must be > 0"),
        (not (s['compile'] and s['zero_stage'] == 3), "zero_stage=3 gathers parameters with hooks "
         "that torch.compile does not support; use --compile=False"),
        (not s['cuda_graph'] or not (s['compile'] or s['zero_stage'] > 1 or s['seq_len_start']),
         "cuda_graph=True replays fixed shapes without hooks: it excludes compile, zero_stage > 1 "
         "and seq_len_start"),
    ]


# model settings a resumed run may change: they weigh losses or regularise, the weights still fit
ADJUSTABLE_ON_RESUME = ('dropout', 'router_jitter', 'capacity_factor', 'aux_loss_coef',
                        'z_loss_coef', 'mtp_weight')
CPU_FLOPS = 35e9  # fp32 FLOP/s per core that training reaches on a CPU (nano: ~0.85 s/it, 2 cores)


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


def cpu_time_warning(config, tokens_per_iter):
    """A one-line warning when one iteration of this model would take over a minute on this CPU,
    from its FLOPs (the model is built on the meta device: no memory, no time); else None."""
    with torch.device('meta'):
        flops = GPT(config).flops_per_token(config.block_size) * tokens_per_iter
    threads = torch.get_num_threads()
    seconds = flops / (CPU_FLOPS * threads)
    if seconds > 60:
        return (f"warning: {flops:.1e} FLOPs per iteration, ~{seconds / 60:.0f} min each on this "
                f"CPU ({threads} thread{'s' * (threads > 1)}); config/nano.py is sized for a CPU")
    return None


def on_stop_signal(signum, frame):
    """SIGTERM / SIGINT (Ctrl-C). After the first step the loop finishes its iteration, saves an
    emergency checkpoint and exits non-zero. Before it (setup, the first evaluation, which on a CPU
    can take minutes) there is nothing new to save, so the run stops at once; so it does at a
    second signal."""
    stop_signal.append(signum)
    if first_iter is None or iter_num == first_iter or len(stop_signal) > 1:
        ckpt = os.path.join(out_dir, 'ckpt.pt')
        kept = f"; {ckpt} is as it was" if os.path.exists(ckpt) else ""
        fail(f"stopped by {signal.Signals(signum).name} before the first step: nothing new to "
             f"save{kept}", code=128 + signum)


# ---- schedules ----

def as_iters(value, max_iters):
    """warmup-style settings: below 1 a fraction of max_iters, otherwise a number of iterations."""
    return int(value * max_iters) if value < 1 else int(value)


def scheduled_lr(it, peak, floor, warmup_iters, decay_iters, cycles):
    """Linear warmup to peak, then cosine from peak to floor, restarted `cycles` times."""
    if it < warmup_iters:
        return peak * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return floor
    cycle_len = (decay_iters - warmup_iters) / cycles
    progress = ((it - warmup_iters) % cycle_len) / cycle_len  # 0 -> 1 inside the current cycle
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def clip_at(it, warmup_iters, start, final):
    """The gradient clip warms from `start` to `final`: loose while Adam's statistics settle."""
    return final if it >= warmup_iters else start + (final - start) * it / max(1, warmup_iters)


def seq_len_at(it, start, end, ramp_iters):
    """Progressive sequence length: start, 2 start, 4 start ... end, an equal share of ramp_iters
    each."""
    if start == 0 or it >= ramp_iters:
        return end
    return start * 2 ** int(math.log2(end // start) * it / ramp_iters)


# ---- monitors ----

class GradNormMonitor:
    """Running mean of the global gradient norm. A norm above threshold x mean is an explosion: the
    step is clipped to the mean instead of the usual threshold. The first `warmup` norms only build
    the mean."""

    def __init__(self, threshold, warmup=10, beta=0.9):
        self.threshold, self.warmup, self.beta = threshold, warmup, beta
        self.mean, self.count, self.explosions = 0.0, 0, 0

    def check(self, norm, clip):
        """-> (the threshold to clip this step to, whether it exploded); updates the mean."""
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
    """Adaptive LR. At each check, compare the smoothed loss with the best seen: a relative drop
    above `threshold` is progress. After `patience` iterations without progress, multiply the LR by
    `boost` if the recent gradient norms were stable (coefficient of variation < 0.3: the plateau is
    flat, push on), else by `cut` (noisy: calm down). The scale multiplies the schedule; the caller
    clamps to [min_lr, max_lr]. observe() keeps the last `window` losses and norms for check()."""

    def __init__(self, patience, threshold, boost, cut=0.7, smoothing=0.9, window=50):
        self.patience, self.threshold, self.boost, self.cut = patience, threshold, boost, cut
        self.smoothing, self.window = smoothing, window
        self.scale, self.smoothed, self.best, self.last_progress = 1.0, None, float('inf'), 0
        self.losses, self.norms = [], []

    def observe(self, loss, norm):
        self.losses = self.losses[1 - self.window:] + [loss]
        self.norms = self.norms[1 - self.window:] + [norm]

    def check(self, it):
        """update() with what observe() kept, which then starts afresh."""
        message = self.update(it, float(np.mean(self.losses)), self.norms)
        self.losses, self.norms = [], []
        return message

    def update(self, it, loss, grad_norms):
        """One check at iteration it; returns a message when the LR scale changed."""
        s = self.smoothing
        self.smoothed = loss if self.smoothed is None else s * self.smoothed + (1 - s) * loss
        if self.smoothed < self.best * (1 - self.threshold):
            self.best, self.last_progress = self.smoothed, it
            return None
        if it - self.last_progress < self.patience:
            return None
        self.last_progress = it  # wait another `patience` before the next change
        norms = np.asarray(grad_norms)
        stable = len(norms) > 1 and norms.std() / norms.mean() < 0.3
        factor = self.boost if stable else self.cut
        self.scale *= factor
        return (f"plateau for {self.patience} iterations (smoothed loss {self.smoothed:.4f}, "
                f"gradients {'stable' if stable else 'noisy'}): LR scale x{factor} -> "
                f"{self.scale:.3f}")

    def state_dict(self):
        keys = ('scale', 'smoothed', 'best', 'last_progress', 'losses', 'norms')
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state):
        self.__dict__.update(state)


class DeadExpertTracker:
    """Warns once when an expert's mean load stays below 1/(10 E) for `window` iterations."""

    def __init__(self, window):
        self.window, self.dead_since = window, {}

    def update(self, it, loads):
        """loads: (L, E) mean load fractions since the last call. -> the warnings to print."""
        warnings, floor = [], 1 / (10 * loads.shape[1])
        for key, load in np.ndenumerate(loads):  # key = (layer, expert)
            if load >= floor:
                self.dead_since.pop(key, None)
                continue
            since = self.dead_since.setdefault(key, it)
            if since is not None and it - since >= self.window:
                warnings.append(f"warning: layer {key[0]} expert {key[1]} has had load < "
                                f"{floor:.3f} for {it - since} iterations (dead expert)")
                self.dead_since[key] = None  # said once; reset when it recovers
        return warnings


def memory_level(fraction):
    """How many of MEMORY_LEVELS a memory fraction has reached: 0 (fine) .. 4 (emergency)."""
    return sum(fraction >= level for level in MEMORY_LEVELS)


def memory_action(fraction):
    """What the memory monitor does at this fraction of device memory, one behaviour per level:
    -> (a message to print or None, empty the allocator's cache?, stop the run?)."""
    level, share = memory_level(fraction), f"memory at {fraction:.0%} of the device"
    messages = [None, share, f"{share}: emptying the allocator's cache",
                f"warning: {share}, near the limit (a smaller batch_size would be safer)", None]
    return messages[level], level in (2, 3), level == 4


def model_flops_utilisation(flops_per_token, tokens_per_iter, dt, world_size, peak_tflops):
    """MFU: the model's FLOPs per second over the peak of all the GPUs that share the iteration's
    tokens (tokens_per_iter counts every rank's)."""
    return flops_per_token * tokens_per_iter / dt / (world_size * peak_tflops * 1e12)


# ---- evaluation and the routers' balance ----

def step_loss(model, precision, x, y):
    """One micro-step's training loss (the model's, with its router and MTP terms)."""
    with precision:
        return model(x, y)[1]


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, seed, precision):
    """Mean cross-entropy over eval_iters batches per split: the same batches every time."""
    model.eval()
    out = {}
    for split in ('train', 'val'):
        rng = torch.Generator().manual_seed(seed + 1)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = batches.get(split, rng)
            with precision:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def balance_routers(model, distributed):
    """Move the routers' balancing biases once per optimizer step, from the expert counts of every
    micro-step on every rank: all ranks keep the same biases, so they route a token alike."""
    counts = model.expert_counts()
    if distributed:
        for c in counts:
            dist.all_reduce(c)
    model.update_router_bias()


# ---- the log ----

def log_line(r):
    """The console line of a metrics record."""
    line = (f"iter {r['iter']}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, grad norm "
            f"{r['grad_norm']:.2f}, dt {r['dt'] * 1000:.0f}ms, tok/s {r['tok_s']:,.0f}")
    if r['progressive']:
        line += f", seq_len {r['seq_len']}"
    if 'mfu' in r:
        line += f", mfu {r['mfu'] * 100:.1f}%, mem {r['mem_reserved']:.0%}"
    if 'mtp_losses' in r:
        line += ", mtp " + "/".join(f"{loss:.2f}" for loss in r['mtp_losses'])
    if 'load' in r:
        line += f", load max/mean {r['imbalance']:.2f}"
        if max(r['dropped']) > 0:
            line += f", dropped {np.mean(r['dropped']):.1%}"
    return line


def memory_record(dev):
    """Memory in use: fractions of the device on CUDA, the resident set (GB) on the CPU."""
    if dev.startswith('cuda'):
        total = torch.cuda.mem_get_info(dev)[1]
        return dict(mem_alloc=torch.cuda.memory_allocated(dev) / total,
                    mem_reserved=torch.cuda.memory_reserved(dev) / total,
                    mem_peak=torch.cuda.max_memory_allocated(dev) / total)
    with open('/proc/self/statm') as f:
        return dict(rss_gb=int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e9)


def routing_record(stats):
    """The routers' monitors from the logged step: load per layer and expert (L, E), the worst
    layer's max/mean, the dropped fraction, entropy, aux and z losses per layer."""
    load = torch.stack([s['load'] for s in stats]).cpu().numpy()  # (L, E)
    record = dict(load=load.tolist(), imbalance=float((load.max(axis=1) * load.shape[1]).max()))
    for key in ('dropped', 'entropy', 'aux_loss', 'z_loss'):
        record[key] = [s[key].item() for s in stats]
    return record


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    stop_signal, first_iter = [], None  # signals received; the iteration training started at
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    overrides = configure_or_exit(globals())
    settings = settings_of(globals())
    check(validity_checks(settings))
    model_settings = {f.name: settings[f.name] for f in fields(ModelConfig)
                      if f.name not in ('vocab_size', 'block_size')}
    try:  # the model's settings are checked up front too
        ModelConfig(vocab_size=1, block_size=block_size, **model_settings)
    except ValueError as e:
        fail(e)

    # setup: the device, precision (bf16 autocast on CUDA, fp32 on the CPU) and, under torchrun,
    # one process per device, each with its own data stream
    dev, device_type = resolve_device(device)
    check([(device_type == 'cuda' or not cuda_graph, "cuda_graph=True needs a CUDA device")])
    precision = autocast(device_type)
    ddp = 'RANK' in os.environ
    rank, world_size = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    check([(gradient_accumulation_steps % world_size == 0,
            f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
            f"{world_size} processes")])
    if ddp:
        if device_type == 'cuda':
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo',
                                timeout=timedelta(seconds=dist_timeout))
        if rank != 0:  # one log is enough: the other ranks print only errors (stderr)
            sys.stdout = open(os.devnull, 'w')
    accumulation = gradient_accumulation_steps // world_size  # micro-steps per rank per iteration
    if device_type == 'cuda':
        ava_kernels.build()  # JIT-compile the CUDA kernels (rank 0 first); else the _ref twins run
    torch.manual_seed(seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # data
    meta, tokens = load_data(data_dir)
    for split, split_tokens in tokens.items():
        if len(split_tokens) <= block_size + 1:
            fail(f"{split}.bin has {len(split_tokens)} tokens, too few for block_size="
                 f"{block_size}; lower block_size or add data")
    load_run_tokenizer(data_dir, meta['vocab_size'],  # sample.py will need it
                       fix="prepare the data again with python data/prepare.py")
    batches = Batches(data_dir, meta['dtype'], batch_size, block_size, dev)

    # model: from scratch, or all of it (weights, optimizer, RNG, monitors) from a checkpoint
    ckpt_path, checkpoint = os.path.join(out_dir, 'ckpt.pt'), None
    if init_from == 'scratch' and os.path.exists(ckpt_path):
        fail(f"{out_dir} already holds a run: continue it with --init_from=resume, or pick another "
             "--out_dir")
    if init_from == 'resume':
        checkpoint, saved_config, model = load_checkpoint(ckpt_path)
        it, trained_on = checkpoint['iter_num'], trained_data_dir(checkpoint)
        print(f"resuming from {ckpt_path} at iteration {it} (model settings from the checkpoint)")
        run_tokenizer = os.path.join(out_dir, 'tokenizer.json')
        check([(saved_config.vocab_size == meta['vocab_size'], f"the checkpoint's vocab_size "
                f"{saved_config.vocab_size} != {meta['vocab_size']} of {data_dir}; resume with "
                f"the data it trained on (--data_dir={trained_on})"),
               (not os.path.exists(run_tokenizer) or filecmp.cmp(
                   run_tokenizer, os.path.join(data_dir, 'tokenizer.json'), shallow=False),
                f"{data_dir}/tokenizer.json is not the tokenizer this run trained with "
                f"({run_tokenizer}); resume with its data (--data_dir={trained_on})"),
               (saved_config.block_size >= block_size, f"block_size={block_size} is longer than "
                f"the checkpoint's block_size={saved_config.block_size}"),
               (max_iters > it, f"max_iters={max_iters} but the checkpoint is at iteration {it}: "
                "nothing to train; resume with a larger --max_iters")])
        model_config = resumed_model_config(asdict(saved_config), overrides)
        if model_config != saved_config:
            model = GPT(model_config)  # restore() puts the checkpoint's weights into it
        settings.update({k: getattr(model_config, k) for k in model_settings})  # what runs
    else:
        model_config = ModelConfig(vocab_size=meta['vocab_size'], block_size=block_size,
                                   **model_settings)
        warning = device_type == 'cpu' and cpu_time_warning(
            model_config, gradient_accumulation_steps * batch_size * block_size)
        if warning:
            print(warning)
        model = GPT(model_config)
    model.to(dev)
    print(f"parameters: {model.num_params() / 1e6:.2f}M total, "
          f"{model.num_params(active=True) / 1e6:.2f}M active per token")
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes x {accumulation} "
          f"micro-steps x {batch_size} x {block_size}); train split {len(tokens['train']):,} "
          f"tokens, val {len(tokens['val']):,}")
    if 'unigram_entropy_nats' in meta:
        print(f"baseline: unigram entropy of the corpus is {meta['unigram_entropy_nats']:.3f} "
              "nats/token")

    # optimizer: AdamW, decoupled weight decay on matrices and expert weights only (norm gains and
    # the embedding are not shrunk), data parallel over the ranks (zero.py)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and not n.startswith('wte')]
    no_decay = [p for n, p in named if p.dim() < 2 or n.startswith('wte')]
    if zero_stage > 0 and not ddp:
        print(f"zero_stage={zero_stage} in a single process: one rank holds every shard")
    optimizer = ShardedAdamW([{'params': decay, 'weight_decay': weight_decay},
                              {'params': no_decay, 'weight_decay': 0.0}], learning_rate,
                             (beta1, beta2), stage=zero_stage, model=model)
    warmup_iters, ceiling = as_iters(warmup, max_iters), max_lr or 2 * learning_rate
    ramp_iters = as_iters(seq_len_warmup, max_iters)  # of the progressive sequence length
    grad_monitor = GradNormMonitor(explosion_threshold)
    plateau = PlateauLR(plateau_patience, plateau_threshold, plateau_factor,
                        window=lr_check_interval)
    monitors = dict(plateau=plateau, grad=grad_monitor)  # saved in checkpoints
    dead_experts = DeadExpertTracker(dead_expert_window)
    batch_rng = torch.Generator().manual_seed(seed + rank)  # this rank's data stream
    if ddp:
        torch.manual_seed(seed + rank)  # dropout and router jitter differ between ranks, as data do
    iter_num, best_val_loss = 0, float('inf')
    if checkpoint:
        iter_num, best_val_loss = restore(checkpoint, model, optimizer, monitors, batch_rng, seed,
                                          dev, out_dir, optimizer_too=not reset_optimizer)
        checkpoint = None  # free the memory
    first_iter = iter_num  # from here on a signal stops the run after an iteration, saved

    # the run folder: one training at a time (the lock), the data set's tokenizer for sample.py,
    # and an absolute data_dir in config.yaml and the checkpoints, so they are found from anywhere
    try:
        os.makedirs(out_dir, exist_ok=True)
        if rank == 0:
            lock = lock_run_folder(out_dir)  # held until this process ends
            source, kept = (os.path.join(d, 'tokenizer.json') for d in (data_dir, out_dir))
            if not os.path.exists(kept) or not filecmp.cmp(source, kept, shallow=False):
                write_atomic(kept, lambda tmp: shutil.copyfile(source, tmp))
        os.makedirs(os.path.join(out_dir, 'plots'), exist_ok=True)
    except OSError as e:
        fail(f"cannot write to out_dir={out_dir} ({e.strerror}); choose another --out_dir")
    settings['data_dir'] = os.path.abspath(data_dir)
    train_model = torch.compile(model) if compile else model

    metrics_path, records, wandb = os.path.join(out_dir, 'metrics.jsonl'), [], None
    if rank == 0:
        name = torch.cuda.get_device_name(dev) if device_type == 'cuda' else 'cpu'
        records = start_run_folder(out_dir, settings, model_config, dict(
            device=dev, device_name=name, world_size=world_size, zero_stage=zero_stage,
            init_from=init_from), iter_num)
        if wandb_log:
            try:
                import wandb
                wandb.init(project=wandb_project, config=settings, resume='allow')
            except ImportError:
                print("wandb_log=True but wandb is not installed (pip install wandb); metrics "
                      "stay in metrics.jsonl")

    # the training loop: the last pass (iter_num == max_iters) only evaluates and saves
    run_start, start_iter, bad_steps, skipped, reloads = time.time(), iter_num, 0, 0, 0
    nan_injected = 0  # steps made NaN by debug_nan_at so far
    graphed = None  # with cuda_graph: the captured micro-steps (common.GraphedSteps)
    t0, t0_iter = time.time(), iter_num  # the tok/s window
    emergency = None  # (why, exit code): the loop stops early and saves an emergency checkpoint
    try:  # a CUDA out-of-memory anywhere in the loop (evaluation too) ends in that checkpoint
        while True:
            scheduled = scheduled_lr(iter_num, learning_rate, min_lr, warmup_iters,
                                     lr_decay_iters or max_iters, num_cycles)
            lr = min(ceiling, max(min_lr, scheduled * plateau.scale))
            for group in optimizer.param_groups:
                group['lr'] = lr

            if iter_num % eval_interval == 0 or iter_num == max_iters:
                losses = estimate_loss(model, batches, eval_iters, seed, precision)
                improved = losses['val'] < best_val_loss
                best_val_loss = min(best_val_loss, losses['val'])
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss "
                      f"{losses['val']:.4f}")
                if rank == 0:
                    log_record(records, metrics_path, wandb, dict(
                        iter=iter_num, train_loss=losses['train'], val_loss=losses['val']))
                if iter_num > start_iter or iter_num == max_iters:
                    path = save_checkpoint(
                        out_dir, 'best' if improved else 'eval', model, optimizer, keep_checkpoints,
                        iter_num=iter_num, best_val_loss=best_val_loss, config=settings,
                        model_config=asdict(model_config), rng=gather_rng(batch_rng, dev),
                        monitors={k: m.state_dict() for k, m in monitors.items()})
                    print(f"saved {path}")
                    if rank == 0:
                        plot_run(records, os.path.join(out_dir, 'plots'))
                t0, t0_iter = time.time(), iter_num  # evaluation time is not training time
            if iter_num >= max_iters:
                break

            # one optimizer step; sequences grow from seq_len_start, tokens per micro-step constant
            seq_len = seq_len_at(iter_num, seq_len_start, block_size, ramp_iters)
            # router statistics on log steps only (a graph records them once, so always)
            model.watch_routing(cuda_graph or (iter_num + 1) % log_interval == 0)
            if cuda_graph:  # the eager loop's batches, the micro-steps replayed as one graph
                xs, ys = (torch.stack(t) for t in zip(*(batches.get('train', batch_rng)
                                                          for _ in range(accumulation))))
                if graphed is None:
                    graphed = GraphedSteps(partial(step_loss, model, precision),
                                           model.parameters(), xs, ys)
                    for counts in model.expert_counts():
                        counts.zero_()  # what the warm-up runs counted
                loss = graphed(xs, ys)
            else:
                for micro_step in range(accumulation):
                    x, y = batches.get('train', batch_rng, seq_len,
                                       batch_size * block_size // seq_len)
                    loss = step_loss(train_model, precision, x, y)
                    if debug_nan_at >= 0 and iter_num >= debug_nan_at and not micro_step:  # tests
                        nan_injected += 1
                        loss = loss * float('nan') if nan_injected <= debug_nan_steps else loss
                    (loss / accumulation).backward()
            grad_norm = optimizer.reduce_gradients()  # the mean gradient over ranks; its norm syncs
            if not math.isfinite(grad_norm):  # skip: the weights and Adam's moments stay as is
                optimizer.zero_grad(set_to_none=True)
                for counts in model.expert_counts():
                    counts.zero_()
                bad_steps, skipped, plateau.scale = bad_steps + 1, skipped + 1, plateau.scale * 0.5
                print(f"iter {iter_num}: non-finite loss/gradient, step skipped ({skipped} so "
                      f"far), LR scale -> {plateau.scale:.3f}")
                if bad_steps < max_bad_steps or not os.path.exists(ckpt_path):
                    iter_num += 1
                    continue
                reloads, scale = reloads + 1, plateau.scale
                if reloads > 3:
                    fail(f"training diverged again after {reloads - 1} reloads of {ckpt_path}; "
                         "lower learning_rate")
                iter_num, best_val_loss = restore(load_checkpoint(ckpt_path)[0], model, optimizer,
                                                  monitors, batch_rng, seed, dev, out_dir)
                plateau.scale, bad_steps = scale * 0.5, 0
                print(f"{max_bad_steps} bad steps in a row: reloaded {ckpt_path} (iteration "
                      f"{iter_num}), LR scale -> {plateau.scale:.3f}")
                continue
            bad_steps = 0
            clip = clip_at(iter_num, warmup_iters, grad_clip_start, grad_clip) if grad_clip else 0
            clip, exploded = grad_monitor.check(grad_norm, clip or math.inf)
            if exploded:
                print(f"iter {iter_num}: gradient norm {grad_norm:.2f} is "
                      f"{grad_norm / grad_monitor.mean:.1f}x its running mean: explosion, clipped "
                      f"to {clip:.2f}")
            optimizer.max_grad_norm = clip if math.isfinite(clip) else 0.0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            balance_routers(model, ddp)
            iter_num += 1
            loss_value = loss.item()
            plateau.observe(loss_value, grad_norm)
            if adaptive_lr and iter_num % lr_check_interval == 0:
                message = plateau.check(iter_num)
                if message:
                    print(f"iter {iter_num}: {message}")

            if iter_num % log_interval == 0:
                if device_type == 'cuda':
                    torch.cuda.synchronize()
                dt = (time.time() - t0) / (iter_num - t0_iter)  # seconds per iteration
                t0, t0_iter = time.time(), iter_num
                record = dict(iter=iter_num, loss=loss_value, lr=lr, grad_norm=grad_norm, clip=clip,
                              dt=dt, tok_s=tokens_per_iter / dt, seq_len=seq_len, skipped=skipped,
                              progressive=seq_len_start > 0, explosions=grad_monitor.explosions,
                              **memory_record(dev))
                if device_type == 'cuda':
                    flops = model.flops_per_token(seq_len)
                    record['mfu'] = model_flops_utilisation(flops, tokens_per_iter, dt, world_size,
                                                            peak_tflops)
                if model.mtp_losses:
                    record['mtp_losses'] = [loss.item() for loss in model.mtp_losses]
                stats = model.router_stats()
                if stats:
                    record.update(routing_record(stats))
                    for warning in dead_experts.update(iter_num, np.array(record['load'])):
                        print(warning)
                print(log_line(record))
                if rank == 0:
                    log_record(records, metrics_path, wandb, record)
                message, empty_cache, stop = memory_action(record.get('mem_reserved', 0.0))
                if message:
                    print(f"iter {iter_num}: {message}")
                if empty_cache:
                    torch.cuda.empty_cache()
                if stop:
                    emergency = (f"memory at {record['mem_reserved']:.0%} of the device", 3)
                    break

            if ddp:  # a signal may reach only some ranks: they all stop together, or none does
                flag = torch.tensor([stop_signal[0] if stop_signal else 0], device=dev)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_signal[:] = [int(flag)] if flag else []
            if stop_signal:
                name = signal.Signals(stop_signal[0]).name
                emergency = (f"stopped by signal {name} at iteration {iter_num}",
                             128 + stop_signal[0])
                break
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)  # frees the partial gradients; weights are untouched
        emergency = (f"CUDA out of memory at iteration {iter_num} (try a smaller batch_size)", 3)
    except RuntimeError as e:  # under torchrun: a collective whose peer process is gone
        if not ddp:
            raise
        kept = (f"resume from {ckpt_path} with --init_from=resume" if os.path.exists(ckpt_path)
                else "no checkpoint was saved")
        fail(f"another process of this torchrun run failed at iteration {iter_num} "
             f"({first_line(e).rpartition('] ')[2].partition('. ')[0]}); {kept}")
    if emergency:
        path = save_checkpoint(out_dir, 'emergency', model, optimizer, keep_checkpoints,
                               iter_num=iter_num, best_val_loss=best_val_loss, config=settings,
                               model_config=asdict(model_config), rng=gather_rng(batch_rng, dev),
                               monitors={k: m.state_dict() for k, m in monitors.items()})
        print(f"{emergency[0]}: saved an emergency checkpoint {path} (also {ckpt_path}); continue "
              "with --init_from=resume", file=sys.stderr)
        sys.exit(emergency[1])

    print(f"done: {iter_num - start_iter} iterations in {time.time() - run_start:.0f}s, best val "
          f"loss {best_val_loss:.4f}, {skipped} skipped steps, {grad_monitor.explosions} gradient "
          "explosions")
    if wandb:
        wandb.finish()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
        # Everything is written: leave now. On the CPU, gloo's threads can abort the process while
        # Python tears down ("terminate called without an active exception"), which torchrun reports
        # as a failed run; skipping the teardown avoids that.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
