"""The decode block's second half (residual add, norm, MoE, residual add): the _ref twin against a
float64 loop over each token's experts and a Block's fused decode step (decode.py) against its
forward (CPU), and the CUDA kernels against the float64 loop (GPU only)."""

import pytest
import torch
import torch.nn.functional as F

import ava_kernels
from kernel_utils import built, cuda, poison, rel_err
from ava_kernels.moe_decode import moe_decode, moe_decode_ref
from decode import KVCache, decodes
from model import Block, ModelConfig, attention_mask, rope_tables


def loop_float64(x, attn, norm_w, eps, router_w, bias, w_in, w_out, K, act):
    """Token by token: r = x + attn, its RMSNorm, logits, the K best of logits + bias (one at a
    time), gates = the chosen probabilities renormalised, then r + each chosen expert's output, in
    float64, with r and the normed row rounded to x's dtype as the block stores them (in bf16 the
    rounding can flip a near-tie in the choice)."""
    stored = lambda t: t.to(x.dtype).double()  # noqa: E731
    Fh, out = w_out.size(2), stored(x.double() + attn.double())
    norm_w, router_w, w_in, w_out = (norm_w.double(), router_w.double(), w_in.double(),
                                     w_out.double())
    for n in range(x.size(0)):
        xn = stored(out[n] / out[n].pow(2).mean().add(eps).sqrt() * norm_w)
        logits = router_w @ xn                                                 # (E,)
        scores = (logits + (0 if bias is None else bias.double())).tolist()
        chosen = []
        for _ in range(K):
            chosen.append(max((e for e in range(len(scores)) if e not in chosen),
                              key=lambda e: scores[e]))
        probs = logits.softmax(0)[chosen]
        moe = torch.zeros_like(xn)
        for gate, e in zip(probs / probs.sum(), chosen):
            h = w_in[e] @ xn
            h = F.silu(h[:Fh]) * h[Fh:] if act == 'swiglu' else F.gelu(h)
            moe += gate * (w_out[e] @ h)
        out[n] += moe
    return out


def make(N, C, E, Fh, act, bias, dtype=torch.float32, weight_dtype=torch.float32, device='cpu',
         offset=0):
    """Inputs at the scale of a trained layer: x and attn of unit rows, a norm weight near 1,
    weights ~N(0, 1/fan_in). offset shifts x by that many elements from a 16-byte boundary."""
    gen = torch.Generator().manual_seed(N * 1000 + C + E)
    rows = 2 * Fh if act == 'swiglu' else Fh
    x = torch.randn(N * C + offset, generator=gen)[offset:].view(N, C)
    attn = torch.randn(N, C, generator=gen)
    norm_w = 1 + 0.1 * torch.randn(C, generator=gen)
    router_w = torch.randn(E, C, generator=gen) / C ** 0.5
    w_in = torch.randn(E, rows, C, generator=gen) / C ** 0.5
    w_out = torch.randn(E, C, Fh, generator=gen) / Fh ** 0.5
    b = torch.randn(E, generator=gen) if bias else None
    to = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (to(x, dtype), to(attn, dtype), to(norm_w, weight_dtype), 1e-6,
            to(router_w, weight_dtype), to(b, torch.float32), to(w_in, weight_dtype),
            to(w_out, weight_dtype))


def cpu(args):
    return [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize('act', ['gelu', 'swiglu'])
@pytest.mark.parametrize('N,K,E,bias', [(1, 2, 4, False), (5, 1, 3, True), (7, 3, 5, False),
                                        (4, 2, 8, True)])
def test_ref_matches_loop(N, K, E, bias, act):
    args = make(N, 12, E, 10, act, bias)
    out = moe_decode_ref(*args, K, act)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), loop_float64(*args, K, act), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('router,act', [('sinkhorn', 'gelu'), ('softmax', 'swiglu'),
                                        ('bias', 'gelu')])
def test_block_decode_equals_forward(router, act):
    """A Block's decode step through the KV cache (KVCache.run: decode_block, the fused path)
    against the same block's forward through the sort and grouped GEMMs, which watch_routing forces
    (it records statistics), each with a fresh KV cache."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_embd=32, n_head=4, n_experts=4, top_k=2, ffn_hidden=48, router=router,
                      expert_act=act)
    block = Block(cfg).eval()
    if router == 'bias':
        block.ffn.router.bias.copy_(torch.tensor([0.5, -0.3, 0.0, 0.2]))
    x = torch.randn(2, 7, 32)
    positions = torch.arange(7)
    cos, sin = rope_tables(8, positions)
    mask = attention_mask(positions, 16)
    outs, moe_calls = [], []
    block.ffn.register_forward_hook(lambda *args: moe_calls.append(1))
    with torch.no_grad():
        for watch in (None, True):
            block.ffn.router.watch = watch
            assert decodes(block, x) == (watch is None)
            cache = KVCache(cfg, 2, 16, 'cpu', torch.float32)
            outs.append(cache.run(0, block, x, cos, sin, mask)[0])
            assert len(moe_calls) == (watch is not None)  # the fused path skips MoE.forward
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize('act', ['gelu', 'swiglu'])
@pytest.mark.parametrize('dtype,weight_dtype,tol', [(torch.float32, torch.float32, 1e-5),
                                                    (torch.bfloat16, torch.bfloat16, 1e-2),
                                                    (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize('N,K,E,C,Fh,offset,bias', [
    (1, 2, 8, 512, 2048, 0, False),   # a decode step of config/small.py
    (32, 2, 8, 512, 2048, 0, True),   # batch 32: every expert busy
    (64, 1, 64, 64, 32, 0, False),    # the limits: 64 assignments, 64 experts
    (20, 2, 2, 96, 64, 0, True),      # 20 tokens an expert: three tiles of 8 positions
    (6, 2, 4, 64, 48, 0, False),      # F not a multiple of 32: bf16 on the CUDA cores
    (3, 3, 5, 13, 7, 0, True),        # odd sizes: the scalar path
    (9, 2, 4, 40, 24, 1, False),      # x off a 16-byte boundary: the scalar route
    (0, 2, 4, 16, 8, 0, False),       # no tokens
])
def test_cuda_matches_loop(N, K, E, C, Fh, offset, bias, act, dtype, weight_dtype, tol):
    built()
    args = make(N, C, E, Fh, act, bias, dtype, weight_dtype, 'cuda', offset)
    ref = loop_float64(*cpu(args), K, act)
    poison()
    out = moe_decode(*args, K, act)
    assert out.dtype == dtype and out.shape == (N, C)
    assert rel_err(out.cpu(), ref) < tol


@cuda
def test_cuda_autocast_fp32_stream():
    """An fp32 model under bf16 autocast: the residual stream stays fp32, the norm and the experts
    run in bf16, the attention's output comes in bf16; the kernels equal the twin."""
    built()
    x, attn, norm_w, eps, router_w, b, w_in, w_out = make(5, 64, 4, 96, 'gelu', False,
                                                          device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = moe_decode(x, attn.bfloat16(), norm_w, eps, router_w, b, w_in, w_out, 2, 'gelu')
        ava_kernels.enabled = False
        ref = moe_decode(x, attn.bfloat16(), norm_w, eps, router_w, b, w_in, w_out, 2, 'gelu')
        ava_kernels.enabled = True
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-2


@cuda
def test_cuda_opcheck_compile_and_graph():
    built()
    x, *weights = make(6, 64, 8, 128, 'swiglu', True, torch.bfloat16, torch.bfloat16, 'cuda')
    torch.library.opcheck(torch.ops.ava.moe_decode.default, (x, *weights, 2, True, torch.bfloat16))
    eager = moe_decode(x, *weights, 2, 'swiglu')
    compiled = torch.compile(lambda x: moe_decode(x, *weights, 2, 'swiglu'), fullgraph=True)
    assert torch.equal(compiled(x), eager)
    graph, captured_x = torch.cuda.CUDAGraph(), x.clone()
    moe_decode(captured_x, *weights, 2, 'swiglu')  # warm-up off the graph
    with torch.cuda.graph(graph):
        captured = moe_decode(captured_x, *weights, 2, 'swiglu')
    new_x = torch.randn_like(x)
    captured_x.copy_(new_x)
    graph.replay()  # the routing of new inputs, not of the captured ones
    assert torch.equal(captured, moe_decode(new_x, *weights, 2, 'swiglu'))
