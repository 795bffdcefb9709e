"""sample.py's quantization and evaluation: quantized weights against their bounds, sliding-window
perplexity against a window-by-window loop, the sample metrics against hand-counted examples, and
the coherence score against the same text shuffled (decode.py's repetition penalties and
self-speculative decoding: tests/test_decode.py).
    python -m pytest -q tests/test_sample.py
"""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig
from sample import (Dequantize, coherence, distinct, perplexity, quantize_model, quantize_weight,
                    repetition_rate)


def tiny_model(block_size=16):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, block_size=block_size, n_layer=2, n_head=2,
                           n_embd=32)).eval()


@torch.no_grad()
def test_perplexity_scores_every_token_once_like_a_window_loop():
    model = tiny_model()
    for length in (5, 17, 40, 61):
        tokens = np.random.default_rng(length).integers(0, 50, length).astype(np.uint16)
        ppl, scored = perplexity(model, tokens, block_size=16, batch_size=3)
        assert scored == length - 1
        # the slow way: windows of 16 moving by 8, one forward each, scoring only targets
        # not scored before
        T, total, done = min(16, length - 1), 0.0, 0
        end = T
        while True:
            x = torch.from_numpy(tokens[end - T:end].astype(np.int64))[None]
            y = torch.from_numpy(tokens[end - T + 1:end + 1].astype(np.int64))
            logits, _ = model(x)
            nll = F.cross_entropy(logits[0], y, reduction='none')
            total += nll[T - (end - done):].sum().item()
            done = end
            if end == length - 1:
                break
            end = min(end + 8, length - 1)
        assert math.isclose(ppl, math.exp(total / (length - 1)), rel_tol=1e-5)


def test_distinct_and_repetition_hand_counted():
    samples = [[1, 2, 1, 2, 1], [3, 3]]
    assert distinct(samples, 1) == 3 / 7              # {1, 2, 3} of 7 tokens
    assert distinct(samples, 2) == 3 / 5              # (1,2) (2,1) (1,2) (2,1) (3,3): 3 unique of 5
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == 3 / 5  # (1,2) (2,1) (1,2)* (2,1)* (1,2)*


def test_coherence_falls_for_shuffled_sentences():
    """A text whose neighbouring sentences share words (a chain of topics) scores well above 1; the
    same sentences in random orders score lower, near 1."""
    words = [f"word{chr(97 + i)}topic" for i in range(26)]
    text = '. '.join(f"{words[i]} {words[i + 1]} {words[(7 * i) % 26]}" for i in range(25)) + '.'
    original = coherence(text)
    sentences = text.split('. ')
    shuffled = []
    for seed in range(5):
        random.Random(seed).shuffle(sentences)
        shuffled.append(coherence('. '.join(sentences)))
    assert original > 2 and max(shuffled) < original and sum(shuffled) / 5 < 1.5
    assert coherence("One sentence only.") is None


def test_quantization_round_trip_bounds():
    """Every weight comes back within half a quantization step: scale = max|row| / 127 (int8, per
    output channel) or max|group| / 7 (int4, per 128 inputs), on random 2-D and 3-D (expert)
    weights."""
    torch.manual_seed(0)
    for shape in ((96, 256), (4, 64, 384)):
        w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3     # rows of different ranges
        for bits, levels in ((8, 127), (4, 7)):
            codes, scale = quantize_weight(w, bits)
            back = Dequantize(scale, bits, w.shape)(codes)
            step = (w.abs().amax(-1, keepdim=True) if bits == 8 else
                    w.view(*shape[:-1], -1, 128).abs().amax(-1, keepdim=True)) / levels
            err = (back - w).abs() if bits == 8 else (back - w).abs().view(*shape[:-1], -1, 128)
            assert (err <= step / 2 + 1e-6).all()
            assert codes.element_size() * codes.numel() == w.numel() * bits // 8


def test_quantized_model_stays_close():
    """int8 and int4 weight-only quantization of attention and experts: the loss moves little, the
    bytes shrink, and int4 refuses an input size its groups do not divide."""
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=128, n_experts=4)
    x = torch.randint(0, 97, (2, 16))
    losses, sizes = [], []
    for bits in (None, 8, 4):
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        sizes.append(quantize_model(model, bits) if bits
                     else sum(p.numel() * 4 for p in model.parameters()))
        losses.append(model(x, x)[1].item())
    assert abs(losses[1] / losses[0] - 1) < 0.002 and abs(losses[2] / losses[0] - 1) < 0.05
    assert sizes[0] > sizes[1] > sizes[2]
    with pytest.raises(ValueError, match='divisible'):
        quantize_model(GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2,
                                       n_embd=96)), 4)
