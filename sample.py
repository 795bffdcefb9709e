"""
Sample from a trained Ava model, and evaluate it.

    python sample.py --out_dir=out/nano
    python sample.py --out_dir=out/nano --start="ROMEO:" --num_samples=3 --temperature=0.8
    python sample.py --out_dir=out/nano --start=FILE:prompts.txt --repetition_penalty=1.2
    python sample.py --out_dir=out/nano --eval=True  # perplexity on val.bin, metrics of the samples
    python sample.py --out_dir=out/nano --export=hf:out/nano-hf  # a transformers Mixtral folder

Many prompts (one per line of a FILE:, with \\n standing for a newline) run as one batch,
left-padded; each gets num_samples continuations. A continuation ends at the end-of-text token, at a
stop string, or after max_new_tokens. Beside decode.py's generate, this file holds what only
sampling uses: repetition penalties, self-speculative decoding and weight-only quantization; and the
export of a SwiGLU model to a folder that transformers loads as Mixtral, with no Ava code.
"""

import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import ava_kernels
from common import (autocast, check, fail, load_checkpoint, load_data, load_run_tokenizer,
                    resolve_device, trained_data_dir, write_atomic)
from configurator import configure_or_exit, settings_of
from decode import CUDAGraphed, KVCache, generate, graphable, kept
from model import Attention, MoE, rope_tables

# -----------------------------------------------------------------------------
out_dir = 'out/nano'     # a folder written by train.py: ckpt.pt and tokenizer.json
start = '\n'             # the prompt, or FILE:path with one prompt per line
num_samples = 2          # continuations per prompt
max_new_tokens = 200
temperature = 0.8        # 0 = greedy; < 1 sharper, > 1 more random
top_k = 0                # keep only the k most likely tokens; 0 = all
top_p = 1.0              # keep the smallest set of tokens whose probability reaches p; 1.0 = all
repetition_penalty = 1.0 # > 1 discourages tokens already in the text (Keskar et al. 2019); 1 = off
no_repeat_ngram_size = 0 # > 0: never repeat an n-gram of this many tokens; 0 = off
stop = ''                # stop strings, separated by | (e.g. '\n\n|THE END'); '' = none
stop_at_eos = True       # a continuation ends at the end-of-text token
out = ''                 # also write the samples as JSON lines to this file
speculative = False      # greedy decoding that drafts with the MTP heads (n_future_tokens > 1): one
                         # prompt, one sample; prints the output and its speed next to plain greedy
quantize = ''            # 'int8' (per output channel) or 'int4' (groups of 128): weight-only,
                         # attention and experts
seed = 1337
device = 'auto'          # 'auto' (cuda if available), 'cpu', 'cuda', ...
dtype = 'auto'           # 'auto': bfloat16 autocast on CUDA (as train.py; decoding then runs as a
                         # CUDA graph), float32 on the CPU; or 'float32', 'bfloat16'
# evaluation (--eval=True): perplexity on val.bin and metrics of the samples, printed and in JSON
eval = False
data_dir = ''            # the prepared data set; '' = the one the checkpoint was trained on
eval_tokens = 0          # score the first this many val tokens; 0 = all
report = ''              # where the JSON report goes; '' = out_dir/eval.json
export = ''              # 'hf:FOLDER': write the model as a transformers Mixtral folder, then exit
# -----------------------------------------------------------------------------


# ---- decoding beyond decode.generate ----

def penalize(logits, idx, repetition_penalty=1.0, no_repeat_ngram_size=0, pad=None):
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
    next drafts) is one CUDA graph, kept with its state for the next call (decode.kept()): a step is
    one launch. How many tokens a step accepts stays on the device: the host reads the length once
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


# ---- weight-only quantization ----

class Dequantize(nn.Module):
    """Weight-only quantization as a parametrization: the module keeps integer codes (int8, or two
    int4 codes per byte) and one scale per output channel (int8) or per group of group_size inputs
    (int4), and rebuilds the float weight on every forward, so the matmul itself is unchanged
    (dequantize on the fly, in plain torch)."""

    def __init__(self, scale, bits, shape):
        super().__init__()
        self.register_buffer('scale', scale)  # (..., out, 1) for int8; (..., out, in/group, 1) int4
        self.bits, self.shape = bits, shape

    def forward(self, codes):
        if self.bits == 4:  # unpack: low, high nibble -> consecutive inputs, stored as value + 8
            codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).to(torch.int8) - 8
            codes = codes.view(*self.scale.shape[:-1], -1)            # (..., out, in/group, group)
        return (codes.float() * self.scale).view(self.shape)


def quantize_weight(w, bits, group_size=128):
    """w (..., out, in) -> (codes, scale) with round-to-nearest symmetric quantization: int8 per
    output channel (scale = max|row| / 127), or int4 per group of group_size inputs (scale =
    max|group| / 7, two codes per byte). Every element comes back within scale / 2."""
    if bits == 8:
        scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127            # (..., out, 1)
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    groups = w.reshape(*w.shape[:-1], w.size(-1) // group_size, group_size)  # (..., out, in/g, g)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
    codes = ((groups / scale).round().clamp(-8, 7) + 8).to(torch.uint8).flatten(-2)  # 0..15
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale                  # (..., out, in/2)


def quantize_model(model, bits, group_size=128):
    """Quantize the attention projections and the expert weights of model in place (weight-only,
    for inference). int4 needs each input size divisible by group_size; the tied embedding/lm_head
    and the norms stay float. Returns the bytes the model's tensors now take."""
    # (module, weight name) pairs, listed before any change: a parametrization adds modules
    modules = list(model.modules())
    weights = [(m, 'weight') for a in modules if isinstance(a, Attention) for m in (a.qkv, a.proj)]
    weights += [(m, name) for m in modules if isinstance(m, MoE) for name in ('w_in', 'w_out')]
    for module, name in weights:
        w = getattr(module, name).detach()
        if bits == 4 and w.size(-1) % group_size:
            raise ValueError(f"int4 groups of {group_size} need input sizes divisible by it; "
                             f"{type(module).__name__}.{name} has {w.size(-1)}")
        codes, scale = quantize_weight(w.float(), bits, group_size)
        setattr(module, name, nn.Parameter(codes, requires_grad=False))
        parametrize.register_parametrization(module, name, Dequantize(scale, bits, w.shape),
                                             unsafe=True)
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- evaluation ----

def perplexity(model, tokens, block_size, batch_size=16):
    """Exact token-level perplexity of tokens (1-D) with a sliding window: every token after the
    first is scored once, each with at least block_size/2 tokens of context (except the first
    window's). -> (ppl, n scored)."""
    stride, n = block_size // 2, len(tokens) - 1
    ends = list(range(min(block_size, n), n + 1, stride))  # window k predicts up to ends[k]
    if ends[-1] != n:
        ends.append(n)
    T, dev = min(block_size, n), model.wte.weight.device
    total, scored = 0.0, 0
    for i in range(0, len(ends), batch_size):
        batch = ends[i:i + batch_size]
        x = torch.stack([torch.from_numpy(tokens[e - T:e].astype(np.int64)) for e in batch])
        y = torch.stack([torch.from_numpy(tokens[e - T + 1:e + 1].astype(np.int64)) for e in batch])
        for row, e in enumerate(batch):  # score only what the previous window did not
            new = T if i + row == 0 else e - ends[i + row - 1]
            y[row, :T - new] = -1
        logits, _ = model(x.to(dev))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(dev), ignore_index=-1,
                                 reduction='sum').item()
        scored += int((y != -1).sum())
    return math.exp(total / scored), scored


def distinct(samples, n):
    """Distinct-n (Li et al. 2016): unique n-grams over all n-grams of the samples' tokens."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def repetition_rate(samples, n=4):
    """Fraction of tokens that complete an n-gram already seen earlier in the same sample."""
    repeats = total = 0
    for s in samples:
        seen = set()
        for i in range(len(s) - n + 1):
            gram = tuple(s[i:i + n])
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / max(total, 1)


def coherence(text):
    """Lexical cohesion (after Halliday & Hasan's lexical chains): how much more adjacent sentences
    share content words than sentences further apart, as mean Jaccard(adjacent) / mean
    Jaccard(distance >= 2). Coherent text scores above 1; the same sentences shuffled score about 1
    (adjacency then means nothing). Computed from the text alone: offline and reproducible. None
    when there are fewer than 3 sentences or no shared words at all."""
    sentences = [set(re.findall(r"[a-z']{4,}", s.lower())) for s in re.split(r"[.!?;:\n]+", text)]
    sentences = [s for s in sentences if s]
    if len(sentences) < 3:
        return None
    jaccard = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    near = [jaccard(sentences[i], sentences[i + 1]) for i in range(len(sentences) - 1)]
    far = [jaccard(sentences[i], sentences[j])
           for i in range(len(sentences)) for j in range(i + 2, len(sentences))]
    if sum(far) == 0:
        return None
    return (sum(near) / len(near)) / (sum(far) / len(far))


@torch.no_grad()
def mean_entropy(model, rows):
    """Mean entropy (nats) of the model's next-token distribution over the generated tokens; rows:
    list of (full token list, prompt length)."""
    values = []
    for tokens, prompt_len in rows:
        window = tokens[-model.config.block_size:]
        logits, _ = model(torch.tensor([window], device=model.wte.weight.device))
        generated = min(len(tokens) - prompt_len, len(window) - 1)  # whose next token is generated
        logp = logits[0, -generated - 1:-1].float().log_softmax(-1)
        values.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(values).mean().item() if values else float('nan')


# ---- export to Hugging Face transformers ----

# safetensors' dtype names. The format is little-endian, as every machine torch runs on is.
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}


def save_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file, written atomically: 8 bytes (little-endian u64) of
    header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__':
    {str: str}} padded with spaces to 8 bytes, then each tensor's raw bytes in header order. Ava
    writes it itself: weights then need neither pickle nor a dependency (transformers reads it)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {'__metadata__': dict(metadata or {})}, [], 0
    for name, t in tensors.items():
        raw = t.detach().to('cpu').contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # the data starts 8-aligned, as safetensors' own writer does

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(len(text).to_bytes(8, 'little'))
            f.write(text)
            for raw in blobs:
                f.write(raw)
    write_atomic(os.fspath(path), write)


def mixtral_weights(model):
    """Ava's weights under the names of Mixtral's original checkpoints, in fp32. The experts go
    out one by one as block_sparse_moe.experts.{j}.w1 (gate), w3 (up), w2 (down): the layout vLLM,
    llama.cpp's converter and transformers 4.x read, and that transformers 5.x fuses on loading
    (its conversion mapping: w1 and w3 -> gate_up_proj, w2 -> down_proj). No Q/K permutation:
    Ava's RoPE rotates the half-split pairs (x[:D/2], x[D/2:]), transformers' rotate_half layout.
    The embedding goes out once; tie_word_embeddings makes it the lm_head too."""
    Fh = model.config.ffn_hidden
    weights = {'model.embed_tokens.weight': model.wte.weight,
               'model.norm.weight': model.norm_f.weight}
    for i, block in enumerate(model.blocks):
        layer, moe = f'model.layers.{i}.', block.ffn
        q, k, v = block.attn.qkv.weight.chunk(3)  # packed [q; k; v], heads in order within each
        weights.update({layer + 'input_layernorm.weight': block.norm1.weight,
                        layer + 'self_attn.q_proj.weight': q,
                        layer + 'self_attn.k_proj.weight': k,
                        layer + 'self_attn.v_proj.weight': v,
                        layer + 'self_attn.o_proj.weight': block.attn.proj.weight,
                        layer + 'post_attention_layernorm.weight': block.norm2.weight,
                        layer + 'block_sparse_moe.gate.weight': moe.router.weight})
        for j in range(moe.w_in.size(0)):  # w_in (E, 2F, C): rows [W1 (gate); W3 (up)]
            expert = f'{layer}block_sparse_moe.experts.{j}.'
            weights.update({expert + 'w1.weight': moe.w_in[j, :Fh],
                            expert + 'w3.weight': moe.w_in[j, Fh:],
                            expert + 'w2.weight': moe.w_out[j]})
    return {name: w.detach().float().contiguous() for name, w in weights.items()}


def mixtral_files(config, eps, eos, eos_id):
    """config.json, generation_config.json and tokenizer_config.json for a Mixtral folder. Ava has
    no BOS: documents are separated by the end-of-text token, so it stands for both, and pads."""
    C, H = config.n_embd, config.n_head
    theta = inspect.signature(rope_tables).parameters['base'].default  # the base trunk() uses
    hf_config = dict(
        architectures=['MixtralForCausalLM'], model_type='mixtral', vocab_size=config.vocab_size,
        hidden_size=C, intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer,
        num_attention_heads=H, num_key_value_heads=H, head_dim=C // H, hidden_act='silu',
        max_position_embeddings=config.block_size, rms_norm_eps=eps, rope_theta=theta,
        rope_parameters=dict(rope_type='default', rope_theta=theta),  # 5.x's form of rope_theta
        sliding_window=None, attention_dropout=0.0, num_local_experts=config.n_experts,
        num_experts_per_tok=config.top_k, router_jitter_noise=0.0, output_router_logits=False,
        tie_word_embeddings=True, torch_dtype='float32', bos_token_id=eos_id, eos_token_id=eos_id,
        use_cache=True)
    generation = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    # the class named, or AutoTokenizer picks Mixtral's own (Mistral's) and ignores tokenizer.json;
    # no clean-up of spaces, so that decoding gives Ava's text byte for byte
    tokenizer = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token=eos, eos_token=eos,
                     pad_token=eos, add_bos_token=False, add_eos_token=False,
                     clean_up_tokenization_spaces=False, model_max_length=config.block_size,
                     padding_side='left')
    return {'config.json': hf_config, 'generation_config.json': generation,
            'tokenizer_config.json': tokenizer}


def export_hf(model, run_dir, folder):
    """Write model (SwiGLU experts, softmax or Sinkhorn router) and its run's tokenizer as a folder
    that transformers' AutoModelForCausalLM and AutoTokenizer load as Mixtral: config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json. At inference
    both of those routers are plain top-k of softmax(logits) renormalised over the K chosen,
    Mixtral's rule (the Sinkhorn bias only balances training). The folder appears whole or not at
    all: it is written beside itself under a temporary name, then renamed."""
    cfg = model.config
    check([(cfg.moe, "a dense model (moe=False) cannot be expressed in Mixtral: it needs MoE "
            "layers"),
           (cfg.expert_act == 'swiglu',
            "Mixtral experts are SwiGLU: train with --expert_act=swiglu"),
           (cfg.router != 'bias', "router='bias' cannot be expressed in Mixtral: its routing adds "
            "a learned bias"),
           (not os.path.exists(folder) or os.path.isdir(folder) and not os.listdir(folder),
            f"{folder} exists and is not an empty folder; export into a new one")])
    enc = load_run_tokenizer(run_dir)
    eos = enc.decode([enc.eot_token])
    files = mixtral_files(cfg, model.norm_f.eps, eos, enc.eot_token)
    weights, target = mixtral_weights(model), os.path.abspath(folder)
    tmp = os.path.join(os.path.dirname(target), f'.{os.path.basename(target)}.tmp{os.getpid()}')
    try:
        os.makedirs(tmp)
        save_safetensors(weights, os.path.join(tmp, 'model.safetensors'),
                         metadata={'format': 'pt'})  # transformers checks the format
        shutil.copyfile(os.path.join(run_dir, 'tokenizer.json'),
                        os.path.join(tmp, 'tokenizer.json'))
        for file, content in files.items():
            with open(os.path.join(tmp, file), 'w') as f:
                json.dump(content, f, indent=2)
        os.replace(tmp, target)  # onto nothing, or onto an empty folder
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot write {folder} ({e.strerror or e}); nothing was written")
    if model.mtp_heads:
        print(f"note: the {len(model.mtp_heads)} multi-token-prediction heads are not exported "
              "(Mixtral has none); the next-token model is")
    n_params = sum(w.numel() for w in weights.values())
    print(f"wrote {folder}: MixtralForCausalLM ({n_params / 1e6:.2f}M parameters, "
          f"{cfg.n_layer} layers, {cfg.n_experts} experts, top-{cfg.top_k}), "
          f"{', '.join(sorted(os.listdir(folder)))}")


# ---- the script's steps ----

def check_settings(temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                   num_samples, max_new_tokens, speculative, quantize, dtype, export, out, report,
                   **_):
    """Every bad setting, as one line, before anything loads."""
    check([(temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
           (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
           (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
           (repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}"),
           (no_repeat_ngram_size >= 0,
            f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}"),
           (num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
           (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
           (not speculative or num_samples == 1,
            "--speculative=True decodes one prompt once: pass --num_samples=1"),
           (quantize in ('', 'int8', 'int4'),
            f"quantize must be '', 'int8' or 'int4', got {quantize!r}"),
           (dtype in ('auto', 'float32', 'bfloat16'),
            f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}"),
           (export == '' or export.startswith('hf:') and len(export) > 3,
            f"export must be 'hf:FOLDER' (a transformers folder), got {export!r}")])
    check([(os.path.isdir(os.path.dirname(os.path.abspath(path))),
            f"--{key}={path}: the folder {os.path.dirname(path)} does not exist; create it first")
           for key, path in (('out', out), ('report', report)) if path])


def ready_model(model, quantize, dev, top_k, speculative, out_dir):
    """The loaded model quantized (if asked), in eval mode on dev, checked against the settings
    that depend on it -> the bytes its weights take."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    if quantize:
        try:
            model_bytes = quantize_model(model, bits=int(quantize[3:]))
        except ValueError as e:
            fail(e)
    model.eval().to(dev)
    vocab = model.config.vocab_size
    check([(top_k <= vocab, f"top_k={top_k} is above the model's vocabulary of {vocab} tokens; "
            "use 0 (all) or fewer"),
           (not speculative or model.mtp_heads, f"--speculative=True drafts with the multi-token "
            f"heads, and {out_dir}/ckpt.pt has none: train with --n_future_tokens=2 or more")])
    return model_bytes


def load_val_tokens(folder, vocab_size, n_tokens):
    """The first n_tokens + 1 tokens of folder's val.bin (all when n_tokens is 0), checked against
    the model's vocabulary before any generating."""
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        fail(f"no prepared data in {folder!r} for --eval (no meta.json); "
             "pass --data_dir=data/<name>")
    meta, splits = load_data(folder, ('val',))
    if meta['vocab_size'] != vocab_size:
        fail(f"{folder} has vocab_size {meta['vocab_size']}, the checkpoint {vocab_size}")
    tokens = splits['val'][:n_tokens + 1] if n_tokens else splits['val']
    if len(tokens) < 2:
        fail(f"{folder}/val.bin has too few tokens to evaluate")
    return np.asarray(tokens)


def read_prompts(start):
    """The prompt, or the prompts of a FILE: (one a line, \\n standing for a newline)."""
    if not start.startswith('FILE:'):
        return [start]
    try:
        with open(start[5:], encoding='utf-8') as f:
            prompts = [line.rstrip('\n').replace('\\n', '\n') for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]}: {e.strerror}")
    except UnicodeDecodeError as e:
        fail(f"cannot read the prompt file {start[5:]}: not UTF-8 text (byte "
             f"{e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8")
    if not prompts:
        fail(f"the prompt file {start[5:]} has no prompts (one per line)")
    return prompts


def prompt_batch(model, enc, prompts, num_samples, max_new_tokens, speculative, start, dev):
    """Each prompt num_samples times, encoded and left-padded with the end-of-text token, so that
    every prompt ends where generation starts -> x (B, longest), pad (B,). Checks first that
    speculative decoding has one prompt and room for it."""
    check([(not speculative or len(prompts) == 1,
            f"--speculative=True decodes one prompt; {start} holds {len(prompts)}")])
    encoded = [enc.encode_ordinary(p) or [enc.eot_token] for p in prompts
               for _ in range(num_samples)]
    longest, context = max(map(len, encoded)), model.config.block_size
    room = speculative_room(model, longest)
    check([(not speculative or max_new_tokens <= room, f"--speculative=True keeps the prompt "
            f"({longest} tokens), max_new_tokens and {len(model.mtp_heads)} drafts in one cache "
            f"of block_size {context}: " + (f"use --max_new_tokens={room} or fewer" if room > 0
                                            else "use a shorter prompt"))])
    if longest >= context:
        print(f"note: a prompt has {longest} tokens, more than the context of {context}: "
              f"the model sees its last {context // 2}")
    pad = torch.tensor([longest - len(e) for e in encoded], device=dev)
    x = torch.tensor([[enc.eot_token] * (longest - len(e)) + e for e in encoded], device=dev)
    return x, pad


def time_speculative(model, x, max_new_tokens, precision, cuda, runs=5):
    """Speculative and plain greedy decoding of x (1, T), each timed runs times after a warm-up
    run (a decode of nano takes ~0.1 s on a GPU: one timing is noise) -> {name: (median seconds,
    forward passes, tokens)}."""
    timings = {}
    for name, decode in (
            ('greedy', lambda: (generate(model, x, max_new_tokens, temperature=0), max_new_tokens)),
            ('speculative', lambda: generate_speculative(model, x, max_new_tokens))):
        seconds = []
        with precision:
            decode()  # warm-up
            for _ in range(runs):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result, passes = decode()
                if cuda:
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
        timings[name] = (sorted(seconds)[runs // 2], passes, result)
    return timings


def print_speculative(model, x, prompt, enc, max_new_tokens, precision, cuda):
    """The speculative continuation of x (1, T), and its speed next to plain greedy decoding."""
    timings = time_speculative(model, x, max_new_tokens, precision, cuda)
    (t_greedy, _, greedy), (t_spec, passes, spec) = timings['greedy'], timings['speculative']
    print(prompt + enc.decode(spec[0, x.size(1):].tolist()))
    print(f"speculative: {max_new_tokens} tokens in {passes} forward passes, {t_spec:.3f} s; "
          f"greedy {t_greedy:.3f} s ({t_greedy / t_spec:.2f}x; medians of 5); identical: "
          f"{torch.equal(spec, greedy)}")


def contains_stop(enc, stops, prompt_len, idx):
    """(B,) bool: the row of idx (B, T) holds a stop string after its first prompt_len tokens."""
    texts = [enc.decode(row[prompt_len:]) for row in idx.tolist()]
    return torch.tensor([any(s in text for s in stops) for text in texts], device=idx.device)


def finish(tokens, enc, stops, stop_at_eos):
    """A continuation's tokens -> (text, tokens, finish reason), cut at the end-of-text token (when
    stop_at_eos) and at the first stop string."""
    reason = 'length'
    if stop_at_eos and enc.eot_token in tokens:
        tokens, reason = tokens[:tokens.index(enc.eot_token)], 'eos'
    text = enc.decode(tokens)
    hits = [text.index(s) for s in stops if s in text]
    if hits:
        text, reason = text[:min(hits)], 'stop'
    return text, tokens, reason


def print_samples(y, prompt_len, prompts, num_samples, enc, stops, stop_at_eos):
    """Print each continuation in y (B, prompt_len + new) after its prompt -> the records (prompt,
    sample, tokens, finish reason), num_samples in a row for each prompt."""
    records = []
    for i, row in enumerate(y.tolist()):
        text, tokens, reason = finish(row[prompt_len:], enc, stops, stop_at_eos)
        prompt = prompts[i // num_samples]
        records.append(dict(prompt=prompt, sample=text, tokens=tokens, finish=reason))
        print(prompt + text)
        print('---------------')
    return records


def write_jsonl(records, path):
    try:
        with open(path, 'w') as f:
            for r in records:
                f.write(json.dumps({k: v for k, v in r.items() if k != 'tokens'}) + '\n')
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")


def evaluate(model, tokens, records, x, pad, precision):
    """Perplexity on tokens, and the metrics of the samples (records) generated from the prompts x
    (B, T) left-padded by pad (B,)."""
    samples = [r['tokens'] for r in records]
    rows = [(x[i, pad[i]:].tolist() + r['tokens'], x.size(1) - int(pad[i]))  # (tokens, prompt len)
            for i, r in enumerate(records) if r['tokens']]
    with torch.no_grad(), precision:
        ppl, scored = perplexity(model, tokens, model.config.block_size)
        entropy = mean_entropy(model, rows)
    scores = [c for c in (coherence(r['sample']) for r in records) if c is not None]
    return dict(val_tokens_scored=scored, val_perplexity=ppl, val_loss=math.log(ppl),
                samples=len(samples), distinct_1=distinct(samples, 1),
                distinct_2=distinct(samples, 2), repetition_rate_4=repetition_rate(samples),
                entropy_nats=entropy, coherence=sum(scores) / len(scores) if scores else None,
                coherence_samples=len(scores))


def write_report(result, path):
    """The evaluation as JSON at path, and its main metrics as a Markdown table."""
    try:
        with open(path, 'w') as f:
            json.dump(result, f, indent=2)
    except OSError as e:
        fail(f"cannot write the report {path}: {e.strerror}")
    print("\n| metric | value |\n|---|---|")
    for key in ('model_bytes', 'val_perplexity', 'val_loss', 'val_tokens_scored', 'distinct_1',
                'distinct_2', 'repetition_rate_4', 'entropy_nats', 'coherence'):
        value = result[key]
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    print(f"report: {path}")


if __name__ == '__main__':
    configure_or_exit(globals())
    check_settings(**settings_of(globals()))
    dev, device_type = resolve_device(device)
    torch.manual_seed(seed)
    bf16 = dtype == 'bfloat16' or (dtype == 'auto' and device_type == 'cuda')
    precision = autocast(device_type, bf16)

    # load: the checkpoint (quantized if asked), its tokenizer, the evaluation data, the prompts
    ckpt, _, model = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    if export:  # instead of sampling
        export_hf(model, out_dir, export[3:])
        sys.exit(0)
    model_bytes = ready_model(model, quantize, dev, top_k, speculative, out_dir)
    enc = load_run_tokenizer(out_dir, model.config.vocab_size)
    folder = data_dir or trained_data_dir(ckpt)
    val_tokens = load_val_tokens(folder, model.config.vocab_size, eval_tokens) if eval else None
    prompts = read_prompts(start)
    x, pad = prompt_batch(model, enc, prompts, num_samples, max_new_tokens, speculative, start, dev)
    stops = [s.replace('\\n', '\n') for s in stop.split('|') if s]

    # generate, write, evaluate
    if speculative:
        cuda = device_type == 'cuda'
        print_speculative(model, x, prompts[0], enc, max_new_tokens, precision, cuda)
        sys.exit(0)
    with precision:
        y = generate(model, x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                     top_p=top_p, eos_id=enc.eot_token if stop_at_eos else None, pad=pad,
                     stop=partial(contains_stop, enc, stops, x.size(1)) if stops else None,
                     penalize=partial(penalize, repetition_penalty=repetition_penalty,
                                      no_repeat_ngram_size=no_repeat_ngram_size, pad=pad))
    records = print_samples(y, x.size(1), prompts, num_samples, enc, stops, stop_at_eos)
    if out:
        write_jsonl(records, out)
    if eval:
        result = dict(checkpoint=os.path.join(out_dir, 'ckpt.pt'), iter=ckpt.get('iter_num'),
                      data_dir=folder, quantize=quantize or 'none', model_bytes=model_bytes,
                      temperature=temperature, top_k=top_k, top_p=top_p)
        result.update(evaluate(model, val_tokens, records, x, pad, precision))
        write_report(result, report or os.path.join(out_dir, 'eval.json'))
