"""
Raw files -> documents (plain strings), for data/prepare.py; torch-free.

  .txt      one document per file, Project Gutenberg's header and licence cut off
  .jsonl    one record per line
  .json     a list of records, or one record
  .parquet  one record per row (needs pyarrow)

The field holding a record's text is detected per file, from its first records: "text",
"content", or a chat list under "messages"/"conversations", rendered as "role: content" lines.
A record that is broken or doesn't fit becomes None, which read_documents counts as malformed and
skips: bad records never stop a run. ShareGPT cuts a long conversation into parts, one record each;
read_documents(files, join=True) puts them back together (join_parts), so that a conversation
stays one document.

The .json reader streams the items of a list one by one instead of calling json.load: ShareGPT's
126 MB list is cut off mid-record, which json.load refuses as a whole, while the streamed reader
keeps every complete record before the cut.
"""
import codecs
import glob
import json
import re
from itertools import groupby
from pathlib import Path

from failsafe import fail

FORMATS = (".txt", ".jsonl", ".json", ".parquet")
TEXT_FIELDS = ("text", "content", "messages", "conversations")  # in order of preference
SPEAKERS = {"human": "user", "gpt": "assistant"}  # ShareGPT's: every chat format reads alike
JSON_SPACE = re.compile(r"[ \t\n\r]*")


def find_files(pattern):
    """A file, a folder (searched recursively) or a glob -> the sorted readable files it names."""
    p = Path(pattern)
    paths = ([p] if p.is_file() else p.rglob("*") if p.is_dir()
             else map(Path, glob.glob(pattern, recursive=True)))
    return sorted(f for f in paths if f.is_file() and f.suffix.lower() in FORMATS)


def strip_gutenberg(text):
    """Keep what lies between Project Gutenberg's '*** START OF ...' and '*** END OF ...' lines, if
    present."""
    if start := re.search(r"^\*\*\* ?START OF.*$", text, re.M):
        text = text[start.end():]
    if end := re.search(r"^\*\*\* ?END OF", text, re.M):
        text = text[:end.start()]
    return text.strip()


def decode_value(decoder, buf, pos, eof):
    """(value, end) of the JSON value at buf[pos], or None while it is broken or may go on past the
    buffer."""
    try:
        value, end = decoder.raw_decode(buf, pos)
    except ValueError:
        return None
    return (value, end) if end < len(buf) or eof else None  # "12" may start "123" in the next chunk


def iter_json(path, chunk_bytes=1 << 20):
    """The records of a .json file: the items of a top-level list, decoded one by one as the file is
    read in chunks, else the file's one value. A list that breaks off (ShareGPT's is cut mid-record)
    still gives every complete record before the break, then one None (counted as malformed) and a
    printed note of where it broke."""
    decoder, buf, pos, eof, count = json.JSONDecoder(), "", 0, False, 0
    dropped = 0  # characters read and let go of before buf
    utf8 = codecs.getincrementaldecoder("utf-8")()  # a chunk may end inside a character: it waits
    # what may come next: "[" first, "item]" after "[", "item" after ",", ",]" after an item
    expect = "["
    try:
        with open(path, "rb") as f:
            while True:
                pos = JSON_SPACE.match(buf, pos).end()
                c = buf[pos:pos + 1]
                if expect == "[" and c not in ("", "["):  # not a list: the whole file is one record
                    try:
                        record = json.loads(buf[pos:] + utf8.decode(f.read(), final=True))
                    except ValueError:
                        break
                    yield record
                    return
                if c and c in "[,]" and c in expect:
                    if c == "]":
                        return
                    pos, expect = pos + 1, "item]" if c == "[" else "item"
                elif "item" in expect and (item := decode_value(decoder, buf, pos, eof)):
                    record, pos = item
                    count, expect = count + 1, ",]"
                    yield record
                elif not eof:  # nothing fits yet: read on, a record may span chunks
                    chunk = f.read(chunk_bytes)
                    buf, pos, dropped = buf[pos:] + utf8.decode(chunk), 0, dropped + pos
                    eof = not chunk
                else:
                    break
    except UnicodeDecodeError:
        pass
    print(f"note: {path} breaks off after {count:,} complete records, at character "
          f"{dropped + pos:,} (cut or broken): skipped the rest")
    yield None


def read_records(path):
    """The records of a .jsonl/.json/.parquet file; a line or file that isn't valid UTF-8 JSON gives
    None."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:  # bad JSON and undecodable bytes both land here
                        yield None
    elif suffix == ".json":
        yield from iter_json(path)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            fail(f"reading {path} needs pyarrow: pip install pyarrow")
        yield from pq.read_table(path).to_pylist()


def record_text(record, field):
    """One record's document, or None when it doesn't fit (field missing, wrong type, a chat turn
    without role/from and content/value). Chats become 'role: content' lines, e.g.
    'user: hi\\nassistant: hello', with ShareGPT's human/gpt renamed user/assistant (its rare
    others, system/bing/bard/chatgpt/user, are kept)."""
    value = record.get(field) if isinstance(record, dict) else None
    if field in ("text", "content"):
        return value if isinstance(value, str) else None
    if not isinstance(value, list) or not value:
        return None
    lines = []
    for turn in value:
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if not (isinstance(role, str) and isinstance(content, str)):
            return None
        lines.append(f"{SPEAKERS.get(role, role)}: {content}")
    return "\n".join(lines)


def id_stem(record):
    """'QWJhYvA' for a record whose id is 'QWJhYvA_11' (ShareGPT's part ids), else None."""
    part_id = record.get("id") if isinstance(record, dict) else None
    match = isinstance(part_id, str) and re.fullmatch(r"(.+)_\d+", part_id)
    return match[1] if match else None


def join_parts(records, field):
    """ShareGPT cuts long conversations into consecutive records with ids <stem>_0, <stem>_11, ...:
    join each run of one stem back into one chat, so that the split by document keeps a conversation
    on one side. A part after the first usually repeats the last turn before it: that turn is kept
    once. Only for --dataset=sharegpt: other data sets number separate chats alike (FastChat's
    identity_0, identity_1). Empty parts vanish; a part whose chat isn't a list makes the whole
    conversation one None (malformed)."""
    for stem, group in groupby(records, key=lambda r: id_stem(r) or object()):  # object(): alone
        parts = list(group)
        if len(parts) == 1:
            yield parts[0]
            continue
        chats, turns = [p.get(field) for p in parts], []
        if not all(isinstance(chat, list) for chat in chats):
            yield None
            continue
        for chat in chats:
            turns += chat[1:] if turns and chat and chat[0] == turns[-1] else chat
        yield {"id": stem, field: turns}


def file_texts(path, join):
    """The documents of one file, None for each record that is broken or doesn't fit. The text field
    of a .json/.jsonl/.parquet file is guessed from its first records; a file without one is
    skipped, and only its broken records are counted."""
    if path.suffix.lower() == ".txt":
        try:
            return [strip_gutenberg(path.read_bytes().decode("utf-8"))]
        except UnicodeDecodeError:
            return [None]
    records = list(read_records(path))
    head = [r for r in records[:16] if isinstance(r, dict)]
    field = next((k for k in TEXT_FIELDS if any(k in r for r in head)), None)
    if field is None:
        print(f"skipping {path}: no {'/'.join(TEXT_FIELDS)} field in its first records")
        return [None for r in records if r is None]
    if join:
        parts, records = sum(r is not None for r in records), list(join_parts(records, field))
        print(f"joined {parts:,} records of {path} into {sum(r is not None for r in records):,} "
              "conversations (consecutive parts of one id)")
    return [record_text(r, field) for r in records]


def read_documents(files, join=False):
    """All documents of all files, and how many records were malformed (skipped, never fatal). With
    join, the parts of one conversation become one document (see join_parts)."""
    docs, malformed = [], 0
    for path in files:
        for text in file_texts(path, join):
            try:
                text.encode("utf-8")  # fails for None and for JSON's lone surrogates, "\ud800"
                docs.append(text)
            except (AttributeError, UnicodeEncodeError):
                malformed += 1
    return docs, malformed
