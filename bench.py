"""
Training throughput of an Ava model on one GPU: tokens/s, MFU and peak memory, timed with CUDA events, and
side by side with transformers' Mixtral at matched dimensions in the same process.

    python bench.py config/small.py                         # Ava with its CUDA kernels, eager
    python bench.py config/small.py --compile=True          # ... under torch.compile
    python bench.py config/small.py --kernels=ref           # ... with the kernels' PyTorch twins instead
    python bench.py config/small.py --compare=hf            # + MixtralForCausalLM, and the ratio of the two
    python bench.py config/small.py --profile=True          # + torch.profiler's table of the GPU time per kernel
    python bench.py config/small.py --decode=True           # generation tokens/s, with and without the KV cache
    python bench.py config/nano.py --decode=True --device=cpu --block_size=1024

The model is built from the config file as train.py would build it, fed random tokens and trained for real:
fused AdamW, bf16 autocast, gradient_accumulation_steps micro-steps of batch_size x block_size tokens per step.
The step time is the median over timed_steps after warmup_steps. MFU counts 6 FLOPs per active weight plus
attention's 12*L*C*T per token (GPT.flops_per_token, the same formula for both models) over peak_tflops.
With --decode=True it times model.generate instead (greedy, random weights, a 16-token prompt): new_tokens
tokens for batch 1 and 32, with the KV cache (its step as a CUDA graph on a GPU, and eager), and recomputing
the context every step; each against the last. The timed call includes the graph capture.
"""

import statistics
import sys
import time
from dataclasses import fields

import torch

import kernels
import train
from configurator import configure_or_exit
from model import GPT, ModelConfig

settings = {k: v for k, v in vars(train).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
settings.update(
    vocab_size=32768,       # the data set decides it in train.py; 32768 is a typical BPE size
    warmup_steps=5,         # untimed steps first (torch.compile compiles here)
    timed_steps=20,         # the reported time is the median of these
    kernels='cuda',         # 'cuda': the hand-written kernels; 'ref': their PyTorch twins
    compare='',             # 'hf': also time transformers' MixtralForCausalLM with matched dimensions
    hf_experts='grouped_mm',  # transformers' experts implementation: 'grouped_mm', 'batched_mm' or 'eager'
    profile=False,          # print torch.profiler's table of GPU time per kernel (3 extra steps)
    peak_tflops=989.0,      # dense bf16 peak of the GPU (H100 SXM); MFU's denominator
    decode=False,           # time generation instead of training
    new_tokens=512,         # tokens generated per row in --decode mode
)


@torch.no_grad()
def decode_bench(cfg, dev, new_tokens):
    """tokens/s of greedy generation, batch 1 and 32: with the KV cache and the CUDA-graphed step (GPU only), with
    the KV cache in eager mode, and recomputing the context every step (bf16 autocast on CUDA)."""
    model = GPT(cfg).to(dev).eval()
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=dev.startswith('cuda'))
    modes = {'cache + CUDA graph': dict(cuda_graph=True), 'cache, eager': dict(cuda_graph=False),
             'no cache': dict(use_cache=False)}
    if not dev.startswith('cuda'):
        del modes['cache + CUDA graph']
    for batch in (1, 32):
        prompt = torch.randint(cfg.vocab_size, (batch, 16), device=dev)
        rates = {}
        for mode, options in modes.items():
            with autocast:
                model.generate(prompt, 8, temperature=0, **options)  # warm-up
                if dev.startswith('cuda'):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(prompt, new_tokens, temperature=0, **options)
                if dev.startswith('cuda'):
                    torch.cuda.synchronize()
            rates[mode] = batch * new_tokens / (time.perf_counter() - start)
        print(f"decode batch {batch}, {new_tokens} new tokens: " + ", ".join(
            f"{mode} {rate:,.0f} tok/s ({rate / rates['no cache']:.1f}x)" for mode, rate in rates.items()))


def median_seconds(step, warmup, timed):
    """Median seconds of step(i) over `timed` calls after `warmup` untimed ones, from CUDA events."""
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(timed):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def time_steps(loss_of, optimizer, batches, accumulation, warmup, timed):
    """Median seconds per optimizer step of `accumulation` micro-steps; and the step."""
    def step(i):
        for micro in range(accumulation):
            x = batches[(i * accumulation + micro) % len(batches)]
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = loss_of(x[:, :-1], x[:, 1:])
            (loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, warmup, timed), step


def router_seconds(model, tokens, warmup, timed):
    """Seconds per step spent in the routers, timed alone: one router's forward and backward on `tokens` random
    activations (its top-k or Sinkhorn, gates, stats and losses), times the number of MoE layers."""
    router = model.blocks[0].ffn.router
    x = torch.randn(tokens, model.config.n_embd, device='cuda', requires_grad=True)

    def step(i):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, gates, _, loss = router(x)
        (gates.sum() + loss).backward()

    return model.config.n_layer * median_seconds(step, warmup, timed)


def report(name, seconds, tokens, flops_per_token, peak_tflops):
    tok_s = tokens / seconds
    mfu = flops_per_token * tok_s / (peak_tflops * 1e12)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name}: {tok_s:,.0f} tok/s, MFU {mfu:.1%}, peak memory {peak:.1f} GiB "
          f"({seconds * 1000:.1f} ms per step of {tokens:,} tokens)")
    return tok_s


def build_hf(cfg, compile_model):
    """transformers' Mixtral with Ava's dimensions: same C, L, H, E, K, V, tied embeddings, SDPA attention. Its
    SwiGLU experts have 3 matrices to our 2, so the width is 2/3 of ours (rounded to a multiple of 64): equal
    parameters. Returns the model and its training FLOPs per token by the same formula as Ava's."""
    from transformers import MixtralConfig, MixtralForCausalLM
    width = round(2 * cfg.ffn_hidden / 3 / 64) * 64
    hf_config = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=width, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.block_size, tie_word_embeddings=True,
        output_router_logits=True, router_aux_loss_coef=cfg.aux_loss_coef, use_cache=False)
    hf_config._attn_implementation = 'sdpa'
    model = MixtralForCausalLM(hf_config).cuda().train()
    model.set_experts_implementation(settings['hf_experts'])
    print(f"hf: MixtralForCausalLM, expert width {width} (SwiGLU), experts implementation "
          f"{model.config._experts_implementation!r}, attention {model.config._attn_implementation!r}")
    total = sum(p.numel() for p in model.parameters())
    active = total - cfg.n_layer * (cfg.n_experts - cfg.top_k) * 3 * cfg.n_embd * width
    print(f"hf: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active")
    loss_of = lambda x, y: model(input_ids=x, labels=x).loss  # noqa: E731 (transformers shifts the labels itself)
    flops_per_token = 6 * active + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return (torch.compile(loss_of) if compile_model else loss_of), model, flops_per_token


def main():
    configure_or_exit(settings)
    s = settings
    if s['decode']:
        cfg = ModelConfig(**{f.name: s[f.name] for f in fields(ModelConfig)})
        if cfg.block_size < 16 + s['new_tokens']:
            sys.exit(f"error: block_size={cfg.block_size} is shorter than 16 + new_tokens={s['new_tokens']}")
        dev = ('cuda' if torch.cuda.is_available() else 'cpu') if s['device'] == 'auto' else s['device']
        kernels.enabled = s['kernels'] == 'cuda'
        torch.manual_seed(s['seed'])
        print(f"{torch.cuda.get_device_name() if dev.startswith('cuda') else 'CPU'}, torch {torch.__version__}")
        return decode_bench(cfg, dev, s['new_tokens'])
    if not torch.cuda.is_available():
        sys.exit("error: bench.py measures a GPU and found none (CUDA unavailable)")
    if s['kernels'] not in ('cuda', 'ref') or s['compare'] not in ('', 'hf'):
        sys.exit("error: --kernels must be 'cuda' or 'ref', --compare must be '' or 'hf'")
    kernels.enabled = s['kernels'] == 'cuda'
    if kernels.enabled and kernels.build() is not True:
        sys.exit("error: the CUDA kernels did not build (see above); use --kernels=ref to time the PyTorch twins")
    torch.manual_seed(s['seed'])
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(**{f.name: s[f.name] for f in fields(ModelConfig)})
    B, T, accumulation = s['batch_size'], s['block_size'], s['gradient_accumulation_steps']
    tokens = B * T * accumulation
    batches = [torch.randint(cfg.vocab_size, (B, T + 1), device='cuda') for _ in range(4)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {B} x {T} x {accumulation} micro-steps")

    model = GPT(cfg).cuda()
    print(f"ava: {model.num_params() / 1e6:.1f}M parameters, {model.num_params(active=True) / 1e6:.1f}M active, "
          f"router {cfg.router}, kernels {s['kernels']}, compile {s['compile']}")
    forward = torch.compile(model) if s['compile'] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_of = lambda x, y: forward(x, y)[1]  # noqa: E731
    seconds, step = time_steps(loss_of, optimizer, batches, accumulation, s['warmup_steps'], s['timed_steps'])
    ava = report('ava', seconds, tokens, model.flops_per_token(T), s['peak_tflops'])
    if cfg.moe:
        routing = router_seconds(model, B * T, s['warmup_steps'], s['timed_steps']) * accumulation
        print(f"routers ({cfg.router}), timed alone: {routing * 1000:.1f} ms, {routing / seconds:.1%} of the step")
    if s['profile']:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=40, max_name_column_width=90))
    del model, optimizer, forward, step

    if s['compare'] == 'hf':
        torch.cuda.empty_cache()
        loss_of, hf_model, hf_flops = build_hf(cfg, s['compile'])
        optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, fused=True)
        seconds, _ = time_steps(loss_of, optimizer, batches, accumulation, s['warmup_steps'], s['timed_steps'])
        hf = report('hf', seconds, tokens, hf_flops, s['peak_tflops'])
        print(f"ava / hf: {ava / hf:.2f}x the tokens per second")


if __name__ == '__main__':
    main()
