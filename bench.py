"""
Measurements of an Ava model, each against a peer in the same process: training throughput
(tokens/s, MFU and peak memory, timed with CUDA events) side by side with transformers' Mixtral at
matched dimensions; generation speed with and without the KV cache; the LR range test on real data.

    python bench.py config/small.py                        # Ava with its CUDA kernels, eager
    python bench.py config/small.py --compile=True         # ... under torch.compile
    python bench.py config/small.py --kernels=ref          # ... with the kernels' PyTorch twins
    python bench.py config/small.py --cuda_graph=True      # ... each step replayed as a CUDA graph
    python bench.py config/small.py --compile=True --cuda_graph=True   # ... both: compiled, graphed
    python bench.py config/small.py --compare=dense        # + the dense twin, eager and compiled
    python bench.py config/small.py --compare=hf           # + MixtralForCausalLM, and the ratio
    python bench.py config/small.py --profile=True         # + torch.profiler's GPU time per kernel
    python bench.py config/small.py --decode=True          # generation tokens/s, cache vs no cache
    python bench.py config/small.py --decode=True --profile=True   # + the graphed step's kernels
    python bench.py config/nano.py --decode=True --device=cpu --block_size=1024
    python bench.py config/nano.py --lr_find=True          # LR range test (Smith 2017), CPU or GPU

Training throughput: the model is built from the config file as train.py builds it, fed random
tokens and trained for real (zero.py's AdamW, stage 0; bf16 autocast), gradient_accumulation_steps
micro-steps of batch_size x block_size tokens per step; the step time is the median over
timed_steps after warmup_steps. MFU counts 6 FLOPs per active weight plus attention's 12*L*C*T per
token (GPT.flops_per_token, the same formula for both models) over peak_tflops. The dense twin is
the same config with moe=False: one FFN of width top_k * ffn_hidden, the MoE's active parameters.
The routing time is the routers' forward and backward plus the sort by expert, timed alone, as in
a training step that logs nothing (no statistics). --decode=True times decode.generate instead
(greedy, random weights in bf16 on a GPU, a 16-token prompt) for batch 1 and 32.
--lr_find=True trains on data_dir with an exponentially growing LR and suggests one
(lr_find.png/.json in out_dir).
"""

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import fields, replace

from failsafe import check, fail, stop_on_signals, write_atomic

if __name__ == '__main__':  # before torch loads: a stop while it does is one line too
    stop_on_signals(lambda: '; nothing was written')  # lr_find's files are written whole or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ava_kernels  # noqa: E402
from ava_kernels import moe_sort  # noqa: E402
from common import (PEAK_TFLOPS, Batches, autocast, load_data, pyplot,  # noqa: E402
                    resolve_device)
from configurator import configure_or_exit, settings_of  # noqa: E402
from decode import GraphedSteps, generate  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from zero import ShardedAdamW  # noqa: E402

# -----------------------------------------------------------------------------
# the model: every field of ModelConfig in model.py, as in train.py
globals().update({f.name: f.default for f in fields(ModelConfig)})
vocab_size = 32768          # the data set decides it in train.py; 32768 is a typical BPE size
# the step: train.py's defaults, which config files override
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
# the measurement
compile = False             # torch.compile the model
cuda_graph = False          # replay each step's forwards and backwards as one CUDA graph
kernels = 'cuda'            # 'cuda': the hand-written kernels; 'ref': their PyTorch twins
device = 'auto'
seed = 1337
peak_tflops = PEAK_TFLOPS   # one GPU's dense bf16 peak, MFU's denominator (as in train.py)
warmup_steps = 5            # untimed steps first (torch.compile compiles here)
timed_steps = 20            # the reported time is the median of these
compare = ''                # 'dense': also time the dense twin, eager and compiled; 'hf':
                            # transformers' MixtralForCausalLM, matched dimensions
hf_experts = 'grouped_mm'   # transformers' experts implementation: grouped_mm, batched_mm or eager
profile = False             # print torch.profiler's table of GPU time per kernel (3 extra steps)
decode = False              # time generation instead of training
new_tokens = 512            # tokens generated per row in --decode mode
lr_find = False             # the LR range test instead: ...
lr_find_start = 1e-8        # ... from this LR
lr_find_end = 1e-2          # ... to this one
lr_find_iters = 100         # ... in this many steps, on data_dir's train split
data_dir = 'data/shakespeare'
out_dir = 'out/nano'        # where lr_find.png and lr_find.json go
# -----------------------------------------------------------------------------
# train.py's settings that config files set and no measurement here uses
TRAINING_ONLY = ('init_from', 'reset_optimizer', 'eval_interval', 'eval_iters', 'log_interval',
                 'keep_checkpoints', 'wandb_log', 'wandb_project', 'seq_len_start',
                 'seq_len_warmup',
                 'learning_rate', 'weight_decay', 'beta1', 'beta2', 'max_iters', 'warmup',
                 'num_cycles', 'lr_decay_iters', 'min_lr', 'adaptive_lr', 'lr_check_interval',
                 'plateau_patience', 'plateau_threshold', 'plateau_factor', 'max_lr', 'grad_clip',
                 'grad_clip_start', 'explosion_threshold', 'max_bad_steps', 'dead_expert_window',
                 'zero_stage', 'dist_timeout')


@torch.no_grad()
def decode_bench(cfg, dev, new_tokens):
    """tokens/s of greedy generation, batch 1 and 32: with the KV cache and the CUDA-graphed step
    (GPU only), with the KV cache in eager mode, and recomputing the context every step."""
    model = GPT(cfg).to(dev).eval()
    if dev.startswith('cuda'):
        model.to(torch.bfloat16)  # the weights, not only the matmuls: no casts per token
    modes = {'cache + CUDA graph': dict(cuda_graph=True), 'cache, eager': dict(cuda_graph=False),
             'no cache': dict(use_cache=False)}
    if not dev.startswith('cuda'):
        del modes['cache + CUDA graph']
    for batch in (1, 32):
        prompt = torch.randint(cfg.vocab_size, (batch, 16), device=dev)
        rates = {}
        for mode, options in modes.items():
            with autocast(dev.split(':')[0]):
                generate(model, prompt, 8, temperature=0, **options)  # warm-up
                synchronize(dev)
                start = time.perf_counter()
                generate(model, prompt, new_tokens, temperature=0, **options)
                synchronize(dev)
            rates[mode] = batch * new_tokens / (time.perf_counter() - start)
        print(f"decode batch {batch}, {new_tokens} new tokens: " + ", ".join(
            f"{mode} {rate:,.0f} tok/s ({rate / rates['no cache']:.1f}x)"
            for mode, rate in rates.items()))
    if not (profile and dev.startswith('cuda')):
        return
    for batch in (1, 32):  # 64 graphed tokens each
        prompt = torch.randint(cfg.vocab_size, (batch, 16), device=dev)
        print(f"decode batch {batch}, 64 new tokens (the first 3 eager):")
        with autocast('cuda'):
            gpu_profile(lambda: generate(model, prompt, 64, temperature=0))


def gpu_profile(run, rows=40):
    """Print torch.profiler's table of GPU time per kernel over run()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=rows,
                                    max_name_column_width=90))


def synchronize(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def median_seconds(step, warmup, timed):
    """Median seconds of step(i) over `timed` calls after `warmup` untimed ones (CUDA events)."""
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    times = []
    for i in range(timed):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def with_bf16(loss_of):
    """loss_of under bf16 autocast, as train.py runs it on a GPU."""
    def loss(x, y):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            return loss_of(x, y)
    return loss


def time_steps(loss_of, model, optimizer, batches, accumulation, warmup, timed, graph=False):
    """Median seconds per optimizer step of `accumulation` micro-steps, eager or replayed as a
    CUDA graph (decode.GraphedSteps); and the step."""
    def micro_batches(i):  # (A, B, T) inputs and targets
        xs = torch.stack([batches[(i * accumulation + m) % len(batches)]
                          for m in range(accumulation)])
        return xs[:, :, :-1], xs[:, :, 1:]

    loss_of = with_bf16(loss_of)
    torch.cuda.reset_peak_memory_stats()  # from here: a graph allocates its memory at capture
    graphed = GraphedSteps(loss_of, model.parameters(), *micro_batches(0)) if graph else None

    def step(i):
        if graphed:
            graphed(*micro_batches(i))
        else:
            for x, y in zip(*micro_batches(i)):
                (loss_of(x, y) / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, warmup, timed), step


def routing_seconds(model, tokens, warmup, timed, graph):
    """Seconds per step spent routing, timed alone: one router's forward and backward on `tokens`
    random activations (top-k or Sinkhorn, gates, losses; no statistics) and the sort by expert,
    times the layers. With graph, replayed as a CUDA graph: the GPU's time alone."""
    moe, E = model.blocks[0].ffn, model.config.n_experts
    x = torch.randn(tokens, model.config.n_embd, device='cuda', requires_grad=True)

    def loss_of(*_):  # of x, closed over: its gradient is the router's backward too
        with torch.autocast('cuda', dtype=torch.bfloat16):
            expert_idx, gates, keep, loss = moe.router(x)
            moe_sort(expert_idx, keep, E)
        return gates.sum() + loss

    inputs = x.detach()[None]  # not read (loss_of closes over x), but cloned: no autograd history
    replay = GraphedSteps(loss_of, moe.router.parameters(), inputs, inputs) if graph else None

    def step(i):
        if replay:
            replay(replay.xs, replay.ys)
        else:
            loss_of().backward()

    return model.config.n_layer * median_seconds(step, warmup, timed)


def report(name, seconds, tokens, flops_per_token):
    tok_s = tokens / seconds
    mfu = flops_per_token * tok_s / (peak_tflops * 1e12)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name}: {tok_s:,.0f} tok/s, MFU {mfu:.1%}, peak memory {peak:.1f} GiB "
          f"({seconds * 1000:.1f} ms per step of {tokens:,} tokens)")
    return tok_s


def build_hf(cfg):
    """transformers' Mixtral with Ava's dimensions: same C, L, H, E, K, V, tied embeddings, SDPA
    attention. Its experts are SwiGLU: against our GELU experts (2 matrices to its 3) the width is
    2/3 of ours, rounded to a multiple of 64, for equal parameters; against SwiGLU experts it is
    ours. -> the model, its training FLOPs per token."""
    from transformers import MixtralConfig, MixtralForCausalLM
    swiglu = cfg.expert_act == 'swiglu'
    width = cfg.ffn_hidden if swiglu else round(2 * cfg.ffn_hidden / 3 / 64) * 64
    hf_config = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=width,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.block_size,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=cfg.aux_loss_coef,
        use_cache=False)
    hf_config._attn_implementation = 'sdpa'
    model = MixtralForCausalLM(hf_config).cuda().train()
    model.set_experts_implementation(hf_experts)
    print(f"hf: MixtralForCausalLM, expert width {width} (SwiGLU), experts implementation "
          f"{model.config._experts_implementation!r}, attention "
          f"{model.config._attn_implementation!r}")
    total = sum(p.numel() for p in model.parameters())
    active = total - cfg.n_layer * (cfg.n_experts - cfg.top_k) * 3 * cfg.n_embd * width
    print(f"hf: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active")
    return model, 6 * active + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def time_model(name, cfg, batches, compiled, graph):
    """One model's training step timed and reported -> the model, its tokens/s, its step."""
    model = GPT(cfg).cuda()
    model.watch_routing(False)  # as train.py's steps that log nothing
    forward = torch.compile(model) if compiled else model
    optimizer = ShardedAdamW(model.parameters(), lr=1e-4)
    seconds, step = time_steps(lambda x, y: forward(x, y)[1], model, optimizer, batches,
                               gradient_accumulation_steps, warmup_steps, timed_steps, graph)
    tokens = batch_size * block_size * gradient_accumulation_steps
    return model, report(name, seconds, tokens, model.flops_per_token(block_size)), step


def throughput(cfg):
    """Ava's training step timed, its routing alone, optionally its profile, the dense twin's
    step and Mixtral's."""
    B, T, accumulation = batch_size, block_size, gradient_accumulation_steps
    batches = [torch.randint(cfg.vocab_size, (B, T + 1), device='cuda') for _ in range(4)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {B} x {T} x "
          f"{accumulation} micro-steps")
    model, ava, step = time_model('ava', cfg, batches, compile, cuda_graph)
    print(f"ava: {model.num_params() / 1e6:.1f}M parameters, "
          f"{model.num_params(active=True) / 1e6:.1f}M active, router {cfg.router}, kernels "
          f"{kernels}, compile {compile}, CUDA graph {cuda_graph}")
    seconds = B * T * accumulation / ava
    if cfg.moe:
        routing = routing_seconds(model, B * T, warmup_steps, timed_steps, cuda_graph)
        print(f"routing ({cfg.router} router + sort), timed alone: "
              f"{routing * accumulation * 1000:.1f} ms, {routing * accumulation / seconds:.1%} "
              "of the step")
    if profile:
        gpu_profile(lambda: [step(i) for i in range(3)])
    model = step = None  # frees their memory (and the graph) for the peers
    torch.cuda.empty_cache()
    if compare == 'dense':
        for compiled in (False, True):
            name = 'dense twin, compiled' if compiled else 'dense twin, eager'
            dense = time_model(name, replace(cfg, moe=False), batches, compiled, False)[1]
            print(f"ava / {name}: {ava / dense:.2f}x the tokens per second")
            torch.cuda.empty_cache()
    if compare == 'hf':
        hf_model, hf_flops = build_hf(cfg)
        loss_of = lambda x, y: hf_model(input_ids=x, labels=x).loss  # noqa: E731 (it shifts labels)
        seconds, _ = time_steps(torch.compile(loss_of) if compile else loss_of, hf_model,
                                ShardedAdamW(hf_model.parameters(), lr=1e-4), batches,
                                accumulation, warmup_steps, timed_steps)
        hf = report('hf', seconds, B * T * accumulation, hf_flops)
        print(f"ava / hf: {ava / hf:.2f}x the tokens per second")


def suggest_lr(lrs, losses):
    """The LR range test's suggestion: where the smoothed loss falls fastest against log(lr),
    looking only before the loss minimum (past it, training diverges)."""
    lrs, losses = np.asarray(lrs), np.asarray(losses)
    end = int(np.argmin(losses)) + 1
    if end < 3:
        return float(lrs[0])
    slope = np.gradient(losses[:end], np.log(lrs[:end]))
    return float(lrs[int(np.argmin(slope))])


def write_lr_find(lrs, smoothed, suggestion):
    """lr_find.json and lr_find.png in out_dir, both or neither: the plot is written (atomically)
    while the JSON's temporary file waits for its rename, so a full disk or a signal in either
    write leaves the previous pair, and a new out_dir that stays empty is removed."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot(lrs, smoothed)
    ax.axvline(suggestion, color='r', ls='--', label=f'suggested {suggestion:.1e}')
    ax.set(xscale='log', xlabel='learning rate', ylabel='smoothed loss')
    ax.legend()
    text = json.dumps(dict(lrs=lrs, smoothed_loss=smoothed, suggested_lr=suggestion))
    png = os.path.join(out_dir, 'lr_find.png')

    def write_json_then_png(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
        write_atomic(png, lambda tmp_png: fig.savefig(tmp_png, dpi=80, format='png'))

    new = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create out_dir={out_dir} ({e.strerror}); choose another --out_dir")
    try:
        write_atomic(os.path.join(out_dir, 'lr_find.json'), write_json_then_png)
    except BaseException:
        if new:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def lr_range_test(cfg, dev):
    """Smith 2017: train on data_dir with an LR growing exponentially from lr_find_start to
    lr_find_end, smooth the loss and suggest where it falls fastest (lr_find.png/.json)."""
    meta, splits = load_data(data_dir, ('train',))
    n = len(splits['train'])
    check([(n >= block_size + 2, f"{data_dir}/train.bin has {n:,} tokens, too few for windows of "
            f"block_size={block_size} + 1: use --block_size={n - 2} or less, or more data")])
    print(f"LR range test: {lr_find_iters} steps from {lr_find_start:.1e} to {lr_find_end:.1e} on "
          f"{data_dir}/train.bin ({n:,} tokens)")
    batches = Batches(data_dir, meta['dtype'], batch_size, block_size, dev)
    model = GPT(replace(cfg, vocab_size=meta['vocab_size'])).to(dev)
    optimizer = ShardedAdamW(model.parameters(), betas=(0.9, 0.95))
    rng = torch.Generator().manual_seed(seed)
    lrs, smoothed, avg, best = [], [], 0.0, float('inf')
    for i in range(lr_find_iters):
        lrs.append(lr_find_start * (lr_find_end / lr_find_start) ** (i / (lr_find_iters - 1)))
        optimizer.param_groups[0]['lr'] = lrs[-1]
        with autocast(dev.split(':')[0]):
            _, loss = model(*batches.get('train', rng))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_router_bias()
        avg = 0.9 * avg + 0.1 * loss.item()
        smoothed.append(avg / (1 - 0.9 ** (i + 1)))  # bias-corrected EMA
        best = min(best, smoothed[-1])
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > 4 * best:
            break  # diverged: the rest of the sweep says nothing
    suggestion = suggest_lr(lrs, smoothed)
    write_lr_find(lrs, smoothed, suggestion)
    print(f"LR range test: {len(lrs)} steps from {lrs[0]:.1e} to {lrs[-1]:.1e}; steepest descent "
          f"at lr={suggestion:.2e} (try --learning_rate={suggestion:.1e}); wrote lr_find.png/.json "
          f"in {out_dir}")


if __name__ == '__main__':
    configure_or_exit(globals(), ignored=TRAINING_ONLY)
    check([(kernels in ('cuda', 'ref'), "--kernels must be 'cuda' or 'ref'"),
           (compare in ('', 'dense', 'hf'), "--compare must be '', 'dense' or 'hf'"),
           (0 < lr_find_start < lr_find_end < math.inf and lr_find_iters >= 10,
            "need 0 < lr_find_start < lr_find_end (finite) and lr_find_iters >= 10"),
           (min(batch_size, block_size, gradient_accumulation_steps) >= 1,
            "batch_size, block_size and gradient_accumulation_steps must be >= 1"),
           (-2**63 <= seed < 2**64, f"seed must fit in 64 bits, got {seed}"),
           (min(warmup_steps, timed_steps, new_tokens) >= 1 and peak_tflops > 0,
            "warmup_steps, timed_steps, new_tokens and peak_tflops must be > 0")])
    settings = settings_of(globals())
    try:
        cfg = ModelConfig(**{f.name: settings[f.name] for f in fields(ModelConfig)})
    except ValueError as e:
        fail(e)
    dev, device_type = resolve_device(device)
    ava_kernels.enabled = kernels == 'cuda'
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    if lr_find:
        lr_range_test(cfg, dev)
    elif decode:
        if cfg.block_size < 16 + new_tokens:
            fail(f"block_size={cfg.block_size} is shorter than 16 + new_tokens={new_tokens}")
        print(f"{torch.cuda.get_device_name() if device_type == 'cuda' else 'CPU'}, "
              f"torch {torch.__version__}")
        decode_bench(cfg, dev, new_tokens)
    elif device_type != 'cuda':
        fail("the training benchmark measures a GPU and found none (CUDA unavailable)")
    elif ava_kernels.enabled and ava_kernels.build() is not True:
        fail("the CUDA kernels did not build (see above); use --kernels=ref to time the twins")
    else:
        throughput(cfg)
