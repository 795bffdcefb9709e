"""
README.md's commands run as printed, right after its command 1: the training examples on the nano
config (shortened only by an appended --max_iters), every sample.py line, the export and the snippet
that loads it in transformers. They run in a copy of the repository whose data/shakespeare is a tiny
corpus (command 1 downloads Shakespeare; the tests do not).
    python -m pytest -q tests/test_readme.py
"""

import os
import random
import re
import shutil
import subprocess
import sys

import pytest

from data.prepare import main as prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = '--max_iters=2'         # appended to every training line ...
RESUMED = '--max_iters=4'       # ... and to a resume, which needs more than its checkpoint's 2


def readme_commands():
    """The shell lines of README.md's bash blocks, in order, comments dropped; command 1's steps
    split at `&&`."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    lines = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for line in block.replace('\\\n', ' ').splitlines():  # a continued line is one
            line = re.sub(r'\s+#.*$', '', line).strip()
            if line and not line.startswith('#'):
                lines += [part.strip() for part in line.split('&&')]
    return lines


def runnable(line):
    """The lines this test runs: training on the nano configs, sampling, writing a prompt file."""
    if line.startswith('python train.py'):
        return 'config/nano' in line
    return line.startswith(('python sample.py', 'printf '))


def shortened(line):
    if not line.startswith('python train.py'):
        return line
    return f"{line} {RESUMED if '--init_from=resume' in line else SHORT}"


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    """A copy of the tracked files, with a tiny corpus prepared as data/shakespeare."""
    copy = tmp_path_factory.mktemp('repo')
    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    assert files.returncode == 0, files.stderr
    for name in files.stdout.splitlines():
        if os.path.isfile(os.path.join(ROOT, name)) and not name.startswith('bench/'):
            os.makedirs(copy / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), copy / name)
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 7)))
             for _ in range(300)]
    raw = tmp_path_factory.mktemp('raw')
    for d in range(30):
        speeches = [f"{rng.choice(['ROMEO', 'JULIET', 'KING HENRY'])}:\n" + ' '.join(
            rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + '.\n'
            for _ in range(80)]
        (raw / f'play{d}.txt').write_text('\n'.join(speeches))
    prepare([f'--input={raw}', f"--out_dir={copy / 'data' / 'shakespeare'}", '--vocab_size=512'])
    return copy


def run_line(line, cwd):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    return subprocess.run(['bash', '-c', line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_readme_commands_run_as_printed(repo):
    lines = [line for line in readme_commands() if runnable(line)]
    assert any('--export=hf:' in line for line in lines) and any(
        '--speculative=True' in line for line in lines)  # the parser finds what it should
    for line in map(shortened, lines):
        result = run_line(line, repo)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_readme_loading_snippet_runs_from_the_repository_root(repo):
    """The transformers snippet, run where the README says, on the folder its export line writes
    (after test_readme_commands_run_as_printed)."""
    pytest.importorskip('transformers')
    text = open(os.path.join(ROOT, 'README.md')).read()
    snippet = re.search(r'```python\n(.*?)```', text, flags=re.S).group(1)
    assert (repo / 'out' / 'nano-hf' / 'config.json').exists(), "run the export line first"
    result = subprocess.run([sys.executable, '-c', snippet], cwd=repo, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith('ROMEO:')
