"""
Hostile input, as a new user gives it: one table of cases, each a command run as a subprocess on a
tiny prepared corpus and a tiny trained run that the fixture makes once. Every case ends in one line
of error that names what to fix (or, where the input is legal but surprising, exit 0 and a one-line
note), prints no traceback, and leaves every file that was there before byte for byte as it was.
    python -m pytest -q tests/test_bad_inputs.py
"""

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from data.prepare import main as prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--n_experts=2', '--block_size=32',
        '--batch_size=4', '--eval_interval=2', '--eval_iters=1', '--log_interval=2',
        '--device=cpu', '--warmup=1']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
BLANK = ' \n\n'
LATIN = b'caf\xe9 au lait\n'
SAMPLE = ['--max_new_tokens=2', '--num_samples=1', '--device=cpu']
RLHF = ['--device=cpu', '--prompt_len=8', '--response_len=6', '--batch_size=4', '--n_pairs=8',
        '--n_val_pairs=4', '--eval_prompts=4']


def corpus(folder, seed, docs=8, lines=60):
    """docs text files of random lines over a made-up vocabulary (seeded)."""
    rng = random.Random(seed)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 8)))
             for _ in range(200)]
    folder.mkdir(parents=True)
    for d in range(docs):
        text = '\n'.join(' '.join(rng.choice(words) for _ in range(rng.randint(5, 12))) + '.'
                         for _ in range(lines))
        (folder / f'doc{d}.txt').write_text(text + '\n')
    return folder


class World:
    """What the fixture makes once (a data set, a trained run, a judge, a second data set with
    another tokenizer of the same size and a third of another size) and, per case, tmp: a folder
    for the case's own copies."""

    def __init__(self, base):
        self.base = base
        self.data, self.other, self.wider = base / 'data', base / 'other', base / 'wider'
        self.run, self.rlhf, self.tmp = base / 'run', base / 'rlhf', None

    def copy(self, src, name, edit=None):
        """A copy of folder src in tmp (hard links would share the bytes: real copies), edited by
        edit(copy), which gets the copy's Path."""
        target = self.tmp / name
        shutil.copytree(src, target)
        if edit:
            edit(target)
        return target

    def train(self, *args):
        return ['train.py', *TINY, f'--data_dir={self.data}', *args]

    def resume(self, *args, run=None):
        return self.train(f'--out_dir={run or self.run}', '--init_from=resume', '--max_iters=6',
                          *args)

    def file(self, name, content):
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


class Case(NamedTuple):
    argv: Callable            # World -> the command ([script, args...]); may make copies in tmp
    words: tuple              # what the error line (or the note) must contain
    exit0: bool = False       # legal but surprising: exit 0, and the words in a note on stdout
    changes: tuple = ()       # files (names in tmp's copies) that an exit-0 case may rewrite
    how: str = 'run'          # 'run', 'elsewhere' (from another folder), or a runner: execute()
    stdout: tuple = ()        # words that must also be on stdout
    made: tuple = ()          # what a failing case may leave in tmp (a run that trained first)


RUN_FILES = ('ckpt.pt', 'best.pt', 'ckpt_000006.pt', 'config.yaml', 'metadata.json',
             'metrics.jsonl', 'train.lock', 'training.png', 'expert_load.png', 'eval.json')


def edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / 'meta.json').read_text())
        meta.update(changes)
        (folder / 'meta.json').write_text(json.dumps(meta))
    return edit


def write(name, content):
    def edit(folder):
        (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def remove(name):
    return lambda folder: (folder / name).unlink()


def truncate(name, size):
    def edit(folder):
        with open(folder / name, 'r+b') as f:
            f.truncate(size)
    return edit


def half_written_metrics(folder):
    with open(folder / 'metrics.jsonl', 'a') as f:
        f.write('{"iter": 5, "loss": 5.6')


def other_tokenizer(world):
    return lambda folder: shutil.copyfile(world.other / 'tokenizer.json',
                                          folder / 'tokenizer.json')


CONFIG = {
    'config file with a syntax error': Case(
        lambda w: w.train(str(w.file('bad.py', 'n_layer = (\n'))), ('bad.py', 'line 1')),
    'config file that raises': Case(
        lambda w: w.train(str(w.file('raises.py', 'n_layer = 2\nx = 1 / 0\n'))),
        ('raises.py', 'line 2', 'ZeroDivisionError')),
    'a directory as config file': Case(
        lambda w: w.train(str(w.tmp)), ('cannot read config file', 'directory')),
    'config file that is not UTF-8': Case(
        lambda w: w.train(str(w.file('latin.py', b'# caf\xe9\n'))), ('latin.py', 'UTF-8')),
    'batch_size=abc': Case(lambda w: w.train('--batch_size=abc'), ('--batch_size', 'int')),
    'batch_size=0': Case(lambda w: w.train('--batch_size=0'), ('batch_size', '>= 1')),
    'block_size=-8': Case(lambda w: w.train('--block_size=-8'), ('block_size', '>= 1')),
    'n_layer=0': Case(lambda w: w.train('--n_layer=0'), ('n_layer', '>= 1')),
    'n_head=0': Case(lambda w: w.train('--n_head=0'), ('n_head', '>= 1')),
    'n_embd=-32': Case(lambda w: w.train('--n_embd=-32'), ('n_embd', '>= 1')),
    'top_k above n_experts': Case(lambda w: w.train('--top_k=3'), ('top_k=3', 'n_experts=2')),
    'n_embd not divisible by n_head': Case(lambda w: w.train('--n_embd=33'),
                                           ('n_embd=33', 'divisible by n_head=2')),
    'dropout=1.5': Case(lambda w: w.train('--dropout=1.5'), ('dropout', '[0, 1)')),
    'dropout=-0.1': Case(lambda w: w.train('--dropout=-0.1'), ('dropout', '[0, 1)')),
    'unknown router': Case(lambda w: w.train('--router=hash'), ('router', "'hash'")),
    '--key without a value': Case(lambda w: w.train('--max_iters'), ('--key=value', 'max_iters')),
    'misspelt key': Case(lambda w: w.train('--n_layers=2'), ("'n_layers'", 'n_layer')),
    'a constant as a key': Case(lambda w: w.train('--PEAK_TFLOPS=1'),
                                ("'PEAK_TFLOPS'", 'peak_tflops', '--help')),
    'a one-dash option': Case(lambda w: w.train('-n'), ("'-n'", '--key=value', '--help')),
    'learning_rate=0': Case(lambda w: w.train('--learning_rate=0'), ('learning_rate', '> 0')),
    'compile=yes': Case(lambda w: w.train('--compile=yes'), ('--compile', 'bool')),
    'device=cuda without CUDA': Case(lambda w: w.train('--device=cuda'), ('CUDA', '--device=cpu')),
}

DATA = {
    'no such data folder': Case(lambda w: w.train(f'--data_dir={w.tmp}/nowhere'),
                                ('nowhere', 'no such folder')),
    'train.bin missing': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', remove('train.bin'))}"),
        ('train.bin', 'missing')),
    'train.bin zero bytes': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', write('train.bin', b''))}"),
        ('train.bin', '0 bytes')),
    'train.bin cut mid-token': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', truncate('train.bin', 1001))}"),
        ('train.bin', '1001 bytes')),
    'val.bin too short': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', truncate('val.bin', 40))}"),
        ('val.bin has 20 tokens', 'block_size')),
    'meta.json missing': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', remove('meta.json'))}"),
        ('meta.json', 'missing')),
    'meta.json not JSON': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', write('meta.json', '{oops'))}"),
        ('meta.json', 'JSONDecodeError')),
    'meta.json without vocab_size': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', edit_meta(vocab_size=None))}"),
        ('meta.json', 'vocab_size')),
    'meta.json with a bogus dtype': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', edit_meta(dtype='float7'))}"),
        ('meta.json', 'float7')),
    'tokenizer.json missing': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', remove('tokenizer.json'))}",
                          f'--out_dir={w.tmp}/out'), ('no tokenizer.json', 'data/prepare.py')),
    'tokenizer.json broken': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', write('tokenizer.json', '[1, 2]'))}",
                          f'--out_dir={w.tmp}/out'), ('tokenizer.json', 'not a tokenizer')),
    'tokenizer disagrees with meta.json': Case(
        lambda w: w.train(f"--data_dir={w.copy(w.data, 'd', edit_meta(vocab_size=512))}",
                          f'--out_dir={w.tmp}/out'), ('tokenizer.json has 300 tokens', '512')),
}

RESUME = {
    'n_embd contradicts the checkpoint': Case(lambda w: w.resume('--n_embd=64'),
                                              ('n_embd=64', 'n_embd=32', 'resume')),
    'n_layer contradicts the checkpoint': Case(lambda w: w.resume('--n_layer=2'),
                                               ('n_layer=2', 'n_layer=1')),
    'n_experts contradicts the checkpoint': Case(lambda w: w.resume('--n_experts=4'),
                                                 ('n_experts=4', 'n_experts=2')),
    'router contradicts the checkpoint': Case(lambda w: w.resume('--router=softmax'),
                                              ("router='softmax'", "'sinkhorn'")),
    'vocab of another data set': Case(lambda w: w.resume(f'--data_dir={w.wider}'),
                                      ('vocab_size', '--data_dir=')),
    "another data set's tokenizer": Case(lambda w: w.resume(f'--data_dir={w.other}'),
                                         ('tokenizer', '--data_dir=')),
    'max_iters below the checkpoint': Case(lambda w: w.resume('--max_iters=2'),
                                           ('max_iters=2', 'iteration 4')),
    'block_size above the checkpoint': Case(lambda w: w.resume('--block_size=64'),
                                            ('block_size=64', 'block_size=32')),
    'truncated checkpoint': Case(
        lambda w: w.resume(run=w.copy(w.run, 'r', truncate('ckpt.pt', 5000))),
        ('ckpt.pt', 'cannot load')),
    'zero-byte checkpoint': Case(lambda w: w.resume(run=w.copy(w.run, 'r', write('ckpt.pt', b''))),
                                 ('ckpt.pt', 'cannot load')),
    'no checkpoint': Case(lambda w: w.resume(run=w.tmp / 'none'), ('no checkpoint', 'out_dir')),
    'metrics.jsonl ends in a half-written line': Case(
        lambda w: w.resume(run=w.copy(w.run, 'r', half_written_metrics)),
        ('metrics.jsonl line 6 of 6', 'cut off'), exit0=True, changes=RUN_FILES),
    'dropout changed on resume': Case(lambda w: w.resume('--dropout=0.1', run=w.copy(w.run, 'r')),
                                      ('dropout=0.1', 'the checkpoint had 0.0'), exit0=True,
                                      changes=RUN_FILES),
}


def mount_tmpfs(folder, size, *options):
    folder.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', ','.join([f'size={size}', *options]),
                           'tmpfs', str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f'cannot mount a tmpfs here: {done.stderr.decode().strip()}')
    return folder


def full_disk(w):
    """A copy of the run on a tmpfs with room for what resume rewrites, not for a checkpoint."""
    used = sum(f.stat().st_size for f in w.run.rglob('*') if f.is_file())
    disk = mount_tmpfs(w.tmp / 'disk', used + 150_000)
    for f in w.run.iterdir():
        if f.is_file():
            shutil.copyfile(f, disk / f.name)
    return w.resume(run=disk)


DISK = {
    'out_dir is a file': Case(lambda w: w.train(f"--out_dir={w.file('a_file', 'x')}"),
                              ('out_dir', 'File exists')),
    'out_dir inside a file': Case(lambda w: w.train(f"--out_dir={w.file('a_file', 'x')}/run"),
                                  ('out_dir', 'Not a directory')),
    'out_dir on a read-only file system': Case(
        lambda w: w.train(f"--out_dir={mount_tmpfs(w.tmp / 'ro', '1m', 'ro')}/run"),
        ('out_dir', 'Read-only')),
    'disk full on resume: the previous checkpoint survives': Case(
        full_disk, ('MiB free', 'a checkpoint of this run needs')),
    'disk full on a new run: no previous checkpoint claimed': Case(
        lambda w: w.train(f"--out_dir={mount_tmpfs(w.tmp / 'disk', '60k')}", '--max_iters=2'),
        ('MiB free', 'a checkpoint of this run needs')),
}


def hold_lock(w):
    """A copy of the run whose train.lock another live process (this test) holds."""
    run = w.copy(w.run, 'r')
    f = open(run / 'train.lock', 'w')
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write('424242\n')
    f.flush()
    w.held = f
    return w.resume(run=run)


def stale_lock(w):
    """A copy of the run with the train.lock of a run that died (nobody holds it)."""
    return w.resume(run=w.copy(w.run, 'r', write('train.lock', '999999\n')))


CONCURRENCY = {
    'run folder locked by a live process': Case(hold_lock, ('another training', 'pid 424242')),
    'a second training into the same out_dir': Case(
        lambda w: w.train(f'--out_dir={w.tmp}/busy', '--max_iters=100000',
                          '--eval_interval=100000'), ('another training', 'busy'),
        how='concurrent', made=('busy',)),
    'a lock left by a dead run does not block': Case(stale_lock, ('resuming from',), exit0=True,
                                                    changes=RUN_FILES + ('train.lock',)),
}


def empty_val(w):
    return ['sample.py', f'--out_dir={w.run}', *SAMPLE, '--eval=True',
            f"--data_dir={w.copy(w.data, 'd', write('val.bin', b''))}"]


def sample(*args):
    return lambda w: ['sample.py', f'--out_dir={w.run}', *SAMPLE, *args]


def mtp_run(w):
    """A tiny run with one multi-token head, trained in the case's tmp."""
    folder = w.tmp / 'mtp'
    rc, out, err = run(w.train(f'--out_dir={folder}', '--n_future_tokens=2', '--max_iters=2'))
    assert rc == 0, err
    return folder


SAMPLING = {
    'max_new_tokens=0': Case(sample('--max_new_tokens=0'), ('max_new_tokens', '>= 1')),
    'max_new_tokens=-5': Case(sample('--max_new_tokens=-5'), ('max_new_tokens', '-5')),
    'top_k above the vocabulary': Case(sample('--top_k=1000'), ('top_k=1000', '300 tokens')),
    'top_p=0': Case(sample('--top_p=0'), ('top_p', '(0, 1]')),
    'top_p=1.5': Case(sample('--top_p=1.5'), ('top_p', '1.5')),
    'num_samples=0': Case(sample('--num_samples=0'), ('num_samples', '>= 1')),
    'device=cuda without CUDA': Case(sample('--device=cuda'), ('CUDA', '--device=cpu')),
    'speculative without MTP heads': Case(sample('--speculative=True'),
                                          ('speculative', 'n_future_tokens')),
    'speculative past block_size': Case(
        lambda w: ['sample.py', f'--out_dir={mtp_run(w)}', *SAMPLE, '--speculative=True',
                   '--max_new_tokens=40'], ('block_size 32', '--max_new_tokens=30 or fewer')),
    'eval with an empty val.bin': Case(empty_val, ('val.bin', '0 bytes')),
    'empty prompt file': Case(lambda w: sample(f"--start=FILE:{w.file('p.txt', BLANK)}")(w),
                              ('p.txt', 'no prompts')),
    'prompt file not UTF-8': Case(
        lambda w: sample(f"--start=FILE:{w.file('p.txt', LATIN)}")(w), ('p.txt', 'UTF-8')),
    'output in a missing folder': Case(lambda w: sample(f'--out={w.tmp}/no/such/x.jsonl')(w),
                                       ('--out=', 'does not exist')),
    'run tokenizer of another size': Case(
        lambda w: ['sample.py', f"--out_dir={w.copy(w.run, 'r', other_size_tokenizer(w))}",
                   *SAMPLE], ('tokenizer.json', '300')),
    'eval from another folder finds the data': Case(
        sample('--eval=True', '--eval_tokens=200', '--report=report.json'),
        ('val_perplexity',), exit0=True, how='elsewhere', stdout=('report: report.json',)),
}


def other_size_tokenizer(world):
    return lambda folder: shutil.copyfile(world.wider / 'tokenizer.json',
                                          folder / 'tokenizer.json')


def prepare_cmd(files):
    """prepare.py on a folder of the given {name: content}, into a copy of the data set."""
    def argv(w):
        raw = w.tmp / 'raw'
        raw.mkdir()
        for name, content in files.items():
            w.file(f'raw/{name}', content)
        return ['data/prepare.py', f'--input={raw}', f"--out_dir={w.copy(w.data, 'd')}",
                '--vocab_size=300']
    return argv


def big_corpus(w):
    """6 MB of 20,000 made-up words: prepare.py still works on it (~1 s) when Ctrl-C comes."""
    rng = random.Random(2)
    words = [''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=rng.randint(3, 10)))
             for _ in range(20000)]
    for d in range(20):
        w.file(f'raw/doc{d}.txt', ' '.join(rng.choices(words, k=40000)))
    return ['data/prepare.py', f'--input={w.tmp}/raw', f"--out_dir={w.copy(w.data, 'd')}",
            '--vocab_size=8000', '--max_repetition=1']


DOC = ' '.join(f'word{i}' for i in range(40))  # passes every filter
PREPARE = {
    'empty folder': Case(prepare_cmd({}), ('matches no', '.txt')),
    'zero-byte files only': Case(prepare_cmd({'a.txt': '', 'b.txt': ''}), ('2 documents', 'empty')),
    'JSONL whose records all break': Case(prepare_cmd({'a.jsonl': '{bad\n{"text": \n'}),
                                          ('no documents', 'broken JSON')),
    'JSONL without a text field': Case(prepare_cmd({'a.jsonl': '{"title": "x"}\n'}),
                                       ('no documents', 'text/content')),
    'non-UTF-8 text': Case(prepare_cmd({'a.txt': b'caf\xe9 ' * 50}), ('no documents', 'UTF-8')),
    'a file type it does not read': Case(prepare_cmd({'a.csv': 'x,y\n', 'b.docx': 'z'}),
                                         ('matches no', '.csv, .docx')),
    'one document only': Case(prepare_cmd({'a.txt': DOC}), ('at least 2 documents', 'got 1')),
    'every document filtered out': Case(prepare_cmd({'a.txt': 'short', 'b.txt': 'tiny'}),
                                        ('filtered out', '--min_chars')),
    'vocab_size below 257': Case(lambda w: ['data/prepare.py', f'--input={w.tmp}',
                                            '--vocab_size=100'], ('vocab_size >= 257',)),
    'an unknown flag': Case(lambda w: ['data/prepare.py', f'--input={w.tmp}', '--no_such=1'],
                            ('unrecognized arguments: --no_such=1', '--help')),
    'an unknown --dataset': Case(lambda w: ['data/prepare.py', '--dataset=nope'],
                                 ("--dataset", "'nope'", 'sharegpt')),
    'Ctrl-C in the middle keeps the previous data': Case(big_corpus, ('SIGINT', 'as it was'),
                                                         how='interrupt:split:'),
}

TORCHRUN = {
    'gradient_accumulation_steps not divisible by the world size': Case(
        lambda w: w.train(f'--out_dir={w.tmp}/ddp', '--gradient_accumulation_steps=3'),
        ('gradient_accumulation_steps=3', '2 processes'), how='torchrun'),
    'a rank killed mid-run': Case(
        lambda w: w.train(f'--out_dir={w.tmp}/ddp', '--max_iters=100000', '--eval_interval=5',
                          '--gradient_accumulation_steps=2', '--dist_timeout=20'),
        ('another process', 'ckpt.pt'), how='torchrun_kill', made=('ddp',)),
}


def judge_as_checkpoint(world):
    return lambda folder: shutil.copyfile(world.rlhf / 'judge.pt', folder / 'ckpt.pt')


def judge_copy(w, edit=None):
    return w.copy(w.rlhf, 'rl', edit)


RLHF_CASES = {
    'no init checkpoint': Case(lambda w: ['rlhf.py', *RLHF, f'--init_dir={w.tmp}/none',
                                          f'--out_dir={w.tmp}/rl', '--mode=judge'],
                               ('no checkpoint', 'none')),
    'init checkpoint of the wrong kind': Case(
        lambda w: ['rlhf.py', *RLHF, '--mode=judge', f'--out_dir={w.tmp}/rl',
                   f"--init_dir={w.copy(w.run, 'r', judge_as_checkpoint(w))}"],
        ('ckpt.pt', 'cannot load', 'train.py')),
    'judge trained on another tokenizer': Case(
        lambda w: ['rlhf.py', *RLHF, '--mode=ppo', '--updates=1', f'--out_dir={judge_copy(w)}',
                   f"--init_dir={w.copy(w.run, 'r', other_tokenizer(w))}"],
        ('judge.pt', 'another tokenizer')),
    'pairs file missing': Case(
        lambda w: ['rlhf.py', *RLHF, '--mode=dpo', '--updates=1', f'--init_dir={w.run}',
                   f"--out_dir={judge_copy(w, remove('pairs.pt'))}"], ('no pairs', 'mode=judge')),
    'judge missing': Case(
        lambda w: ['rlhf.py', *RLHF, '--mode=ppo', '--updates=1', f'--init_dir={w.run}',
                   f'--out_dir={w.tmp}/rl'], ('no judge', 'mode=judge')),
    'judge file broken': Case(
        lambda w: ['rlhf.py', *RLHF, '--mode=bon', '--bon_n=2', f'--init_dir={w.run}',
                   f"--out_dir={judge_copy(w, write('judge.pt', b'not torch'))}"],
        ('judge.pt', 'cannot load')),
}

TRAIN_SIGNALS = {
    'Ctrl-C during the first evaluation': Case(
        lambda w: w.train(f'--out_dir={w.tmp}/out', '--eval_iters=1000000'),
        ('SIGINT', 'before the first step'), how='interrupt:parameters:'),
    'a CPU warned about a GPU-sized config': Case(
        lambda w: ['train.py', 'config/small.py', f'--data_dir={w.data}', f'--out_dir={w.tmp}/s',
                   '--device=cpu'], ('SIGINT',), how='interrupt:warning:',
        stdout=('warning:', 'min each', 'config/nano.py')),
}

# ---- every script keeps the promise: signals, full disks, broken inputs to the side tools ----

def train_starts_no_inodes(w, resume):
    """A tmpfs with bytes to spare but no inode for one more file: the run passes the room check,
    then cannot write its first checkpoint (the disk is full, as the write says). resume: a copy of
    the run there; else a new run into a folder made there."""
    if not resume:
        disk = mount_tmpfs(w.tmp / 'disk', '8m', 'nr_inodes=3')  # its root, out_dir, train.lock
        return w.train(f'--out_dir={disk}/run', '--max_iters=2')
    files = [f for f in w.run.iterdir() if f.is_file()]
    disk = mount_tmpfs(w.tmp / 'disk', '8m', f'nr_inodes={len(files) + 1}')
    for f in files:
        shutil.copyfile(f, disk / f.name)
    return w.resume(run=disk)


def train_starts_empty_folder(w):
    (w.tmp / 'empty').mkdir()
    return w.train(f'--out_dir={w.tmp}/empty', '--eval_iters=1000000')


TRAIN_STARTS = {  # a failed start of train.py changes nothing
    'compile=True on the CPU': Case(lambda w: w.train(f'--out_dir={w.tmp}/out', '--compile=True'),
                                    ('compile=True', 'dense models only', 'GPU')),
    'SIGTERM during the first evaluation': Case(
        lambda w: w.train(f'--out_dir={w.tmp}/out', '--eval_iters=1000000'),
        ('SIGTERM', 'before the first step'), how='terminate:parameters:'),
    'Ctrl-C during the first evaluation of a resume: its folder as it was': Case(
        lambda w: w.resume('--eval_iters=1000000', run=w.copy(w.run, 'r')),
        ('SIGINT', 'before the first step', 'as this run found it'), how='interrupt:parameters:'),
    'Ctrl-C in an empty out_dir that was there: it stays empty': Case(
        train_starts_empty_folder, ('SIGINT', 'before the first step'),
        how='interrupt:parameters:'),
    'disk full at the first checkpoint of a resume: its folder as it was': Case(
        lambda w: train_starts_no_inodes(w, resume=True),
        ('ckpt_000006.pt', 'disk is full', 'ckpt.pt is intact')),
    'disk full at the first checkpoint of a new run: no folder left': Case(
        lambda w: train_starts_no_inodes(w, resume=False),
        ('ckpt_000002.pt', 'disk is full', 'nothing was saved')),
}

def sample_stops_full_disk(w):
    """A tmpfs in tmp filled to the last byte: whatever is written there finds the disk full."""
    disk = mount_tmpfs(w.tmp / 'disk', '64k')
    fd = os.open(disk / 'filler', os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b'x' * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return disk


def sample_stops_long(w, *args):
    """sample.py on a continuation that lasts (100,000 tokens: the cache slides past block_size);
    its echo of max_new_tokens is the last line before the work."""
    return ['sample.py', f'--out_dir={w.run}', '--device=cpu', '--num_samples=1',
            '--stop_at_eos=False', *args, '--max_new_tokens=100000']


def sample_stops_big_val(w):
    """sample.py --eval on a copy of the data set whose val.bin has 4M tokens: the perplexity pass
    lasts, and starts once the sample's closing rule is printed."""
    def edit(folder):  # tokens 0..199 over and over, as uint16
        (folder / 'val.bin').write_bytes(b''.join(i.to_bytes(2, 'little') for i in range(200))
                                         * 20_000)
    return ['sample.py', f'--out_dir={w.run}', *SAMPLE, '--eval=True',
            f"--data_dir={w.copy(w.data, 'd', edit)}"]


def sample_stops_swiglu_run(w):
    """A tiny run with SwiGLU experts (the fixture's are GELU, which Mixtral cannot hold), trained
    once in the fixture's folder and shared by the export cases."""
    folder = w.base / 'sample_stops_swiglu'
    if not (folder / 'ckpt.pt').exists():
        rc, out, err = run(w.train(f'--out_dir={folder}', '--expert_act=swiglu', '--max_iters=2'))
        assert rc == 0, err
    return folder


def sample_stops_bench(w, *args):
    """bench.py's LR range test on the fixture's data set, with the fixture's tiny model."""
    return ['bench.py', *TINY, '--lr_find=True', f'--data_dir={w.data}', *args]


SAMPLE_STOPS = {  # sample.py, export and bench.py
    'Ctrl-C while sampling': Case(
        lambda w: sample_stops_long(w, f'--out={w.tmp}/s.jsonl'), ('SIGINT', 's.jsonl'),
        how='interrupt:config: max_new_tokens'),
    'SIGTERM while sampling': Case(
        lambda w: sample_stops_long(w, f'--out={w.tmp}/s.jsonl'), ('SIGTERM', 's.jsonl'),
        how='terminate:config: max_new_tokens'),
    'Ctrl-C during the perplexity pass': Case(sample_stops_big_val, ('SIGINT', 'eval.json'),
                                              how='interrupt:---------------'),
    'SIGTERM during the perplexity pass': Case(sample_stops_big_val, ('SIGTERM', 'eval.json'),
                                               how='terminate:---------------'),
    'Ctrl-C while sample.py imports torch': Case(
        sample(), ('stopped by SIGINT', 'nothing was written'), how='import:torch:SIGINT'),
    'SIGTERM while bench.py imports torch': Case(
        sample_stops_bench, ('stopped by SIGTERM', 'nothing was written'),
        how='import:torch:SIGTERM'),
    'eval_tokens=-5': Case(sample('--eval=True', '--eval_tokens=-5'), ('eval_tokens', '>= 0')),
    'speculative with --out, which it would not write': Case(
        lambda w: sample('--speculative=True', f'--out={w.tmp}/s.jsonl')(w),
        ('--speculative=True', 'no --out')),
    'speculative with --eval, which it would not run': Case(
        sample('--speculative=True', '--eval=True'), ('--speculative=True', 'no --eval')),
    'temperature=1e999 (infinite)': Case(sample('--temperature=1e999'),
                                         ('temperature', 'finite', 'got inf')),
    'repetition_penalty=1e999 (infinite)': Case(sample('--repetition_penalty=1e999'),
                                                ('repetition_penalty', 'finite', 'got inf')),
    'seed=2**64': Case(sample(f'--seed={2**64}'), ('seed', '64 bits')),
    'samples file on a full disk': Case(
        lambda w: sample(f'--out={sample_stops_full_disk(w)}/s.jsonl')(w),
        ('s.jsonl', 'disk is full')),
    'eval report on a full disk': Case(
        lambda w: sample('--eval=True', '--eval_tokens=200',
                         f'--report={sample_stops_full_disk(w)}/r.json')(w),
        ('r.json', 'disk is full')),
    'export onto a file': Case(
        lambda w: ['sample.py', f'--out_dir={sample_stops_swiglu_run(w)}',
                   f"--export=hf:{w.file('a_file', 'x')}"], ('a_file', 'is a file')),
    'export onto a full disk': Case(
        lambda w: ['sample.py', f'--out_dir={sample_stops_swiglu_run(w)}',
                   f'--export=hf:{sample_stops_full_disk(w)}/hf'], ('disk is full',)),
    'lr_find: Ctrl-C mid-sweep': Case(
        lambda w: sample_stops_bench(w, f'--out_dir={w.tmp}/lr', '--lr_find_iters=100000',
                                     '--lr_find_end=1e-6'), ('SIGINT', 'nothing was written'),
        how='interrupt:LR range test: 100000 steps'),
    'lr_find: block_size longer than the train split': Case(
        lambda w: sample_stops_bench(w, f'--out_dir={w.tmp}/lr', '--block_size=100000'),
        ('block_size=100000', 'train.bin')),
    'lr_find: batch_size=0': Case(
        lambda w: sample_stops_bench(w, f'--out_dir={w.tmp}/lr', '--batch_size=0'),
        ('batch_size', '>= 1')),
    'lr_find: lr_find_end=1e999 (infinite)': Case(
        lambda w: sample_stops_bench(w, f'--out_dir={w.tmp}/lr', '--lr_find_end=1e999'),
        ('lr_find_end', 'finite')),
    'lr_find: out_dir on a full disk': Case(
        lambda w: sample_stops_bench(w, f'--out_dir={sample_stops_full_disk(w)}',
                                     '--lr_find_iters=10'), ('lr_find', 'disk is full')),
}


def rlhf_stops_cmd(mode, *args, out=None, edit=None):
    """rlhf.py --mode=mode on the fixture's run, into out (a name in tmp) or else a copy of the
    judge's folder edited by edit(world, folder)."""
    def argv(w):
        folder = w.tmp / out if out else judge_copy(w, edit and (lambda f: edit(w, f)))
        return ['rlhf.py', *RLHF, f'--mode={mode}', f'--init_dir={w.run}', *args,
                f'--out_dir={folder}']
    return argv


def rlhf_stops_pairs(make):
    """An edit that makes pairs.pt what make(world, torch) returns: a copy of the file at a Path,
    else that object, saved by torch (imported only here: the other cases need no torch)."""
    def edit(w, folder):
        import torch
        obj = make(w, torch)
        if isinstance(obj, Path):
            shutil.copyfile(obj, folder / 'pairs.pt')
        else:
            torch.save(obj, folder / 'pairs.pt')
    return edit


def rlhf_stops_long_pairs(w, torch):
    """Pairs of 30 + 6 tokens, for a model of block_size 32."""
    tokens = torch.zeros(2, 30, dtype=torch.long)
    return dict(train=dict(prompts=tokens, a=tokens[:, :6], b=tokens[:, :6], label=torch.ones(2)))


def rlhf_stops_frontier(*lines):
    """--mode=frontier over an out_dir with one run, whose metrics.jsonl is lines."""
    def argv(w):
        w.file('fr/ppo_s1/metrics.jsonl', ''.join(lines))
        return ['rlhf.py', '--mode=frontier', f'--out_dir={w.tmp}/fr']
    return argv


RLHF_STOPS_EVAL = ('{"eval": true, "mode": "ppo", "step": %d, "kl": %.1f, "gold": -1.0, '
                   '"gold_sd": 0.5, "judge": 0.1}\n')


RLHF_STOPS = {  # rlhf.py
    'Ctrl-C while torch loads': Case(
        rlhf_stops_cmd('judge', out='rl'), ('SIGINT', 'nothing was written'),
        how='import:torch:SIGINT'),
    'Ctrl-C while the judge samples leaves no folder': Case(
        rlhf_stops_cmd('judge', '--n_pairs=20000', out='rl'), ('SIGINT', 'nothing was written'),
        how='interrupt:config: out_dir'),
    'Ctrl-C while the judge learns keeps the previous judge and pairs': Case(
        rlhf_stops_cmd('judge', '--n_pairs=2000', '--judge_epochs=2'),
        ('SIGINT', 'nothing was written'), how='interrupt:judge epoch 1'),
    'SIGTERM in PPO before its first save leaves no run folder': Case(
        rlhf_stops_cmd('ppo', '--updates=1', '--eval_prompts=5000'),
        ('SIGTERM', 'nothing was written'), how='terminate:config: out_dir'),
    'SIGTERM in DPO before its first save leaves no run folder': Case(
        rlhf_stops_cmd('dpo', '--updates=1', '--eval_prompts=5000'),
        ('SIGTERM', 'nothing was written'), how='terminate:config: out_dir'),
    'SIGTERM in PPO after its first save keeps step 0': Case(
        rlhf_stops_cmd('ppo', '--updates=100000', '--eval_interval=100000'),
        ('SIGTERM', 'ppo_s1337 keeps the policy of step 0'), how='terminate:update 1:',
        made=('rl/ppo_s1337',)),
    'judge onto a full disk': Case(
        lambda w: rlhf_stops_cmd('judge', out=f"{mount_tmpfs(w.tmp / 'disk', '64k')}/rl")(w),
        ('judge.pt', 'disk is full', 'nothing was saved')),
    'out_dir inside a file': Case(
        lambda w: rlhf_stops_cmd('judge', out=f"{w.file('a_file', 'x')}/rl")(w),
        ('a_file', 'File exists')),
    'DPO on a judge.pt as pairs.pt': Case(
        rlhf_stops_cmd('dpo', '--updates=1',
                       edit=rlhf_stops_pairs(lambda w, t: w.rlhf / 'judge.pt')),
        ('pairs.pt', 'no preference pairs', '--mode=judge')),
    'DPO on a train.py checkpoint as pairs.pt': Case(
        rlhf_stops_cmd('dpo', '--updates=1', edit=rlhf_stops_pairs(lambda w, t: w.run / 'ckpt.pt')),
        ('pairs.pt', 'no preference pairs')),
    'DPO on a torch dict without train and val as pairs.pt': Case(
        rlhf_stops_cmd('dpo', '--updates=1', edit=rlhf_stops_pairs(lambda w, t: {'pairs': [1, 2]})),
        ('pairs.pt', 'no preference pairs')),
    'DPO on pairs longer than the block_size': Case(
        rlhf_stops_cmd('dpo', '--updates=1', edit=rlhf_stops_pairs(rlhf_stops_long_pairs)),
        ('30 + 6 tokens', 'block_size 32')),
    'frontier over a metrics.jsonl cut off by a kill': Case(
        rlhf_stops_frontier(RLHF_STOPS_EVAL % (0, 0.0), '{"update": 1, "kl": 0.2}\n',
                            RLHF_STOPS_EVAL % (1, 0.3), '{"eval": true, "mo'),
        ('metrics.jsonl line 4 of 4', 'cut off'),
        exit0=True, stdout=('wrote', 'gold_vs_kl.png')),
    'frontier over a metrics.jsonl with nothing before the cut': Case(
        rlhf_stops_frontier('{"eval": true, "mo'), ('no evaluated runs', '--mode=ppo'),
        stdout=('line 1 of 1', 'cut off')),
}

def prepare_stops_into_copy(w):
    """prepare.py on the fixture's corpus again, into a copy of its data set."""
    return ['data/prepare.py', f"--input={corpus(w.tmp / 'raw', 0)}",
            f"--out_dir={w.copy(w.data, 'd')}", '--vocab_size=300']


def prepare_stops_full_disk(w):
    """prepare.py into a copy of the data set on a tmpfs with 8 kB to spare: the new data set, the
    size of the old one, cannot fit beside it."""
    pages = sum(-(-f.stat().st_size // 4096) * 4096 for f in w.data.iterdir())
    disk = mount_tmpfs(w.tmp / 'disk', pages + 8192)
    for f in w.data.iterdir():
        shutil.copyfile(f, disk / f.name)
    return ['data/prepare.py', f"--input={corpus(w.tmp / 'raw', 0)}", f'--out_dir={disk}',
            '--vocab_size=300']


def prepare_stops_plot(out_png, metrics=None):
    """bench/plot_runs.py drawing the fixture's run, and a run whose metrics.jsonl holds metrics,
    into out_png (a name in tmp)."""
    def argv(w):
        runs = [str(w.run)]
        if metrics is not None:
            runs.append(str(w.file('r2/metrics.jsonl', metrics).parent))
        return ['bench/plot_runs.py', f'{w.tmp}/{out_png}', *runs]
    return argv


PREPARE_STOPS = {  # data/prepare.py and bench/plot_runs.py
    'Ctrl-C while it imports numpy': Case(
        prepare_stops_into_copy, ('stopped by SIGINT', 'nothing was written'),
        how='import:numpy:SIGINT'),
    'SIGTERM while it imports tokenizers (to train the BPE)': Case(
        prepare_stops_into_copy, ('stopped by SIGTERM', 'as it was'),
        how='import:tokenizers:SIGTERM'),
    'SIGTERM in the middle keeps the previous data': Case(big_corpus, ('SIGTERM', 'as it was'),
                                                          how='terminate:split:'),
    'disk full: the previous data set survives': Case(
        prepare_stops_full_disk, ('disk is full', '/disk is intact')),
    'plot_runs: a run with an empty metrics.jsonl': Case(
        prepare_stops_plot('p.png', ''), ('r2/metrics.jsonl', 'no evaluations')),
    'plot_runs: an output folder that does not exist': Case(
        prepare_stops_plot('no/such/p.png'), ('no/such', 'does not exist')),
    'plot_runs: an output type matplotlib does not write': Case(
        prepare_stops_plot('p.docx'), ("'docx'", 'png')),
    'plot_runs: Ctrl-C while it imports torch': Case(
        prepare_stops_plot('p.png'), ('stopped by SIGINT',), how='import:torch:SIGINT'),
    'plot_runs writes its figure whole': Case(
        prepare_stops_plot('p.png'), ('wrote', 'p.png'), exit0=True),
}

FAMILIES = dict(config=CONFIG, data=DATA, resume=RESUME, disk=DISK, concurrency=CONCURRENCY,
                sample=SAMPLING, prepare=PREPARE, torchrun=TORCHRUN, rlhf=RLHF_CASES,
                signals=TRAIN_SIGNALS, starts=TRAIN_STARTS, sample_stops=SAMPLE_STOPS,
                rlhf_stops=RLHF_STOPS, prepare_stops=PREPARE_STOPS)
CASES = {f'{family}: {name}': case for family, cases in FAMILIES.items()
         for name, case in cases.items()}


# ---- running a case ----

def command(argv):
    return [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]]


def run(argv, cwd=ROOT, timeout=120):
    done = subprocess.run(command(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV)
    return done.returncode, done.stdout, done.stderr


def interrupt_after(prefix, signum=signal.SIGINT):
    """Start the command, send signum (SIGINT: Ctrl-C) once a line of its output starts with prefix
    (an empty prefix: at its first line). The child starts with SIGINT's default action: a shell's
    background job (`pytest &`) ignores SIGINT, and Python then never turns it into
    KeyboardInterrupt."""
    def runner(argv, cwd):
        process = subprocess.Popen(command(argv), cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=ENV,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith(prefix):
                time.sleep(0.2)
                assert process.poll() is None, 'the command ended before Ctrl-C: give it more work'
                process.send_signal(signum)
                break
        out, err = process.communicate(timeout=60)
        return process.returncode, ''.join(lines) + out, err
    return runner


def concurrent(argv, cwd):
    """The command twice into one out_dir: the first stopped (SIGSTOP) once it evaluated, so it
    holds the run folder and writes nothing while the second runs."""
    first = subprocess.Popen(command(argv), cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        for line in first.stdout:
            if line.startswith('iter 0: train loss'):
                break
        first.send_signal(signal.SIGSTOP)
        return run(argv, cwd)
    finally:
        first.kill()
        first.wait()


def torchrun(argv, cwd, kill=False):
    """argv under torchrun on 2 gloo processes; with kill, one worker is killed (SIGKILL) after
    iteration 6."""
    process = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                '--nproc_per_node=2', *command(argv)[1:]], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    if kill:
        for line in process.stdout:
            lines.append(line)
            if line.startswith('iter 6:'):
                break
        workers = subprocess.run(['pgrep', '-P', str(process.pid)], capture_output=True,
                                 text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    return process.returncode, ''.join(lines) + out, err


def fingerprint(*folders):
    """{path: sha1} of every file under the folders, and {path: None} of every folder."""
    return {str(f): hashlib.sha1(f.read_bytes()).hexdigest() if f.is_file() else None
            for folder in folders for f in Path(folder).rglob('*') if f.is_file() or f.is_dir()}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """The tiny data sets, a 4-iteration run trained with a data_dir relative to the repository
    (so that reading it from elsewhere is tested), and a judge of that run."""
    w = World(tmp_path_factory.mktemp('world'))
    for folder, seed, vocab in ((w.data, 0, 300), (w.other, 1, 300), (w.wider, 1, 320)):
        prepare([f'--input={corpus(w.base / f"raw_{folder.name}", seed)}',
                 f'--out_dir={folder}', f'--vocab_size={vocab}'])
    rc, out, err = run(['train.py', *TINY, f'--data_dir={os.path.relpath(w.data, ROOT)}',
                        f'--out_dir={w.run}', '--max_iters=4'])
    assert rc == 0, err
    rc, out, err = run(['rlhf.py', *RLHF, '--mode=judge', f'--init_dir={w.run}',
                        f'--out_dir={w.rlhf}'], cwd=w.base)
    assert rc == 0, err
    return w


def execute(case, argv, cwd):
    if case.how in ('run', 'elsewhere'):
        return run(argv, cwd)
    if case.how == 'concurrent':
        return concurrent(argv, cwd)
    if case.how.startswith('interrupt:'):
        return interrupt_after(case.how.partition(':')[2])(argv, cwd)
    if case.how.startswith('terminate:'):
        return interrupt_after(case.how.partition(':')[2], signal.SIGTERM)(argv, cwd)
    if case.how.startswith('import:'):  # tests/signal_at_import.py
        _, module, name = case.how.split(':')
        return run(['tests/signal_at_import.py', module, name, os.path.join(ROOT, argv[0]),
                    *argv[1:]], cwd)
    return torchrun(argv, cwd, kill=case.how == 'torchrun_kill')


@pytest.mark.parametrize('name', CASES)
def test_bad_input(world, tmp_path, name):
    case = CASES[name]
    world.tmp = tmp_path / 'case'
    world.tmp.mkdir()
    try:
        argv = case.argv(world)
        before = fingerprint(world.base, world.tmp)
        rc, out, err = execute(case, argv, world.tmp if case.how == 'elsewhere' else ROOT)
        after = fingerprint(world.base, world.tmp)
    finally:
        for mount in [*world.tmp.glob('disk'), *world.tmp.glob('ro')]:
            subprocess.run(['umount', '-l', str(mount)], capture_output=True)
        if getattr(world, 'held', None):
            world.held = world.held.close()
    text = out + err
    print(f'exit code {rc}\n--- stdout\n{out}\n--- stderr\n{err}')  # shown when a case fails
    if case.how.startswith('torchrun'):
        check_torchrun(case, rc, out, err)
    elif case.exit0:
        assert rc == 0 and not err.strip(), err
        notes = [line for line in out.splitlines() if all(w in line for w in case.words)]
        assert len(notes) == 1, out
    else:
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1, text
        assert all(w in lines[0] for w in case.words), lines[0]
        assert lines[0].startswith('error: '), lines[0]
    if not case.how.startswith('torchrun'):
        assert 'Traceback' not in text, text
    how, _, name = case.how.rpartition(':')
    stopped_by = (signal.Signals[name] if how.startswith('import:') else
                  dict(interrupt=signal.SIGINT, terminate=signal.SIGTERM).get(how))
    assert stopped_by is None or rc == 128 + stopped_by, rc  # exit 128 + the signal
    assert all(w in out for w in case.stdout), out
    changed = [p for p, digest in before.items() if after.get(p) != digest
               and not (case.exit0 and Path(p).name in case.changes and str(world.tmp) in p)]
    assert not changed, changed
    leftovers = [p for p in after if p not in before and (p.endswith('.tmp') or not case.exit0)
                 and not any(f'{world.tmp}/{name}' in p for name in case.made)]
    assert not leftovers, leftovers  # a failed command leaves nothing behind, not even a folder


def check_torchrun(case, rc, out, err):
    """torchrun prints its own traceback and summary; the worker's line must be there once, and
    again in the summary's root cause, and the config echo must come once (rank 0 only)."""
    assert rc != 0
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and all(w in errors[0] for w in case.words), err
    assert f'traceback : {errors[0]}' in err, err
    assert out.count('config: out_dir = ') == 1, out
    assert 'train.py", line' not in err and '[rank' not in err, err
