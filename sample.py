"""
Sample from a trained Ava model, and evaluate it.

    python sample.py --out_dir=out/nano
    python sample.py --out_dir=out/nano --start="ROMEO:" --num_samples=3 --temperature=0.8
    python sample.py --out_dir=out/nano --start=FILE:prompts.txt --repetition_penalty=1.2
    python sample.py --out_dir=out/nano --eval=True  # perplexity on val.bin, metrics of the samples
    python sample.py --out_dir=out/nano --export=hf:out/nano-hf  # a transformers Mixtral folder

Many prompts (one per line of a FILE:, with \\n standing for a newline) run as one batch,
left-padded; each gets num_samples continuations. A continuation ends at the end-of-text token, at a
stop string, or after max_new_tokens. The decoding itself (generate, repetition penalties,
self-speculative decoding) is decode.py's, the export export.py's; this file holds what only
sampling uses: weight-only quantization and the evaluation's metrics.
"""

import json
import math
import os
import re
import sys
import time
from functools import partial
from pathlib import Path

from failsafe import check, fail, stop_on_signals, write_atomic

if __name__ == '__main__':  # before torch loads: a stop while it does is one line too
    pending = []  # the outputs still to write (--out, the report, the export): a stop names them
    stop_on_signals(lambda: f"; {' and '.join(pending)} not written" if pending
                    else "; nothing was written")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from common import (autocast, load_checkpoint, load_data, resolve_device,  # noqa: E402
                    trained_data_dir)
from configurator import configure_or_exit, settings_of  # noqa: E402
from decode import (generate, generate_speculative, penalize_repeats,  # noqa: E402
                    speculative_room)
from export import export_hf  # noqa: E402
from model import Attention, MoE  # noqa: E402
from tokenizer import load_run_tokenizer  # noqa: E402

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


# ---- the script's steps ----

def check_settings(temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                   num_samples, max_new_tokens, speculative, quantize, dtype, export, out, report,
                   eval_tokens, seed, eval, **_):
    """Every bad setting, as one line, before anything loads. An infinite temperature or penalty
    (1e999 reads as inf) would sample noise without a word: they must be finite."""
    check([(0 <= temperature < math.inf,
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"),
           (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
           (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
           (0 < repetition_penalty < math.inf,
            "repetition_penalty must be a finite number > 0 (1.0 = off), got "
            f"{repetition_penalty}"),
           (no_repeat_ngram_size >= 0,
            f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}"),
           (num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
           (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
           (eval_tokens >= 0, f"eval_tokens must be >= 0 (0 = all of val.bin), got {eval_tokens}"),
           (-2**63 <= seed < 2**64, f"seed must fit in 64 bits, got {seed}"),
           (not speculative or num_samples == 1,
            "--speculative=True decodes one prompt once: pass --num_samples=1"),
           (not speculative or not (out or eval),
            "--speculative=True prints one greedy continuation and its speed: it writes no --out "
            "and runs no --eval; run those without it"),
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


def print_speculative(model, x, prompt, enc, max_new_tokens, precision, cuda, runs=5):
    """The speculative continuation of x (1, T), and its speed next to plain greedy decoding: the
    medians of runs timed decodes each, after a warm-up one (a decode of nano takes ~0.1 s on a
    GPU: one timing is noise)."""
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
    (t_greedy, _, greedy), (t_spec, passes, spec) = timings['greedy'], timings['speculative']
    print(prompt + enc.decode(spec[0, x.size(1):].tolist()))
    print(f"speculative: {max_new_tokens} tokens in {passes} forward passes, {t_spec:.3f} s; "
          f"greedy {t_greedy:.3f} s ({t_greedy / t_spec:.2f}x; medians of {runs}); identical: "
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
    lines = ''.join(json.dumps({k: v for k, v in r.items() if k != 'tokens'}) + '\n'
                    for r in records)
    write_atomic(path, lambda tmp: Path(tmp).write_text(lines))


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
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print("\n| metric | value |\n|---|---|")
    for key in ('model_bytes', 'val_perplexity', 'val_loss', 'val_tokens_scored', 'distinct_1',
                'distinct_2', 'repetition_rate_4', 'entropy_nats', 'coherence'):
        value = result[key]
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    print(f"report: {path}")


if __name__ == '__main__':
    configure_or_exit(globals())
    check_settings(**settings_of(globals()))
    report = report or os.path.join(out_dir, 'eval.json')
    pending += [path for path, asked in ((out, out), (report, eval), (export[3:], export))
                if asked]
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
                     penalize=partial(penalize_repeats, repetition_penalty=repetition_penalty,
                                      no_repeat_ngram_size=no_repeat_ngram_size, pad=pad))
    records = print_samples(y, x.size(1), prompts, num_samples, enc, stops, stop_at_eos)
    if out:
        write_jsonl(records, out)
        pending.remove(out)
    if eval:
        result = dict(checkpoint=os.path.join(out_dir, 'ckpt.pt'), iter=ckpt.get('iter_num'),
                      data_dir=folder, quantize=quantize or 'none', model_bytes=model_bytes,
                      temperature=temperature, top_k=top_k, top_p=top_p)
        result.update(evaluate(model, val_tokens, records, x, pad, precision))
        write_report(result, report)
