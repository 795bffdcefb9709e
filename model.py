"""
Ava's model: a GPT whose feed-forward layers are Mixtures of Experts. RMSNorm, rotary attention,
three routers (softmax top-k with an aux loss, Sinkhorn-Knopp balanced, aux-loss-free bias), grouped
experts, multi-token prediction heads; no training loops, no decoding, no files. GPT.forward takes
an optional KV cache and hands each block to it: decode.py holds the cache, the fused per-token
path a decode step takes through a block, and generate().

Shape legend used in comments:
  B batch, T time (sequence), C channels (n_embd), H heads, D head dim (C // H), V vocab,
  N = B*T tokens, E experts, K experts per token (top_k), F expert hidden size, S cached positions,
  I rows of an expert's input projection (F for GELU, 2F for SwiGLU's gate and up).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import ava_kernels
from ava_kernels import (cross_entropy, moe_permute, moe_sort, moe_unpermute, qkv_rope, rms_norm,
                         sinkhorn_topk)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    block_size: int = 256        # longest context the model is trained on
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # mixture of experts
    moe: bool = True             # False: dense FFNs of width top_k*ffn_hidden (same active params)
    n_experts: int = 4
    top_k: int = 2
    ffn_hidden: int = 0          # F, hidden size of one expert; 0 means 4 * n_embd
    expert_act: str = 'gelu'     # 'gelu' (2 matrices of C x F per expert) or 'swiglu' (3: the
                                 # gated Llama/Mixtral FFN; ~2/3 of GELU's F for equal parameters)
    router: str = 'sinkhorn'     # 'sinkhorn' (balanced by construction), 'softmax' (aux loss and
                                 # capacity) or 'bias' (aux-loss-free: a per-expert selection bias)
    sinkhorn_iters: int = 8      # a fixed count: no data-dependent loop, no host sync
    capacity_factor: float = 0.0 # softmax only: capacity = factor * N*K/E in training; 0 = no drops
    router_jitter: float = 0.0   # softmax only: multiplicative noise on the router input (training)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss (softmax router only)
    z_loss_coef: float = 0.001   # router z-loss (ST-MoE): keeps router logits small, every router
    bias_update_rate: float = 0.01   # 'bias' only: how far each update moves an expert's bias
    sinkhorn_bias_rate: float = 0.0  # 'sinkhorn' only: the same bias after balancing; 0 = off
    # multi-token prediction (Gloeckle et al. 2024)
    n_future_tokens: int = 1     # heads predicting t+1 .. t+n; 1 = only the usual next-token head
    mtp_weight: float = 0.3      # weight of the mean extra-head loss in the training loss

    def __post_init__(self):
        """Impossible combinations fail here, with one line that says what to change."""
        if self.ffn_hidden == 0:
            self.ffn_hidden = 4 * self.n_embd
        C, H, E, K, router = self.n_embd, self.n_head, self.n_experts, self.top_k, self.router
        checks = [
            (C % H == 0, f"n_embd={C} must be divisible by n_head={H}"),
            ((C // H) % 2 == 0, "head size n_embd/n_head must be even for RoPE"),
            (router in ('softmax', 'sinkhorn', 'bias'),
             f"router must be 'softmax', 'sinkhorn' or 'bias', not {router!r}"),
            (self.expert_act in ('gelu', 'swiglu'),
             f"expert_act must be 'gelu' or 'swiglu', not {self.expert_act!r}"),
            (1 <= K <= E, f"top_k={K} must be between 1 and n_experts={E}"),
            (router == 'softmax' or self.capacity_factor == 0, "capacity_factor applies to the "
             "softmax router only: the others balance without dropping"),
            (router == 'softmax' or self.router_jitter == 0,
             "router_jitter applies to the softmax router only"),
            (router == 'sinkhorn' or self.sinkhorn_bias_rate == 0,
             "sinkhorn_bias_rate applies to the sinkhorn router only"),
            (self.capacity_factor == 0 or self.capacity_factor >= 1,
             "capacity_factor must be 0 (no dropping) or >= 1"),
            (min(self.vocab_size, self.block_size, self.n_layer, self.ffn_hidden) > 0,
             "sizes must be positive"),
            (self.n_future_tokens >= 1,
             f"n_future_tokens={self.n_future_tokens} must be >= 1 (1 = next token only)"),
        ]
        checks += [(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
                   for name in ('bias_update_rate', 'sinkhorn_bias_rate', 'mtp_weight')]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias (Zhang & Sennrich 2019)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # kernels/rms_norm.py: in the next matmul's dtype


def rope_tables(head_dim, positions, base=10000.0):
    """cos and sin of RoPE's angles pos * base^(-2i/D) at any positions (no table to outgrow):
    positions (T,) -> each (T, D/2), or per row (B, T) -> (B, T, D/2)."""
    i2 = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)  # (D/2,) 2i
    angles = positions.float()[..., None] * base ** (-i2 / head_dim)                # (..., T, D/2)
    return angles.cos(), angles.sin()


def attention_mask(query, n_keys, pad=None):
    """query positions (T,) -> (T, S) bool: query i sees keys 0 .. query[i] of S = n_keys. With pad
    (B,) -> (B, 1, T, S): not row b's first pad[b] keys, though a padding query sees itself."""
    key = torch.arange(n_keys, device=query.device)                                # (S,)
    mask = key <= query[:, None]                                                   # (T, S)
    if pad is not None:
        mask = (mask & (key >= pad[:, None, None, None])) | (key == query[:, None])  # (B, 1, T, S)
    return mask


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        """x (B, T, C); mask from attention_mask(), or None: causal within x (training: SDPA's own
        mask, nothing to build). With a KV cache (decode.py), the queries attend to the cached keys
        too."""
        B, T, C = x.size()
        q, k, v = qkv_rope(self.qkv(x), cos, sin, self.n_head)  # 3 x (B, H, T, D), q, k rotated
        if cache is not None:
            return self.proj(cache.attend(layer, q, k, v, mask))  # (B, T, C)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.proj(y)


def ffn_activation(h, act):
    """The hidden layer of an expert or dense FFN from its first projection h: 'gelu' h (..., F) ->
    gelu(h); 'swiglu' h (..., 2F), rows [gate; up] of one matrix (one matmul, one grouped GEMM)
    -> silu(gate) * up (..., F) (Shazeer 2020)."""
    if act == 'swiglu':
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class MLP(nn.Module):
    """Dense feed-forward C -> hidden -> C (GELU or SwiGLU, as the experts); the dense baseline for
    MoE comparisons. SwiGLU's fc holds [gate; up]: (2 * hidden, C)."""

    def __init__(self, n_embd, hidden, act='gelu'):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(n_embd, 2 * hidden if act == 'swiglu' else hidden, bias=False)
        self.proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        """-> (y, zero router loss), as MoE returns: a Block treats both FFNs alike."""
        y = self.proj(ffn_activation(self.fc(x), self.act))
        return y, y.new_zeros(())


class Router(nn.Module):
    """Chooses K experts per token and their gates: logits = x W_r in fp32, gates = softmax(logits)
    renormalised over the chosen K, z-loss = mean(logsumexp(logits)^2). The choice:
    - 'softmax': top-k of softmax(logits), balanced by the Switch aux loss E * sum_e f_e P_e (f_e:
      share of the N*K assignments sent to e, P_e: mean probability of e; Fedus et al. 2021). With
      capacity_factor > 0 an expert takes at most ceil(cf * N*K/E) assignments while training, first
      choices of all tokens before second choices; the rest are dropped (the residual path remains).
    - 'sinkhorn': top-k of the Sinkhorn-Knopp balanced matrix while training (kernels/sinkhorn.py),
      plain top-k at inference. The soft matrix is balanced exactly, its hard top-k counts are not:
      sinkhorn_bias_rate > 0 adds a bias b (E,) to the balanced log matrix before the top-k.
    - 'bias': top-k of logits + b, at inference too (aux-loss-free balancing, Wang et al. 2024): b
      only chooses, the gates stay unbiased, no aux loss pulls against the LM loss. b is on logits,
      not (as in DeepSeek-V3) on probabilities, where an expert every token rates near 0 wins them
      all at once when its bias crosses over; on logits the tokens cross one by one.
    The load, entropy and aux terms are computed only where the aux loss, the bias counts or the
    statistics read them. With a moving bias, training forwards count the assignments per expert
    (buffer `counts`); update_bias() moves each b by the rate toward balance. Its caller sums the
    counts over data-parallel ranks and updates once per optimizer step, so every micro-step and
    every rank routes a token alike.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(config.n_experts, config.n_embd) * 0.02)  # (E, C)
        rates = dict(bias=config.bias_update_rate, sinkhorn=config.sinkhorn_bias_rate)
        self.rate = rates.get(config.router, 0.0)
        if config.router != 'softmax':  # saved when it routes at inference or moves in training
            saved = config.router == 'bias' or self.rate > 0
            self.register_buffer('bias', torch.zeros(config.n_experts), persistent=saved)  # (E,)
        if self.rate > 0:  # (E,) training assignments per expert since the last update_bias()
            self.register_buffer('counts', torch.zeros(config.n_experts), persistent=False)
        self.stats = {}     # the last recorded forward's, detached: see GPT.router_stats
        self.watch = None   # record stats: None in training forwards, True always, False never

    def forward(self, x):
        """x (N, C) -> expert_idx (N, K), gates (N, K), keep (N, K) bool (False: dropped), loss."""
        cfg, N, E, K = self.config, x.size(0), self.config.n_experts, self.config.top_k
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32: routing is sensitive
        choice = logits.detach()
        probs = logits.softmax(dim=-1)                           # (N, E)
        if cfg.router == 'sinkhorn' and self.training:  # kernels/sinkhorn.py
            expert_idx = sinkhorn_topk(choice, cfg.sinkhorn_iters, K, self.bias)
        elif cfg.router == 'bias':
            expert_idx = (choice + self.bias).topk(K, dim=-1).indices
        else:
            expert_idx = probs.topk(K, dim=-1).indices           # (N, K)
        gates = probs.gather(1, expert_idx)
        gates = gates / gates.sum(dim=-1, keepdim=True)          # (N, K) sum to 1 over the chosen
        keep = torch.ones_like(gates, dtype=torch.bool)          # (N, K)
        record = self.training if self.watch is None else self.watch
        if not self.training:  # inference: no dropping, no losses
            if record:
                self.stats = dict(load=expert_counts(expert_idx, E) / (N * K))  # (E,)
            return expert_idx, gates, keep, logits.new_zeros(())
        if cfg.capacity_factor > 0:
            keep = capacity_keep(expert_idx, E, math.ceil(cfg.capacity_factor * N * K / E))
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        if not (record or self.rate > 0 or cfg.router == 'softmax'):  # nothing reads the load
            return expert_idx, gates, keep, cfg.z_loss_coef * z_loss
        per_expert = expert_counts(expert_idx, E)                # (E,) chosen, before dropping
        if self.rate > 0:
            self.counts += per_expert
        load = per_expert / (N * K)                              # (E,) share of assignments
        aux_loss = logits.new_zeros(())
        if cfg.router == 'softmax':
            aux_loss = E * (load * probs.mean(dim=0)).sum()
        if record:
            entropy = -(probs * torch.log(probs.clamp_min(1e-9))).sum(dim=-1).mean()
            self.stats = dict(load=load, dropped=1 - keep.float().mean(), entropy=entropy.detach(),
                              aux_loss=aux_loss.detach(), z_loss=z_loss.detach())
        return expert_idx, gates, keep, cfg.aux_loss_coef * aux_loss + cfg.z_loss_coef * z_loss

    @torch.no_grad()
    def update_bias(self):
        """One balancing step from the assignments counted since the last one, then a fresh count.
        No host sync: with nothing counted, nothing moves."""
        total = self.counts.sum()
        load = self.counts / total.clamp_min(1)                  # (E,) fraction of assignments
        self.bias += self.rate * torch.sign(1 / self.config.n_experts - load) * (total > 0)
        self.counts.zero_()


def expert_counts(expert_idx, n_experts):
    """expert_idx (N, K) -> (E,) float: how many of the N*K assignments chose each expert (a
    scatter-add: no one-hot, no host sync)."""
    flat = expert_idx.flatten()                                            # (M,)
    ones = torch.ones_like(flat, dtype=torch.float32)
    return ones.new_zeros(n_experts).scatter_add_(0, flat, ones)


def capacity_keep(expert_idx, n_experts, capacity):
    """Which assignments fit: an expert takes at most `capacity`, all first choices (in token
    order) before the seconds. -> keep (N, K) bool."""
    (N, K), E = expert_idx.shape, n_experts
    # each assignment's place in its expert's queue: a scan along the last dim of (E, K*N), which
    # CUDA runs faster than down dim 0 of (K*N, E) with E threads
    queue = F.one_hot(expert_idx, E).permute(2, 1, 0).reshape(E, K * N)   # (E, K*N) choice-major
    rank = (queue.cumsum(dim=1) - 1) * queue                               # (E, K*N)
    return (rank.sum(dim=0) < capacity).view(K, N).t()                     # (N, K)


class MoE(nn.Module):
    """Router + E experts (C -> F -> C), run without a Python loop over experts: sort the N*K
    assignments by expert (permute), two grouped matmuls, then add each result back to its token
    weighted by its gate (unpermute + combine). GELU experts: w_out gelu(w_in x); SwiGLU experts:
    w_in holds W1 (gate, rows :F) over W3 (up, rows F:), and an expert is W2 (silu(W1 x) * W3 x)
    with W2 = w_out: the same two grouped matmuls, the first one twice as wide. A decode step
    takes kernels/moe_decode.py instead (decode.py's decode_block): the same function without the
    sort, where sorting and grouping cost more than the matmuls."""

    def __init__(self, config):
        super().__init__()
        E, C, Fh = config.n_experts, config.n_embd, config.ffn_hidden
        self.act = config.expert_act
        rows = 2 * Fh if self.act == 'swiglu' else Fh  # I
        self.router = Router(config)
        # stored (out, in) like nn.Linear weights; their transposes are the column-major operands
        # grouped_mm wants. Init as GPT._init_weights: N(0, 0.02), output projection 0.02/sqrt(2L)
        self.w_in = nn.Parameter(torch.randn(E, rows, C) * 0.02)                     # (E, I, C)
        self.w_out = nn.Parameter(torch.randn(E, C, Fh) * 0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, x):
        B, T, C = x.shape
        x = x.view(-1, C)                                                    # (N, C)
        expert_idx, gates, keep, router_loss = self.router(x)
        offsets, row_src, assignment_row = moe_sort(expert_idx, keep, self.w_in.size(0))
        dtype = ava_kernels.autocast_dtype(x)                                # bf16 under autocast
        w_in = self.w_in.to(dtype).transpose(1, 2)                           # (E, C, I)
        w_out = self.w_out.to(dtype).transpose(1, 2)                         # (E, F, C)
        # grouped matmuls: rows offsets[e-1]:offsets[e] (expert e's, in order) times expert e's
        # matrix, every expert in one call; offsets (E,) int32 cumulative row counts
        h = F.grouped_mm(moe_permute(x, row_src, assignment_row), w_in, offs=offsets)  # (M, I)
        h = ffn_activation(h, self.act)                                      # (M, F)
        y = F.grouped_mm(h, w_out, offs=offsets)                             # (M, C)
        # out[t] = sum over t's kept assignments of gate * expert output (kernels/moe_permute.py)
        out = moe_unpermute(y, gates, row_src, assignment_row)               # (N, C) gates' fp32
        # back in the residual stream's dtype, the model's own (a bf16 model stays bf16)
        return out.view(B, T, C).to(self.router.weight.dtype), router_loss


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.norm2 = RMSNorm(config.n_embd)
        dense_width = config.top_k * config.ffn_hidden  # the MoE's active width
        self.ffn = MoE(config) if config.moe else MLP(config.n_embd, dense_width, config.expert_act)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.dropout(self.attn(self.norm1(x), cos, sin, mask, cache, layer))
        y, router_loss = self.ffn(self.norm2(x))
        return x + self.dropout(y), router_loss

class MTPHead(nn.Module):
    """Turns the trunk's state at t into one for predicting token t+1+i (Gloeckle et al. 2024) that
    the tied lm_head scores: norm(x + W norm(x)). One linear layer, not Gloeckle et al.'s
    transformer layer: cheap to train and to draft with, and weak enough that the trunk itself must
    carry the future tokens (the point of the extra loss). At init it copies the next-token one."""

    def __init__(self, n_embd):
        super().__init__()
        self.norm_in = RMSNorm(n_embd)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.norm_out = RMSNorm(n_embd)

    def forward(self, x):
        return self.norm_out(x + self.proj(self.norm_in(x)))


def next_token_loss(logits, targets):
    """Mean cross-entropy of logits (B, T, V) over the targets (B, T) that are not -1, in fp32 (the
    fused kernel of kernels/cross_entropy.py never makes an fp32 copy of the logits)."""
    return cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017): fewer parameters
        # head i in 1 .. n-1 predicts token t+1+i; none when off, and then no extra state_dict keys
        n_heads = config.n_future_tokens - 1
        self.mtp_heads = nn.ModuleList(MTPHead(config.n_embd) for _ in range(n_heads))
        self.mtp_losses = []  # last forward's extra-head losses (detached), for the training log
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """N(0, 0.02) everywhere (GPT-2); the projections into the residual stream get 0.02/sqrt(2L)
        so that its variance does not grow with depth."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, (Attention, MLP, MTPHead)):
            torch.nn.init.normal_(module.proj.weight, mean=0.0, std=out_std)

    def num_params(self, active=False):
        """Parameters in the model; with active=True those one token uses (K of the E experts, each
        2 C F for GELU, 3 C F for SwiGLU)."""
        total, cfg = sum(p.numel() for p in self.parameters()), self.config
        if active and cfg.moe:
            matrices = 3 if cfg.expert_act == 'swiglu' else 2
            expert = matrices * cfg.n_embd * cfg.ffn_hidden
            total -= cfg.n_layer * (cfg.n_experts - cfg.top_k) * expert
        return total

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per active weight plus attention's 12*L*C*T (PaLM, appendix
        B); the tied lm_head counts once in 6N and once more per MTP head that reuses it."""
        cfg = self.config
        weights = self.num_params(active=True) + len(self.mtp_heads) * cfg.n_embd * cfg.vocab_size
        return 6 * weights + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def routers(self):
        return [block.ffn.router for block in self.blocks if isinstance(block.ffn, MoE)]

    def router_stats(self):
        """Per MoE layer: load (E,), dropped fraction, entropy, aux and z loss of the last training
        forward, as device tensors (the caller decides when to sync)."""
        return [router.stats for router in self.routers()]

    def watch_routing(self, on=True):
        """Record the routing statistics in every forward (on=True: eval mode too, where RLHF
        trains and router_stats() then holds {'load'}), or in none (False: a training step that
        logs nothing skips them), or None: training forwards only, the default."""
        for router in self.routers():
            router.watch = on

    def expert_counts(self):
        """The (E,) assignment counts of the routers whose bias moves; a data-parallel caller sums
        them over the ranks, in place, before update_router_bias()."""
        return [router.counts for router in self.routers() if router.rate > 0]

    def update_router_bias(self):
        """Router.update_bias() for each router whose bias moves: once per optimizer step."""
        for router in self.routers():
            if router.rate > 0:
                router.update_bias()

    def trunk(self, idx, cache=None, pad=None):
        """idx (B, T) -> the last block's hidden states (B, T, C), before norm_f, and the summed
        router loss. With a KV cache (decode.py's KVCache), idx continues the cached sequence at
        cache.pos, and the cache runs each block (a decode step takes a fused path). With pad (B,),
        row b starts with pad[b] padding tokens: RoPE starts its text at 0, attention skips them."""
        B, T = idx.size()
        positions = torch.arange(T, device=idx.device) if cache is None else cache.positions(T)
        mask = None  # no cache, no padding: SDPA's causal mask
        if cache is not None or pad is not None:
            mask = attention_mask(positions, T if cache is None else cache.max_len, pad)
        if pad is not None:
            positions = (positions - pad[:, None]).clamp_min(0)                 # (B, T)
        if cache is None:
            cos, sin = rope_tables(self.config.n_embd // self.config.n_head, positions)
        else:
            cos, sin = cache.cos[positions], cache.sin[positions]  # (T, D/2) or (B, T, D/2)
        if pad is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): broadcast over heads
        x = self.wte(idx)  # (B, T, C)
        router_loss = 0.0
        for layer, block in enumerate(self.blocks):
            if cache is None:
                x, block_router_loss = block(x, cos, sin, mask)
            else:
                x, block_router_loss = cache.run(layer, block, x, cos, sin, mask)
            router_loss = router_loss + block_router_loss
        if cache is not None:
            cache.pos += T  # a device tensor: no sync
        return x, router_loss

    def mtp_logits(self, hidden):
        """Trunk states (B, T, C) -> logits (B, T, V) per extra head: entry i-1 at t scores token
        t+1+i. hidden[:, -1:] drafts the tokens after the next one."""
        return [self.lm_head(head(hidden)) for head in self.mtp_heads]

    def forward(self, idx, targets=None, cache=None, pad=None):
        """idx (B, T) -> logits (B, T, V), and with targets (-1 = ignore) the cross-entropy, which
        training adds the router losses and mtp_weight * the mean extra-head loss (eval reports the
        plain cross-entropy). self.mtp_losses gets the extra-head losses, detached; generation
        (no targets) does not run the heads. cache and pad as in trunk()."""
        x, router_loss = self.trunk(idx, cache, pad)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            self.mtp_losses = []
            return logits, None
        loss = next_token_loss(logits, targets)
        # head i's logits at t score token t+1+i = targets[:, t+i]; the last i positions have none
        mtp_losses = [next_token_loss(head_logits[:, :-i], targets[:, i:])
                      for i, head_logits in enumerate(self.mtp_logits(x), start=1)]
        self.mtp_losses = [head_loss.detach() for head_loss in mtp_losses]
        if not self.training:
            return logits, loss
        if mtp_losses:
            loss = loss + self.config.mtp_weight * sum(mtp_losses) / len(mtp_losses)
        return logits, loss + router_loss
