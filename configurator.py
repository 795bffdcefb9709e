"""
The settings of every script; torch-free, so that data/prepare.py can use it on a machine without
torch.

Poor man's configurator, after nanoGPT: a script keeps its settings as plain module globals, each
with a comment, between two `# ----` rules, and

    python train.py config/nano.py --max_iters=200 --router=softmax

overrides them, first from the config file(s) (plain Python assignments), then from --key=value
arguments. `--help` lists the settings with their defaults and those comments.
Why not argparse: the defaults stay readable at the top of the script, with a comment on each line.

Unlike nanoGPT's exec-into-globals, every key is checked: a name the script does not define, or a
value of the wrong type, is a one-line error that names the key, instead of a silent new global.
On the command line a str setting takes the text as written (`--start=42` is the prompt '42'); an
int, float or bool setting reads it as a Python literal.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import traceback
import types

from failsafe import fail, first_line



def _coerce(key, value, default):
    """value with the type of the default it replaces (an int is a fine float), or a ValueError."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"--{key} expects {type(default).__name__} (default {default!r}), got "
                         f"{value!r}")
    return value


def settings_of(namespace):
    """The settings of a script: its public globals that hold an int, float, bool or str. An
    ALL-UPPERCASE name is a constant (PEAK_TFLOPS), never a setting."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str))}


def read_config_file(path):
    """The assignments of a config file, run in its own namespace -> [(key, value)]. A file that
    cannot be read, does not parse, or raises is a ValueError naming the file (and line)."""
    try:
        source = open(path).read()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, 'strerror', None) or f"not UTF-8 text ({e.reason})"
        raise ValueError(f"cannot read config file {path}: {why}") from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), namespace)
    except SyntaxError as e:
        raise ValueError(f"config file {path} line {e.lineno}: {e.msg}") from None
    except Exception as e:  # the file ran and raised: name it and its line
        frames = traceback.extract_tb(e.__traceback__)
        line = next((f" line {f.lineno}" for f in reversed(frames) if f.filename == path), '')
        raise ValueError(f"config file {path}{line} raised {type(e).__name__}: "
                         f"{first_line(e)}") from None
    return [(k, v) for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType)]


def read_argument(arg, settings):
    """One --key=value -> [(key, value)]: the text as written for a str setting, else a Python
    literal (numbers, booleans), or the text when it is none (the type check then names it)."""
    key, sep, text = arg[2:].partition('=')
    if not sep:
        raise ValueError(f"expected --key=value, got {arg!r} (--help lists the settings)")
    if isinstance(settings.get(key), str):
        return [(key, text)]
    try:
        return [(key, ast.literal_eval(text))]
    except (SyntaxError, ValueError):
        return [(key, text)]


def configure(settings, argv, ignored=()):
    """Apply config files and --key=value overrides in argv to the dict settings (a script's
    globals()), for the keys settings_of finds there. Keys in `ignored` are accepted and dropped
    (bench.py reads train.py's config files but not their data or schedule settings). Bad input is
    a ValueError of one line. Returns the overridden {key: value}."""
    keys = set(settings_of(settings))
    overrides = {}
    for arg in argv:
        if arg.startswith('--'):
            pairs = read_argument(arg, settings)
        elif arg.startswith('-'):
            raise ValueError(f"unknown option {arg!r}: settings are --key=value, anything else is "
                             "a config file (--help lists the settings)")
        else:
            pairs = read_config_file(arg)
        for key, value in pairs:
            if key in ignored:
                continue
            if key not in keys:
                close = difflib.get_close_matches(key.lower(), keys, n=3)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise ValueError(f"unknown config key {key!r} (from {arg}); {hint}--help lists "
                                 "the settings")
            overrides[key] = settings[key] = _coerce(key, value, settings[key])
    return overrides


def configure_or_exit(settings, argv=None, ignored=()):
    """configure(), with bad input reported as one line by fail (exit code 2), and the overrides
    echoed once: under torchrun by rank 0 only. -h or --help prints settings_help and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    rank0 = os.environ.get('RANK', '0') == '0'
    if '-h' in argv or '--help' in argv:
        if rank0:
            print(settings_help(settings))
        sys.exit(0)
    try:
        overrides = configure(settings, argv, ignored)
    except ValueError as e:
        fail(e, code=2)
    if rank0:
        for key, value in overrides.items():
            print(f"config: {key} = {value!r}")
    return overrides


# ---- --help: the settings as the script's source documents them ----

def documented(source, statements, rows):
    """What the source lines `rows` say about the settings, in order: ('setting', name, comment)
    per name an assignment statement binds, its comment joined with the comment lines that continue
    it (indented further than the statement); ('section', None, text) for comment lines of their
    own; ('code', None, None) for any other statement."""
    lines = source.splitlines()
    comments = {t.start[0]: (t.start[1], t.string[1:].strip()) for t in
                tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    alone = {row for row in comments if lines[row - 1].lstrip().startswith('#')}
    at = {node.lineno: node for node in statements}
    items, row = [], rows.start
    while row < rows.stop:
        node = at.get(row)
        if node is None:
            if row in alone and row - 1 in alone and items and items[-1][0] == 'section':
                items[-1] = ('section', None, f"{items[-1][2]} {comments[row][1]}")
            elif row in alone:
                items.append(('section', None, comments[row][1]))
            row += 1
            continue
        end, indent = node.end_lineno, len(lines[row - 1]) - len(lines[row - 1].lstrip())
        text = [comments[r][1] for r in range(row, end + 1) if r in comments]
        while end + 1 in alone and comments[end + 1][0] > indent:
            end += 1
            text.append(comments[end][1])
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, 'target', None)]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        items += [('setting', name, ' '.join(text)) for name in names] or [('code', None, None)]
        row = end + 1
    return items


def script_items(path):
    """documented() of the settings block of the script at path: the lines between its first two
    `# ----` rules. [] when there is no such block or no readable file."""
    try:
        source = open(path, encoding='utf-8').read()
    except (OSError, TypeError, UnicodeDecodeError):
        return []
    rules = [n for n, line in enumerate(source.splitlines(), 1) if re.fullmatch(r'# -{20,}', line)]
    if len(rules) < 2:
        return []
    return documented(source, ast.parse(source).body, range(rules[0] + 1, rules[1]))


def dataclass_items(cls):
    """documented() of a dataclass's fields: train.py and bench.py take ModelConfig's as settings
    (by a `globals().update`), documented in model.py."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return [('setting', f.name, '') for f in dataclasses.fields(cls)]
    body = ast.parse(source).body[0].body
    return documented(source, body, range(body[0].lineno, body[-1].end_lineno + 1))


def settings_items(settings):
    """The settings among a script's globals, in the order of its settings block, with their
    comments and section headers. The fields of the dataclasses among the globals that the block
    does not assign take the place of its first statement that is not an assignment (the
    `globals().update`); what neither documents comes last."""
    keys = settings_of(settings)
    block = script_items(settings.get('__file__'))
    assigned = {name for kind, name, _ in block if kind == 'setting'}
    classes = [v for v in settings.values() if isinstance(v, type) and dataclasses.is_dataclass(v)]
    fields = [(kind, name, text) for cls in classes for kind, name, text in dataclass_items(cls)
              if kind == 'setting' and name not in assigned]
    at = next((n for n, item in enumerate(block) if item[0] == 'code'), len(block))
    items = block[:at] + fields + block[at:] + [('section', None, 'other settings')]
    items += [('setting', k, '') for k in keys]
    seen, kept = set(), []
    for kind, name, text in items:
        if kind == 'section' or kind == 'setting' and name in keys and name not in seen:
            seen.add(name)
            kept.append((kind, name, text))
    return [item for item, after in zip(kept, kept[1:] + [('section',)])
            if item[0] == 'setting' or after[0] == 'setting']  # no header without settings


def settings_help(settings):
    """--help: how to run the script, its docstring's first paragraph, then each setting as
    --key=default with its comment, under the block's section headers."""
    script = os.path.relpath(settings.get('__file__') or 'script.py')
    about = (settings.get('__doc__') or '').strip().split('\n\n')[0]
    lines = [f"usage: python {script} [CONFIG_FILE ...] [--key=value ...]", '', about, '',
             "Each setting with its default; config files (Python assignments) override them,",
             "then --key=value arguments do."]
    pad = ' ' * 32
    for kind, name, text in settings_items(settings):
        if kind == 'section':
            lines += ['', *textwrap.wrap(text, 100)]
            continue
        head = f"  --{name}={settings[name]!r}"
        if len(head) > len(pad) - 2 and text:  # the comment starts on the next line
            lines.append(head)
            head = pad
        lines += textwrap.wrap(text, 100, initial_indent=head.ljust(len(pad)),
                               subsequent_indent=pad) or [head]
    return '\n'.join(lines)
