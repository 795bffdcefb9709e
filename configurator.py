"""
Poor man's configurator, after nanoGPT: a script keeps its settings as plain module globals, and

    python train.py config/nano.py --max_iters=200 --router='softmax'

overrides them, first from the config file(s) (plain Python assignments), then from --key=value
arguments.
Why not argparse: the defaults stay readable at the top of the script, with a comment on each line.

Unlike nanoGPT's exec-into-globals, every key is checked: a name the script does not define, or a
value of
the wrong type, is a one-line error that names the key, instead of a silent new global.
"""

import ast
import difflib
import os
import sys
import traceback
import types


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
    """The settings of a script: its public globals that hold an int, float, bool or str."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def configure(settings, argv, ignored=()):
    """Apply config files and --key=value overrides in argv to the dict settings (a script's
    globals()), for the keys that already hold an int, float, bool or str. Keys in `ignored` are
    accepted and dropped (bench.py reads train.py's config files but not their data or schedule
    settings). A config file that does not parse, or raises, is a ValueError naming the file.
    Returns the overridden {key: value}."""
    keys = set(settings_of(settings))
    overrides = {}
    for arg in argv:
        if not arg.startswith('--'):  # a config file: run in its own namespace, check what it set
            try:
                source = open(arg).read()
            except (OSError, UnicodeDecodeError) as e:
                why = getattr(e, 'strerror', None) or f"not UTF-8 text ({e.reason})"
                raise ValueError(f"cannot read config file {arg}: {why}") from None
            namespace = {}
            try:
                exec(compile(source, arg, 'exec'), namespace)
            except SyntaxError as e:
                raise ValueError(f"config file {arg} line {e.lineno}: {e.msg}") from None
            except Exception as e:  # the file ran and raised: name it and its line
                frames = traceback.extract_tb(e.__traceback__)
                line = next((f" line {f.lineno}" for f in reversed(frames) if f.filename == arg),
                            '')
                first = str(e).partition('\n')[0]
                raise ValueError(f"config file {arg}{line} raised {type(e).__name__}: "
                                 f"{first}") from None
            pairs = [(k, v) for k, v in namespace.items()
                     if not k.startswith('_') and not isinstance(v, types.ModuleType)]
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise ValueError(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)  # numbers, booleans, quoted strings ...
            except (SyntaxError, ValueError):
                value = text                    # ... and bare words are strings
            pairs = [(key, value)]
        for key, value in pairs:
            if key in ignored:
                continue
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=3)
                hint = (f"did you mean {' or '.join(close)}?" if close
                        else "the settings are the globals of the script")
                raise ValueError(f"unknown config key {key!r} (from {arg}); {hint}")
            overrides[key] = settings[key] = _coerce(key, value, settings[key])
    return overrides


def configure_or_exit(settings, argv=None, ignored=()):
    """configure(), with bad input reported as one line by common.fail (exit code 2), and the
    overrides echoed once: under torchrun by rank 0 only."""
    from common import fail  # common imports torch: configure() itself stays free of it
    try:
        overrides = configure(settings, sys.argv[1:] if argv is None else argv, ignored)
    except ValueError as e:
        fail(e, code=2)
    if os.environ.get('RANK', '0') == '0':
        for key, value in overrides.items():
            print(f"config: {key} = {value!r}")
    return overrides
