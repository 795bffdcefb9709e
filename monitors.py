"""
train.py's monitors, each a small class or function that the tests drive with made-up numbers:
gradient explosions (GradNormMonitor), the plateau rule of the adaptive LR (PlateauLR), dead
experts (DeadExpertTracker), memory levels and what each does, stop signals and the stop every
rank agrees on (agreed_stop), speed (the CPU time warning, MFU), and the log line with the records
it prints.
"""

import os
import signal
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from failsafe import fail
from model import GPT

MEMORY_LEVELS = (0.75, 0.80, 0.85, 0.90)  # of device memory: note, empty cache, warn, stop
CPU_FLOPS = 35e9  # fp32 FLOP/s per core that training reaches on a CPU (nano: ~0.85 s/it, 2 cores)


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


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C): `received` lists them for the loop, which stops after its
    iteration, saves an emergency checkpoint and exits non-zero. Before the first step (setup, the
    first evaluation, which on a CPU can take minutes) there is nothing new to save, so the run
    stops at once and leaves out_dir as it found it (checkpoint.RunFolder); a second signal stops
    it at once too, without waiting for the emergency checkpoint."""

    def __init__(self, out_dir):
        self.out_dir, self.received, self.stepped = out_dir, [], False
        signal.signal(signal.SIGTERM, self.receive)
        signal.signal(signal.SIGINT, self.receive)

    def receive(self, signum, frame):
        self.received.append(signum)
        if not self.stepped:
            fail(f"stopped by {signal.Signals(signum).name} before the first step: nothing new to "
                 f"save; {self.out_dir} is as this run found it", code=128 + signum)
        if len(self.received) > 1:
            fail(f"stopped by a second {signal.Signals(signum).name}, without the emergency "
                 "checkpoint; --init_from=resume continues from the last checkpoint, if one was "
                 "saved", code=128 + signum)


class Stop(NamedTuple):
    """Why the run stops, as every rank agreed (agreed_stop)."""
    why: str
    code: int   # the exit code
    now: bool   # CUDA ran out of memory: the iteration's gradients are lost, no step is taken


def agreed_stop(signals, memory, oom, ddp, dev):
    """The one stop decision, which every rank takes together: a rank that stopped alone would
    wait for the others in the emergency checkpoint's collectives until dist_timeout. This rank's
    reasons are the stop signals it received, memory (the device's memory share when the last log
    step found it past the last of MEMORY_LEVELS, else 0) and oom (CUDA ran out of memory); each
    is the largest over the ranks. -> a Stop, or None to go on."""
    reasons = [float(oom), memory, float(signals[0] if signals else 0)]
    if ddp:
        agreed = torch.tensor(reasons, dtype=torch.float64, device=dev)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        reasons = agreed.tolist()
    oom, memory, signum = reasons[0], reasons[1], int(reasons[2])
    if oom:
        return Stop("CUDA out of memory (try a smaller batch_size)", 3, now=True)
    if memory:
        return Stop(f"memory at {memory:.0%} of the device", 3, now=False)
    if signum:
        return Stop(f"stopped by signal {signal.Signals(signum).name}", 128 + signum, now=False)
    return None


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


def model_flops_utilisation(flops_per_token, tokens_per_iter, dt, world_size, peak_tflops):
    """MFU: the model's FLOPs per second over the peak of all the GPUs that share the iteration's
    tokens (tokens_per_iter counts every rank's)."""
    return flops_per_token * tokens_per_iter / dt / (world_size * peak_tflops * 1e12)


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
