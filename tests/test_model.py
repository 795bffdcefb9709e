"""
model.py against trusted references: hand-derived values, float64 loops, and full recomputation.
    python -m pytest -q tests/test_model.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

import ava_kernels
from ava_kernels import sinkhorn
from decode import generate
from model import GPT, MoE, ModelConfig, Router


def tiny_config(**overrides):
    settings = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, n_experts=4,
                    top_k=2)
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.mark.parametrize('router', ['sinkhorn', 'softmax'])
def test_causality(router):
    """Changing token t never changes the logits before t (inference routing: plain top-k, no
    dropping)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(router=router)).eval()
    idx = torch.randint(0, 97, (2, 16))
    logits, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        logits_changed, _ = model(changed)
        assert torch.equal(logits[:, :t], logits_changed[:, :t])
        assert not torch.allclose(logits[:, t], logits_changed[:, t])


def test_watch_routing_records_the_eval_load():
    """After watch_routing(), an eval forward leaves each layer's load: the share of top-k
    assignments per expert of its router's logits, counted here by hand from the input the router
    saw."""
    torch.manual_seed(0)
    model = GPT(tiny_config(router='bias')).eval()
    assert model.router_stats() == [{}, {}]  # off by default: decoding records nothing
    model.watch_routing()
    router = model.blocks[1].ffn.router
    # as if trained: the load follows logits + bias
    router.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    seen = []
    router.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(torch.randint(0, 97, (2, 8)))
    chosen = (seen[0] @ router.weight.t() + router.bias).topk(2, dim=-1).indices     # (16, 2)
    by_hand = torch.bincount(chosen.flatten(), minlength=4) / chosen.numel()
    assert torch.allclose(model.router_stats()[1]['load'], by_hand)


def test_bf16_weights_without_autocast_run_in_bf16():
    """A model cast to bf16 (no autocast) keeps its residual stream in bf16 through the MoE layers,
    and its logits stay within bf16 rounding of the fp32 model's."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 8))
    half = GPT(tiny_config()).eval().to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    logits = half(idx)[0]
    assert (logits.dtype == torch.bfloat16
            and torch.allclose(logits.float(), model(idx)[0], atol=2e-2))
    assert generate(half, idx, max_new_tokens=4, temperature=0).shape == (2, 12)


def sinkhorn_float64(logits, n_iters):
    """The textbook form: P = diag(u) exp(logits) diag(v), alternately fixing row sums 1 and column
    sums N/E."""
    kernel = logits.double().exp()
    N, E = kernel.shape
    u, v = torch.ones(N, dtype=torch.float64), torch.ones(E, dtype=torch.float64)
    for _ in range(n_iters):
        u = 1.0 / (kernel @ v)
        v = (N / E) / (kernel.t() @ u)
    return u[:, None] * kernel * v[None, :]


def test_sinkhorn_is_near_doubly_stochastic_and_spreads_tokens():
    torch.manual_seed(0)
    N, E = 4096, 8
    logits = torch.randn(N, E)
    logits[:, 0] += 3.0  # every token prefers expert 0
    balanced = sinkhorn(logits, n_iters=8)
    torch.testing.assert_close(balanced.double(), sinkhorn_float64(logits, 8), rtol=1e-4, atol=1e-6)
    # columns exact
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((E,), N / E), rtol=1e-4, atol=0)
    # rows close to 1
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(N), rtol=0.05, atol=0)
    plain = torch.bincount(logits.argmax(dim=1), minlength=E).float()
    even = torch.bincount(balanced.argmax(dim=1), minlength=E).float()
    assert plain.max() / plain.mean() > 4      # plain routing piles onto expert 0 ...
    assert even.max() / even.mean() < 1.1      # ... the balanced matrix spreads the tokens evenly


def test_sinkhorn_router_balances_training_load():
    torch.manual_seed(0)
    router = Router(tiny_config(n_experts=8, top_k=2)).train()
    # logits that vary across tokens (std ~1.7), as after training
    router.weight.data = torch.randn(8, 32) * 0.3
    # tokens with a positive mean (below) now all favour expert 0: logit +3.2
    router.weight.data[0] += 0.1
    x = torch.randn(4096, 32) + 1.0
    router(x)
    load = router.stats['load']
    assert load.max() / load.mean() < 1.1
    # inference routing is plain top-k: the favourite is overloaded again
    picked = router.eval()(x)[0]
    assert (picked == 0).float().mean() > 1.5 / 8


def test_sinkhorn_bias_evens_the_hard_load():
    """Small logits (std ~0.3, as early in training): the soft matrix is balanced, its hard top-2 is
    not (max/mean 1.09). sinkhorn_bias_rate moves a bias, once per update_bias(), until every expert
    is within 5% of its share; inference (plain top-k) ignores it. Without a rate there is no bias
    to save (checkpoints keep their keys)."""
    torch.manual_seed(0)
    weight, x = torch.randn(8, 32) * 0.05, torch.randn(4096, 32)
    loads = {}
    for rate in (0.0, 0.01):
        router = Router(tiny_config(n_experts=8, top_k=2, sinkhorn_bias_rate=rate)).train()
        router.weight.data = weight.clone()
        loads[rate] = []
        for _ in range(100):
            router(x)
            if rate:
                router.update_bias()
            loads[rate].append((router.stats['load'].max() / router.stats['load'].mean()).item())
        assert ('bias' in router.state_dict()) == (rate > 0) and 'counts' not in router.state_dict()
    assert min(loads[0.0]) > 1.08 and max(loads[0.01][-50:]) < 1.05
    assert router.bias.abs().sum() > 0
    assert torch.equal(router.eval()(x)[0], (x @ weight.t()).topk(2, dim=-1).indices)


def test_bias_router_hand_computed_step():
    """Aux-loss-free balancing, one step by hand: 4 tokens all prefer expert 0 (top-1 over 3
    experts), so the load is (1, 0, 0) and the bias moves by rate * sign(1/3 - load) = (-1, +1, +1)
    at rate 1. The bias only picks experts: the gates stay the unbiased probabilities (top-1: 1),
    and the loss is the z-loss alone."""
    rows = [[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.5], [2.0, 0.5, 1.0]]
    router = Router(tiny_config(n_embd=4, n_head=1, n_experts=3, top_k=1, router='bias',
                                bias_update_rate=1.0))
    # x = identity: the logits are exactly `rows`
    router.weight.data = torch.tensor(rows).t().contiguous()
    x = torch.eye(4)
    expert_idx, gates, _, loss = router.train()(x)
    assert expert_idx.flatten().tolist() == [0, 0, 0, 0] and torch.equal(gates, torch.ones(4, 1))
    assert torch.equal(router.bias, torch.zeros(3))  # the forward only counts
    router.update_bias()
    assert torch.equal(router.bias, torch.tensor([-1.0, 1.0, 1.0])) and not router.counts.any()
    torch.testing.assert_close(loss, 0.001 * torch.logsumexp(torch.tensor(rows), -1).pow(2).mean())
    # logits + bias now: (1, 2, 1), (1, 1, 2), (1, 2, 1.5), (1, 1.5, 2);
    # inference routes by them too
    assert router.eval()(x)[0].flatten().tolist() == [1, 2, 1, 2]


def test_bias_router_balances_hard_load_over_steps():
    """On the skewed tokens of the Sinkhorn test, the bias walks the hard top-2 load from 2.6x the
    mean to within 5% of even over 500 training steps."""
    torch.manual_seed(0)
    router = Router(tiny_config(n_experts=8, top_k=2, router='bias', bias_update_rate=0.01)).train()
    router.weight.data = torch.randn(8, 32) * 0.3
    router.weight.data[0] += 0.1
    x = torch.randn(4096, 32) + 1.0
    router(x)
    first = router.stats['load']
    for _ in range(500):
        router.update_bias()
        router(x)
    load = router.stats['load']
    assert first.max() / first.mean() > 2.5 and load.max() / load.mean() < 1.05


@pytest.mark.parametrize('router',
                         [dict(router='bias'), dict(router='sinkhorn', sinkhorn_bias_rate=0.01)])
def test_router_bias_moves_once_per_optimizer_step(router):
    """Two micro-steps (training forwards) leave the bias alone and add up their assignments in
    counts; one update_router_bias() then moves it by rate * sign(1/E - load) of the load summed
    over both, by hand here from the experts each router chose, and starts a fresh count. Eval
    forwards count nothing."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**router)).train()
    routers = [block.ffn.router for block in model.blocks]
    chosen = {id(r): [] for r in routers}
    for r in routers:
        r.register_forward_hook(lambda module, args, out: chosen[id(module)].append(out[0]))
    for _ in range(2):
        model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))[1].backward()
    model.eval()(torch.randint(0, 97, (2, 8)))
    assert all(not r.bias.any() for r in routers)
    counts, expected = model.expert_counts(), []
    assert len(counts) == 2
    for r, count in zip(routers, counts):
        by_hand = torch.bincount(torch.cat(chosen[id(r)][:2]).flatten(), minlength=4).float()
        assert torch.equal(count, by_hand) and count.sum() == 2 * 16 * 2
        expected.append(0.01 * torch.sign(1 / 4 - by_hand / by_hand.sum()))
    model.update_router_bias()
    for r, bias in zip(routers, expected):
        assert torch.equal(r.bias, bias) and not r.counts.any()
    assert GPT(tiny_config(router='softmax')).expert_counts() == []


def test_sinkhorn_bias_is_saved_with_the_weights():
    """With sinkhorn_bias_rate > 0 the bias is part of the model's state: it survives
    state_dict/load_state_dict (resume continues from it); the counts are not saved."""
    cfg = tiny_config(sinkhorn_bias_rate=0.01)
    model = GPT(cfg)
    model.blocks[1].ffn.router.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    state = model.state_dict()
    assert 'blocks.1.ffn.router.bias' in state and not any(k.endswith('counts') for k in state)
    restored = GPT(cfg)
    restored.load_state_dict(state)
    assert torch.equal(restored.blocks[1].ffn.router.bias, torch.tensor([0.3, -0.2, 0.0, 0.1]))


def router_with_logits(rows, **overrides):
    """A softmax router whose logits are exactly `rows` (x = one-hot rows of the identity,
    W = rows^T)."""
    logits = torch.tensor(rows, dtype=torch.float32)
    N, E = logits.shape
    router = Router(tiny_config(n_embd=N, n_head=1, n_experts=E, router='softmax', **overrides))
    router.weight.data = logits.t().contiguous()
    return router, torch.eye(N)


def test_aux_and_z_loss_hand_computed():
    """logits [ln3, 0] for tokens 0, 1, 3 and [0, ln3] for token 2 give probabilities
    (.75, .25) / (.25, .75). Top-1: f = (3/4, 1/4); mean probabilities P = (.625, .375);
    aux = E * sum f*P = 2 * (.46875 + .09375) = 1.125. Every row has logsumexp = ln 4, so
    z = (ln 4)^2."""
    l3 = math.log(3)
    router, x = router_with_logits([[l3, 0], [l3, 0], [0, l3], [l3, 0]], top_k=1, aux_loss_coef=1.0,
                                   z_loss_coef=1.0)
    expert_idx, gates, keep, loss = router(x)
    assert expert_idx.flatten().tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(router.stats['aux_loss'], torch.tensor(1.125))
    torch.testing.assert_close(router.stats['z_loss'], torch.tensor(math.log(4) ** 2))
    torch.testing.assert_close(loss, torch.tensor(1.125 + math.log(4) ** 2))
    torch.testing.assert_close(gates, torch.ones(4, 1))


def test_capacity_drops_exactly_the_overflow():
    """6 tokens, 2 experts, capacity factor 1 -> capacity ceil(6*1/2) = 3 per expert (top-1). Five
    tokens want expert 0: the first three (in token order) get it, tokens 3 and 4 are dropped, token
    5 goes to expert 1."""
    rows = [[1.0, 0.0]] * 5 + [[0.0, 1.0]]
    router, x = router_with_logits(rows, top_k=1, capacity_factor=1.0)
    _, _, keep, _ = router.train()(x)
    assert keep.flatten().tolist() == [True, True, True, False, False, True]
    torch.testing.assert_close(router.stats['dropped'], torch.tensor(2 / 6))
    # top-2 over 4 experts, capacity ceil(1.0 * 4*2/4) = 2. First choices queue before second
    # choices: expert 0 gets t0, t1 (firsts), then t3 (first, dropped), t2 (second, dropped);
    # expert 1 gets t2 (first), t0 (second), then t1 (second, dropped); expert 2 gets t3 (second).
    rows = [[2.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0]]
    router, x = router_with_logits(rows, top_k=2, capacity_factor=1.0)
    expert_idx, _, keep, _ = router.train()(x)
    assert expert_idx.tolist() == [[0, 1], [0, 1], [1, 0], [0, 2]]
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, True]]
    assert not router.eval()(x)[2].logical_not().any()  # inference never drops


def expert_loop_reference(moe, x):
    """The slow, obvious MoE: for every token, for each of its kept experts, gate * expert(token),
    in float64. A GELU expert is w_out gelu(w_in x); a SwiGLU one W2 (silu(W1 x) * W3 x),
    W1 = w_in[:F], W3 = w_in[F:]."""
    expert_idx, gates, keep, _ = moe.router(x)
    out = torch.zeros_like(x, dtype=torch.float64)
    Fh = moe.w_out.size(2)
    for n in range(x.size(0)):
        for k in range(expert_idx.size(1)):
            if keep[n, k]:
                e, token = expert_idx[n, k], x[n].double()
                if moe.act == 'swiglu':
                    w1, w3 = moe.w_in[e, :Fh].double(), moe.w_in[e, Fh:].double()
                    hidden = F.silu(token @ w1.t()) * (token @ w3.t())
                else:
                    hidden = F.gelu(token @ moe.w_in[e].double().t())
                out[n] += gates[n, k].double() * (hidden @ moe.w_out[e].double().t())
    return out


@pytest.mark.parametrize('router,capacity,act', [('sinkhorn', 0.0, 'gelu'),
                                                 ('softmax', 0.0, 'gelu'),
                                                 ('softmax', 1.0, 'gelu'),
                                                 ('sinkhorn', 0.0, 'swiglu'),
                                                 ('softmax', 1.0, 'swiglu')])
def test_grouped_experts_equal_per_expert_loop(router, capacity, act):
    """Forward and backward of the sorted, grouped-matmul path equal a per-token loop (float64)."""
    torch.manual_seed(0)
    cfg = tiny_config(router=router, capacity_factor=capacity, n_experts=4, top_k=2, ffn_hidden=48,
                      expert_act=act)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 20, 32, requires_grad=True)
    if capacity:
        moe.router.weight.data[1] += 1.0  # overload expert 1 so that some assignments are dropped
    out, _ = moe.train()(x)
    if capacity:
        assert moe.router.stats['dropped'] > 0
    reference = expert_loop_reference(moe, x.view(-1, 32)).view(2, 20, 32)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    params = [x, moe.w_in, moe.w_out, moe.router.weight]
    grads = torch.autograd.grad(out, params, grad)
    grads_ref = torch.autograd.grad(reference, params, grad.double())
    # SwiGLU's hidden layer multiplies two projections: its gradients are ~3x GELU's here, and so is
    # fp32's rounding of the entries that cancel to near zero
    atol = 1e-5 if act == 'swiglu' else 1e-6
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize('act,matrices', [('gelu', 2), ('swiglu', 3)])
def test_dense_twin_has_the_moe_active_parameter_count(act, matrices):
    """moe=False swaps every MoE for a dense FFN of width top_k*F: parameters = the MoE's active
    ones minus the routers (n_layer * E * C), which the dense model does not need."""
    cfg = tiny_config(n_experts=8, top_k=2, expert_act=act)
    moe, dense = GPT(cfg), GPT(tiny_config(n_experts=8, top_k=2, moe=False, expert_act=act))
    router_params = cfg.n_layer * cfg.n_experts * cfg.n_embd
    assert dense.num_params() == moe.num_params(active=True) - router_params
    expert = matrices * cfg.n_embd * cfg.ffn_hidden
    assert moe.num_params() - moe.num_params(active=True) == cfg.n_layer * (8 - 2) * expert


def test_swiglu_parameters_by_hand():
    """SwiGLU experts: w_in (E, 2F, C) = [W1; W3], w_out (E, C, F) = W2, under the GELU model's
    state_dict keys. Counted by hand: embeddings V*C, norm_f C; per layer 2 norms 2C, attention
    4C^2, router E*C, experts 3*E*C*F; a token uses K of the E experts, and the FLOPs follow the
    active count."""
    cfg = tiny_config(expert_act='swiglu', ffn_hidden=40, n_experts=4, top_k=2)
    C, V, L, E, K, Fh, T = cfg.n_embd, cfg.vocab_size, cfg.n_layer, 4, 2, 40, 16
    model, gelu = GPT(cfg), GPT(tiny_config(ffn_hidden=40))
    assert (model.blocks[0].ffn.w_in.shape == (E, 2 * Fh, C)
            and model.blocks[0].ffn.w_out.shape == (E, C, Fh))
    assert list(model.state_dict()) == list(gelu.state_dict())
    total = V * C + C + L * (2 * C + 4 * C * C + E * C + 3 * E * C * Fh)
    active = V * C + C + L * (2 * C + 4 * C * C + E * C + 3 * K * C * Fh)
    assert model.num_params() == total and model.num_params(active=True) == active
    assert model.flops_per_token(T) == 6 * active + 12 * L * C * T


def test_dense_swiglu_equals_the_formula():
    """The dense twin's SwiGLU: fc (2*K*F, C) holds [W1; W3], proj (C, K*F) is W2, and
    y = W2 (silu(W1 x) * W3 x), here in float64 from the weights' rows; the router loss is zero."""
    torch.manual_seed(0)
    cfg = tiny_config(moe=False, expert_act='swiglu', ffn_hidden=24)
    mlp = GPT(cfg).blocks[0].ffn
    width = cfg.top_k * 24
    assert mlp.fc.weight.shape == (2 * width, 32) and mlp.proj.weight.shape == (32, width)
    x = torch.randn(3, 5, 32)
    y, loss = mlp(x)
    w1, w3, w2 = (mlp.fc.weight[:width].double(), mlp.fc.weight[width:].double(),
                  mlp.proj.weight.double())
    expected = (F.silu(x.double() @ w1.t()) * (x.double() @ w3.t())) @ w2.t()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-7)
    assert loss.item() == 0


@pytest.mark.parametrize('moe', [True, False])
def test_swiglu_gpt_trains(moe):
    """A SwiGLU GPT (experts or the dense twin) fits a tiny repeated batch: the loss falls under
    AdamW."""
    torch.manual_seed(0)
    model = GPT(tiny_config(expert_act='swiglu', ffn_hidden=48, moe=moe)).train()
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize('bad,message', [
    (dict(top_k=5), 'top_k'), (dict(router='expert_choice'), 'router'),
    (dict(n_head=3), 'divisible'),
    (dict(router='sinkhorn', capacity_factor=1.25), 'softmax router only'),
    (dict(n_future_tokens=0), 'n_future_tokens'), (dict(mtp_weight=-0.1), 'mtp_weight'),
    (dict(expert_act='relu'), "expert_act must be 'gelu' or 'swiglu', not 'relu'"),
])
def test_config_rejects_impossible_combinations(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


def counting_sequences(batch, length, vocab):
    """Rows start at a random token and count up mod vocab, so token t fixes every later token."""
    start = torch.randint(0, vocab, (batch, 1))
    seq = (start + torch.arange(length + 1)) % vocab  # (B, T+1)
    return seq[:, :-1], seq[:, 1:]


def mtp_accuracy(model, idx, targets):
    """Per extra head i: fraction of positions t whose argmax is token t+1+i."""
    with torch.no_grad():
        hidden, _ = model.trunk(idx)
        return [(head_logits[:, :-i].argmax(dim=-1) == targets[:, i:]).float().mean().item()
                for i, head_logits in enumerate(model.mtp_logits(hidden), start=1)]


def test_mtp_heads_learn_a_predictable_sequence():
    """On counting sequences tokens t+2 and t+3 are as predictable as t+1: trained heads get them
    right, untrained ones are at chance (1/32)."""
    torch.manual_seed(0)
    V = 32
    model = GPT(tiny_config(vocab_size=V, block_size=16, n_layer=1, n_future_tokens=3))
    test_idx, test_targets = counting_sequences(64, 16, V)
    assert max(mtp_accuracy(model.eval(), test_idx, test_targets)) < 0.2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        _, loss = model(*counting_sequences(32, 16, V))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = mtp_accuracy(model.eval(), test_idx, test_targets)
    assert len(accuracy) == 2 and min(accuracy) > 0.9, accuracy


def test_mtp_losses_equal_a_per_position_loop():
    """Head i's loss is the mean over positions t with a target t+i (not -1) of
    -log p(targets[t+i]); the training loss adds the router losses and mtp_weight * their mean; eval
    returns the plain cross-entropy; generation never runs the heads."""
    torch.manual_seed(0)
    cfg = tiny_config(router='softmax', n_future_tokens=3, mtp_weight=0.5)
    model = GPT(cfg).train()
    B, T, V = 2, 12, cfg.vocab_size
    idx, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    targets[0, 7] = targets[1, 2] = -1
    logits, loss = model(idx, targets)
    with torch.no_grad():
        head_logits = model.mtp_logits(model.trunk(idx)[0])
    assert len(model.mtp_losses) == 2
    for i in (1, 2):
        terms = [-head_logits[i - 1][b, t].log_softmax(dim=-1)[targets[b, t + i]]
                 for b in range(B) for t in range(T - i) if targets[b, t + i] != -1]
        torch.testing.assert_close(model.mtp_losses[i - 1], torch.stack(terms).mean())
    ce = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
    router = sum(cfg.aux_loss_coef * s['aux_loss'] + cfg.z_loss_coef * s['z_loss']
                 for s in model.router_stats())
    mtp = sum(model.mtp_losses) / 2
    torch.testing.assert_close(loss, ce + router + 0.5 * mtp)
    _, eval_loss = model.eval()(idx, targets)
    torch.testing.assert_close(eval_loss, ce)
    assert len(model.mtp_losses) == 2
    calls = []
    model.mtp_heads[0].register_forward_hook(lambda *args: calls.append(1))
    generate(model, idx[:, :4], max_new_tokens=3, temperature=0)
    assert calls == [] and model.mtp_losses == []


def test_mtp_off_leaves_the_model_unchanged():
    """n_future_tokens=1 adds no state_dict keys and no parameters; each extra head costs C^2 + 2C
    parameters and the lm_head's FLOPs once more, and leaves the next-token logits alone."""
    cfg = tiny_config()
    C, V, L, E, Fh = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.n_experts, cfg.ffn_hidden
    off, on = GPT(cfg), GPT(tiny_config(n_future_tokens=3))
    block_keys = ['norm1.weight', 'attn.qkv.weight', 'attn.proj.weight', 'norm2.weight',
                  'ffn.router.weight', 'ffn.w_in', 'ffn.w_out']
    keys = ({'wte.weight', 'lm_head.weight', 'norm_f.weight'}
            | {f'blocks.{l}.{k}' for l in range(L) for k in block_keys})
    assert set(off.state_dict()) == keys
    assert off.num_params() == V * C + C + L * (2 * C + 4 * C * C + E * C + 2 * E * C * Fh)
    head_keys = {f'mtp_heads.{h}.{k}' for h in range(2)
                 for k in ('norm_in.weight', 'proj.weight', 'norm_out.weight')}
    assert set(on.state_dict()) == keys | head_keys
    assert on.num_params(active=True) - off.num_params(active=True) == 2 * (C * C + 2 * C)
    assert on.flops_per_token(16) - off.flops_per_token(16) == 6 * 2 * (C * C + 2 * C + C * V)
    # a checkpoint without MTP: only the heads are new
    loaded = on.load_state_dict(off.state_dict(), strict=False)
    assert set(loaded.missing_keys) == head_keys and not loaded.unexpected_keys
    idx = torch.randint(0, V, (2, 8))
    assert torch.equal(off.eval()(idx)[0], on.eval()(idx)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('router,capacity,act', [('sinkhorn', 0.0, 'gelu'),
                                                 ('softmax', 1.25, 'gelu'),
                                                 ('sinkhorn', 0.0, 'swiglu'),
                                                 ('softmax', 1.25, 'swiglu')])
def test_grouped_experts_cuda_bf16(router, capacity, act):
    """The CUDA path (grouped GEMM in bf16 under autocast) against the float64 loop: bf16-level
    agreement."""
    torch.manual_seed(0)
    cfg = tiny_config(router=router, capacity_factor=capacity, n_experts=8, top_k=2, n_embd=64,
                      ffn_hidden=128, expert_act=act)
    moe = MoE(cfg).cuda().train()
    x = torch.randn(4, 100, 64, device='cuda', requires_grad=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out, _ = moe(x)
    reference = expert_loop_reference(moe, x.view(-1, 64)).view(4, 100, 64)
    error = (out.double() - reference).norm() / reference.norm()
    assert error < 1e-2, error
    grad = torch.randn(out.shape, device='cuda')
    grads = torch.autograd.grad(out.float(), [x, moe.w_in], grad)
    grads_ref = torch.autograd.grad(reference, [x, moe.w_in], grad.double())
    for g, g_ref in zip(grads, grads_ref):
        assert (g.double() - g_ref).norm() / g_ref.norm() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('autocast,tol', [(False, 1e-4), (True, 2e-2)])
@pytest.mark.parametrize('router', [dict(router='sinkhorn'),
                                    dict(router='softmax', capacity_factor=1.25),
                                    dict(router='sinkhorn', expert_act='swiglu')])
def test_cuda_kernels_train_like_their_twins(router, autocast, tol):
    """The whole model, CUDA kernels against their PyTorch twins: the same loss and gradients (fp32:
    to rounding; bf16: the tolerance of bf16 activations)."""
    assert ava_kernels.build() is True
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, n_head=4, block_size=64, n_experts=4, n_future_tokens=2,
                            **router)).cuda()
    idx, targets = (torch.randint(64, (4, 64), device='cuda'),
                    torch.randint(64, (4, 64), device='cuda'))
    results = []
    for enabled in (True, False):
        ava_kernels.enabled = enabled
        model.zero_grad()
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(idx, targets)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    ava_kernels.enabled = True
    for fast, ref in zip(*results):
        assert ((fast - ref).norm() / ref.norm()).item() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('act', ['gelu', 'swiglu'])
def test_compiled_moe_equals_eager_cuda(act):
    """torch.compile of an MoE layer (bf16 autocast: the grouped GEMM, the permute kernels, the
    activation between them) gives eager's output and gradients, to bf16 rounding."""
    torch.manual_seed(0)
    moe = MoE(tiny_config(n_experts=8, n_embd=64, ffn_hidden=128, expert_act=act)).cuda().train()
    x = torch.randn(4, 100, 64, device='cuda')
    results = []
    for fn in (moe, torch.compile(moe, fullgraph=True)):
        x_in = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out, _ = fn(x_in)
        grads = torch.autograd.grad(out.float().square().sum(), [x_in, moe.w_in, moe.w_out])
        results.append([out.float()] + list(grads))
    for got, want in zip(*results):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
