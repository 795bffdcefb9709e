"""
Decoding an Ava model: generate() and its sampler (with repetition penalties), the KV cache and
the fused path a decode step takes through a block, self-speculative decoding with the
multi-token heads (generate_speculative), and CUDA graphs: one capture helper, which serves decode
steps (CUDAGraphed) and train.py's captured training steps (GraphedSteps), and the registry that
keeps a model's decode graph between calls (kept, forget).

    from decode import generate
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)

Why a module of its own: model.py reads as the model alone (GPT.forward takes an optional KVCache
and hands each block to it; the cache picks the path), and the three scripts that decode (sample.py,
rlhf.py, bench.py) share this one, as nanochat keeps engine.py beside gpt.py and gpt-fast
generate.py beside model.py. GraphedSteps lives here because it is built on the same capture.

Shape legend as in model.py: B batch, T time, C channels, H heads, D head dim (C // H), V vocab,
S cached positions.
"""

import weakref
from functools import partial
from itertools import chain

import torch

import ava_kernels
from ava_kernels import cached_attention, moe_decode, norm_qkv_rope
from ava_kernels.moe_decode import MAX_ASSIGNMENTS
from model import MoE, rope_tables


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row of logits (B, V): greedy if temperature == 0, else from softmax(logits /
    temperature) over the top_k most likely tokens and the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        remove = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # once the mass before >= p
        logits = logits.scatter(1, sorted_idx, sorted_logits.masked_fill(remove, float('-inf')))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


def penalize_repeats(logits, idx, repetition_penalty=1.0, no_repeat_ngram_size=0, pad=None):
    """Discourage repeats in next-token logits (B, V) given the tokens so far idx (B, T), skipping
    each row's left padding. repetition_penalty p > 1 (Keskar et al. 2019): a token already in the
    row has its logit divided by p if positive, multiplied by p if negative. no_repeat_ngram_size
    n > 0: a token that would complete an n-gram the row already contains (its last n-1 tokens
    followed by it) gets -inf."""
    if repetition_penalty == 1.0 and no_repeat_ngram_size <= 0:
        return logits
    logits, n = logits.clone(), no_repeat_ngram_size
    for b, row in enumerate(idx.tolist()):
        row = row[int(pad[b]):] if pad is not None else row
        if repetition_penalty != 1.0 and row:
            seen = torch.tensor(sorted(set(row)), device=logits.device)
            scores = logits[b, seen]
            logits[b, seen] = torch.where(scores > 0, scores / repetition_penalty,
                                          scores * repetition_penalty)
        if n > 0 and len(row) >= n:
            prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
            banned = [row[i + n - 1] for i in range(len(row) - n + 1)
                      if tuple(row[i:i + n - 1]) == prefix]
            logits[b, banned] = float('-inf')
    return logits


# ---- the KV cache and the fused per-token block ----

class KVCache:
    """Keys and values of every layer, preallocated to max_len, for positions [0, pos), where pos is
    a device tensor: writes and masks read it on the GPU, so a decode step has the same shapes and
    launches at every position, and one CUDA graph can replay it (CUDAGraphed)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)  # (B, H, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # positions already stored
        self.max_len = max_len
        # RoPE's cos and sin at every position the cache can hold: a step looks its rows up in
        # two launches where rope_tables() takes eight
        self.cos, self.sin = rope_tables(shape[-1], torch.arange(max_len, device=device))

    def positions(self, T):
        return self.pos + torch.arange(T, device=self.pos.device)  # (T,) of the next T tokens

    def run(self, layer, block, x, cos, sin, mask):
        """GPT.trunk's call of block number `layer` on x (B, T, C) against this cache -> (x, router
        loss): the fused path for a decode step (decode_block), else the block's own forward."""
        if decodes(block, x):
            return decode_block(block, x, cos, sin, mask, self, layer), 0.0
        return block(x, cos, sin, mask, self, layer)

    def attend(self, layer, q, k, v, mask):
        """Store layer's new k, v (B, H, T, D) at positions(T), then attend q (B, H, T, D) to all
        the layer's positions under mask, which hides what is not written yet -> y (B, T, C).
        One launch for a decode step (kernels/cached_attention.py). GPT.trunk() advances pos
        after the last layer."""
        return cached_attention(q, k, v, self.k[layer], self.v[layer], self.pos, mask)


def decodes(block, x):
    """Whether x (B, T, C) is a decode step for decode_block(): few tokens (N*K <= 64), at
    inference, through an MoE whose router records nothing."""
    if not isinstance(block.ffn, MoE) or block.training or torch.is_grad_enabled():
        return False
    router = block.ffn.router
    return x.size(0) * x.size(1) * router.config.top_k <= MAX_ASSIGNMENTS and not router.watch


def decode_block(block, x, cos, sin, mask, cache, layer):
    """Block.forward's function with a KV cache for a few tokens, in 7 launches: the norms and the
    residual adds ride in the kernels beside them (kernels/rope.py's norm_qkv_rope,
    kernels/moe_decode.py) and the experts run without the sort, since at this size each launch,
    not its bytes, costs the time. No router loss, not even a zero tensor."""
    B, T, C = x.shape
    attn, moe, router = block.attn, block.ffn, block.ffn.router
    q, k, v = norm_qkv_rope(x, block.norm1.weight, block.norm1.eps, attn.qkv.weight, cos, sin,
                            attn.n_head)                                 # 3 x (B, H, T, D)
    y = attn.proj(cache.attend(layer, q, k, v, mask))                    # (B, T, C)
    bias = router.bias if router.config.router == 'bias' else None
    out = moe_decode(x.view(-1, C), y.view(-1, C), block.norm2.weight, block.norm2.eps,
                     router.weight, bias, moe.w_in, moe.w_out, router.config.top_k, moe.act)
    return out.view(B, T, C)


# ---- CUDA graphs ----

def capture(run, warmup, reset):
    """run() recorded as a CUDA graph -> (graph, run()'s outputs, which each replay rewrites in
    place). Capture wants run's first calls (cuBLAS workspaces, autograd's buffers, the allocator's
    pools) made beforehand and off the default stream: `warmup` real calls on a side stream, each
    followed by reset(), which undoes what a call changed that the caller keeps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
            reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the launches; runs nothing
        outputs = run()
    return graph, outputs


class CUDAGraphed:
    """fn(*inputs) captured once as a CUDA graph, then replayed: a decode step's many small launches
    become one, and the GPU stops waiting on Python. A call copies its inputs into the captured ones
    and returns the captured outputs, valid until the next call. fn may update the tensors of state
    in place (cache.pos, a decoder's length): the warm-up runs are undone."""

    def __init__(self, fn, inputs, state):
        self.inputs = [x.clone() for x in inputs]
        self.state, self.saved = state, [t.clone() for t in state]
        self.graph, self.outputs = capture(partial(fn, *self.inputs), 2, self.restore)

    def restore(self):
        for t, saved in zip(self.state, self.saved):
            t.copy_(saved)

    def __call__(self, *inputs):
        for captured, x in zip(self.inputs, inputs):
            captured.copy_(x)
        self.graph.replay()
        return self.outputs


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
        self.graph, self.loss = capture(self.micro_steps, warmup, self.drop_grads)
        self.grads = [p.grad for p in self.params]

    def micro_steps(self):
        """-> the last micro-step's loss (detached), as train.py's eager loop reports it."""
        for x, y in zip(self.xs, self.ys):
            loss = self.loss_of(x, y)
            (loss / len(self.xs)).backward()
        return loss.detach()

    def drop_grads(self):
        """The warm-up's gradients go: the captured backward allocates them, in the graph's
        memory."""
        for p in self.params:
            p.grad = None

    def __call__(self, xs, ys):
        self.xs.copy_(xs)
        self.ys.copy_(ys)
        self.graph.replay()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return self.loss


_kept = weakref.WeakKeyDictionary()  # model -> (what its kept build depends on, the build)


def kept(model, key, build):
    """build(), kept for the model's next call with the same key: a decode step's CUDA graph (with
    the cache it writes) takes milliseconds to capture and microseconds to replay. A model keeps
    one build, the last, so its memory stays that of one decode. A graph reads tensors at fixed
    addresses and replays the kernels it captured, so casting, moving or reallocating the model's
    tensors, train()/eval(), another autocast setting or ava_kernels.enabled builds anew."""
    stamp = (key, model.training, torch.is_autocast_enabled('cuda'),
             torch.get_autocast_dtype('cuda'), ava_kernels.enabled,
             [(t.data_ptr(), t.dtype) for t in chain(model.parameters(), model.buffers())])
    if model in _kept and _kept[model][0] == stamp:
        return _kept[model][1]
    _kept.pop(model, None)  # the old build goes first: its memory serves the new one
    _kept[model] = (stamp, build())
    return _kept[model][1]


def forget(model):
    """Free what kept() holds for the model: for a caller that trains between decodes, where the
    memory is worth more than the next call's capture."""
    _kept.pop(model, None)


# ---- generate ----

def graphable(model, idx):
    """Whether decoding idx can run as a CUDA graph: on a GPU, with 16-bit experts (grouped_mm
    in fp32 falls back to a loop that reads the expert offsets on the CPU: not capturable)."""
    dtype = ava_kernels.autocast_dtype(model.wte.weight)
    return idx.is_cuda and (not model.config.moe or dtype != torch.float32)


def decode_step(model, cache, token, pad=None):
    """Each row's next token (B, 1) against the cache -> its logits (B, V)."""
    return model(token, cache=cache, pad=pad)[0][:, -1]


def decoder(model, idx, pad, cuda_graph):
    """A KV cache for generating from idx (B, T) with left padding pad (B,) or None, and
    step(token (B, 1)[, pad]) -> logits (B, V) over it. On a GPU in 16 bits the step is a CUDA
    graph, kept with its cache for the next call with as many rows (kept())."""
    graphed = cuda_graph and graphable(model, idx)
    build = partial(new_decoder, model, idx[:, -1:], pad, graphed)
    return kept(model, ('generate', idx.size(0), pad is None), build) if graphed else build()


def new_decoder(model, token, pad, graphed):
    """decoder()'s cache and step for tokens like token (B, 1), built anew."""
    cfg, dtype = model.config, ava_kernels.autocast_dtype(model.wte.weight)
    cache = KVCache(cfg, token.size(0), cfg.block_size, token.device, dtype)
    step = partial(decode_step, model, cache)
    if not graphed:
        return cache, step
    inputs = (token,) if pad is None else (token, pad)
    return cache, CUDAGraphed(step, inputs, [cache.pos])


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             pad=None, stop=None, penalize=None, use_cache=True, cuda_graph=True,
             return_logprobs=False):
    """Continue idx (B, T) by up to max_new_tokens tokens from sample_next(temperature, top_k,
    top_p); pad (B,): each row's left padding. A row finishes when it samples eos_id or when
    stop(idx) -> (B,) bool says so, then repeats eos_id (or its last token); generation ends
    when all rows are finished. penalize(logits (B, V), idx) -> logits reshapes each step's
    logits before sampling (penalize_repeats, its settings bound). Past block_size the KV cache is
    rebuilt from the last block_size // 2 tokens: no step sees more than the model trained on.
    On a GPU in 16 bits the one-token step is a CUDA graph (decoder()); use_cache=False and
    cuda_graph=False measure what each saves. return_logprobs=True also returns (B, new) each
    token's log-probability under the model, before temperature, filters and penalties (with
    plain sampling, the sampler's own, as RL needs; a finished row's are its filler token's)."""
    B, window = idx.size(0), model.config.block_size
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    check_finished = eos_id is not None or stop is not None  # finished.all() syncs with the GPU
    cache, step = decoder(model, idx, pad, cuda_graph) if use_cache else (None, None)
    cached, logprobs, context_pad = 0, [], pad  # positions cached; (B, 1) each; pad of the cache
    for _ in range(max_new_tokens):
        if use_cache and 0 < cached < window:  # one new token against the cache
            inputs = (idx[:, -1:],) if pad is None else (idx[:, -1:], context_pad)
            logits, cached = step(*inputs), cached + 1                          # (B, V)
        else:  # (re)build the cache from the context; without a cache, recompute the context
            keep = idx.size(1) if idx.size(1) < window else window // 2 if use_cache else window
            context_pad = None if pad is None else (pad - (idx.size(1) - keep)).clamp_min(0)
            if use_cache:
                cache.pos.zero_()
            logits, cached = model(idx[:, -keep:], cache=cache, pad=context_pad)[0][:, -1], keep
        logits = logits.float()
        scores = logits if penalize is None else penalize(logits, idx)
        next_token = sample_next(scores, temperature, top_k, top_p)           # (B, 1)
        done_token = idx[:, -1:] if eos_id is None else torch.full_like(next_token, eos_id)
        next_token = torch.where(finished[:, None], done_token, next_token)
        if return_logprobs:
            logprobs.append(logits.log_softmax(dim=-1).gather(1, next_token))
        idx = torch.cat((idx, next_token), dim=1)
        if eos_id is not None:
            finished |= next_token[:, 0] == eos_id
        if stop is not None:
            finished |= stop(idx)
        if check_finished and finished.all():
            break
    return (idx, torch.cat(logprobs, dim=1)) if return_logprobs else idx


# ---- self-speculative decoding ----

def speculative_room(model, prompt_len):
    """How many new tokens generate_speculative can add after a prompt: its one cache (it does not
    slide) holds the prompt, the new tokens and a step's drafts, within block_size."""
    return model.config.block_size - prompt_len - len(model.mtp_heads)


def propose(model, hidden):
    """Every head's greedy token after each row of hidden (1, R, C) -> (n, R): row 0 the main
    head's next token, row i head i's token i after that. The n heads' states share one pass over
    the vocabulary and one argmax."""
    states = torch.cat([model.norm_f(hidden), *(head(hidden) for head in model.mtp_heads)])
    return model.lm_head(states).argmax(-1)                              # (n, R)


def speculative_step(model, cache, out, length, candidate):
    """One verify-and-draft step on device state, in place: the trunk takes candidate (1, n) (the
    main head's next token and the heads' n-1 drafts after it) in one pass; the main head's tokens
    after each of the n rows are the verdict on the drafts and, with the heads' drafts, the next
    step's candidates, all from one vocabulary pass. The n candidates go into out (1, L) at length,
    length grows by 1 + the drafts agreed in a row, cache.pos forgets the rejected keys, and
    candidate becomes the tokens proposed after the last kept one. No host sync and the same
    shapes every step: a CUDA graph replays it."""
    n = candidate.size(1)
    hidden = model.trunk(candidate, cache)[0]                          # (1, n, C) in one pass
    guesses = propose(model, hidden)                                   # (n, n)
    agreed = (guesses[0, :-1] == candidate[0, 1:]).long().cumprod(dim=0).sum()  # () in a row
    # all n go in at the current length; the next step overwrites the rejected ones
    out.index_copy_(1, length + torch.arange(n, device=out.device), candidate)
    length += 1 + agreed                                               # the token + the agreed
    cache.pos -= n - 1 - agreed                                        # forget the rejected keys
    candidate.copy_(guesses.index_select(1, agreed.view(1)).view(1, n))  # proposed after the last


@torch.no_grad()
def generate_speculative(model, idx, max_new_tokens, cuda_graph=True, sync_every=8):
    """Greedy decoding of idx (1, T) that drafts with the multi-token-prediction heads and verifies
    with the main head (self-speculative decoding, Gloeckle et al. 2024 sec. 3.2; Stern et al.
    2018). Each step feeds the next token and the heads' n-1 drafts through the model at once and
    keeps the drafts the main head agrees with, plus the main head's own next token: the output
    equals generate(model, idx, temperature=0) token for token, in fewer forward passes. Returns
    (idx, forward passes). Falls back to generate() without MTP heads or when the text would outgrow
    block_size (the cache does not slide here). On a GPU the whole step (verifying pass, verdict,
    next drafts) is one CUDA graph, kept with its state for the next call (kept()): a step is one
    launch. How many tokens a step accepts stays on the device: the host reads the length once
    per round of up to sync_every steps (as many as cannot overshoot), so it queues the next steps
    while the GPU runs."""
    heads = model.mtp_heads
    if not heads or idx.size(0) != 1 or max_new_tokens > speculative_room(model, idx.size(1)):
        greedy = generate(model, idx, max_new_tokens, temperature=0, cuda_graph=cuda_graph)
        return greedy, max_new_tokens
    (_, T), n = idx.shape, 1 + len(heads)
    dtype = ava_kernels.autocast_dtype(model.wte.weight)
    graphed = cuda_graph and graphable(model, idx)
    build = partial(speculative_decoder, model, idx.device, dtype, graphed)
    cache, out, length, candidate, step = (
        kept(model, 'speculative', build) if graphed else build())
    cache.pos.zero_()
    hidden, _ = model.trunk(idx, cache)                                   # (1, T, C)
    out[:, :T] = idx
    length.fill_(T)
    candidate.copy_(propose(model, hidden[:, -1:]).view(1, n))           # after the prompt
    passes, generated = 1, 0
    while generated < max_new_tokens:
        for _ in range(max(1, min(sync_every, (max_new_tokens - generated) // n))):
            step()
            passes += 1
        generated = int(length) - T  # the one host sync of the round
    return out[:, :T + max_new_tokens].clone(), passes  # out stays with the kept graph


def speculative_decoder(model, device, dtype, cuda_graph):
    """generate_speculative's state on the device: a one-row KV cache, the output row (1,
    block_size + 1: room for the prompt, the new tokens and a step's drafts), how much of it is
    final () and the candidates (1, n); and its step over them, a CUDA graph if cuda_graph."""
    cfg, n = model.config, 1 + len(model.mtp_heads)
    cache = KVCache(cfg, 1, cfg.block_size, device, dtype)
    out = torch.zeros(1, cfg.block_size + 1, dtype=torch.long, device=device)
    length = torch.zeros((), dtype=torch.long, device=device)
    candidate = torch.zeros(1, n, dtype=torch.long, device=device)
    step = partial(speculative_step, model, cache, out, length, candidate)
    if cuda_graph:
        step = CUDAGraphed(step, (), [cache.pos, length, candidate])
    return cache, out, length, candidate, step
