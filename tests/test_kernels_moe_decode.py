"""The decode MoE: the _ref twin against a float64 loop over each token's experts and against the model's
training path (CPU), and the CUDA kernels against the float64 loop (GPU only)."""

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import built, cuda, poison, rel_err
from kernels.moe_decode import moe_decode, moe_decode_ref
from model import MoE, ModelConfig


def loop_float64(x, router_w, bias, w_in, w_out, K, act):
    """Token by token: logits, the K best of logits + bias (one at a time), gates = the chosen
    probabilities renormalised, then each chosen expert's output, in float64."""
    x, router_w, w_in, w_out = x.double(), router_w.double(), w_in.double(), w_out.double()
    Fh, out = w_out.size(2), torch.zeros(x.size(0), w_out.size(1), dtype=torch.float64)
    for n in range(x.size(0)):
        logits = router_w @ x[n]                                               # (E,)
        scores = (logits + (0 if bias is None else bias.double())).tolist()
        chosen = []
        for _ in range(K):
            chosen.append(max((e for e in range(len(scores)) if e not in chosen), key=lambda e: scores[e]))
        probs = logits.softmax(0)[chosen]
        for gate, e in zip(probs / probs.sum(), chosen):
            h = w_in[e] @ x[n]
            h = F.silu(h[:Fh]) * h[Fh:] if act == 'swiglu' else F.gelu(h)
            out[n] += gate * (w_out[e] @ h)
    return out


def make(N, C, E, Fh, act, bias, dtype=torch.float32, weight_dtype=torch.float32, device='cpu', offset=0):
    """Inputs at the scale of a trained layer: x of unit rows, weights ~N(0, 1/fan_in). offset shifts x by that
    many elements from a 16-byte boundary."""
    gen = torch.Generator().manual_seed(N * 1000 + C + E)
    rows = 2 * Fh if act == 'swiglu' else Fh
    x = torch.randn(N * C + offset, generator=gen)[offset:].view(N, C)
    router_w = torch.randn(E, C, generator=gen) / C ** 0.5
    w_in = torch.randn(E, rows, C, generator=gen) / C ** 0.5
    w_out = torch.randn(E, C, Fh, generator=gen) / Fh ** 0.5
    b = torch.randn(E, generator=gen) if bias else None
    to = lambda t, d: None if t is None else t.to(device=device, dtype=d)  # noqa: E731
    return (to(x, dtype), to(router_w, weight_dtype), to(b, torch.float32), to(w_in, weight_dtype),
            to(w_out, weight_dtype))


@pytest.mark.parametrize('act', ['gelu', 'swiglu'])
@pytest.mark.parametrize('N,K,E,bias', [(1, 2, 4, False), (5, 1, 3, True), (7, 3, 5, False), (4, 2, 8, True)])
def test_ref_matches_loop(N, K, E, bias, act):
    x, router_w, b, w_in, w_out = make(N, 12, E, 10, act, bias)
    out = moe_decode_ref(x, router_w, b, w_in, w_out, K, act)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), loop_float64(x, router_w, b, w_in, w_out, K, act), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize('router,act', [('sinkhorn', 'gelu'), ('softmax', 'swiglu'), ('bias', 'gelu')])
def test_decode_path_equals_the_training_path(router, act):
    """MoE.forward at inference for a few tokens (the decode path) against the same layer's sort + grouped path,
    which watch_routing forces (it records statistics)."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig(n_embd=32, n_experts=4, top_k=2, ffn_hidden=48, router=router, expert_act=act)).eval()
    if router == 'bias':
        moe.router.bias.copy_(torch.tensor([0.5, -0.3, 0.0, 0.2]))
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        decoded, _ = moe(x)
        moe.router.watch = True
        grouped, _ = moe(x)
    torch.testing.assert_close(decoded, grouped, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize('act', ['gelu', 'swiglu'])
@pytest.mark.parametrize('dtype,weight_dtype,tol', [(torch.float32, torch.float32, 1e-5),
                                                    (torch.bfloat16, torch.bfloat16, 1e-2),
                                                    (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize('N,K,E,C,Fh,offset,bias', [
    (1, 2, 8, 512, 2048, 0, False),   # a decode step of config/small.py
    (32, 2, 8, 512, 2048, 0, True),   # batch 32: every expert busy
    (64, 1, 64, 64, 32, 0, False),    # the limits: 64 assignments, 64 experts
    (3, 3, 5, 13, 7, 0, True),        # odd sizes: the scalar path
    (9, 2, 4, 40, 24, 1, False),      # x off a 16-byte boundary: the scalar up-projection
    (0, 2, 4, 16, 8, 0, False),       # no tokens
])
def test_cuda_matches_loop(N, K, E, C, Fh, offset, bias, act, dtype, weight_dtype, tol):
    built()
    args = make(N, C, E, Fh, act, bias, dtype, weight_dtype, 'cuda', offset)
    ref = loop_float64(*[None if a is None else a.cpu() for a in args], K, act)
    poison()
    out = moe_decode(*args, K, act)
    assert out.dtype == weight_dtype and out.shape == (N, C)
    assert rel_err(out.cpu(), ref) < tol


@cuda
def test_cuda_opcheck_compile_and_graph():
    built()
    x, router_w, b, w_in, w_out = make(6, 64, 8, 128, 'swiglu', True, torch.bfloat16, torch.bfloat16, 'cuda')
    torch.library.opcheck(torch.ops.ava.moe_decode.default, (x, router_w, b, w_in, w_out, 2, True))
    eager = moe_decode(x, router_w, b, w_in, w_out, 2, 'swiglu')
    compiled = torch.compile(lambda x: moe_decode(x, router_w, b, w_in, w_out, 2, 'swiglu'), fullgraph=True)
    assert torch.equal(compiled(x), eager)
    graph, captured_x = torch.cuda.CUDAGraph(), x.clone()
    moe_decode(captured_x, router_w, b, w_in, w_out, 2, 'swiglu')  # warm-up off the graph
    with torch.cuda.graph(graph):
        captured = moe_decode(captured_x, router_w, b, w_in, w_out, 2, 'swiglu')
    new_x = torch.randn_like(x)
    captured_x.copy_(new_x)
    graph.replay()  # the routing of new inputs, not of the captured ones
    assert torch.equal(captured, moe_decode(new_x, router_w, b, w_in, w_out, 2, 'swiglu'))
