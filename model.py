"""
Ava's model: a GPT whose feed-forward layers are Mixtures of Experts.

All of it is in this file: RMSNorm, rotary attention, two routers (classic softmax top-k with an aux loss
and capacity dropping, and Sinkhorn-Knopp balanced top-k), grouped experts, multi-token prediction heads,
and KV-cache generation.
Nothing here knows about training loops or files.

Shape legend used in comments:
  B batch, T time (sequence), C channels (n_embd), H heads, D head dim (C // H), V vocab,
  N = B*T tokens, E experts, K experts per token (top_k), F expert hidden size.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import cross_entropy, moe_permute, moe_unpermute, qkv_rope, rms_norm, sinkhorn_topk


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    block_size: int = 256        # longest context the model is trained on
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # mixture of experts
    moe: bool = True             # False: each MoE becomes a dense FFN of width top_k*ffn_hidden (same active params)
    n_experts: int = 4
    top_k: int = 2
    ffn_hidden: int = 0          # F, hidden size of one expert; 0 means 4 * n_embd
    router: str = 'sinkhorn'     # 'sinkhorn' (balanced by construction), 'softmax' (aux loss + capacity) or
                                 # 'bias' (aux-loss-free: a per-expert selection bias nudged toward balance)
    sinkhorn_iters: int = 8      # fixed number of Sinkhorn-Knopp iterations: no data-dependent loop, no host sync
    capacity_factor: float = 0.0 # softmax router only: expert capacity = factor * N*K/E while training; 0 = no dropping
    router_jitter: float = 0.0   # softmax router only: multiplicative noise on the router input while training
    aux_loss_coef: float = 0.01  # Switch load-balancing loss (softmax router only)
    z_loss_coef: float = 0.001   # router z-loss (ST-MoE): keeps router logits small, every router
    bias_update_rate: float = 0.01   # 'bias' router only: how far each training step moves an expert's logit bias
    sinkhorn_bias_rate: float = 0.0  # 'sinkhorn' router only: the same correction on the balanced matrix; 0 = off
    # multi-token prediction (Gloeckle et al. 2024)
    n_future_tokens: int = 1     # heads predicting t+1 .. t+n; 1 = only the usual next-token head
    mtp_weight: float = 0.3      # weight of the mean extra-head loss in the training loss

    def __post_init__(self):
        """Impossible combinations fail here, with one line that says what to change."""
        if self.ffn_hidden == 0:
            self.ffn_hidden = 4 * self.n_embd
        checks = [
            (self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"),
            ((self.n_embd // self.n_head) % 2 == 0, "head size n_embd/n_head must be even for RoPE"),
            (self.router in ('softmax', 'sinkhorn', 'bias'),
             f"router must be 'softmax', 'sinkhorn' or 'bias', not {self.router!r}"),
            (1 <= self.top_k <= self.n_experts, f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}"),
            (self.router == 'softmax' or self.capacity_factor == 0,
             "capacity_factor applies to the softmax router only: the others balance without dropping"),
            (self.router == 'softmax' or self.router_jitter == 0, "router_jitter applies to the softmax router only"),
            (self.bias_update_rate >= 0, f"bias_update_rate={self.bias_update_rate} must be >= 0"),
            (self.sinkhorn_bias_rate >= 0, f"sinkhorn_bias_rate={self.sinkhorn_bias_rate} must be >= 0"),
            (self.router == 'sinkhorn' or self.sinkhorn_bias_rate == 0, "sinkhorn_bias_rate applies to the sinkhorn "
             "router only"),
            (self.capacity_factor == 0 or self.capacity_factor >= 1, "capacity_factor must be 0 (no dropping) or >= 1"),
            (min(self.vocab_size, self.block_size, self.n_layer, self.ffn_hidden) > 0, "sizes must be positive"),
            (self.n_future_tokens >= 1, f"n_future_tokens={self.n_future_tokens} must be >= 1 (1 = next token only)"),
            (self.mtp_weight >= 0, f"mtp_weight={self.mtp_weight} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias, cheaper and just as good (Zhang & Sennrich 2019)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # kernels/rms_norm.py: output in the next matmul's dtype


def rope_tables(head_dim, positions, base=10000.0):
    """cos and sin of RoPE's rotation angles pos * base^(-2i/D): positions (T,) -> each (T, D/2), or per row
    (B, T) -> (B, T, D/2). Computed for any positions, so every length and cache offset works without a limit."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    return angles.cos(), angles.sin()


class KVCache:
    """Keys and values of every layer, preallocated to max_len, for positions [0, pos) where pos is a device tensor:
    writes and attention masks read it on the GPU, so a decode step has the same shapes and launches at every
    position, which lets one CUDA graph replay it (CUDAGraphed)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)  # (B, H, T_max, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # number of positions already stored


class CUDAGraphed:
    """fn(*inputs) captured once as a CUDA graph and replayed: a decode step's ~1,000 kernel launches (eager,
    ~80 ms of CPU per token on small) become one, so the GPU no longer waits on Python. Replays reuse the same
    memory: call() copies new inputs into the captured ones and returns the captured outputs, valid until the
    next call. fn may advance cache.pos (it is a device tensor); the warm-up runs are undone."""

    def __init__(self, fn, inputs, cache):
        self.inputs = [x.clone() for x in inputs]
        pos = cache.pos.clone()
        side = torch.cuda.Stream()  # warm up off the default stream, as capture needs (lazy cuBLAS/allocator setup)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.inputs)
                cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the launches; runs nothing
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs):
        for captured, x in zip(self.inputs, inputs):
            captured.copy_(x)
        self.graph.replay()
        return self.outputs


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, layer=0, pad=None):
        """pad (B,): row b starts with pad[b] padding tokens (batched prompts of different lengths, left-padded);
        no query attends to them."""
        B, T, C = x.size()
        q, k, v = qkv_rope(self.qkv(x), cos, sin, self.n_head)  # 3 x (B, H, T, D), q and k rotated (kernels/rope.py)
        mask, causal = None, cache is None and pad is None  # training: SDPA's own causal mask, nothing to build
        if not causal:  # query i sits at position start + i and may see keys 0 .. start + i
            query = (cache.pos if cache is not None else 0) + torch.arange(T, device=x.device)  # (T,)
            if cache is not None:
                cache.k[layer].index_copy_(2, query, k.to(cache.k[layer].dtype))
                cache.v[layer].index_copy_(2, query, v.to(cache.v[layer].dtype))
                k, v = cache.k[layer], cache.v[layer]                                  # (B, H, T_max, D)
            key = torch.arange(k.size(2), device=x.device)                             # (S,)
            mask = key <= query[:, None]                                               # (T, S)
            if pad is not None:  # ... but not row b's first pad[b] keys; a padding query sees itself (no empty row)
                mask = (mask & (key >= pad[:, None, None, None])) | (key == query[:, None])  # (B, 1, T, S)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """Dense GELU feed-forward C -> hidden -> C; the dense baseline for MoE comparisons."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Router(nn.Module):
    """Chooses K experts per token and their gates.

    Both kinds compute logits = x W_r in fp32, z-loss = mean(logsumexp(logits)^2), and gates = softmax(logits)
    renormalised over the chosen K experts.
    - 'softmax': top-k on softmax(logits). Balance comes from the Switch aux loss E * sum_e f_e P_e, where f_e is
      the fraction of the N*K assignments sent to expert e and P_e the mean router probability of e (Fedus et al.
      2021). With capacity_factor > 0 each expert takes at most ceil(cf * N*K/E) assignments while training; the
      rest are dropped (the token keeps its residual path), first choices of all tokens before second choices.
    - 'sinkhorn': top-k on the Sinkhorn-Knopp balanced matrix while training (kernels/sinkhorn.py says how and why),
      plain top-k at inference. No aux loss. The soft matrix is balanced exactly, but its hard top-k counts can
      stay skewed (max/mean 1.17-1.20 on ShareGPT, README Results); sinkhorn_bias_rate > 0 adds a training-only
      bias b (E,) to the balanced log matrix before the top-k, moved like the 'bias' router's (1.02 at 0.01).
    - 'bias': top-k on logits + b, where b (E,) is a buffer, not a parameter. After every training forward, each
      expert's b moves by bias_update_rate toward balance: up if it got fewer than its share of the assignments,
      down if more (DeepSeek-V3's auxiliary-loss-free balancing, Wang et al. 2024). b only chooses the experts, at
      inference too; the gates come from the unbiased softmax. No aux loss, so no gradient pulls against the
      language-modelling loss. DeepSeek-V3 adds b to sigmoid scores; on softmax probabilities an expert that every
      token rates near 0 wins all of them at once when its bias crosses over, and the load oscillates. On the
      logits the tokens cross one by one.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(config.n_experts, config.n_embd) * 0.02)  # (E, C)
        if config.router == 'bias':  # saved with the weights: it is part of the routing function
            self.register_buffer('bias', torch.zeros(config.n_experts))                  # (E,)
        elif config.router == 'sinkhorn':  # training only (inference routes by plain top-k): not saved
            self.register_buffer('bias', torch.zeros(config.n_experts), persistent=False)  # (E,)
        self.stats = {}  # last training forward's load, dropped fraction, entropy, aux and z losses (detached)
        self.watch_load = False  # eval mode too: record the load (GPT.watch_routing), else decoding skips it

    def forward(self, x):
        cfg, N, E, K = self.config, x.size(0), self.config.n_experts, self.config.top_k  # x: (N, C)
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32: routing is precision-sensitive
        probs = logits.softmax(dim=-1)                           # (N, E)
        if cfg.router == 'sinkhorn' and self.training:
            with torch.no_grad():  # kernels/sinkhorn.py
                expert_idx = sinkhorn_topk(logits.detach(), cfg.sinkhorn_iters, K, self.bias)           # (N, K)
        elif cfg.router == 'bias':
            expert_idx = (logits.detach() + self.bias).topk(K, dim=-1).indices                     # (N, K)
        else:
            expert_idx = probs.topk(K, dim=-1).indices                                             # (N, K)
        gates = probs.gather(1, expert_idx)
        gates = gates / gates.sum(dim=-1, keepdim=True)          # (N, K) sum to 1 over the chosen experts

        keep = torch.ones_like(gates, dtype=torch.bool)          # (N, K)
        if not self.training:  # inference: no dropping, no losses; only the load, and only when watched
            if self.watch_load:
                self.stats = dict(load=F.one_hot(expert_idx, E).float().mean(dim=(0, 1)))  # (E,)
            return expert_idx, gates, keep, logits.new_zeros(())
        assigned = F.one_hot(expert_idx, E).float()              # (N, K, E)
        load = assigned.sum(dim=(0, 1)) / (N * K)                # (E,) fraction of assignments per expert
        rate = {'bias': cfg.bias_update_rate, 'sinkhorn': cfg.sinkhorn_bias_rate}.get(cfg.router, 0)
        if rate > 0:
            self.bias += rate * torch.sign(1 / E - load)  # under-loaded experts up, over-loaded down
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * N * K / E)
            # rank of each assignment inside its expert's queue: all first choices (in token order), then seconds
            # (a scan along the last dim: along dim 0 of (K*N, E), CUDA scans with only E threads, ~10 ms a layer)
            queue = assigned.permute(2, 1, 0).reshape(E, K * N)  # (E, K*N) choice-major order
            rank = (queue.cumsum(dim=1) - 1) * queue             # (E, K*N) position in the expert's queue
            keep = (rank.sum(dim=0) < capacity).view(K, N).t()   # (N, K)

        aux_loss = E * (load * probs.mean(dim=0)).sum() if cfg.router == 'softmax' else logits.new_zeros(())
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        entropy = -(probs * torch.log(probs.clamp_min(1e-9))).sum(dim=-1).mean()
        self.stats = dict(load=load.detach(), dropped=1 - keep.float().mean().detach(), entropy=entropy.detach(),
                          aux_loss=aux_loss.detach(), z_loss=z_loss.detach())
        return expert_idx, gates, keep, cfg.aux_loss_coef * aux_loss + cfg.z_loss_coef * z_loss


def grouped_mm(x, w, offsets):
    """Row block g of x (rows offsets[g-1]:offsets[g]) times w[g]: every expert's matmul in one call.
    x: (M, in), w: (E, in, out), offsets: (E,) int32 cumulative row counts -> (M, out)."""
    if x.is_cuda and hasattr(torch, '_grouped_mm') and not hasattr(F, 'grouped_mm'):  # torch < 2.10 on CUDA
        return torch._grouped_mm(x, w, offs=offsets)
    return F.grouped_mm(x, w, offs=offsets)


def sort_by_expert(expert_idx, keep, n_experts):
    """The expert-sorted row layout of the M = N*K assignments (t, k) of expert_idx (N, K), where keep (N, K) is
    False for dropped ones: they get the sentinel expert E and sort last, outside every expert's block.
    Returns offsets (E,) int32, the end row of each expert's block; row_src (M,) int32, the assignment t*K + k
    each row holds (-1: an unused row); assignment_row (N, K) int32, the row each assignment holds (-1: dropped).
    Everything stays on the GPU: no host sync, so the CPU can queue the next layers meanwhile."""
    (N, K), E = expert_idx.shape, n_experts
    flat_expert = torch.where(keep, expert_idx, E).flatten()                   # (M,)
    order = flat_expert.argsort(stable=True)                                    # (M,) the assignment each row holds
    counts = torch.zeros(E + 1, dtype=torch.long, device=expert_idx.device).scatter_add_(
        0, flat_expert, torch.ones_like(flat_expert))                           # (E+1,) rows per expert, dropped last
    offsets = counts[:E].cumsum(0).to(torch.int32)                              # (E,)
    rows = torch.arange(N * K, device=expert_idx.device)
    row_src = torch.where(rows < offsets[-1], order, -1).int()                  # (M,)
    assignment_row = torch.empty_like(order).scatter_(0, order, rows)           # (M,) inverse permutation
    return offsets, row_src, torch.where(keep.flatten(), assignment_row, -1).int().view(N, K)


class MoE(nn.Module):
    """Router + E GELU experts (C -> F -> C), run without a Python loop over experts:
    sort the N*K assignments by expert (permute), two grouped matmuls, then add each result back to its token
    weighted by its gate (unpermute + combine)."""

    def __init__(self, config):
        super().__init__()
        E, C, Fh = config.n_experts, config.n_embd, config.ffn_hidden
        self.router = Router(config)
        # stored (out, in) like nn.Linear weights; transposed views are the column-major operands grouped_mm wants
        # (init as GPT._init_weights does for dense layers: N(0, 0.02), output projection 0.02/sqrt(2L))
        self.w_in = nn.Parameter(torch.randn(E, Fh, C) * 0.02)                                  # (E, F, C)
        self.w_out = nn.Parameter(torch.randn(E, C, Fh) * 0.02 / math.sqrt(2 * config.n_layer))  # (E, C, F)

    def forward(self, x):
        B, T, C = x.shape
        x = x.view(-1, C)                                                       # (N, C)
        expert_idx, gates, keep, router_loss = self.router(x)
        offsets, row_src, assignment_row = sort_by_expert(expert_idx, keep, self.w_in.size(0))
        dtype = kernels.autocast_dtype(x)                                       # bf16 under autocast
        w_in, w_out = self.w_in.to(dtype).transpose(1, 2), self.w_out.to(dtype).transpose(1, 2)  # (E,C,F), (E,F,C)
        h = F.gelu(grouped_mm(moe_permute(x, row_src, assignment_row), w_in, offsets))  # (M, F)
        y = grouped_mm(h, w_out, offsets)                                       # (M, C)
        # out[t] = sum over t's kept assignments of gate * expert output (kernels/moe_permute.py)
        out = moe_unpermute(y, gates, row_src, assignment_row)                 # (N, C) in the gates' fp32
        return out.view(B, T, C), router_loss


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.norm2 = RMSNorm(config.n_embd)
        self.ffn = MoE(config) if config.moe else MLP(config.n_embd, config.top_k * config.ffn_hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, pad=None):
        x = x + self.dropout(self.attn(self.norm1(x), cos, sin, cache, layer, pad))
        if isinstance(self.ffn, MoE):  # its output is in the gates' fp32: keep a bf16 model (no autocast) in bf16
            y, router_loss = self.ffn(self.norm2(x))
            y = y.to(x.dtype)
        else:
            y, router_loss = self.ffn(self.norm2(x)), x.new_zeros(())
        return x + self.dropout(y), router_loss


class MTPHead(nn.Module):
    """Turns the trunk's final state at position t into a state for predicting token t+1+i (Gloeckle et al. 2024),
    which the shared, tied lm_head then scores: x + W norm(x), normed like norm_f.

    One residual linear layer (~C^2 parameters, where Gloeckle et al. give each head a transformer layer): cheap
    enough to run at every training step and to draft tokens with, and weak enough that the trunk has to carry the
    future tokens itself, which is the point of the extra loss. With W small at init the head starts as a copy of
    the next-token state, the nearest thing the model already knows."""

    def __init__(self, n_embd):
        super().__init__()
        self.norm_in = RMSNorm(n_embd)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.norm_out = RMSNorm(n_embd)

    def forward(self, x):
        return self.norm_out(x + self.proj(self.norm_in(x)))


def next_token_loss(logits, targets):
    """Mean cross-entropy over the targets that are not -1, in fp32 (kernels/cross_entropy.py: the fused kernel
    never makes an fp32 copy of the logits). logits (B, T, V), targets (B, T)."""
    return cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017): fewer parameters, trains as well
        # head i (1 .. n-1) predicts token t+1+i; empty when off, so such checkpoints have no extra keys
        self.mtp_heads = nn.ModuleList([MTPHead(config.n_embd) for _ in range(config.n_future_tokens - 1)])
        self.mtp_losses = []  # last forward's extra-head losses (detached), for the training log
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """N(0, 0.02) everywhere (GPT-2); the projections that write into the residual stream get
        0.02/sqrt(2L) so the stream's variance does not grow with depth."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, (Attention, MLP, MTPHead)):
            torch.nn.init.normal_(module.proj.weight, mean=0.0, std=out_std)

    def num_params(self, active=False):
        """Parameters in the model; with active=True only those one token uses (K of the E experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.config.moe:
            cfg = self.config
            per_expert = 2 * cfg.n_embd * cfg.ffn_hidden
            total -= cfg.n_layer * (cfg.n_experts - cfg.top_k) * per_expert
        return total

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per active weight (forward + backward) plus attention's 12*L*C*T
        (PaLM appendix B; the embedding lookup is free, the tied lm_head is counted once by 6N, and once more
        for each extra MTP head that reuses it)."""
        cfg = self.config
        mtp_lm_head = len(self.mtp_heads) * cfg.n_embd * cfg.vocab_size
        return 6 * (self.num_params(active=True) + mtp_lm_head) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def router_stats(self):
        """Per MoE layer: expert load (E,), dropped fraction, router entropy, aux and z loss, from the last
        forward pass. Tensors stay on the device; the caller decides when to sync."""
        return [block.ffn.router.stats for block in self.blocks if isinstance(block.ffn, MoE)]

    def watch_routing(self, on=True):
        """Record each router's expert load in eval mode too (RLHF samples and trains in eval mode and logs the
        load); router_stats() then holds {'load'} after an eval forward. Off by default: decoding skips it."""
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                block.ffn.router.watch_load = on

    def trunk(self, idx, cache=None, pad=None):
        """idx (B, T) -> the last block's hidden states (B, T, C), before norm_f, and the summed router loss.
        With a KVCache, idx continues the cached sequence from position cache.pos. With pad (B,), row b begins
        with pad[b] padding tokens: its text starts at position 0 for RoPE, and attention skips the padding."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0                                  # a device tensor: no sync
        positions = start + torch.arange(T, device=idx.device)                           # (T,)
        if pad is not None:
            positions = (positions - pad[:, None]).clamp_min(0)                          # (B, T)
        cos, sin = rope_tables(self.config.n_embd // self.config.n_head, positions)
        if pad is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): broadcast over heads
        x = self.wte(idx)  # (B, T, C)
        router_loss = 0.0
        for layer, block in enumerate(self.blocks):
            x, block_router_loss = block(x, cos, sin, cache, layer, pad)
            router_loss = router_loss + block_router_loss
        if cache is not None:
            cache.pos += T
        return x, router_loss

    def mtp_logits(self, hidden):
        """Trunk states (B, T, C) -> one logits tensor (B, T, V) per extra head: entry i-1 at position t scores
        token t+1+i. Pass hidden[:, -1:] to draft the tokens after the next one (self-speculative decoding)."""
        return [self.lm_head(head(hidden)) for head in self.mtp_heads]

    def forward(self, idx, targets=None, cache=None, pad=None):
        """idx (B, T) token ids -> logits (B, T, V), and with targets (-1 = ignore) the loss: cross-entropy, plus
        while training the router losses and mtp_weight * the mean extra-head loss (both help training, so eval
        reports the plain cross-entropy). The extra-head losses land in self.mtp_losses, detached; without
        targets (generation) the extra heads are not run. With a KVCache, idx continues from cache.pos; pad as
        in trunk()."""
        x, router_loss = self.trunk(idx, cache, pad)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            self.mtp_losses = []
            return logits, None
        loss = next_token_loss(logits, targets)
        # head i's logits at t score token t+1+i = targets[:, t+i]; the last i positions have no target
        mtp_losses = [next_token_loss(head_logits[:, :-i], targets[:, i:])
                      for i, head_logits in enumerate(self.mtp_logits(x), start=1)]
        self.mtp_losses = [head_loss.detach() for head_loss in mtp_losses]
        if not self.training:
            return logits, loss
        if mtp_losses:
            loss = loss + self.config.mtp_weight * sum(mtp_losses) / len(mtp_losses)
        return logits, loss + router_loss

    def graphable(self, idx):
        """Whether decoding idx can run as a CUDA graph: on a GPU, with the experts in 16 bits (grouped_mm in fp32
        falls back to a per-expert loop that reads the expert offsets on the CPU, which a graph cannot capture)."""
        return idx.is_cuda and (not self.config.moe or kernels.autocast_dtype(self.wte.weight) != torch.float32)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 no_repeat_ngram_size=0, eos_id=None, pad=None, stop=None, use_cache=True, cuda_graph=True,
                 return_logprobs=False):
        """Continue idx (B, T) by up to max_new_tokens sampled tokens. temperature=0 is greedy; top_k, top_p,
        repetition_penalty and no_repeat_ngram_size as in penalize() and sample_next(). pad (B,): left padding
        per row (batched prompts). A row is finished once it samples eos_id, or when stop(idx) -> (B,) bool says
        so (stop strings); finished rows then repeat eos_id (or their last token), and generation ends when all
        are finished. Keys and values come from a KV cache (use_cache=False recomputes the whole context every
        step: only for measuring what the cache saves); on a GPU in bf16 the one-token step runs as a CUDA graph
        (cuda_graph=False: eager, to measure what the graph saves). Past block_size the context slides: the cache
        is rebuilt from the last block_size // 2 tokens, so every step stays within what the model was trained on.
        return_logprobs=True also returns each new token's log-probability under the model's own distribution,
        before temperature, filters and penalties (B, new): RL needs them, with plain sampling (temperature 1, no
        filters), where they are the sampler's; a finished row's entries are its filler token's."""
        B, window = idx.size(0), self.config.block_size
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        check_finished = eos_id is not None or stop is not None  # else never: finished.all() syncs with the GPU
        cache = (KVCache(self.config, B, window, idx.device, kernels.autocast_dtype(self.wte.weight))
                 if use_cache else None)
        step, cached, logprobs = None, 0, []  # the one-token step; positions in the cache; (B, 1) per token
        for _ in range(max_new_tokens):
            if use_cache and 0 < cached < window:  # one new token against the cache
                inputs = (idx[:, -1:],) if context_pad is None else (idx[:, -1:], context_pad)
                if step is None:
                    step = lambda token, pad=None: self(token, cache=cache, pad=pad)[0][:, -1]  # noqa: E731
                    if cuda_graph and self.graphable(idx):
                        step = CUDAGraphed(step, inputs, cache)
                logits, cached = step(*inputs), cached + 1                               # (B, V)
            else:  # (re)build the cache from the context; without a cache, recompute the whole context
                keep = idx.size(1) if idx.size(1) < window else window // 2 if use_cache else window
                context_pad = None if pad is None else (pad - (idx.size(1) - keep)).clamp_min(0)
                if use_cache:
                    cache.pos.zero_()
                logits, cached = self(idx[:, -keep:], cache=cache, pad=context_pad)[0][:, -1], keep
            logits = logits.float()
            next_token = sample_next(penalize(logits, idx, repetition_penalty, no_repeat_ngram_size, pad),
                                     temperature, top_k, top_p)                           # (B, 1)
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

    @torch.no_grad()
    def generate_speculative(self, idx, max_new_tokens, cuda_graph=True):
        """Greedy decoding of idx (1, T) that drafts with the multi-token-prediction heads and verifies with the
        main head (self-speculative decoding, Gloeckle et al. 2024 sec. 3.2; Stern et al. 2018). Each step
        feeds the next token and the heads' n-1 drafts through the model at once, keeps the drafts the main head
        agrees with, plus the main head's own next token: the output equals generate(temperature=0) token for
        token, in fewer forward passes. Returns (idx, forward passes). Falls back to generate() without MTP heads
        or when the text would outgrow block_size (the cache does not slide here). The verifying pass always
        takes n tokens, so on a GPU it runs as a CUDA graph too."""
        too_long = idx.size(1) + max_new_tokens + len(self.mtp_heads) > self.config.block_size
        if not self.mtp_heads or idx.size(0) != 1 or too_long:
            return self.generate(idx, max_new_tokens, temperature=0, cuda_graph=cuda_graph), max_new_tokens
        cache = KVCache(self.config, 1, self.config.block_size, idx.device, kernels.autocast_dtype(self.wte.weight))
        hidden, _ = self.trunk(idx, cache)                                     # (1, T, C)
        last, passes, start, verify = hidden[:, -1:], 1, idx.size(1), None
        while idx.size(1) - start < max_new_tokens:
            next_token = self.lm_head(self.norm_f(last)).argmax(-1)            # (1, 1) the main head's token
            drafts = [logits.argmax(-1) for logits in self.mtp_logits(last)]  # tokens after it, one per head
            candidate = torch.cat([next_token, *drafts], dim=1)                # (1, n)
            if verify is None:
                verify = lambda tokens: self.trunk(tokens, cache)[0]  # noqa: E731
                if cuda_graph and self.graphable(idx):
                    verify = CUDAGraphed(verify, (candidate,), cache)
            hidden = verify(candidate)                                         # (1, n, C) all n in one pass
            passes += 1
            agree = self.lm_head(self.norm_f(hidden[:, :-1])).argmax(-1) == candidate[:, 1:]  # (1, n-1)
            accepted = 1 + int(agree[0].long().cumprod(0).sum())              # the token + drafts agreed in a row
            idx = torch.cat([idx, candidate[:, :accepted]], dim=1)
            cache.pos -= candidate.size(1) - accepted                          # forget the rejected drafts' keys
            last = hidden[:, accepted - 1:accepted]
        return idx[:, :start + max_new_tokens], passes


def penalize(logits, idx, repetition_penalty=1.0, no_repeat_ngram_size=0, pad=None):
    """Discourage repeats in next-token logits (B, V) given the tokens so far idx (B, T), skipping each row's left
    padding. repetition_penalty p > 1 (Keskar et al. 2019): a token already in the row has its logit divided by p
    if positive, multiplied by p if negative. no_repeat_ngram_size n > 0: a token that would complete an n-gram
    the row already contains gets -inf (its last n-1 tokens followed by it)."""
    if repetition_penalty == 1.0 and no_repeat_ngram_size <= 0:
        return logits
    logits = logits.clone()
    for b, row in enumerate(idx.tolist()):
        row = row[int(pad[b]):] if pad is not None else row
        if repetition_penalty != 1.0 and row:
            seen = torch.tensor(sorted(set(row)), device=logits.device)
            scores = logits[b, seen]
            logits[b, seen] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        n = no_repeat_ngram_size
        if n > 0 and len(row) >= n:
            prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
            banned = [row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix]
            logits[b, banned] = float('-inf')
    return logits


class Dequantize(nn.Module):
    """Weight-only quantization as a parametrization: the module keeps integer codes (int8, or two int4 codes per
    byte) and one scale per output channel (int8) or per group of group_size inputs (int4), and rebuilds the float
    weight on every forward, so the matmul itself is unchanged (dequantize on the fly, in plain torch)."""

    def __init__(self, scale, bits, shape):
        super().__init__()
        self.register_buffer('scale', scale)  # (..., out, 1) for int8; (..., out, in / group, 1) for int4
        self.bits, self.shape = bits, shape

    def forward(self, codes):
        if self.bits == 4:  # unpack: low nibble, high nibble -> consecutive inputs, stored as value + 8
            codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).to(torch.int8) - 8
            codes = codes.view(*self.scale.shape[:-1], -1)                 # (..., out, in / group, group)
        return (codes.float() * self.scale).view(self.shape)


def quantize_weight(w, bits, group_size=128):
    """w (..., out, in) -> (codes, scale) with round-to-nearest symmetric quantization: int8 per output channel
    (scale = max|row| / 127), or int4 per group of group_size inputs (scale = max|group| / 7, two codes per byte).
    Every element comes back within scale / 2."""
    if bits == 8:
        scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127                # (..., out, 1)
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    groups = w.reshape(*w.shape[:-1], w.size(-1) // group_size, group_size)            # (..., out, in/g, g)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
    codes = ((groups / scale).round().clamp(-8, 7) + 8).to(torch.uint8).flatten(-2)     # (..., out, in) in 0..15
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale                            # (..., out, in/2)


def quantize_model(model, bits, group_size=128):
    """Quantize the attention projections and the expert weights of model in place (weight-only, for inference).
    int4 needs each input size divisible by group_size; the tied embedding/lm_head and the norms stay float.
    Returns the bytes the model's tensors now take."""
    from torch.nn.utils import parametrize
    # (module, weight name) pairs, listed before any change: registering a parametrization adds modules
    weights = [(linear, 'weight') for m in model.modules() if isinstance(m, Attention) for linear in (m.qkv, m.proj)]
    weights += [(m, name) for m in model.modules() if isinstance(m, MoE) for name in ('w_in', 'w_out')]
    for module, name in weights:
        w = getattr(module, name).detach()
        if bits == 4 and w.size(-1) % group_size:
            raise ValueError(f"int4 groups of {group_size} need input sizes divisible by it; "
                             f"{type(module).__name__}.{name} has {w.size(-1)}")
        codes, scale = quantize_weight(w.float(), bits, group_size)
        setattr(module, name, nn.Parameter(codes, requires_grad=False))
        parametrize.register_parametrization(module, name, Dequantize(scale, bits, w.shape), unsafe=True)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits (B, V): greedy if temperature == 0, else softmax(logits / temperature)
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        remove = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # drop tokens once the mass before them >= p
        logits = logits.scatter(1, sorted_idx, sorted_logits.masked_fill(remove, float('-inf')))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)
