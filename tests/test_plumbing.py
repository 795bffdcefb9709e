"""
What every script shares: configurator.py's settings (which globals are settings, how a --key=value
is read), --help on every script, one-line errors for unknown flags, and the import names Ava takes
at the repository root.
    python -m pytest -q tests/test_plumbing.py
"""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure, settings_help, settings_of  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS='1')


def run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=ENV)


# ---- settings ----

def test_settings_of_skips_constants():
    """An ALL-UPPERCASE global is a constant: not a setting, not in config.yaml, not settable."""
    namespace = dict(PEAK_TFLOPS=989.0, CPU_FLOPS=35e9, T=3, peak_tflops=989.0, beta1=0.9,
                     name='x', flag=True, _private=1, table=(1, 2), os=os)
    assert settings_of(namespace) == dict(peak_tflops=989.0, beta1=0.9, name='x', flag=True)
    for arg in ('--PEAK_TFLOPS=1', '--CPU_FLOPS=1e9'):
        with pytest.raises(ValueError, match=r"unknown config key .*--help"):
            configure(dict(namespace), [arg])
    with pytest.raises(ValueError, match="did you mean peak_tflops"):
        configure(dict(namespace), ['--PEAK_TFLOPS=1'])


def test_a_str_setting_takes_the_text_as_written(tmp_path):
    settings = dict(start='\n', stop='', out='', num_samples=2, temperature=0.8, eval=False)
    overrides = configure(settings, ['--start=42', r'--stop=\n\n|THE END', '--out=True',
                                     '--num_samples=3', '--temperature=1', '--eval=True'])
    assert overrides == dict(start='42', stop=r'\n\n|THE END', out='True', num_samples=3,
                             temperature=1.0, eval=True)
    assert isinstance(settings['temperature'], float)
    assert configure(settings, ['--start=3.5', "--stop='x'", '--out=']) == dict(
        start='3.5', stop="'x'", out='')
    for bad, words in (('--num_samples=2.5', 'expects int'), ('--num_samples=abc', 'expects int'),
                       ('--temperature=hot', 'expects float'), ('--eval=1', 'expects bool'),
                       ('--eval=yes', 'expects bool'), ('--num_samples', 'expected --key=value'),
                       ('-n', "unknown option '-n'")):
        with pytest.raises(ValueError, match=words):
            configure(dict(settings), [bad])
    config_file = tmp_path / 'c.py'
    config_file.write_text('start = 42\n')  # a config file is Python: its types are checked
    with pytest.raises(ValueError, match='--start expects str'):
        configure(dict(settings), [str(config_file)])


# ---- --help ----

TOY_CONFIG = '''
from dataclasses import dataclass


@dataclass
class ToyConfig:
    width: int = 8            # channels
    depth: int = 1            # layers
    # routing
    router: str = 'sinkhorn'  # 'sinkhorn' or 'softmax': a comment
                              # that continues

    def __post_init__(self):
        # a comment inside a method
        self.width = max(self.width, 1)
'''

TOY_SCRIPT = '''"""
Toy: a script whose settings document themselves.

A second paragraph that --help leaves out.
"""
from dataclasses import fields

from toy_config import ToyConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/toy'     # where it goes
# the model: ToyConfig's fields, with its
# defaults
globals().update({f.name: f.default for f in fields(ToyConfig)})
depth = 2               # the script's own default and comment win
verbose = False         # a comment that goes on
                        # over two lines
seed = 1337
# -----------------------------------------------------------------------------
LIMIT = 3               # a constant: no setting
extra = 'x'             # a setting past the block
'''


def test_help_lists_the_settings_with_their_comments(tmp_path, monkeypatch):
    """Worked by hand: the block's order and section headers, comments continued on the next
    lines, a dataclass's fields (documented in its own file) where the block takes them in."""
    (tmp_path / 'toy_config.py').write_text(TOY_CONFIG)
    (tmp_path / 'toy.py').write_text(TOY_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = types.ModuleType('toy')
    toy.__file__ = str(tmp_path / 'toy.py')
    exec(compile(TOY_SCRIPT, toy.__file__, 'exec'), vars(toy))
    expected = f"""\
        usage: python {os.path.relpath(toy.__file__)} [CONFIG_FILE ...] [--key=value ...]

        Toy: a script whose settings document themselves.

        Each setting with its default; config files (Python assignments) override them,
        then --key=value arguments do.

        I/O
          --out_dir='out/toy'           where it goes

        the model: ToyConfig's fields, with its defaults
          --width=8                     channels
          --router='sinkhorn'           'sinkhorn' or 'softmax': a comment that continues
          --depth=2                     the script's own default and comment win
          --verbose=False               a comment that goes on over two lines
          --seed=1337

        other settings
          --extra='x'"""
    assert settings_help(vars(toy)) == textwrap.dedent(expected)


# a setting of each script, its default and words of its comment (for train.py, one from model.py
# and one whose comment continues over lines)
HELP = {
    'train.py': [('--learning_rate=0.001', 'peak learning rate'),
                 ("--router='sinkhorn'", "'sinkhorn' (balanced by construction), 'softmax'"),
                 ("--expert_act='gelu'", "'gelu' (2 matrices of C x F per expert)")],
    'sample.py': [('--temperature=0.8', '0 = greedy; < 1 sharper, > 1 more random')],
    'rlhf.py': [('--kl_coef=0.25', 'beta of the per-token penalty')],
    'bench.py': [('--timed_steps=20', 'the reported time is the median of these')],
    'data/prepare.py': [('--min_chars N', 'drop shorter documents (default: 100)')],
}


@pytest.mark.parametrize('script', HELP)
def test_help_on_every_script(script):
    for flag in ('--help', '-h') if script == 'train.py' else ('--help',):
        done = run(script, flag)
        assert done.returncode == 0 and not done.stderr, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f'usage: python {script}'), lines[0]
        for setting, comment in HELP[script]:
            assert [line for line in lines if line.strip().startswith(setting)
                    and comment in line], (setting, done.stdout)
    if script == 'train.py':  # a comment continued on the next line (in model.py) is there too
        assert "or 'swiglu' (3: the gated Llama/Mixtral FFN;" in ' '.join(done.stdout.split())


@pytest.mark.parametrize('script', HELP)
def test_an_unknown_flag_is_one_line(script):
    for arg in ('--no_such_setting=1', '-x'):
        done = run(script, arg)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, done.stderr
        assert lines[0].startswith('error: ') and arg.partition('=')[0] in lines[0], lines[0]
        assert '--help' in lines[0] and 'Traceback' not in done.stdout + done.stderr


# ---- import names ----

def test_import_kernels_from_the_root_is_hugging_faces():
    """kernels/ holds Ava's CUDA ops but is no package: from the repository root, `import kernels`
    (which transformers does) finds the installed Hugging Face package."""
    try:
        installed = importlib.metadata.distribution('kernels').locate_file('kernels/__init__.py')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    done = run('-c', 'import kernels; print(kernels.__file__)')
    assert done.returncode == 0, done.stderr
    assert os.path.realpath(done.stdout.strip()) == os.path.realpath(installed)


COMMON = {'kernels', 'transformers', 'tokenizers', 'datasets', 'accelerate', 'safetensors',
          'huggingface_hub', 'torch', 'torchvision', 'numpy', 'tiktoken', 'yaml', 'matplotlib',
          'pytest', 'wandb', 'triton', 'peft', 'trl', 'evaluate', 'sentencepiece', 'einops',
          'vllm', 'flash_attn', 'deepspeed', 'megatron', 'apex', 'xformers', 'bitsandbytes',
          'liger_kernel', 'torchao', 'lightning', 'pyarrow', 'pandas', 'scipy', 'tqdm', 'regex'}


def test_no_top_level_name_is_taken():
    """An Ava module or package at the root hides any installed one of the same import name (and
    Python's own) from a script, a REPL or pytest started there: none takes one."""
    ava = {name[:-3] for name in os.listdir(ROOT) if name.endswith('.py')}
    ava |= {name for name in os.listdir(ROOT) if os.path.isfile(
        os.path.join(ROOT, name, '__init__.py'))}
    taken = set(importlib.metadata.packages_distributions()) | COMMON | sys.stdlib_module_names
    assert {'model', 'train', 'configurator', 'ava_kernels'} <= ava
    assert not ava & taken, ava & taken


# ---- failsafe.py ----

def test_a_signal_inside_a_weakref_callback_still_stops(tmp_path):
    """Python drops a SystemExit raised in a weakref callback or __del__ (torch runs some while it
    imports): stop_on_signals must stop the script anyway, with one line and 128 + the signal."""
    script = tmp_path / 'stops.py'
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time, weakref
        sys.path.insert(0, {ROOT!r})
        from failsafe import stop_on_signals
        stop_on_signals(lambda: '; nothing was written')
        class Thing:
            pass
        thing = Thing()
        ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM))
        del thing
        time.sleep(0.5)
        print('still running')
    """))
    done = run(str(script))
    assert done.returncode == 143 and 'still running' not in done.stdout, done
    assert done.stderr.strip().splitlines() == ['error: stopped by SIGTERM; nothing was written']


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    """A write that fails half way (here: an error after some bytes) leaves the previous file and no
    .tmp, and the error is one line naming the file; optional=True makes it a note."""
    from failsafe import write_atomic
    path = tmp_path / 'out.txt'
    path.write_text('old')

    def broken(tmp):
        with open(tmp, 'w') as f:
            f.write('new, half')
        raise OSError(5, 'Input/output error')
    with pytest.raises(SystemExit) as stop:
        write_atomic(path, broken)
    assert str(stop.value) == (f"error: could not write {path} (Input/output error); the "
                               f"previous {path} is intact")
    assert path.read_text() == 'old' and sorted(os.listdir(tmp_path)) == ['out.txt']
    assert write_atomic(path, broken, optional=True) is False and path.read_text() == 'old'
    assert write_atomic(path, lambda tmp: open(tmp, 'w').write('new')) and path.read_text() == 'new'
