"""
Sample from a trained Ava model, and evaluate it.

    python sample.py --out_dir=out/nano
    python sample.py --out_dir=out/nano --start="ROMEO:" --num_samples=3 --temperature=0.8 --top_k=50
    python sample.py --out_dir=out/nano --start=FILE:prompts.txt --repetition_penalty=1.2 --out=samples.jsonl
    python sample.py --out_dir=out/nano --eval=True         # perplexity on val.bin + metrics of the samples

Many prompts (one per line of a FILE:, with \\n standing for a newline) run as one batch, left-padded; each gets
num_samples continuations. A continuation ends at the end-of-text token, at a stop string, or after
max_new_tokens.
"""

import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure_or_exit
from data.prepare import load_tokenizer
from model import quantize_model
from train import fail, load_checkpoint  # the same checks and one-line errors as train.py

# -----------------------------------------------------------------------------
out_dir = 'out/nano'     # a folder written by train.py: ckpt.pt and tokenizer.json
start = '\n'             # the prompt, or FILE:path with one prompt per line
num_samples = 2          # continuations per prompt
max_new_tokens = 200
temperature = 0.8        # 0 = greedy; < 1 sharper, > 1 more random
top_k = 0                # keep only the k most likely tokens; 0 = all
top_p = 1.0              # keep the smallest set of tokens whose probability reaches p (nucleus); 1.0 = all
repetition_penalty = 1.0 # > 1 discourages tokens already in the text (Keskar et al. 2019); 1.0 = off
no_repeat_ngram_size = 0 # > 0: never repeat an n-gram of this many tokens; 0 = off
stop = ''                # stop strings, separated by | (e.g. '\n\n|THE END'); '' = none
stop_at_eos = True       # a continuation ends at the end-of-text token
out = ''                 # also write the samples as JSON lines to this file
speculative = False      # greedy decoding that drafts with the MTP heads (n_future_tokens > 1): one prompt,
                         # one sample; prints the output and its speed next to plain greedy decoding
quantize = ''            # 'int8' (per output channel) or 'int4' (groups of 128): weight-only, attention and experts
seed = 1337
device = 'auto'          # 'auto' (cuda if available), 'cpu', 'cuda', ...
dtype = 'auto'           # 'auto': bfloat16 autocast on CUDA (as train.py; decoding then runs as a CUDA graph),
                         # float32 on the CPU; or 'float32', 'bfloat16'
# evaluation (--eval=True): perplexity on val.bin and metrics of the samples, printed and saved as JSON
eval = False
data_dir = ''            # the prepared data set; '' = the one the checkpoint was trained on
eval_tokens = 0          # score the first this many val tokens; 0 = all
report = ''              # where the JSON report goes; '' = out_dir/eval.json
# -----------------------------------------------------------------------------


def perplexity(model, tokens, block_size, batch_size=16):
    """Exact token-level perplexity of tokens (1-D) with a sliding window: every token after the first is scored
    once, each with at least block_size/2 tokens of context (except the first window's). -> (ppl, n scored)."""
    stride, n = block_size // 2, len(tokens) - 1
    ends = list(range(min(block_size, n), n + 1, stride))  # window k predicts tokens ends[k]-T+1 .. ends[k]
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
    """Lexical cohesion (after Halliday & Hasan's lexical chains): how much more adjacent sentences share content
    words than sentences further apart, as mean Jaccard(adjacent) / mean Jaccard(distance >= 2). Coherent text
    scores above 1; the same sentences shuffled score about 1 (adjacency then means nothing). Computed from the
    text alone: offline and reproducible. None when there are fewer than 3 sentences or no shared words at all."""
    sentences = [set(re.findall(r"[a-z']{4,}", s.lower())) for s in re.split(r"[.!?;:\n]+", text)]
    sentences = [s for s in sentences if s]
    if len(sentences) < 3:
        return None
    jaccard = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    near = [jaccard(sentences[i], sentences[i + 1]) for i in range(len(sentences) - 1)]
    far = [jaccard(sentences[i], sentences[j]) for i in range(len(sentences)) for j in range(i + 2, len(sentences))]
    if sum(far) == 0:
        return None
    return (sum(near) / len(near)) / (sum(far) / len(far))


@torch.no_grad()
def mean_entropy(model, rows):
    """Mean entropy (nats) of the model's next-token distribution over the generated tokens; rows: list of
    (full token list, prompt length)."""
    values = []
    for tokens, prompt_len in rows:
        window = tokens[-model.config.block_size:]
        logits, _ = model(torch.tensor([window], device=model.wte.weight.device))
        generated = min(len(tokens) - prompt_len, len(window) - 1)  # positions whose next token was generated
        logp = logits[0, -generated - 1:-1].float().log_softmax(-1)
        values.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(values).mean().item() if values else float('nan')


if __name__ == '__main__':
    configure_or_exit(globals())
    checks = [(temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
              (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
              (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
              (repetition_penalty > 0, f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}"),
              (no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}"),
              (num_samples >= 1 and max_new_tokens >= 1, "num_samples and max_new_tokens must be >= 1"),
              (quantize in ('', 'int8', 'int4'), f"quantize must be '', 'int8' or 'int4', got {quantize!r}"),
              (dtype in ('auto', 'float32', 'bfloat16'), f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")]
    for ok, message in checks:
        if not ok:
            fail(message)
    model_device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    torch.manual_seed(seed)
    bf16 = dtype == 'bfloat16' or (dtype == 'auto' and model_device.startswith('cuda'))
    precision = torch.autocast(model_device.split(':')[0], dtype=torch.bfloat16, enabled=bf16)
    ckpt, _, model = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    model_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    if quantize:
        try:
            model_bytes = quantize_model(model, bits=int(quantize[3:]))
        except ValueError as e:
            fail(e)
    model.eval().to(model_device)
    try:
        enc = load_tokenizer(os.path.join(out_dir, 'tokenizer.json'))
    except OSError as e:
        fail(f"no tokenizer next to the checkpoint ({e}); copy the data set's tokenizer.json into {out_dir}")

    if eval:  # the evaluation data is checked before any generating
        folder = data_dir or ckpt.get('config', {}).get('data_dir', '')
        try:
            meta = json.load(open(os.path.join(folder, 'meta.json')))
            val = np.memmap(os.path.join(folder, 'val.bin'), dtype=meta['dtype'], mode='r')
        except (OSError, KeyError, ValueError) as e:
            fail(f"no prepared data in {folder!r} for --eval ({type(e).__name__}); pass --data_dir=data/<name>")
        if meta['vocab_size'] != model.config.vocab_size:
            fail(f"{folder} has vocab_size {meta['vocab_size']}, the checkpoint {model.config.vocab_size}")
        tokens = val[:eval_tokens + 1] if eval_tokens else val
        if len(tokens) < 2:
            fail(f"{folder}/val.bin has too few tokens to evaluate")

    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                prompts = [line.rstrip('\n').replace('\\n', '\n') for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file {start[5:]}: {getattr(e, 'strerror', None) or e}")
        if not prompts:
            fail(f"the prompt file {start[5:]} has no prompts (one per line)")
    else:
        prompts = [start]
    encoded = [enc.encode_ordinary(p) or [enc.eot_token] for p in prompts for _ in range(num_samples)]
    longest = max(map(len, encoded))
    if longest >= model.config.block_size:
        print(f"note: a prompt has {longest} tokens, more than the context of {model.config.block_size}: "
              f"the model sees its last {model.config.block_size // 2}")
    # left padding with the end-of-text token: every prompt ends where generation starts
    pad = torch.tensor([longest - len(e) for e in encoded], device=model_device)
    x = torch.tensor([[enc.eot_token] * (longest - len(e)) + e for e in encoded], device=model_device)
    stops = [s.replace('\\n', '\n') for s in stop.split('|') if s]
    if speculative:
        if len(encoded) != 1 or not model.mtp_heads:
            fail("--speculative=True needs one prompt, --num_samples=1 and a model trained with n_future_tokens > 1")
        timings = {}
        for name, decode in (('greedy', lambda: (model.generate(x, max_new_tokens, temperature=0), max_new_tokens)),
                             ('speculative', lambda: model.generate_speculative(x, max_new_tokens))):
            with precision:
                decode()  # warm-up
                if model_device.startswith('cuda'):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result, passes = decode()
            if model_device.startswith('cuda'):
                torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - t0, passes, result)
        (t_greedy, _, greedy), (t_spec, passes, spec) = timings['greedy'], timings['speculative']
        print(prompts[0] + enc.decode(spec[0, longest:].tolist()))
        print(f"speculative: {max_new_tokens} tokens in {passes} forward passes, {t_spec:.2f} s; greedy "
              f"{t_greedy:.2f} s ({t_greedy / t_spec:.2f}x); identical to greedy: {torch.equal(spec, greedy)}")
        sys.exit(0)

    def stopped(idx):
        """(B,) bool: the row's continuation contains a stop string."""
        return torch.tensor([any(s in enc.decode(row[longest:]) for s in stops) for row in idx.tolist()],
                            device=idx.device)

    with precision:
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                           eos_id=enc.eot_token if stop_at_eos else None, pad=pad, stop=stopped if stops else None)
    records = []
    for i, row in enumerate(y.tolist()):
        new = row[longest:]
        finish = 'length'
        if stop_at_eos and enc.eot_token in new:
            new, finish = new[:new.index(enc.eot_token)], 'eos'
        text = enc.decode(new)
        hits = [text.index(s) for s in stops if s in text]
        if hits:
            text, finish = text[:min(hits)], 'stop'
        records.append(dict(prompt=prompts[i // num_samples], sample=text, tokens=new, finish=finish))
        print(prompts[i // num_samples] + text)
        print('---------------')
    if out:
        try:
            with open(out, 'w') as f:
                for r in records:
                    f.write(json.dumps({k: v for k, v in r.items() if k != 'tokens'}) + '\n')
        except OSError as e:
            fail(f"cannot write {out}: {e.strerror}")

    if eval:
        samples = [r['tokens'] for r in records]
        with torch.no_grad(), precision:
            ppl, scored = perplexity(model, np.asarray(tokens), model.config.block_size)
            entropy = mean_entropy(model, [(x[i, pad[i]:].tolist() + s, longest - int(pad[i]))
                                           for i, s in enumerate(samples) if s])
        scores = [c for c in (coherence(r['sample']) for r in records) if c is not None]
        result = dict(checkpoint=os.path.join(out_dir, 'ckpt.pt'), iter=ckpt.get('iter_num'), data_dir=folder,
                      val_tokens_scored=scored, val_perplexity=ppl, val_loss=math.log(ppl),
                      quantize=quantize or 'none', model_bytes=model_bytes,
                      samples=len(samples), temperature=temperature, top_k=top_k, top_p=top_p,
                      distinct_1=distinct(samples, 1), distinct_2=distinct(samples, 2),
                      repetition_rate_4=repetition_rate(samples),
                      entropy_nats=entropy,
                      coherence=sum(scores) / len(scores) if scores else None, coherence_samples=len(scores))
        path = report or os.path.join(out_dir, 'eval.json')
        try:
            with open(path, 'w') as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            fail(f"cannot write the report {path}: {e.strerror}")
        print("\n| metric | value |\n|---|---|")
        for key in ('model_bytes', 'val_perplexity', 'val_loss', 'val_tokens_scored', 'distinct_1', 'distinct_2',
                    'repetition_rate_4', 'entropy_nats', 'coherence'):
            value = result[key]
            print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
        print(f"report: {path}")
