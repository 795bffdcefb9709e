"""
train.py, sample.py and configurator.py end to end, on a tiny corpus prepared in a temporary folder.
    python -m pytest -q tests/test_train.py
"""

import os
import random
import re
import subprocess
import sys

import pytest
import torch

from configurator import configure
from data.prepare import main as prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--n_experts=4', '--top_k=2', '--batch_size=8',
        '--block_size=32', '--eval_iters=2', '--log_interval=5', '--device=cpu', '--warmup_iters=2']


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """40 documents of random sentences over a 300-word vocabulary, prepared with a 512-token BPE."""
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 8))) for _ in range(300)]
    raw = tmp_path_factory.mktemp('raw')
    for d in range(40):
        sentences = [' '.join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + '.'
                     for _ in range(60)]
        (raw / f'doc{d}.txt').write_text(' '.join(sentences))
    out = tmp_path_factory.mktemp('data')
    prepare([f'--input={raw}', f'--out_dir={out}', '--vocab_size=512'])
    return str(out)


def test_training_lowers_the_loss_and_sample_prints_text(data_dir, tmp_path):
    result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=30',
                 '--eval_interval=30', '--learning_rate=3e-3')
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(r'train loss ([\d.]+)', result.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, result.stdout
    assert 'load max/mean' in result.stdout and 'tok/s' in result.stdout
    sample = run('sample.py', f'--out_dir={tmp_path}', '--start=Hello', '--max_new_tokens=20', '--num_samples=2')
    assert sample.returncode == 0, sample.stderr
    assert sum(line.startswith('Hello') for line in sample.stdout.splitlines()) == 2  # the prompt, continued


def test_resume_is_bit_exact(data_dir, tmp_path):
    """20 iterations in one go == 10 iterations, stop, resume to 20. Dropout, router jitter and capacity
    dropping are on, so the global RNG and the data stream must both be restored exactly."""
    common = [*TINY, f'--data_dir={data_dir}', '--eval_interval=10', '--lr_decay_iters=20', '--router=softmax',
              '--capacity_factor=1.25', '--router_jitter=0.1', '--dropout=0.1']
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    for args in ([f'--out_dir={straight}', '--max_iters=20'],
                 [f'--out_dir={interrupted}', '--max_iters=10'],
                 [f'--out_dir={interrupted}', '--max_iters=20', '--init_from=resume']):
        result = run('train.py', *common, *args)
        assert result.returncode == 0, result.stderr
    a = torch.load(straight / 'ckpt.pt', weights_only=True)
    b = torch.load(interrupted / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 20
    assert a['model'].keys() == b['model'].keys()
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    before = torch.load(interrupted / 'ckpt.prev.pt', weights_only=True)  # the previous checkpoint is kept
    assert before['iter_num'] == 10 and not torch.equal(before['model']['wte.weight'], b['model']['wte.weight'])


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    return result.returncode != 0 and len(lines) == 1 and 'Traceback' not in result.stderr


def test_bad_input_gives_one_line_errors(data_dir, tmp_path):
    cases = [
        (run('train.py', '--n_layers=4'), 'unknown config key'),
        (run('train.py', '--max_iters=ten'), 'expects int'),
        (run('train.py', 'config/missing.py'), 'cannot read config file'),
        (run('train.py', f'--data_dir={tmp_path}/nowhere'), 'data/prepare.py'),
        (run('train.py', f'--data_dir={data_dir}', '--top_k=9', '--device=cpu'), 'top_k'),
        (run('train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--init_from=resume'), 'no checkpoint'),
        (run('sample.py', f'--out_dir={tmp_path}'), 'no checkpoint'),
        (run('sample.py', '--top_p=1.5'), 'top_p'),
        (run('sample.py', '--temperature=-1.0'), 'temperature'),
    ]
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    cases.append((run('sample.py', f'--out_dir={tmp_path}'), 'cannot load'))
    cases.append((run('train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--init_from=resume'), 'cannot resume'))
    for result, message in cases:
        assert one_line_error(result), result.stderr
        assert message in result.stderr, result.stderr


def test_configure_checks_keys_and_types(tmp_path):
    settings = dict(max_iters=100, learning_rate=1e-3, compile=False, router='sinkhorn')
    config_file = tmp_path / 'c.py'
    config_file.write_text("import math\nmax_iters = 7\nlearning_rate = math.pi\n")
    overrides = configure(settings, [str(config_file), '--learning_rate=2', '--compile=True', '--router=softmax'])
    assert settings == dict(max_iters=7, learning_rate=2.0, compile=True, router='softmax')
    assert overrides == settings and isinstance(settings['learning_rate'], float)
    for bad in (['--max_iter=3'], ['--max_iters=2.5'], ['--compile=1'], ['--router=3'], ['max_iters']):
        with pytest.raises(ValueError):
            configure(dict(settings), bad)
    config_file.write_text("typo_key = 1\n")
    with pytest.raises(ValueError, match='typo_key'):
        configure(dict(settings), [str(config_file)])
