"""
train.py, sample.py and configurator.py end to end, on a tiny corpus prepared in a temporary folder:
training, the run folder, exact resume (after a clean stop, SIGTERM and kill -9), NaN recovery, the
LR finder, and one-line errors for bad input.
    python -m pytest -q tests/test_train.py
"""

import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import pytest
import torch
import yaml

from checkpoint import checkpoint_size, training_figure
from common import Batches
from configurator import configure
from data.prepare import main as prepare
from model import GPT, ModelConfig
from monitors import routing_record
from train import estimate_loss, scheduled_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--n_experts=4', '--top_k=2', '--batch_size=8',
        '--block_size=32', '--eval_iters=2', '--log_interval=5', '--device=cpu', '--warmup=2']


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def run_patched(patch, *args, nproc=1):
    """train.py after `patch` (Python source, run first in the same process): how the tests inject
    the faults that no setting offers. nproc > 1: under torchrun, on gloo."""
    code = (f"{patch}\nimport runpy, sys\nsys.argv = ['train.py', *sys.argv[1:]]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
              f'--nproc_per_node={nproc}', '--no-python'] if nproc > 1 else []
    return subprocess.run([*launch, sys.executable, '-c', code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def after_training_forwards(action):
    """A patch for run_patched: `action`, one statement, runs after each training forward of
    GPT, with n (that forward's number on this rank: 1, 2, ...), rank and its loss in scope. The
    first iteration's micro-steps are forwards 1 .. micro-steps, and so on."""
    return textwrap.dedent(f'''
        import os, model, torch
        forward, count = model.GPT.forward, [0]
        def patched(self, idx, targets=None, **kw):
            logits, loss = forward(self, idx, targets, **kw)
            if self.training:
                count[0] += 1
                n, rank = count[0], int(os.environ.get('RANK', 0))
                {action}
            return logits, loss
        model.GPT.forward = patched
    ''')


def start(script, *args):
    return subprocess.Popen([sys.executable, '-u', script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def weights(path):
    return torch.load(path, weights_only=True)['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """40 documents of random sentences over a 300-word vocabulary, prepared with a 512-token
    BPE."""
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 8)))
             for _ in range(300)]
    raw = tmp_path_factory.mktemp('raw')
    for d in range(40):
        sentences = [' '.join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize()
                     + '.' for _ in range(60)]
        (raw / f'doc{d}.txt').write_text(' '.join(sentences))
    out = tmp_path_factory.mktemp('data')
    prepare([f'--input={raw}', f'--out_dir={out}', '--vocab_size=512'])
    return str(out)


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 40-iteration run with dropout, router jitter and capacity dropping (so the
    global RNG matters as well as the data stream), its arguments, and its final weights."""
    args = [*TINY, f'--data_dir={data_dir}', '--eval_interval=10', '--max_iters=40',
            '--router=softmax', '--capacity_factor=1.25', '--router_jitter=0.1', '--dropout=0.1']
    out = tmp_path_factory.mktemp('reference')
    result = run('train.py', *args, f'--out_dir={out}')
    assert result.returncode == 0, result.stderr
    return args, weights(out / 'ckpt.pt')


def test_training_lowers_the_loss_and_sample_prints_text(data_dir, tmp_path):
    result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                 '--max_iters=30', '--eval_interval=30', '--learning_rate=3e-3')
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(r'train loss ([\d.]+)', result.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, result.stdout
    assert 'load max/mean' in result.stdout and 'tok/s' in result.stdout
    sample = run('sample.py', f'--out_dir={tmp_path}', '--start=Hello', '--max_new_tokens=20',
                 '--num_samples=2')
    assert sample.returncode == 0, sample.stderr
    # the prompt, continued
    assert sum(line.startswith('Hello') for line in sample.stdout.splitlines()) == 2
    # two prompts of different lengths in one left-padded batch, JSON lines out,
    # and the evaluation report
    (tmp_path / 'prompts.txt').write_text('Hello\nThe quick brown fox\n')
    sample = run('sample.py', f'--out_dir={tmp_path}', f'--start=FILE:{tmp_path / "prompts.txt"}',
                 '--num_samples=2', '--max_new_tokens=12', f'--out={tmp_path / "s.jsonl"}',
                 '--eval=True', '--repetition_penalty=1.3', '--no_repeat_ngram_size=3',
                 '--stop=\\n\\n')
    assert sample.returncode == 0, sample.stderr
    records = [json.loads(line) for line in (tmp_path / 's.jsonl').read_text().splitlines()]
    assert [r['prompt'] for r in records] == ['Hello'] * 2 + ['The quick brown fox'] * 2
    assert all(r['finish'] in ('eos', 'stop', 'length') and '\n\n' not in r['sample']
               for r in records)
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert (1 < report['val_perplexity'] < 1000 and report['samples'] == 4
            and '| val_perplexity |' in sample.stdout)


def test_run_folder_metrics_plots_and_features(data_dir, tmp_path):
    """One run with MTP heads, progressive sequence length, checkpoint rotation and wandb asked
    for."""
    result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                 '--max_iters=40', '--eval_interval=10', '--keep_checkpoints=2',
                 '--n_future_tokens=3', '--seq_len_start=8', '--seq_len_warmup=0.5',
                 '--wandb_log=True')
    assert result.returncode == 0, result.stderr
    files = set(os.listdir(tmp_path))
    assert {'ckpt.pt', 'best.pt', 'config.yaml', 'metadata.json', 'metrics.jsonl',
            'tokenizer.json'} <= files
    assert sorted(f for f in files if f.startswith('ckpt_')) == ['ckpt_000030.pt', 'ckpt_000040.pt']
    assert {'training.png', 'expert_load.png'} <= set(os.listdir(tmp_path / 'plots'))
    config = yaml.safe_load((tmp_path / 'config.yaml').read_text())
    assert config['max_iters'] == 40 and config['model']['n_future_tokens'] == 3
    assert not {'PEAK_TFLOPS', 'CPU_FLOPS', 'MAX_RELOADS'} & config.keys()  # constants
    assert ({'git_commit', 'torch', 'device', 'world_size', 'start_time'}
            <= json.loads((tmp_path / 'metadata.json').read_text()).keys())
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    steps = [r for r in records if 'loss' in r]
    evals = [r for r in records if 'val_loss' in r]
    assert ([r['iter'] for r in evals] == [0, 10, 20, 30, 40]
            and [r['iter'] for r in steps] == list(range(5, 41, 5)))
    assert len(steps[-1]['mtp_losses']) == 2 and 'mtp' in result.stdout
    # ramp over 20 iterations, 8 -> 16 -> 32
    # (each logged step reports the length of the step just taken)
    assert [r['seq_len'] for r in steps] == [8, 8, 16, 16, 32, 32, 32, 32]
    assert (len(steps[-1]['load']) == 2 and len(steps[-1]['load'][0]) == 4
            and steps[-1]['rss_gb'] > 0)
    assert 'wandb is not installed' in result.stdout  # (wandb is optional and not installed in CI)
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    assert best['best_val_loss'] == min(r['val_loss'] for r in evals)


def test_the_loss_plot_keeps_the_training_objective_apart_from_the_evaluated_cross_entropy():
    """The step records' loss is the training objective (cross-entropy + router + MTP losses): it
    gets a panel of its own, not one beside the evaluated cross-entropy as if they measured the same
    thing."""
    records = [dict(iter=0, train_loss=5.0, val_loss=5.1),
               dict(iter=5, loss=9.0, lr=1e-3, grad_norm=1.0),
               dict(iter=10, loss=8.0, lr=1e-3, grad_norm=1.0),
               dict(iter=10, train_loss=4.0, val_loss=4.2)]
    panels = [[list(line.get_ydata()) for line in ax.lines] for ax in training_figure(records).axes]
    evaluated = [p for p in panels if [5.1, 4.2] in p]
    assert len(evaluated) == 1 and [5.0, 4.0] in evaluated[0] and [9.0, 8.0] not in evaluated[0]
    assert any([9.0, 8.0] in p for p in panels)


def test_resume_after_a_clean_stop_is_bit_exact(reference, tmp_path):
    args, final = reference
    for extra in (['--max_iters=20', '--lr_decay_iters=40'], ['--init_from=resume']):
        result = run('train.py', *args, f'--out_dir={tmp_path}', *extra)
        assert result.returncode == 0, result.stderr
    assert_same_weights(weights(tmp_path / 'ckpt.pt'), final)
    # history kept
    assert torch.load(tmp_path / 'ckpt_000020.pt', weights_only=True)['iter_num'] == 20


def test_sigterm_saves_an_emergency_checkpoint_and_resume_is_exact(reference, tmp_path):
    args, final = reference
    process = start('train.py', *args, f'--out_dir={tmp_path}')
    for line in process.stdout:
        if line.startswith('iter 15:'):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and 'emergency checkpoint' in stderr, stderr
    stopped_at = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert stopped_at['reason'] == 'emergency' and 15 <= stopped_at['iter_num'] < 40
    result = run('train.py', *args, f'--out_dir={tmp_path}', '--init_from=resume')
    assert result.returncode == 0, result.stderr
    assert_same_weights(weights(tmp_path / 'ckpt.pt'), final)


def test_kill_9_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    args, final = reference
    process = start('train.py', *args, f'--out_dir={tmp_path}')
    for line in process.stdout:
        if line.startswith('iter 25:'):  # after the iteration-20 checkpoint
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    result = run('train.py', *args, f'--out_dir={tmp_path}', '--init_from=resume')
    assert result.returncode == 0, result.stderr
    assert 'resuming from' in result.stdout and 'at iteration 20' in result.stdout
    assert_same_weights(weights(tmp_path / 'ckpt.pt'), final)


def test_a_failed_checkpoint_write_keeps_the_previous_one(reference, tmp_path):
    """A resume whose first checkpoint cannot be written: one line, and the run folder as it was,
    every file in it (config.yaml, metadata.json, metrics.jsonl, train.lock) byte for byte."""
    args, _ = reference
    assert run('train.py', *args, f'--out_dir={tmp_path}', '--max_iters=10').returncode == 0
    (tmp_path / 'ckpt_000020.pt.tmp').mkdir()  # the next save cannot write its temporary file
    before = {f: f.read_bytes() for f in tmp_path.rglob('*') if f.is_file()}
    result = run('train.py', *args, f'--out_dir={tmp_path}', '--max_iters=20', '--init_from=resume')
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert f"{tmp_path / 'ckpt.pt'} is intact" in lines[0], lines[0]
    assert {f: f.read_bytes() for f in tmp_path.rglob('*') if f.is_file()} == before


def test_a_full_disk_at_a_later_checkpoint_keeps_the_one_before(data_dir, tmp_path):
    """The disk fills at the second checkpoint (iteration 10; its write fails with ENOSPC): one line
    that names the full disk, ckpt.pt stays the first checkpoint, and the run folder is the one that
    checkpoint began (config.yaml, the metrics to iteration 10). The room check's estimate for a
    new run covers a checkpoint, and by no more than its 1 MiB to spare."""
    patch = textwrap.dedent('''
        import errno, checkpoint, common, failsafe
        saves = []
        def no_room(tmp):
            raise OSError(errno.ENOSPC, 'No space left on device')
        def save_atomic(obj, path, fallback=None):
            saves.append(path)
            if len(saves) == 2:
                return failsafe.write_atomic(path, no_room, fallback)
            return common.save_atomic(obj, path, fallback)
        checkpoint.save_atomic = save_atomic
    ''')
    result = run_patched(patch, *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                         '--max_iters=20', '--eval_interval=5')
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert all(words in lines[0] for words in (
        f"could not write {tmp_path / 'ckpt_000010.pt'}", 'the disk is full',
        f"{tmp_path / 'ckpt.pt'} is intact")), lines[0]
    first = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert first['iter_num'] == 5 and not (tmp_path / 'ckpt_000010.pt').exists()
    assert yaml.safe_load((tmp_path / 'config.yaml').read_text())['max_iters'] == 20
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [r['iter'] for r in records if 'val_loss' in r] == [0, 5, 10]
    size = os.path.getsize(tmp_path / 'ckpt_000005.pt')
    assert size <= checkpoint_size(GPT(ModelConfig(**first['model_config'])), tmp_path) <= (
        size + 2**20)


def test_nan_steps_are_skipped_and_repeated_ones_reload_the_checkpoint(data_dir, tmp_path):
    """A NaN loss at iteration 7 (the 8th training forward) is skipped; three in a row reload the
    iteration-5 checkpoint, reading its state without building a model (load_checkpoint would)."""
    common = [*TINY, f'--data_dir={data_dir}', '--eval_interval=5', '--max_iters=20']
    nan_at = lambda calls: after_training_forwards(
        f"loss = loss * float('nan') if n in {calls} else loss")
    once = run_patched(nan_at({8}), *common, f'--out_dir={tmp_path / "once"}')
    assert once.returncode == 0, once.stderr
    assert ('iter 7: non-finite loss/gradient, step skipped (1 so far), LR scale -> 0.500'
            in once.stdout)
    assert '1 skipped steps' in once.stdout
    no_model = ("import common\ncommon.load_checkpoint = lambda *_: common.fail("
                "'the reload built a model')\n")
    repeated = run_patched(no_model + nan_at({8, 9, 10}), *common, '--max_bad_steps=3',
                           f'--out_dir={tmp_path / "repeated"}')
    assert repeated.returncode == 0, repeated.stderr
    assert ('3 bad steps in a row: reloaded' in repeated.stdout
            and '(iteration 5)' in repeated.stdout)
    for name in ('once', 'repeated'):
        assert all(torch.isfinite(w).all() for w in weights(tmp_path / name / 'ckpt.pt').values())


def test_a_run_that_keeps_diverging_ends_after_max_reloads(data_dir, tmp_path):
    """Every step NaN from iteration 7 on: each bad step reloads the iteration-5 checkpoint
    (max_bad_steps=1); the fourth divergence ends the run with one line."""
    result = run_patched(after_training_forwards("loss = loss * float('nan') if n >= 8 else loss"),
                         *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                         '--eval_interval=5', '--max_iters=20', '--max_bad_steps=1')
    assert result.returncode == 1 and result.stdout.count('bad steps in a row: reloaded') == 3
    assert result.stderr.strip().splitlines() == [
        f"error: training diverged again after 3 reloads of {tmp_path / 'ckpt.pt'}; lower "
        "learning_rate"]


def test_without_the_plateau_rule_the_lr_is_the_schedule(data_dir, tmp_path):
    """adaptive_lr=False: each step's LR is scheduled_lr's, warm-up included, though min_lr is
    above its first values (min_lr is the floor of the cosine and of the plateau rule)."""
    result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                 '--max_iters=4', '--log_interval=1', '--learning_rate=1e-3', '--min_lr=5e-4')
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    lrs = [r['lr'] for r in records if 'lr' in r]  # logged at iter it + 1: step it's LR
    assert lrs == [scheduled_lr(it, 1e-3, 5e-4, 2, 4, 1) for it in range(4)]
    assert lrs[0] == pytest.approx(1e-3 / 3)


def test_an_evaluation_leaves_the_training_steps_records_for_the_next_log(data_dir):
    """The log line after an evaluation reads what the last training forward recorded: the routers'
    statistics (with the dropped share, which eval mode does not record) and the MTP losses. With
    --cuda_graph=True those are the tensors the captured step writes at each replay, so the
    evaluation must leave the very same objects in place."""
    meta = json.loads(open(os.path.join(data_dir, 'meta.json')).read())
    model = GPT(ModelConfig(vocab_size=meta['vocab_size'], block_size=32, n_layer=2, n_head=2,
                            n_embd=32, n_experts=4, top_k=2, n_future_tokens=2))
    batches = Batches(data_dir, meta['dtype'], 4, 32, 'cpu')
    model.watch_routing(True)  # as a graphed step records them
    model(*batches.get('train', torch.Generator().manual_seed(0)))
    stats, mtp_losses = model.router_stats(), model.mtp_losses
    estimate_loss(model, batches, 2, 0, nullcontext())
    assert all(a is b for a, b in zip(model.router_stats(), stats, strict=True))
    assert model.mtp_losses is mtp_losses and len(mtp_losses) == 1
    assert len(routing_record(model.router_stats())['dropped']) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_graph_logs_after_an_evaluation(data_dir, tmp_path):
    """--cuda_graph=True, an evaluation at 10 between the logs at 5 and 15: the log lines after it
    read what the replayed step writes (the routing statistics, the MTP losses), not what the
    evaluation recorded."""
    result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                 '--device=cuda', '--cuda_graph=True', '--max_iters=20', '--eval_interval=10',
                 '--n_future_tokens=2')
    assert result.returncode == 0, result.stderr
    steps = {r['iter']: r for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))
             if 'loss' in r}
    assert all(len(steps[it]['dropped']) == 2 for it in (5, 10, 15, 20))
    assert steps[15]['mtp_losses'] != steps[20]['mtp_losses']


def test_lr_finder_writes_a_plot_and_no_checkpoint(data_dir, tmp_path):
    result = run('bench.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                 '--lr_find=True', '--lr_find_iters=30', '--lr_find_start=1e-6',
                 '--lr_find_end=1.0')
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / 'lr_find.json').read_text())
    assert 1e-6 <= found['suggested_lr'] <= 1.0 and (tmp_path / 'lr_find.png').exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.pt')]


def test_reset_optimizer_keeps_weights_and_restarts_adamw(reference, tmp_path):
    args, _ = reference
    assert run('train.py', *args, f'--out_dir={tmp_path}', '--max_iters=10').returncode == 0
    result = run('train.py', *args, f'--out_dir={tmp_path}', '--max_iters=15', '--init_from=resume',
                 '--reset_optimizer=True')
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['optimizer']['state']
    # Adam restarted at iteration 10 (10 + 5 steps without the reset)
    assert state[0]['step'].item() == 5


class Exploit:
    """Unpickling this would run a shell command: weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_bad_input_gives_one_line_errors_and_touches_nothing(reference, data_dir, tmp_path):
    args, _ = reference
    run_dir = tmp_path / 'run'
    assert run('train.py', *args, f'--out_dir={run_dir}', '--max_iters=10').returncode == 0
    fingerprint = lambda: {f: hashlib.sha1((run_dir / f).read_bytes()).hexdigest()
                           for f in os.listdir(run_dir) if (run_dir / f).is_file()}
    before = fingerprint()
    train = lambda *extra: run('train.py', *TINY, f'--data_dir={data_dir}', *extra)
    resume = lambda path, *extra: train(f'--out_dir={path}', '--init_from=resume', *extra)

    def copy_run(name, edit):  # a copy of the run whose checkpoint has been tampered with
        target = tmp_path / name
        target.mkdir()
        (target / 'ckpt.pt').write_bytes((run_dir / 'ckpt.pt').read_bytes())
        edit(target / 'ckpt.pt')
        return target

    def reshape(path):
        ckpt = torch.load(path, weights_only=True)
        ckpt['model_config']['n_embd'] = 64
        torch.save(ckpt, path)

    truncated = tmp_path / 'truncated'
    truncated.mkdir()
    for f in os.listdir(data_dir):
        (truncated / f).write_bytes((open(os.path.join(data_dir, f), 'rb').read()))
    with open(truncated / 'train.bin', 'r+b') as f:
        f.truncate(12345)  # not a whole number of uint16 tokens
    untokenized = tmp_path / 'untokenized'  # a prepared folder that lost its tokenizer.json
    untokenized.mkdir()
    for f in os.listdir(data_dir):
        if f != 'tokenizer.json':
            (untokenized / f).write_bytes(open(os.path.join(data_dir, f), 'rb').read())
    empty = tmp_path / 'empty'
    empty.mkdir()
    (tmp_path / 'a_file').write_text('not a folder')
    marker = tmp_path / 'exploited'
    cases = [
        (train('--n_layers=4'), "unknown config key 'n_layers'"),
        (train('--PEAK_TFLOPS=1'), "unknown config key 'PEAK_TFLOPS'"),  # a constant
        (train('--max_iters=ten'), 'expects int'),
        (train('config/missing.py'), 'cannot read config file'),
        (train('--learning_rate=-1.0'), 'learning_rate must be > 0'),
        (train('--batch_size=0'), 'batch_size'),
        (train('--top_k=9'), 'top_k'),
        (train('--capacity_factor=1.25'), 'softmax router only'),
        (train('--init_from=gpt2'), 'init_from'),
        (train('--seq_len_start=12'), 'power of 2'),
        (train('--device=tpu'), 'device'),
        (train(f'--data_dir={tmp_path}/nowhere'), 'data/prepare.py'),
        (train(f'--data_dir={truncated}'), 'no usable prepared data'),
        (train(f'--data_dir={untokenized}', f'--out_dir={tmp_path / "fresh"}'),
         'no tokenizer.json'),
        (run('data/prepare.py', f'--input={empty}'), 'matches no'),
        (train(f'--out_dir={run_dir}'), 'already holds a run'),
        (train(f'--out_dir={tmp_path / "a_file"}'), 'cannot write to out_dir'),
        (resume(tmp_path / 'no_run'), 'no checkpoint'),
        (resume(copy_run('corrupt', lambda p: p.write_bytes(b'not a checkpoint'))), 'cannot load'),
        (resume(copy_run('foreign', lambda p: torch.save({'hello': 1}, p))), 'cannot load'),
        (resume(copy_run('reshaped', reshape)), 'cannot load'),
        (resume(copy_run('exploit', lambda p: p.write_bytes(pickle.dumps(Exploit(marker))))),
         'cannot load'),
        (resume(run_dir, '--block_size=64'), "longer than the checkpoint's"),
        (run('sample.py', f'--out_dir={tmp_path / "no_run"}'), 'no checkpoint'),
        (run('sample.py', f'--out_dir={tmp_path / "corrupt"}'), 'cannot load'),
        (run('sample.py', '--top_p=1.5'), 'top_p'),
        (run('sample.py', '--temperature=-1.0'), 'temperature'),
        (run('sample.py', '--repetition_penalty=0'), 'repetition_penalty'),
        (run('sample.py', '--dtype=fp16'), 'dtype'),
        (run('sample.py', f'--out_dir={run_dir}', f'--start=FILE:{tmp_path}/missing.txt'),
         'cannot read the prompt'),
        (run('sample.py', f'--out_dir={run_dir}', '--eval=True', f'--data_dir={tmp_path}/nowhere',
             '--max_new_tokens=2'), 'no prepared data'),
    ]
    for result, message in cases:
        lines = result.stderr.strip().splitlines()
        assert (result.returncode != 0 and len(lines) == 1
                and 'Traceback' not in result.stderr), result.stderr
        assert message in result.stderr, result.stderr
    assert not marker.exists()  # the malicious pickle never ran
    assert fingerprint() == before


def test_configure_checks_keys_and_types(tmp_path):
    settings = dict(max_iters=100, learning_rate=1e-3, compile=False, router='sinkhorn')
    config_file = tmp_path / 'c.py'
    config_file.write_text("import math\nmax_iters = 7\nlearning_rate = math.pi\n")
    overrides = configure(settings, [str(config_file), '--learning_rate=2', '--compile=True',
                                     '--router=softmax'])
    assert settings == dict(max_iters=7, learning_rate=2.0, compile=True, router='softmax')
    assert overrides == settings and isinstance(settings['learning_rate'], float)
    # (a str setting takes any text: --router=3 is the router '3', which ModelConfig refuses)
    for bad in (['--max_iter=3'], ['--max_iters=2.5'], ['--compile=1'], ['max_iters']):
        with pytest.raises(ValueError):
            configure(dict(settings), bad)
    config_file.write_text("typo_key = 1\n")
    with pytest.raises(ValueError, match='typo_key'):
        configure(dict(settings), [str(config_file)])
    for text, words in (("max_iters = (\n", 'line'), ("max_iters = 1 / 0\n", 'ZeroDivisionError')):
        # a syntax error, or a file that raises: one line naming the file
        config_file.write_text(text)
        with pytest.raises(ValueError, match=words) as error:
            configure(dict(settings), [str(config_file)])
        assert str(config_file) in str(error.value) and '\n' not in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_out_of_memory_saves_an_emergency_checkpoint(data_dir, tmp_path):
    """A batch far beyond the device's memory: the OOM inside the step is caught, the (untouched)
    weights are saved, and the run exits non-zero naming the checkpoint."""
    result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                 '--device=cuda', '--block_size=1024', '--batch_size=65536', '--max_iters=5',
                 '--eval_interval=100', '--eval_iters=1')
    assert result.returncode == 3, result.stderr
    assert 'CUDA out of memory' in result.stderr and 'emergency checkpoint' in result.stderr
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['reason'] == 'emergency' and ckpt['iter_num'] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('router', ['sinkhorn', 'bias'])
def test_cuda_graph_steps_match_eager_steps(data_dir, tmp_path, router):
    """20 iterations of 2 micro-steps, eager and replayed as a CUDA graph: the same losses and
    gradient norms at every step (the warm-up runs before the capture leave no trace, not even in
    the bias router's counts)."""
    runs = {}
    for graph in (False, True):
        out = tmp_path / f'graph_{graph}'
        result = run('train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}',
                     '--device=cuda', f'--router={router}', '--max_iters=20', '--eval_interval=20',
                     '--log_interval=1', '--gradient_accumulation_steps=2', f'--cuda_graph={graph}')
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in open(out / 'metrics.jsonl')]
        runs[graph] = [(r['loss'], r['grad_norm']) for r in records if 'loss' in r]
    assert len(runs[True]) == 20
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-3,
                               atol=1e-5)


def torchrun(nproc, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={nproc}', 'train.py', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_data_parallel_resumes_exactly_and_at_another_world_size(data_dir, tmp_path):
    """DDP on 2 gloo processes: 10 iterations straight == 5, stop, resume to 10 (bit for bit); the
    run then continues on 1 process and back on 2."""
    args = [*TINY, f'--data_dir={data_dir}', '--eval_interval=5', '--gradient_accumulation_steps=2']
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    result = torchrun(2, *args, f'--out_dir={straight}', '--max_iters=10')
    assert result.returncode == 0, result.stderr
    assert ('2 processes x 1 micro-steps' in result.stdout
            and result.stdout.count('iter 10: train loss') == 1)
    for extra in (['--max_iters=5', '--lr_decay_iters=10'],
                  ['--max_iters=10', '--init_from=resume']):
        result = torchrun(2, *args, f'--out_dir={stopped}', *extra)
        assert result.returncode == 0, result.stderr
    assert_same_weights(weights(stopped / 'ckpt.pt'), weights(straight / 'ckpt.pt'))
    one = run('train.py', *args, f'--out_dir={stopped}', '--max_iters=15', '--init_from=resume')
    assert (one.returncode == 0
            and 'resuming 2 ranks\' run on 1: data streams re-seeded' in one.stdout), one.stderr
    two = torchrun(2, *args, f'--out_dir={stopped}', '--max_iters=20', '--init_from=resume')
    assert two.returncode == 0 and 'done: 5 iterations' in two.stdout, two.stderr
    assert torch.load(stopped / 'ckpt.pt', weights_only=True)['iter_num'] == 20


def test_zero_stages_under_torchrun_match_ddp_and_resume_from_rank_shards(data_dir, tmp_path):
    """2 gloo processes: zero.py stages 1, 2 and 3 end where DDP + torch AdamW ends (same data, same
    maths). Each rank writes its own optimizer shard; stage 2 resumes bit exactly from them at 2
    ranks, and a stage-3 run moves to 1 process and back (the shards are re-cut); stage 0 cannot
    read shards and says so in one line."""
    args = [*TINY, f'--data_dir={data_dir}', '--eval_interval=5', '--gradient_accumulation_steps=2']
    for stage in (0, 1, 2, 3):
        result = torchrun(2, *args, f'--out_dir={tmp_path / str(stage)}', f'--zero_stage={stage}',
                          '--max_iters=10')
        assert result.returncode == 0, result.stderr
    assert {'ckpt_000010.rank0.pt', 'ckpt_000010.rank1.pt'} <= set(os.listdir(tmp_path / '3'))
    ddp = weights(tmp_path / '0' / 'ckpt.pt')
    for stage in ('1', '2', '3'):
        zero = weights(tmp_path / stage / 'ckpt.pt')
        assert max((zero[k] - ddp[k]).abs().max().item() for k in ddp) <= 1e-6, stage
    stopped = tmp_path / 'stopped'
    for extra in (['--max_iters=5', '--lr_decay_iters=10'],
                  ['--max_iters=10', '--init_from=resume']):
        result = torchrun(2, *args, f'--out_dir={stopped}', '--zero_stage=2', *extra)
        assert result.returncode == 0, result.stderr
    assert_same_weights(weights(stopped / 'ckpt.pt'), weights(tmp_path / '2' / 'ckpt.pt'))
    refused = run('train.py', *args, f'--out_dir={tmp_path / "3"}', '--max_iters=15',
                  '--init_from=resume')
    assert (refused.returncode != 0
            and 'resume with --zero_stage=3' in refused.stderr), refused.stderr
    single = run('train.py', *args, f'--out_dir={tmp_path / "3"}', '--max_iters=15',
                 '--init_from=resume', '--zero_stage=3')
    assert single.returncode == 0 and 'done: 5 iterations' in single.stdout, single.stderr
    spread = torchrun(2, *args, f'--out_dir={tmp_path / "3"}', '--max_iters=20',
                      '--init_from=resume', '--zero_stage=3')
    assert spread.returncode == 0 and 'done: 5 iterations' in spread.stdout, spread.stderr
    whole = run('train.py', *args, f'--out_dir={tmp_path / "0"}', '--max_iters=15',
                '--init_from=resume',
                '--zero_stage=1')  # DDP's whole AdamW state, cut into shards on load
    assert whole.returncode == 0 and 'done: 5 iterations' in whole.stdout, whole.stderr


@pytest.mark.parametrize('fault', ['memory', 'oom'])
def test_a_stop_on_one_rank_stops_every_rank_with_an_emergency_checkpoint(data_dir, tmp_path,
                                                                           fault):
    """2 gloo processes; only rank 1 finds its memory past the last level at the log step of
    iteration 5, or runs out of CUDA memory in its 8th forward (iteration 7). Every rank stops with
    it (after the step for the memory level, before it for the OOM) and takes part in one emergency
    checkpoint, instead of waiting in its collectives until dist_timeout."""
    patch = {'memory': textwrap.dedent("""
                 import os, monitors
                 memory_record = monitors.memory_record
                 full = {'mem_reserved': 0.95} if os.environ['RANK'] == '1' else {}
                 monitors.memory_record = lambda dev: dict(memory_record(dev), **full)
                 """),
             'oom': after_training_forwards(
                 "if rank == 1 and n == 8: raise torch.OutOfMemoryError('CUDA out of memory.')")}
    result = run_patched(patch[fault], *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                         '--max_iters=100', '--gradient_accumulation_steps=2', '--dist_timeout=60',
                         nproc=2)
    why, stopped_at = {'memory': ('memory at 95% of the device', 6),
                       'oom': ('CUDA out of memory (try a smaller batch_size)', 7)}[fault]
    line = f"{why} at iteration {stopped_at}: saved an emergency checkpoint"
    assert result.returncode != 0 and result.stderr.count(line) == 2, result.stderr  # both ranks
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['reason'] == 'emergency' and ckpt['iter_num'] == stopped_at


def test_a_dead_rank_stops_the_whole_run(data_dir, tmp_path):
    """kill -9 one of two workers mid-run: the run ends (non-zero) within seconds instead of
    hanging."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    process = subprocess.Popen([sys.executable, '-u', '-m', 'torch.distributed.run', '--standalone',
                                '--nproc_per_node=2', 'train.py', *TINY, f'--data_dir={data_dir}',
                                f'--out_dir={tmp_path}', '--max_iters=100000',
                                '--eval_interval=1000', '--gradient_accumulation_steps=2',
                                '--dist_timeout=30'],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env)
    for line in process.stdout:
        if line.startswith('iter 10:'):
            break
    workers = subprocess.run(['pgrep', '-P', str(process.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    process.stdout.close()
    assert process.wait(timeout=90) != 0


def test_torchrun_trains_the_nano_config(data_dir, tmp_path):
    """The README's gloo command on the real config file (a few iterations, on the test corpus)."""
    result = torchrun(2, 'config/nano.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                      '--max_iters=4', '--eval_interval=2', '--eval_iters=1', '--log_interval=2',
                      '--gradient_accumulation_steps=2')
    assert result.returncode == 0, result.stderr
    assert 'tokens per iteration: 8,192 (2 processes x 1 micro-steps x 32 x 128)' in result.stdout
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 4
