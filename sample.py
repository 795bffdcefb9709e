"""
Sample from a trained Ava model.

    python sample.py --out_dir=out/nano
    python sample.py --out_dir=out/nano --start="ROMEO:" --num_samples=3 --temperature=0.8 --top_k=50
    python sample.py --out_dir=out/nano --start=FILE:prompt.txt --top_p=0.9 --seed=7
"""

import os

import torch

from configurator import configure_or_exit
from data.prepare import load_tokenizer
from train import fail, load_checkpoint  # the same checks and one-line errors as train.py

# -----------------------------------------------------------------------------
out_dir = 'out/nano'     # a folder written by train.py: ckpt.pt and tokenizer.json
start = '\n'             # the prompt, or FILE:path to read it from a file
num_samples = 2
max_new_tokens = 200
temperature = 0.8        # 0 = greedy; < 1 sharper, > 1 more random
top_k = 0                # keep only the k most likely tokens; 0 = all
top_p = 1.0              # keep the smallest set of tokens whose probability reaches p (nucleus); 1.0 = all
seed = 1337
device = 'auto'          # 'auto' (cuda if available), 'cpu', 'cuda', ...
# -----------------------------------------------------------------------------
configure_or_exit(globals())

if temperature < 0:
    fail(f"temperature must be >= 0 (0 = greedy), got {temperature}")
if not 0 < top_p <= 1:
    fail(f"top_p must be in (0, 1], got {top_p}")
if top_k < 0:
    fail(f"top_k must be >= 0 (0 = off), got {top_k}")
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
torch.manual_seed(seed)

_, _, model = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
model.eval().to(device)
try:
    enc = load_tokenizer(os.path.join(out_dir, 'tokenizer.json'))
except OSError as e:
    fail(f"no tokenizer next to the checkpoint ({e}); copy the data set's tokenizer.json into {out_dir}")

if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]}: {e.strerror}")
prompt = enc.encode_ordinary(start) or [enc.eot_token]  # an empty prompt starts like a new document
x = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p)
for row in y.tolist():
    print(enc.decode(row))
    print('---------------')
