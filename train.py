"""
Train an Ava MoE language model. One readable script, nanoGPT style: settings are the globals below,
overridden by a config file and --key=value arguments.

    python data/prepare.py                                   # once: Shakespeare -> data/shakespeare/
    python train.py config/nano.py                           # CPU, a few minutes
    python train.py config/nano.py --max_iters=200 --router=softmax --capacity_factor=1.25
    python train.py config/nano.py --init_from=resume        # continue from out_dir/ckpt.pt
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

from configurator import configure_or_exit
from model import GPT, ModelConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/nano'          # checkpoint, copy of the tokenizer
init_from = 'scratch'         # 'scratch' or 'resume' (from out_dir/ckpt.pt)
eval_interval = 100           # every this many iterations: estimate train/val loss and write a checkpoint
eval_iters = 20               # batches per split for that estimate (always the same batches, so curves compare)
log_interval = 10             # one log line every this many iterations
# data
data_dir = 'data/shakespeare' # a folder written by data/prepare.py: train.bin, val.bin, meta.json, tokenizer.json
batch_size = 32               # sequences per micro-step
block_size = 128              # tokens per sequence
gradient_accumulation_steps = 1
# model: every field of ModelConfig in model.py is a setting too (n_layer, n_experts, router, ...),
# with the defaults written there; vocab_size comes from the data set's meta.json
globals().update({f.name: f.default for f in fields(ModelConfig) if f.name not in ('vocab_size', 'block_size')})
# AdamW
learning_rate = 1e-3          # peak learning rate
weight_decay = 0.1            # decoupled; only on matrices (not norms or embeddings)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # clip the global gradient norm to this; 0 = off
# schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
max_iters = 600
warmup_iters = 30
lr_decay_iters = 0            # 0 = max_iters
min_lr = 1e-4                 # ~learning_rate / 10 (Chinchilla)
# system
device = 'auto'               # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
compile = False               # torch.compile the model (worth it on GPU for long runs)
seed = 1337
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
configure_or_exit(globals())
config = {k: globals()[k] for k in config}  # the resolved settings, stored in every checkpoint


def fail(message):
    """Bad input ends the run with one line that says what to fix, never a traceback."""
    sys.exit(f"error: {message}")


# device and precision: bf16 autocast on CUDA, plain fp32 on CPU
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"device={device!r} but CUDA is not available; use --device=cpu")
autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device_type == 'cuda' else nullcontext()
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# data: train.bin / val.bin are flat token arrays (uint16 or uint32), read through np.memmap
try:
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    split_tokens = {split: np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r').size
                    for split in ('train', 'val')}
except (OSError, KeyError, ValueError) as e:
    fail(f"no prepared data in {data_dir} ({type(e).__name__}: {e}); run `python data/prepare.py` first")
for split, n in split_tokens.items():
    if n <= block_size + 1:
        fail(f"{split}.bin has {n} tokens, too few for block_size={block_size}; lower block_size or add data")


def get_batch(split, generator):
    """batch_size random windows of block_size+1 tokens -> inputs x and next-token targets y, each (B, T)."""
    # a new memmap per batch: a long-lived one slowly grows memory (https://stackoverflow.com/q/45132940)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r')
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if device_type == 'cuda':  # pinned memory lets the copy to the GPU run asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# model: from scratch, or everything (weights, optimizer, iteration, RNG streams) from the last checkpoint
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
checkpoint = None
if init_from == 'resume':
    try:
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        model_config = ModelConfig(**checkpoint['model_config'])
    except FileNotFoundError:
        fail(f"--init_from=resume but there is no checkpoint at {ckpt_path}")
    except Exception as e:  # truncated file, wrong format, keys from another version ...
        reason = str(e).partition('\n')[0]  # torch's messages run over many lines
        fail(f"cannot resume from {ckpt_path} ({type(e).__name__}: {reason}); is it from train.py?")
    print(f"resuming from {ckpt_path} at iteration {checkpoint['iter_num']} (model settings from the checkpoint)")
elif init_from == 'scratch':
    try:
        model_config = ModelConfig(**{f.name: globals()[f.name] for f in fields(ModelConfig) if f.name != 'vocab_size'},
                                   vocab_size=meta['vocab_size'])
    except ValueError as e:
        fail(e)
else:
    fail(f"init_from must be 'scratch' or 'resume', not {init_from!r}")
if model_config.block_size < block_size:
    fail(f"block_size={block_size} is longer than the checkpoint's block_size={model_config.block_size}")
model = GPT(model_config).to(device)
if checkpoint:
    model.load_state_dict(checkpoint['model'])
print(f"parameters: {model.num_params() / 1e6:.2f}M total, {model.num_params(active=True) / 1e6:.2f}M active per token")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} x {batch_size} x {block_size}); "
      f"train split {split_tokens['train']:,} tokens, val {split_tokens['val']:,}")
if 'unigram_entropy_nats' in meta:
    print(f"baseline: unigram entropy of the corpus is {meta['unigram_entropy_nats']:.3f} nats/token")

# AdamW with decoupled weight decay on matrices and expert weights only (norm gains and embeddings are not shrunk)
decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith('wte')]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith('wte')]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
batch_rng = torch.Generator().manual_seed(seed)  # the training data stream: its own RNG, saved with the checkpoint
iter_num, best_val_loss = 0, float('inf')
if checkpoint:
    optimizer.load_state_dict(checkpoint['optimizer'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    batch_rng.set_state(checkpoint['rng']['batch'])
    torch.set_rng_state(checkpoint['rng']['torch'])
    if device_type == 'cuda' and checkpoint['rng']['cuda']:
        torch.cuda.set_rng_state_all(checkpoint['rng']['cuda'])
    checkpoint = None  # free the memory
os.makedirs(out_dir, exist_ok=True)
shutil.copy(os.path.join(data_dir, 'tokenizer.json'), os.path.join(out_dir, 'tokenizer.json'))  # for sample.py
train_model = torch.compile(model) if compile else model


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


def get_lr(it):
    """Linear warmup for warmup_iters, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def save_checkpoint():
    """Write to a temporary file, keep the previous checkpoint as ckpt.prev.pt, then rename: a crash while
    saving never leaves a half-written ckpt.pt."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_config=asdict(model_config),
                 config=config, iter_num=iter_num, best_val_loss=best_val_loss,
                 rng=dict(batch=batch_rng.get_state(), torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if device_type == 'cuda' else []))
    torch.save(state, ckpt_path + '.tmp')
    if os.path.exists(ckpt_path):
        os.replace(ckpt_path, os.path.join(out_dir, 'ckpt.prev.pt'))
    os.replace(ckpt_path + '.tmp', ckpt_path)


# training loop: the last pass (iter_num == max_iters) only evaluates and saves
run_start, start_iter = time.time(), iter_num
t0, t0_iter = time.time(), iter_num  # timing window for tok/s
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        best_val_loss = min(best_val_loss, losses['val'])
        print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if iter_num > start_iter or iter_num == max_iters:
            save_checkpoint()
            print(f"saved {ckpt_path}")
        t0, t0_iter = time.time(), iter_num  # evaluation time is not training time
    if iter_num >= max_iters:
        break

    for micro_step in range(gradient_accumulation_steps):
        x, y = get_batch('train', batch_rng)
        with autocast:
            _, loss = train_model(x, y)
        (loss / gradient_accumulation_steps).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0:
        loss_value = loss.item()  # a CPU-GPU sync point, so only on logging steps
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = (time.time() - t0) / (iter_num - t0_iter)  # seconds per iteration
        t0, t0_iter = time.time(), iter_num
        line = (f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm.item():.2f}, "
                f"dt {dt * 1000:.0f}ms, tok/s {tokens_per_iter / dt:,.0f}")
        if device_type == 'cuda':  # model FLOPs utilisation against H100 SXM bf16 dense peak, 989 TFLOP/s
            line += f", mfu {model.flops_per_token(block_size) * tokens_per_iter / dt / 989e12 * 100:.1f}%"
        stats = model.router_stats()
        if stats:  # worst layer's busiest expert relative to a perfectly even load; 1.00 = balanced
            imbalance = max((s['load'].max() / s['load'].mean()).item() for s in stats)
            line += f", load max/mean {imbalance:.2f}"
        print(line)

print(f"done: {iter_num - start_iter} iterations in {time.time() - run_start:.0f}s, best val loss {best_val_loss:.4f}")
