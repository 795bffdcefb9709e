"""
Train an Ava MoE language model. One script, read top to bottom as nanoGPT's: settings (the
globals below, overridden by a config file and --key=value arguments), setup, data, model,
optimizer, one loop.

The loop's branches (an evaluation, a non-finite step, the log line, a checkpoint, the emergency
exit) are the functions above it; the monitors they call are in monitors.py, the checkpoints and
the run folder in checkpoint.py.

    python data/prepare.py                                 # once: Shakespeare -> data/shakespeare/
    python train.py config/nano.py                         # CPU, a few minutes
    python train.py config/nano.py --max_iters=200 --router=softmax --capacity_factor=1.25
    python train.py config/nano.py --init_from=resume      # continue exactly from out_dir/ckpt.pt
    python train.py config/small.py --cuda_graph=True      # GPU: each iteration as one CUDA graph
    torchrun --standalone --nproc_per_node=2 train.py config/nano.py --gradient_accumulation_steps=2
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import ava_kernels
from checkpoint import (RunFolder, check_resumable, checkpoint_size, gather_rng, plot_run, restore,
                        resumed_model_config, save_checkpoint, start_wandb)
from common import (PEAK_TFLOPS, Batches, autocast, load_checkpoint, load_data, load_torch,
                    resolve_device)
from configurator import configure_or_exit, settings_of
from decode import GraphedSteps
from failsafe import check, fail, first_line
from model import GPT, ModelConfig
from monitors import (DeadExpertTracker, GradNormMonitor, PlateauLR, StopSignals, agreed_stop,
                      cpu_time_warning, log_line, memory_action, memory_record,
                      model_flops_utilisation, routing_record)
from tokenizer import load_run_tokenizer
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
# -----------------------------------------------------------------------------
# A reload halves the LR scale at least twice (a bad step, the reload): by the third the LR is at
# most 1/64 of the schedule's, and a run that still diverges needs a lower learning_rate.
MAX_RELOADS = 3


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


# ---- evaluation and the routers' balance ----

def step_loss(model, precision, x, y):
    """One micro-step's training loss (the model's, with its router and MTP terms)."""
    with precision:
        return model(x, y)[1]


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, seed, precision):
    """Mean cross-entropy over eval_iters batches per split: the same batches every time. What the
    last training forward recorded stays (the routers' statistics, the MTP losses): the next log
    line reads it, and a replayed CUDA graph writes only the tensors its capture recorded.
    -> {split: loss}, or None when CUDA ran out of memory (the run stops: see agreed_stop)."""
    model.eval()
    model.watch_routing(False)  # the loop sets it again before each step
    mtp_losses, out = model.mtp_losses, {}
    try:
        for split in ('train', 'val'):
            rng = torch.Generator().manual_seed(seed + 1)
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = batches.get(split, rng)
                with precision:
                    _, loss = model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
    except torch.OutOfMemoryError:
        out = None
    model.mtp_losses = mtp_losses
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


# ---- the loop's branches ----

@dataclass
class Run:
    """What the loop's branches share. The first six fields are the training state, which a
    checkpoint saves and a reload puts back; then where the run writes, and what its log counts."""
    model: GPT
    optimizer: ShardedAdamW
    monitors: dict                  # {'plateau': PlateauLR, 'grad': GradNormMonitor}
    batch_rng: torch.Generator      # this rank's data stream
    iter_num: int
    best_val_loss: float
    dev: str
    rank: int
    out_dir: str
    settings: dict                  # as config.yaml and every checkpoint hold them
    folder: RunFolder               # rank 0's: the run's files and metrics records (else unused)
    wandb: object                   # the wandb module when wandb_log (rank 0), else None
    dead_experts: DeadExpertTracker
    bad_steps: int = 0              # non-finite steps in a row
    skipped: int = 0                # non-finite steps in all
    reloads: int = 0                # of the last checkpoint, after max_bad_steps bad steps
    memory: float = 0.0             # the device's memory share when the log saw the last level
    graphed: GraphedSteps = None    # with cuda_graph: the captured micro-steps
    clock: tuple = (0.0, 0)         # (time, iter_num) where the tok/s window starts

    def log(self, record):
        """One metrics record (rank 0 writes them: metrics.jsonl, wandb)."""
        if self.rank == 0:
            self.folder.log(record)
            if self.wandb:
                self.wandb.log(record, step=record['iter'])


def checkpoint(reason, run, keep):
    """Save the run, every rank taking part: reason is 'eval', 'best' (a new best val loss, also
    best.pt) or 'emergency'; the newest `keep` stay. Rank 0 then writes the run's files (the
    first time: see RunFolder) and redraws the plots. -> the path."""
    path = save_checkpoint(run.out_dir, reason, run.model, run.optimizer, keep,
                           iter_num=run.iter_num, best_val_loss=run.best_val_loss,
                           config=run.settings, model_config=asdict(run.model.config),
                           rng=gather_rng(run.batch_rng, run.dev),
                           monitors={k: m.state_dict() for k, m in run.monitors.items()})
    if run.rank == 0:
        run.folder.commit()
        plot_run(run.folder.records, os.path.join(run.out_dir, 'plots'))
    return path


def evaluated(run, losses, keep, save):
    """An evaluation's losses, printed and logged; with save, a checkpoint ('best' when the val
    loss is the best yet)."""
    improved = losses['val'] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses['val'])
    print(f"iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    run.log(dict(iter=run.iter_num, train_loss=losses['train'], val_loss=losses['val']))
    if save:
        print(f"saved {checkpoint('best' if improved else 'eval', run, keep)}")
    run.clock = (time.time(), run.iter_num)  # evaluation time is not training time


def forward_backward(run, loss_of, batches, micro_steps, seq_len, rows, graph):
    """This rank's micro-steps of one iteration, forwards and backwards: the gradients accumulate
    in .grad. With graph, the eager loop's batches, the micro-steps replayed as one CUDA graph
    (captured at the first call). -> the last micro-step's loss, or None when CUDA ran out of
    memory (the run stops: see agreed_stop)."""
    try:
        if not graph:
            for _ in range(micro_steps):
                x, y = batches.get('train', run.batch_rng, seq_len, rows)
                loss = loss_of(x, y)
                (loss / micro_steps).backward()
            return loss
        xs, ys = (torch.stack(t) for t in zip(*(batches.get('train', run.batch_rng)
                                                  for _ in range(micro_steps))))
        if run.graphed is None:
            run.graphed = GraphedSteps(loss_of, run.model.parameters(), xs, ys)
            for counts in run.model.expert_counts():
                counts.zero_()  # what the warm-up runs counted
        return run.graphed(xs, ys)
    except torch.OutOfMemoryError:
        return None


def skip_or_reload(run, max_bad_steps, seed):
    """A step whose loss or gradient is not finite is skipped (the weights and Adam's moments stay
    as they are) and the LR scale halves. max_bad_steps of them in a row reload the last checkpoint,
    at half the scale again; after MAX_RELOADS reloads the run ends."""
    run.optimizer.zero_grad(set_to_none=True)
    for counts in run.model.expert_counts():
        counts.zero_()
    plateau, ckpt_path = run.monitors['plateau'], os.path.join(run.out_dir, 'ckpt.pt')
    run.bad_steps, run.skipped = run.bad_steps + 1, run.skipped + 1
    plateau.scale /= 2
    print(f"iter {run.iter_num}: non-finite loss/gradient, step skipped ({run.skipped} so far), "
          f"LR scale -> {plateau.scale:.3f}")
    if run.bad_steps < max_bad_steps or not os.path.exists(ckpt_path):
        run.iter_num += 1
        return
    run.reloads, scale = run.reloads + 1, plateau.scale
    if run.reloads > MAX_RELOADS:
        fail(f"training diverged again after {MAX_RELOADS} reloads of {ckpt_path}; lower "
             "learning_rate")
    run.iter_num, run.best_val_loss = restore(load_torch(ckpt_path), run.model, run.optimizer,
                                              run.monitors, run.batch_rng, seed, run.dev,
                                              run.out_dir)
    plateau.scale, run.bad_steps = scale / 2, 0
    print(f"{max_bad_steps} bad steps in a row: reloaded {ckpt_path} (iteration {run.iter_num}), "
          f"LR scale -> {plateau.scale:.3f}")


def log_step(run, step, seq_len, tokens_per_iter, peak_tflops, progressive):
    """The log line and metrics record of the step just taken: step (its loss, lr, grad_norm and
    clip), its speed, memory, MTP losses and routing; then what the memory level calls for.
    -> the device's memory share when it reached the last level (the run is to stop), else 0."""
    cuda = run.dev.startswith('cuda')
    if cuda:
        torch.cuda.synchronize()
    dt = (time.time() - run.clock[0]) / (run.iter_num - run.clock[1])  # seconds per iteration
    run.clock = (time.time(), run.iter_num)
    record = dict(iter=run.iter_num, **step, dt=dt, tok_s=tokens_per_iter / dt, seq_len=seq_len,
                  skipped=run.skipped, progressive=progressive,
                  explosions=run.monitors['grad'].explosions, **memory_record(run.dev))
    if cuda:
        record['mfu'] = model_flops_utilisation(run.model.flops_per_token(seq_len),
                                                tokens_per_iter, dt, run.optimizer.world_size,
                                                peak_tflops)
    if run.model.mtp_losses:
        record['mtp_losses'] = [loss.item() for loss in run.model.mtp_losses]
    stats = run.model.router_stats()
    if stats:
        record.update(routing_record(stats))
        for warning in run.dead_experts.update(run.iter_num, np.array(record['load'])):
            print(warning)
    print(log_line(record))
    run.log(record)
    message, empty_cache, stop = memory_action(record.get('mem_reserved', 0.0))
    if message:
        print(f"iter {run.iter_num}: {message}")
    if empty_cache:
        torch.cuda.empty_cache()
    return record['mem_reserved'] if stop else 0.0


def emergency_exit(run, stop, keep):
    """After a Stop: the emergency checkpoint, one line on stderr that names it, and the exit."""
    run.optimizer.zero_grad(set_to_none=True)  # an OOM's partial gradients; weights are untouched
    path = checkpoint('emergency', run, keep)
    print(f"{stop.why} at iteration {run.iter_num}: saved an emergency checkpoint {path} (also "
          f"{os.path.join(run.out_dir, 'ckpt.pt')}); continue with --init_from=resume",
          file=sys.stderr)
    sys.exit(stop.code)


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    overrides = configure_or_exit(globals())
    settings = settings_of(globals())
    check(validity_checks(settings))
    signals = StopSignals(out_dir)  # from here on SIGTERM and SIGINT stop the run (see there)
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
    check([(len(split_tokens) > block_size + 1, f"{split}.bin has {len(split_tokens)} tokens, too "
            f"few for block_size={block_size}; lower block_size or add data")
           for split, split_tokens in tokens.items()])
    load_run_tokenizer(data_dir, meta['vocab_size'],  # sample.py will need it
                       fix="prepare the data again with python data/prepare.py")
    batches = Batches(data_dir, meta['dtype'], batch_size, block_size, dev)

    # model: from scratch, or all of it (weights, optimizer, RNG, monitors) from a checkpoint
    ckpt_path, ckpt = os.path.join(out_dir, 'ckpt.pt'), None
    if init_from == 'scratch' and os.path.exists(ckpt_path):
        fail(f"{out_dir} already holds a run: continue it with --init_from=resume, or pick another "
             "--out_dir")
    if init_from == 'resume':
        ckpt, saved_config, model = load_checkpoint(ckpt_path)
        print(f"resuming from {ckpt_path} at iteration {ckpt['iter_num']} (model settings from the "
              "checkpoint)")
        check_resumable(ckpt, saved_config, meta, data_dir, out_dir, block_size, max_iters)
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
    check([(device_type == 'cuda' or not compile or not model_config.moe,
            "compile=True on the CPU compiles dense models only: torch.compile traces the "
            "experts' grouped_mm in bf16 alone, and the CPU trains in fp32; drop --compile, or "
            "train on a GPU")])
    model.to(dev)
    room = checkpoint_size(model, out_dir, resumed=ckpt['iter_num'] if ckpt else None)  # bytes
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
    if ckpt:
        iter_num, best_val_loss = restore(ckpt, model, optimizer, monitors, batch_rng, seed, dev,
                                          out_dir, optimizer_too=not reset_optimizer)
        ckpt = None  # free the memory

    # the run folder (rank 0's): one training at a time (the lock), room for a checkpoint, and an
    # absolute data_dir in config.yaml and the checkpoints, so they are found from anywhere. Its
    # files wait for the first checkpoint: a run that ends before leaves out_dir as it found it
    settings['data_dir'] = os.path.abspath(data_dir)
    folder = RunFolder(out_dir, data_dir)
    run = Run(model, optimizer, monitors, batch_rng, iter_num, best_val_loss, dev, rank, out_dir,
              settings, folder, None, dead_experts, clock=(time.time(), iter_num))
    loss_of = partial(step_loss, torch.compile(model) if compile else model, precision)
    start_iter, run_start = iter_num, time.time()
    try:
        if rank == 0:
            folder.open(room)  # its lock is held until this process ends
            name = torch.cuda.get_device_name(dev) if device_type == 'cuda' else 'cpu'
            folder.start(settings, model_config, dict(
                device=dev, device_name=name, world_size=world_size, zero_stage=zero_stage,
                init_from=init_from), iter_num)
            run.wandb = start_wandb(wandb_project, settings) if wandb_log else None

        # the training loop: the last pass (iter_num == max_iters) only evaluates and saves
        while True:
            lr = scheduled_lr(run.iter_num, learning_rate, min_lr, warmup_iters,
                              lr_decay_iters or max_iters, num_cycles) * plateau.scale
            if adaptive_lr:  # the plateau rule's LR stays within [min_lr, max_lr]
                lr = min(ceiling, max(min_lr, lr))
            for group in optimizer.param_groups:
                group['lr'] = lr

            if run.iter_num % eval_interval == 0 or run.iter_num == max_iters:
                losses = estimate_loss(model, batches, eval_iters, seed, precision)
                stop = agreed_stop(signals.received, run.memory, losses is None, ddp, dev)
                if stop:
                    break
                evaluated(run, losses, keep_checkpoints,
                          save=run.iter_num > start_iter or run.iter_num == max_iters)
            if run.iter_num >= max_iters:  # (stop is None: the evaluation above ran)
                break

            # one optimizer step; sequences grow from seq_len_start, tokens per micro-step constant
            seq_len = seq_len_at(run.iter_num, seq_len_start, block_size, ramp_iters)
            # router statistics on log steps only (a graph records them once, so always)
            model.watch_routing(cuda_graph or (run.iter_num + 1) % log_interval == 0)
            loss = forward_backward(run, loss_of, batches, accumulation, seq_len,
                                    batch_size * block_size // seq_len, cuda_graph)
            # out of memory stops the run now; a signal or the memory level once this step is
            # taken, so that the emergency checkpoint resumes exactly
            stop = agreed_stop(signals.received, run.memory, loss is None, ddp, dev)
            if stop and stop.now:
                break
            grad_norm = optimizer.reduce_gradients()  # the mean gradient over ranks; its norm syncs
            if not math.isfinite(grad_norm):
                skip_or_reload(run, max_bad_steps, seed)
                continue
            run.bad_steps = 0
            clip = grad_clip and clip_at(run.iter_num, warmup_iters, grad_clip_start, grad_clip)
            clip, exploded = grad_monitor.check(grad_norm, clip or math.inf)
            if exploded:
                print(f"iter {run.iter_num}: gradient norm {grad_norm:.2f} is "
                      f"{grad_norm / grad_monitor.mean:.1f}x its running mean: explosion, clipped "
                      f"to {clip:.2f}")
            optimizer.max_grad_norm = clip if math.isfinite(clip) else 0.0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            balance_routers(model, ddp)
            run.iter_num += 1
            signals.stepped = True
            loss_value = loss.item()
            plateau.observe(loss_value, grad_norm)
            if adaptive_lr and run.iter_num % lr_check_interval == 0:
                message = plateau.check(run.iter_num)
                if message:
                    print(f"iter {run.iter_num}: {message}")
            if run.iter_num % log_interval == 0:
                run.memory = log_step(run, dict(loss=loss_value, lr=lr, grad_norm=grad_norm,
                                                clip=clip), seq_len, tokens_per_iter, peak_tflops,
                                      progressive=seq_len_start > 0)
            if stop:
                break
        if stop:
            emergency_exit(run, stop, keep_checkpoints)
    except RuntimeError as e:  # under torchrun: a collective whose peer process is gone
        if not ddp or isinstance(e, torch.OutOfMemoryError):
            raise
        kept = (f"resume from {ckpt_path} with --init_from=resume" if os.path.exists(ckpt_path)
                else "no checkpoint was saved")
        fail(f"another process of this torchrun run failed at iteration {run.iter_num} "
             f"({first_line(e).rpartition('] ')[2].partition('. ')[0]}); {kept}")
    finally:  # before the first checkpoint: out_dir as this run found it
        folder.close()

    print(f"done: {run.iter_num - start_iter} iterations in {time.time() - run_start:.0f}s, best "
          f"val loss {run.best_val_loss:.4f}, {run.skipped} skipped steps, "
          f"{grad_monitor.explosions} gradient explosions")
    if run.wandb:
        run.wandb.finish()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
        # Everything is written: leave now. On the CPU, gloo's threads can abort the process while
        # Python tears down ("terminate called without an active exception"): a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
