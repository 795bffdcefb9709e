"""
data/prepare.py on a small corpus planted in tmp_path: every filter count, the split, the bins and meta.json are
checked against values known by construction, and the two BPE implementations against each other. No network.
"""
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.prepare import (bytes_to_unicode, default_name, dup_5gram_fraction, filter_documents,  # noqa: E402
                          load_tokenizer, main, read_documents, split_documents)

WORDS = ("the of and to a in that is was he for it with as his on be at by I you don't we'll it's café "
         "naïve über 日本語 テキスト 🙂 👍🏽 1999 3.14 42 1,000 thou thee hath doth king queen night day love death "
         "sword crown blood fair foul sweet bitter heaven earth fire water").split()
TRICKY = ["Hello, world! I'm here; you're there & they'll come.",
          "naïve café — 日本語のテキスト, emoji 🙂👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
          "numbers: 12345 3.14159 1,000,000 0x1F 2024-06-01",
          "  leading spaces,   runs   of spaces,\ttabs\t\tand\n\n\nnewlines\r\nCRLF \n ",
          "DON'T WON'T it's 'quoted' \"double\" can't",
          "\u00a0no-break\u2003em\u200bzero-width", " " * 40 + "x" + "\n" * 7, "aaaaaaaaaaaaaaaaaaaaaaa"]


def prose(rng, n_words=150):
    """Random words, so duplicated 5-grams (and long word runs) are vanishingly unlikely."""
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Plant a corpus with known good documents and known bad ones, run prepare.py on it once."""
    rng, root = random.Random(0), tmp_path_factory.mktemp("corpus")
    src, out = root / "src", root / "out"
    (src / "sub").mkdir(parents=True)
    good = [prose(rng) for _ in range(30)]
    lines = [json.dumps({"text": t}) for t in good]
    lines += [json.dumps({"text": good[i]}) for i in (0, 7, 29)]                    # 3 duplicates
    lines += [json.dumps({"text": t}) for t in ("hi", "too short", "", "x" * 99)]  # 4 too short (< 100 chars)
    lines += [json.dumps({"text": "the cat sat on the mat and " * 20})]            # 1 repetitive
    lines += [json.dumps({"text": prose(rng) + " la" * 25 + " " + prose(rng)})]   # 1 word run of 25 > 20
    lines += ['{"text": "unterminated', json.dumps({"title": "no text field"}),      # 5 malformed
              json.dumps({"text": 42}), json.dumps({"text": "\ud800" + prose(rng)})]
    (src / "a.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"text": "\xff\xfe bad utf-8"}\n\n')
    txt = [prose(rng) for _ in range(4)]
    for i, t in enumerate(txt[:3]):
        (src / "sub" / f"doc{i}.txt").write_text(t + "\n")
    (src / "sub" / "gutenberg.txt").write_text("The Project Gutenberg EBook, LICENCE BOILERPLATE\n*** START OF THIS "
                                               f"PROJECT GUTENBERG EBOOK X ***\n\n{txt[3]}\n\n*** END OF THE PROJECT "
                                               "GUTENBERG EBOOK X ***\nMORE BOILERPLATE\n")
    (src / "sub" / "latin1.txt").write_bytes(b"caf\xe9 " * 50)                 # 1 malformed (not UTF-8)
    (src / "sub" / "notes.md").write_text(prose(rng))                         # not a corpus format: ignored
    content = [prose(rng) for _ in range(3)]
    (src / "c.json").write_text(json.dumps([{"content": t} for t in content]))
    chats = [[{"role": "user", "content": prose(rng, 20)}, {"role": "assistant", "content": prose(rng, 20)}]
             for _ in range(4)]
    (src / "chat.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in chats[:2]))
    (src / "sharegpt.jsonl").write_text("\n".join(
        json.dumps({"conversations": [{"from": t["role"], "value": t["content"]} for t in m]}) for m in chats[2:]))
    rendered = ["\n".join(f"{t['role']}: {t['content']}" for t in m) for m in chats]
    # prepare reads files in sorted path order: a.jsonl, c.json, chat.jsonl, sharegpt.jsonl, sub/doc*.txt, ...
    kept = good + content + rendered + txt
    main([f"--input={src}", f"--out_dir={out}", "--vocab_size=400", "--seed=0"])
    meta = json.loads((out / "meta.json").read_text())
    return out, meta, kept


def split_docs(out, meta, split):
    """Decode a .bin back into its documents, cutting at <|endoftext|>."""
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    enc, eot = load_tokenizer(out / "tokenizer.json"), meta["eot_id"]
    assert ids[-1] == eot
    parts = np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]  # each part ends with its <|endoftext|>
    return [enc.decode(part[:-1].tolist()) for part in parts]


def test_filter_counts_match_what_was_planted(corpus):
    _, meta, kept = corpus
    f = meta["filters"]
    assert f["dropped"] == {"duplicate": 3, "too_short": 4, "word_run": 1, "repetitive": 1}
    assert f["malformed"] == 6 and f["kept"] == len(kept) == 41 and f["read"] == 41 + 9


def test_bins_hold_exactly_the_kept_documents_in_order(corpus):
    out, meta, kept = corpus
    train, val = split_docs(out, meta, "train"), split_docs(out, meta, "val")
    assert sorted(train + val) == sorted(kept)  # nothing lost, nothing extra, Gutenberg licence stripped
    assert not any("BOILERPLATE" in d for d in train + val)
    for split in (train, val):  # each split keeps the corpus order
        positions = [kept.index(d) for d in split]
        assert positions == sorted(positions)
    assert [len(train), len(val)] == [meta["documents"]["train"], meta["documents"]["val"]]
    assert len(train) >= 1 and len(val) >= 1
    val_chars, total = sum(map(len, val)), sum(map(len, kept))
    assert 0.15 * total <= val_chars < 0.15 * total + max(map(len, val))  # stopped at the first doc past 15%


def test_bins_and_meta_agree(corpus):
    out, meta, _ = corpus
    assert meta["vocab_size"] == 400 and meta["eot_id"] == 399 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "tokenizer.json"
    for split in ("train", "val"):
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == meta["tokens"][split] == (out / f"{split}.bin").stat().st_size // 2
        assert (ids == 399).sum() == meta["documents"][split] and ids.max() <= 399
    counts = Counter(np.fromfile(out / "train.bin", dtype=np.uint16).tolist())
    n = sum(counts.values())
    assert meta["unigram_entropy_nats"] == pytest.approx(-sum(c / n * math.log(c / n) for c in counts.values()),
                                                         abs=1e-4)


def test_tiktoken_matches_tokenizers_and_round_trips(corpus):
    out, _, kept = corpus
    hf, enc = Tokenizer.from_file(str(out / "tokenizer.json")), load_tokenizer(out / "tokenizer.json")
    assert enc.n_vocab == hf.get_vocab_size() == 400 and enc.eot_token == hf.token_to_id("<|endoftext|>") == 399
    for text in TRICKY + kept[:5]:
        ids = enc.encode_ordinary(text)
        assert ids == hf.encode(text).ids, text
        assert enc.decode(ids) == hf.decode(ids) == text
    assert len(enc.encode_ordinary(kept[0])) < len(kept[0].encode())  # merges were learned and used


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], table[0]) == ("Ġ", "Ċ", "A", "Ā")


def test_format_detection(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": 1, "text": "plain text"}))
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "some content"}))
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}))
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                                    {"from": "gpt", "value": "a"}]}))
    (tmp_path / "l.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, {"text": ["not", "str"]}]))
    (tmp_path / "d.json").write_text(json.dumps({"content": "a lone record"}))
    (tmp_path / "x.json").write_text("[{broken")
    docs, malformed = read_documents(sorted(tmp_path.iterdir()))
    assert docs == ["some content", "a lone record", "one", "two", "user: hi\nassistant: hello",
                    "human: q\ngpt: a", "plain text"]
    assert malformed == 2


def test_split_is_seeded_and_keeps_order():
    docs = [f"document {i} " * (i + 1) for i in range(20)]
    train, val = split_documents(docs, 0.15, seed=1)
    assert (train, val) == split_documents(docs, 0.15, seed=1) != split_documents(docs, 0.15, seed=2)
    assert sorted(train + val) == sorted(docs) and train == [d for d in docs if d in train]
    assert split_documents(["a", "b"], 0.99, seed=0)[0]  # train always keeps a document
    with pytest.raises(SystemExit, match="at least 2 documents"):
        split_documents(["only one"], 0.15, seed=0)


def test_default_name():
    assert default_name(None) == "shakespeare"
    assert [default_name(p) for p in ("books/", "x/chats.jsonl", "web/*.json", "c/**/*.txt")] == \
        ["books", "chats", "web", "c"]


def test_parquet_without_pyarrow_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # a None entry makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit) as e:
        main([f"--input={tmp_path / 'd.parquet'}", f"--out_dir={tmp_path / 'out'}"])
    assert "pip install pyarrow" in e.value.code and "\n" not in e.value.code


@pytest.mark.parametrize("argv, message", [
    (["--input={tmp}/nothing/*.jsonl"], "matches no"),
    (["--input={tmp}/junk.jsonl"], "no documents"),
    (["--input={tmp}/junk.jsonl", "--val_fraction=1.5"], "val_fraction"),
])
def test_bad_input_exits_cleanly(tmp_path, argv, message):
    (tmp_path / "junk.jsonl").write_text('{"text": 1}\nnot json\n')
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv] + [f"--out_dir={tmp_path / 'out'}"])
    assert e.value.code.startswith("error:") and message in e.value.code and "\n" not in e.value.code


def test_repetition_score_by_hand():
    assert dup_5gram_fraction("a b c d e".split()) == 0  # one 5-gram, seen once
    assert dup_5gram_fraction("a b c d e a b c d e".split()) == 1
    # the 5-gram "a b c d e" occurs twice; "yyyy" sits outside both copies: 10 of 14 characters are covered
    assert dup_5gram_fraction("a b c d e yyyy a b c d e".split()) == pytest.approx(10 / 14)


def test_filter_thresholds_are_inclusive_limits():
    rng = random.Random(1)
    ok_run, long_run = prose(rng) + " la" * 20, prose(rng) + " la" * 21
    docs = ["y" * 100, "y" * 99, ok_run, long_run, ok_run, "a b c d e " * 30]
    kept, dropped = filter_documents(docs, min_chars=100, max_repetition=0.15, max_word_run=20)
    assert kept == ["y" * 100, ok_run]
    assert dropped == {"duplicate": 1, "too_short": 1, "word_run": 1, "repetitive": 1}
