"""
The BPE tokenizer of a data set, read back for encoding and decoding: data/prepare.py trains a
byte-level BPE with `tokenizers` and writes it as tokenizer.json; every script reads that file as a
tiktoken Encoding with the same ids (tiktoken encodes several times faster). Torch-free, so that
data/prepare.py runs where torch is not installed.

    from tokenizer import load_run_tokenizer
    enc = load_run_tokenizer('out/nano', vocab_size=8192)   # the run's copy of the data set's BPE
    enc.decode(enc.encode_ordinary('ROMEO:'))
"""

import json
import os
from pathlib import Path

import tiktoken

from failsafe import fail, first_line

# GPT-2's pre-tokenizer regex: split into words, numbers, punctuation and whitespace runs before
# BPE. It is the one `tokenizers`' ByteLevel pre-tokenizer uses (use_regex=True); tiktoken needs it
# spelled out.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's table byte -> printable character. Byte-level BPE stores every byte as a visible
    character so that its vocabulary is plain strings: printable bytes map to themselves, the rest
    to code points from 256 up."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # control bytes, space, etc. borrow the code points 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tokenizer(path):
    """Rebuild the BPE in a tokenizer.json as a tiktoken Encoding with identical ids. `tokenizers`
    applies merges in the order it learned them; tiktoken merges the pair whose joined bytes have
    the lowest id. The trainer gives each new token the next id, so the two orders agree;
    data/prepare.py checks that on val text, the tests on tricky strings."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in token): i for token, i in spec["model"]["vocab"].items()}
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    return tiktoken.Encoding(Path(path).parent.name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens=special, explicit_n_vocab=len(ranks) + len(special))


def load_run_tokenizer(folder, vocab_size=None, fix=None):
    """The tokenizer.json of a run folder (train.py copies the data set's next to the checkpoint)
    or of a data set, checked against vocab_size (the model's or meta.json's). A missing, broken or
    mismatched file is one line; fix says what to do about it."""
    path = os.path.join(folder, 'tokenizer.json')
    fix = fix or f"copy the data set's tokenizer.json into {folder}"
    try:
        enc = load_tokenizer(path)
    except OSError as e:
        fail(f"no tokenizer.json in {folder} ({e.strerror}); {fix}")
    except Exception as e:  # any other: not the JSON a BPE from data/prepare.py writes
        fail(f"{path} is not a tokenizer from data/prepare.py ({type(e).__name__}: "
             f"{first_line(e)}); {fix}")
    if vocab_size is not None and enc.n_vocab != vocab_size:
        fail(f"{path} has {enc.n_vocab} tokens where {vocab_size} are expected (another data "
             f"set's?); {fix}")
    return enc
