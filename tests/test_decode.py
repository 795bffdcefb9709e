"""
decode.py against trusted references: full recomputation, a full forward's log-probabilities,
each prompt decoded alone, hand-worked penalized logits, greedy decoding for self-speculative
decoding, and (on a GPU) eager decoding and eager training steps for what the CUDA graphs replay.
    python -m pytest -q tests/test_decode.py
"""

import pytest
import torch

import ava_kernels
from decode import (GraphedSteps, KVCache, forget, generate, generate_speculative, graphable, kept,
                    penalize_repeats)
from model import GPT, ModelConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def tiny_config(**overrides):
    settings = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, n_experts=4,
                    top_k=2)
    settings.update(overrides)
    return ModelConfig(**settings)


def test_kv_cache_generation_equals_full_recomputation():
    """Greedy decoding with the KV cache gives the same tokens as recomputing the whole sequence
    each step."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 97, (3, 5))
    cached = generate(model, prompt, max_new_tokens=20, temperature=0)
    full = prompt
    for _ in range(20):
        logits, _ = model(full)
        full = torch.cat([full, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(cached, full)
    # past block_size the cache slides instead of failing
    assert generate(model, prompt, max_new_tokens=40, temperature=0).shape == (3, 45)


def test_generate_logprobs_equal_a_full_forward():
    """return_logprobs: each sampled token's log-probability under the model's own distribution
    (before the temperature), as a full forward over the finished sequence gives it."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 97, (3, 5))
    for temperature in (1.0, 0.7):
        out, logprobs = generate(model, prompt, max_new_tokens=10, temperature=temperature,
                                 return_logprobs=True)
        # (3, 10)
        full = model(out)[0][:, 4:-1].log_softmax(dim=-1).gather(2, out[:, 5:, None]).squeeze(2)
        assert logprobs.shape == (3, 10) and torch.allclose(logprobs, full, atol=1e-5)


def test_left_padded_batch_decodes_like_each_prompt_alone():
    """Prompts of different lengths, left-padded into one batch: each row's greedy continuation
    (cached and uncached) equals decoding that prompt on its own, so padding is invisible to RoPE
    positions and attention."""
    torch.manual_seed(0)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'  # on CUDA: the kernels, in fp32
    model = GPT(tiny_config()).eval().to(device)
    prompts = [torch.randint(0, 97, (n,), device=device) for n in (7, 3, 5)]
    pad = torch.tensor([7 - len(p) for p in prompts], device=device)
    batch = torch.stack([torch.cat([torch.full((7 - len(p),), 96, device=device), p])
                         for p in prompts])  # (3, 7)
    for use_cache in (True, False):
        out = generate(model, batch, max_new_tokens=12, temperature=0, pad=pad, use_cache=use_cache)
        for row, prompt in zip(out, prompts):
            alone = generate(model, prompt[None], max_new_tokens=12, temperature=0)[0]
            assert torch.equal(row[-12:], alone[-12:])


def test_eos_and_stop_finish_rows():
    """A row that samples eos_id is finished and repeats eos_id; generation ends once every row is
    finished."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    torch.manual_seed(1)
    # sampled: the same draws below until row 0 ends
    free = generate(model, prompt, max_new_tokens=6)
    new = free[0, 4:].tolist()
    # the first token not seen before
    j = next((i for i in range(1, len(new)) if new[i] not in new[:i]), 0)
    torch.manual_seed(1)
    out = generate(model, prompt, max_new_tokens=6, eos_id=new[j])
    assert torch.equal(out[0, :5 + j], free[0, :5 + j]) and (out[0, 5 + j:] == new[j]).all()
    stopped = generate(model, prompt, max_new_tokens=6, temperature=0,
                       stop=lambda idx: idx[:, -1] >= 0)
    assert stopped.shape == (2, 5)  # every row stops after its first token


def test_penalize_reshapes_each_steps_logits():
    """generate(penalize=f) samples from f(logits, tokens so far) at every step, and reports the
    log-probabilities of the unpenalized logits: a penalty that bans each row's greedy choice gives
    the second-best token."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    seen = []

    def ban_best(logits, idx):
        seen.append(idx.size(1))
        return logits.scatter(1, logits.argmax(dim=-1, keepdim=True), float('-inf'))

    out, logprobs = generate(model, prompt, 3, temperature=0, penalize=ban_best,
                             return_logprobs=True)
    assert seen == [4, 5, 6]
    full = model(out)[0][:, 3:-1].log_softmax(dim=-1)                                  # (2, 3, V)
    assert torch.equal(out[:, 4:], full.topk(2, dim=-1).indices[..., 1])
    assert torch.allclose(logprobs, full.gather(2, out[:, 4:, None]).squeeze(2), atol=1e-5)


def test_repetition_penalties_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    # tokens 0 and 1 seen: positive logit / 2, negative logit * 2;
    # the pad token 2 (first position) is skipped
    out = penalize_repeats(logits, torch.tensor([[2, 0, 1]]), repetition_penalty=2.0,
                           pad=torch.tensor([1]))
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    # no 2-gram may repeat: the row ends in 3, and "3 1" already occurred, so 1 is banned
    # (and only 1)
    out = penalize_repeats(logits, torch.tensor([[3, 1, 0, 3]]), no_repeat_ngram_size=2)
    assert torch.isinf(out[0, 1]) and torch.equal(out[0, [0, 2, 3]], logits[0, [0, 2, 3]])


def test_kept_builds_once_per_key_until_the_model_changes():
    """kept() hands back what it built for a model and key, and builds again for another key
    (keeping one build a model) and after what a captured graph would get wrong: a cast (new
    tensors), a mode change, the kernels switched off; and after forget(). Another model keeps its
    own; weights changed in place keep the build."""
    builds = []

    def build():
        builds.append(object())
        return builds[-1]
    model, other = GPT(tiny_config()).eval(), GPT(tiny_config()).eval()
    first = kept(model, 'a', build)
    assert kept(model, 'a', build) is first and len(builds) == 1
    assert (kept(other, 'a', build) is not first and kept(model, 'a', build) is first
            and len(builds) == 2)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # in place: a graph reads the new values where it read the old
    assert kept(model, 'a', build) is first and len(builds) == 2
    assert (kept(model, 'b', build) is not first and kept(model, 'a', build) is not first
            and len(builds) == 4)
    again = kept(model, 'a', build)
    model.train()
    assert kept(model, 'a', build) is not again and len(builds) == 5
    model.eval()
    again = kept(model, 'a', build)
    ava_kernels.enabled = False  # the twins' graph is not the kernels'
    try:
        assert kept(model, 'a', build) is not again and len(builds) == 7
    finally:
        ava_kernels.enabled = True
    again = kept(model, 'a', build)
    forget(model)
    assert kept(model, 'a', build) is not again and len(builds) == 9
    again = kept(model, 'a', build)
    model.double()
    assert kept(model, 'a', build) is not again and len(builds) == 10


def mtp_model(block_size, device='cpu'):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                      n_future_tokens=3)
    return GPT(cfg).eval().to(device)


def test_self_speculative_decoding_equals_greedy():
    """Drafting with the MTP heads and verifying with the main head gives exactly the greedy tokens,
    whether the drafts are mostly right (heads at init copy the next-token state) or mostly wrong
    (heads scrambled)."""
    model = mtp_model(block_size=96)
    prompt = torch.randint(0, 97, (1, 5))
    for scramble in (False, True):
        if scramble:
            for head in model.mtp_heads:
                torch.nn.init.normal_(head.proj.weight, std=1.0)
        for new_tokens in (1, 2, 7, 60):  # fewer than n, a round of one step, several rounds
            out, passes = generate_speculative(model, prompt, new_tokens)
            greedy = generate(model, prompt, new_tokens, temperature=0)
            assert torch.equal(out, greedy) and passes <= new_tokens + 1, (new_tokens, scramble)
    # too long for the cache: plain greedy
    assert generate_speculative(model, prompt, 95)[0].shape == (1, 100)


@cuda
def test_cuda_graph_speculative_decoding_equals_eager():
    """Self-speculative decoding with a CUDA-graphed verify pass (bf16 autocast) equals its eager
    self, with good and scrambled drafts."""
    model = mtp_model(block_size=48, device='cuda')
    prompt = torch.randint(0, 97, (1, 9), device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        for scramble in (False, True):
            if scramble:
                for head in model.mtp_heads:
                    torch.nn.init.normal_(head.proj.weight, std=1.0)
            (graphed, passes), (eager, eager_passes) = (
                generate_speculative(model, prompt, 30, cuda_graph=graph)
                for graph in (True, False))
            assert torch.equal(graphed, eager) and passes == eager_passes
        # the kept graph and state decode a longer prompt next, and leave the earlier output be
        earlier, first = graphed, graphed.clone()
        longer = torch.randint(0, 97, (1, 14), device='cuda')
        (graphed, passes), (eager, eager_passes) = (
            generate_speculative(model, longer, 25, cuda_graph=graph)
            for graph in (True, False))
        assert torch.equal(graphed, eager) and passes == eager_passes and graphed.shape == (1, 39)
        assert torch.equal(earlier, first)


@cuda
def test_cuda_graph_decoding_equals_eager():
    """The CUDA-graphed decode step (bf16 autocast) replays exactly what eager decoding computes:
    the same tokens for a padded batch, sampled (same seed) and greedy, across the cache's slide
    past block_size (test_cuda_graph_speculative_decoding_equals_eager checks
    generate_speculative's graphed verify pass)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=48, n_future_tokens=3)).eval().cuda()
    prompts = [torch.randint(0, 97, (n,), device='cuda') for n in (9, 4, 6)]
    pad = torch.tensor([9 - len(p) for p in prompts], device='cuda')
    batch = torch.stack([torch.cat([torch.full((9 - len(p),), 96, device='cuda'), p])
                         for p in prompts])
    assert not graphable(model, batch)  # fp32 experts: grouped_mm's fallback cannot be captured
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert graphable(model, batch)
        for temperature in (0.0, 1.0):
            outs = []
            for graph in (True, False):
                torch.manual_seed(1)
                outs.append(generate(model, batch, 70, temperature=temperature, pad=pad,
                                     cuda_graph=graph))
            assert outs[0].shape == (3, 79) and torch.equal(outs[0], outs[1])
        # the graph and cache kept from the calls above decode other prompts,
        # and leave earlier outputs be
        first = outs[0].clone()
        other = torch.randint(0, 97, (3, 9), device='cuda')
        graphed, eager = (generate(model, other, 30, temperature=0, pad=pad, cuda_graph=graph)
                          for graph in (True, False))
        assert torch.equal(graphed, eager) and torch.equal(outs[0], first)


@cuda
@pytest.mark.parametrize('router', ['sinkhorn', 'bias'])
def test_cuda_decode_kernels_step_like_their_twins(router):
    """A prompt, six one-token steps and a three-token step over the KV cache (GPT.forward with a
    cache: at most 64 token-expert assignments, so each step takes the fused block), with the
    decode kernels (norm_qkv_rope, moe_decode, cached_attention) and with their twins: the same
    logits to fp32 rounding."""
    assert ava_kernels.build() is True
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, n_head=4, block_size=64, n_experts=4,
                            router=router)).cuda().eval()
    for r in model.routers():
        if router == 'bias':
            r.bias.normal_()  # as if trained: the choice follows logits + bias
    tokens = torch.randint(97, (2, 19), device='cuda')
    results = []
    for enabled in (True, False):
        ava_kernels.enabled = enabled
        cache = KVCache(model.config, 2, 64, 'cuda', torch.float32)
        with torch.no_grad():
            steps = [model(tokens[:, t0:t1], cache=cache)[0]
                     for t0, t1 in [(0, 10)] + [(t, t + 1) for t in range(10, 16)] + [(16, 19)]]
        results.append(torch.cat(steps, dim=1))
    ava_kernels.enabled = True
    assert ((results[0] - results[1]).norm() / results[1].norm()).item() < 1e-5


@cuda
def test_graphed_steps_equal_eager_micro_steps():
    """GraphedSteps (the capture helper, under training): each replay gives the last micro-step's
    loss and the gradients accumulated over the micro-steps that eager steps give on the same
    batches, for batches other than the captured ones too; the warm-up runs leave no gradient
    behind (bf16 autocast, as train.py runs it: the same kernels, up to atomics' order)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, n_head=4)).cuda()

    def loss_of(x, y):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            return model(x, y)[1]

    batches = [torch.randint(0, 97, (2, 3, 17), device='cuda') for _ in range(3)]  # (A, B, T+1)
    graphed = GraphedSteps(loss_of, model.parameters(), batches[0][..., :-1], batches[0][..., 1:])
    for batch in batches[::-1]:
        xs, ys = batch[..., :-1], batch[..., 1:]                                  # (A, B, T)
        model.zero_grad(set_to_none=True)
        got = [graphed(xs, ys).clone()] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        for x, y in zip(xs, ys):
            loss = loss_of(x, y)
            (loss / 2).backward()
        want = [loss.detach()] + [p.grad for p in model.parameters()]
        for g, w in zip(got, want):
            assert ((g - w).norm() / w.norm()).item() < 1e-3
