"""
rlhf.py: GAE, the adaptive KL controller, the PPO and DPO losses against values worked by hand or
written out element by element in float64; the lr=0 sanity run (ratio exactly 1, KL exactly 0) on a
tiny MoE; and the judge, PPO, DPO, best-of-n and frontier modes end to end on a tiny corpus, with
one-line errors for bad input.
    python -m pytest -q tests/test_rlhf.py
"""

import copy
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch

import rlhf
from common import read_metrics
from configurator import configure, settings_of
from data.prepare import main as prepare
from model import GPT, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_gae_against_a_hand_computed_example():
    # row 0, gamma=1, lambda=0.95, rewards [0, 0, 1], values [0.5, 0.2, 0.4], all three tokens real:
    #   delta2 = 1 + 0 - 0.4 = 0.6                    A2 = 0.6
    #   delta1 = 0 + 0.4 - 0.2 = 0.2                  A1 = 0.2 + 0.95 * 0.6 = 0.77
    #   delta0 = 0 + 0.2 - 0.5 = -0.3                 A0 = -0.3 + 0.95 * 0.77 = 0.4315
    #   returns = A + V = [0.9315, 0.97, 1.0]
    # row 1 ends after two tokens (the third reward and value are garbage that must be ignored):
    #   delta1 = -0.2 + 0 - 0.1 = -0.3 (nothing after the last token)    A1 = -0.3
    #   delta0 = 0.1 + 0.1 - 0.3 = -0.1               A0 = -0.1 + 0.95 * -0.3 = -0.385
    #   returns = [-0.085, -0.2, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.1, -0.2, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.1, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages, returns = rlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.allclose(advantages, torch.tensor([[0.4315, 0.77, 0.6], [-0.385, -0.3, 0.0]]),
                          atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.9315, 0.97, 1.0], [-0.085, -0.2, 0.0]]),
                          atol=1e-6)
    # gamma=0.5, lambda=0.5 on row 0: delta2 = 0.6, A2 = 0.6; delta1 = 0.5 * 0.4 - 0.2 = 0,
    # A1 = 0.25 * 0.6 = 0.15; delta0 = 0.5 * 0.2 - 0.5 = -0.4, A0 = -0.4 + 0.25 * 0.15 = -0.3625
    advantages, _ = rlhf.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[-0.3625, 0.15, 0.6]]), atol=1e-6)


def test_adaptive_kl_controller_against_the_formula_by_hand():
    # beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon),
    # with beta 0.1, target 2, n 64, horizon 1000
    assert math.isclose(rlhf.adapt_kl(0.1, 3.0, 2.0, 64, 1000),
                        0.1 * (1 + 0.2 * 0.064))          # +0.5 clipped to +0.2
    assert math.isclose(rlhf.adapt_kl(0.1, 1.8, 2.0, 64, 1000),
                        0.1 * (1 - 0.1 * 0.064))          # -0.1 = 0.09936
    assert math.isclose(rlhf.adapt_kl(0.1, 0.0, 2.0, 64, 1000),
                        0.1 * (1 - 0.2 * 0.064))          # -1 clipped to -0.2
    assert rlhf.adapt_kl(0.1, 2.0, 2.0, 64, 1000) == 0.1  # on target: unchanged


def test_ppo_losses_against_element_by_element_float64():
    # by hand first: A=1, ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped);
    # A=-1, ratio 0.5 -> max(0.5, 0.8) = 0.8
    ratio = torch.tensor([[1.5, 0.5]])
    policy_loss, _, _, clipfrac = rlhf.ppo_losses(ratio.log(), torch.zeros(1, 2),
                                                  torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2),
                                                  torch.zeros(1, 2), torch.zeros(1, 2),
                                                  torch.ones(1, 2), 0.2, 0.2)
    assert (math.isclose(policy_loss.item(), (-1.2 + 0.8) / 2, rel_tol=1e-6)
            and clipfrac.item() == 1.0)
    g = torch.Generator().manual_seed(0)
    B, R, eps, eps_v = 3, 5, 0.2, 0.3
    lp, old, adv, v, old_v, ret = (torch.randn(B, R, generator=g, dtype=torch.float64) * 0.5
                                   for _ in range(6))
    mask = torch.rand(B, R, generator=g) > 0.3
    policy_loss, value_loss, _, clipfrac = rlhf.ppo_losses(lp, old, adv, v, old_v, ret,
                                                           mask.double(), eps, eps_v)
    pg = vf = clipped = n = 0.0
    for b in range(B):
        for t in range(R):
            if not mask[b, t]:
                continue
            r, a = math.exp(lp[b, t] - old[b, t]), float(adv[b, t])
            pg += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
            vc = float(old_v[b, t]) + min(max(float(v[b, t] - old_v[b, t]), -eps_v), eps_v)
            vf += 0.5 * max((float(v[b, t]) - float(ret[b, t])) ** 2, (vc - float(ret[b, t])) ** 2)
            clipped += abs(r - 1) > eps
            n += 1
    assert math.isclose(policy_loss.item(), pg / n, rel_tol=1e-9)
    assert math.isclose(value_loss.item(), vf / n, rel_tol=1e-9)
    assert math.isclose(clipfrac.item(), clipped / n, rel_tol=1e-9)


def test_dpo_loss_against_the_formula():
    g = torch.Generator().manual_seed(1)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(4, generator=g, dtype=torch.float64)
                                                  * 3 for _ in range(4))
    loss, margin = rlhf.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    # -log sigmoid(x) = log(1 + e^-x)
    expected = [math.log(1 + math.exp(-0.3 * ((c - rc) - (r - rr))))
                for c, r, rc, rr
                in zip(*(x.tolist() for x in (chosen, rejected, ref_chosen, ref_rejected)))]
    assert math.isclose(loss.item(), sum(expected) / 4, rel_tol=1e-9)
    assert torch.allclose(margin, 0.3 * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def test_best_of_against_a_loop_over_groups():
    """best_of: 7 samples for 3 prompts, n = 1, 2, 3 (the 7th sample left out of
    groups of 2 and 3)."""
    g = torch.Generator().manual_seed(2)
    score, value = torch.randn(7, 3, generator=g), torch.randint(-3, 4, (7, 3), generator=g).float()
    for n in (1, 2, 3):
        expected = [[value[k * n:(k + 1) * n, j][score[k * n:(k + 1) * n, j].argmax()].item()
                     for j in range(3)]
                    for k in range(7 // n)]
        assert rlhf.best_of(score, value, n).tolist() == expected
    assert torch.equal(rlhf.best_of(score, value, 1), value)


def test_read_metrics_drops_a_cut_off_tail_with_a_note(tmp_path, capsys):
    """A killed run's metrics.jsonl ends in a cut-off line; an evaluation record without what
    frontier() reads is not a record either: each drops the rest of the file, with a note."""
    path = tmp_path / 'metrics.jsonl'
    good = [dict(eval=True, mode='ppo', step=0, kl=0.0, gold=-1.0, judge=0.2), dict(update=1)]
    tails = {'{"eval": true, "mo': 3, '{"eval": true, "mode": "ppo"}\n{"update": 2}\n': 4}
    for tail, lines in tails.items():
        path.write_text(''.join(json.dumps(r) + '\n' for r in good) + tail)
        assert read_metrics(path, rlhf.whole_record) == good
        assert f'line 3 of {lines} is cut off' in capsys.readouterr().out
    path.write_text(''.join(json.dumps(r) + '\n' for r in good))
    assert read_metrics(path, rlhf.whole_record) == good and capsys.readouterr().out == ''


def byte_task(text, prompt_len=6, response_len=5, label_temperature=0.5):
    """A LineTask on text (both splits) with a byte-level tokenizer: token b is byte b, and 256 ends
    a document, so the line-ending tokens are 10 and 256."""
    enc = tiktoken.Encoding('bytes', pat_str=r"[^\n]+|\n",
                            mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens={'<|endoftext|>': 256})
    ids = np.array(enc.encode_ordinary(text))
    return rlhf.LineTask(enc, {'train': ids, 'val': ids}, 257, 'cpu', prompt_len, response_len,
                         label_temperature)


def test_line_end_and_gold_score():
    task = byte_task('one line\n')
    end, has_eos, mask = task.line_end(torch.tensor([[3, 10, 0, 1], [2, 2, 2, 2], [5, 6, 256, 10]]))
    assert end.tolist() == [1, 3, 2] and has_eos.tolist() == [True, False, True]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True],
                             [True, True, True, False]]
    known = {'my', 'sweet', 'love', 'and', 'the', 'death', 'of', 'hope'}
    assert rlhf.gold_score('My sweet love, and the death', known, True) == (2 - 1, 0)
    assert rlhf.gold_score('sweet sweet love and hope', known, True) == (3, -1)  # 'sweet' once
    assert rlhf.gold_score('my love and zorbl', known, False) == (1, -1 - 1)  # a non-word, no end
    assert rlhf.gold_score('', known, True) == (0, -1)                        # not a line


def test_line_task_prompts_gold_and_pairs():
    """Prompts are the prompt_len tokens up to a line break of their split; gold is gold_score of a
    response's text up to its line break; pairs carry the gold of both and a Bradley-Terry label
    at the task's own temperature (not the module's default)."""
    text = 'my sweet love\nand the death\nof hope\nand\n'
    task = byte_task(text, prompt_len=6, response_len=5, label_temperature=0.7)
    assert task.known == {'my', 'sweet', 'love', 'and', 'the', 'death', 'of', 'hope'}
    assert task.ends.nonzero().flatten().tolist() == [10, 256]
    assert task.starts['train'].tolist() == [i for i, c in enumerate(text) if c == '\n' and i >= 5]
    prompts = task.prompts('train', 20, torch.Generator().manual_seed(0))
    assert prompts.shape == (20, 6) and (prompts[:, -1] == 10).all()
    assert {bytes(row).decode() for row in prompts.tolist()} <= {text[i - 5:i + 1] for i in
                                                                 task.starts['train']}
    assert torch.equal(prompts, task.prompts('train', 20, torch.Generator().manual_seed(0)))
    responses = torch.tensor([list(b'sweet\nxy'), list(b'zorbl lo'), [*b'love', 256, 1, 2, 3]])
    end, has_eos, _ = task.line_end(responses)
    expected = [rlhf.gold_score(line, task.known, eos)
                for line, eos in (('sweet', True), ('zorbl lo', False), ('love', True))]
    assert task.gold(responses, end, has_eos).T.tolist() == [list(map(float, e)) for e in expected]
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    pairs = task.sample_pairs(gpt, 'val', 4, torch.Generator().manual_seed(1))
    assert pairs['prompts'].shape == (4, 6) and pairs['a'].shape == pairs['b'].shape == (4, 5)
    for k in 'ab':
        gold = task.gold(pairs[k], *task.line_end(pairs[k])[:2]).sum(0)
        assert torch.equal(pairs[f'gold_{k}'], gold)
    prob = torch.sigmoid((pairs['gold_a'] - pairs['gold_b']) / 0.7)
    assert torch.equal(pairs['prob'], prob) and set(pairs['label'].tolist()) <= {0.0, 1.0}


def test_with_lr_zero_the_ratio_is_one_and_the_kl_zero():
    """A tiny MoE (Sinkhorn router): experience from the KV-cache rollout, then PPO epochs with
    AdamW at lr=0."""
    settings = {**settings_of(vars(rlhf)), 'ppo_epochs': 2, 'minibatches': 2}
    shaping = dict(beta=0.1, gamma=1.0, lam=0.95, missing_eos_penalty=1.0)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4,
                         top_k=2)
    ref = GPT(config).eval()
    policy, judge = copy.deepcopy(ref), rlhf.HeadedGPT(GPT(config)).eval()
    critic = copy.deepcopy(judge)
    task = byte_task('one line\n', response_len=5)
    optimizer = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=0.0)
    before = copy.deepcopy(policy.state_dict())
    policy.watch_routing()
    prompts = torch.randint(11, 256, (8, 6))
    batch = rlhf.experience(policy, critic, ref, judge, task, prompts, **shaping)
    assert torch.equal(batch['kl'], torch.zeros(8)) and batch['advantages'].abs().sum() > 0
    stats = rlhf.ppo_update(policy, critic, optimizer, batch, settings)
    # the first minibatch is the old log-probs' model on half the batch: equal up to the fp32
    # rounding of another matmul shape (exactly 0 on some CPUs, 5e-7 on others)
    assert (stats['ratio_first_max'] < 1e-5 and stats['approxkl'] < 1e-10
            and stats['clipfrac'] == 0.0)
    assert stats['logprob_mismatch'] < 1e-4 and stats['grad_norm'] > 0 and stats['skipped'] == 0
    # per layer: load / even share of each expert, summing to E
    assert len(stats['expert_load']) == 2
    assert all(math.isclose(sum(layer), 4, rel_tol=1e-5) for layer in stats['expert_load'])
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    again = rlhf.experience(policy, critic, ref, judge, task, prompts, **shaping)
    assert torch.equal(again['kl'], torch.zeros(8))
    # ... and the check can fail: in train() mode the Sinkhorn router balances over the batch, so
    # the first minibatch (half the batch) routes differently from the full-batch forward that made
    # the old log-probs
    policy.train()
    moved = rlhf.ppo_update(policy, critic, optimizer, batch, settings)['ratio_first_max']
    assert moved > 1e-3, moved


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A corpus of short comma-ended lines (words from the gold lexicon and made-up ones), a
    512-token BPE, and a tiny MoE trained on it for 20 iterations."""
    rng = random.Random(0)
    words = sorted(rlhf.POSITIVE)[:15] + sorted(rlhf.NEGATIVE)[:15] + \
        [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 6)))
         for _ in range(60)]
    raw = tmp_path_factory.mktemp('raw')
    for d in range(12):
        lines = [' '.join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize() + ','
                 for _ in range(150)]
        (raw / f'doc{d}.txt').write_text('\n'.join(lines) + '\n')
    data, out = tmp_path_factory.mktemp('data'), tmp_path_factory.mktemp('nano')
    prepare([f'--input={raw}', f'--out_dir={data}', '--vocab_size=512'])
    result = run('train.py', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=8',
                 '--block_size=32', '--eval_iters=2', '--device=cpu', '--warmup=2',
                 '--max_iters=20', '--eval_interval=20', '--learning_rate=3e-3',
                 f'--data_dir={data}', f'--out_dir={out}')
    assert result.returncode == 0, result.stderr
    return str(out)


def test_judge_ppo_dpo_bon_and_frontier_end_to_end(pretrained, tmp_path):
    common = ['rlhf.py', f'--init_dir={pretrained}', f'--out_dir={tmp_path}', '--device=cpu',
              '--prompt_len=8', '--response_len=6', '--batch_size=8', '--eval_prompts=16',
              '--eval_interval=2']
    judge = run(*common, '--mode=judge', '--n_pairs=32', '--n_val_pairs=16', '--judge_epochs=1')
    assert judge.returncode == 0, judge.stderr
    assert ('held-out accuracy' in judge.stdout
            and {'judge.pt', 'pairs.pt'} <= set(os.listdir(tmp_path)))
    ppo = run(*common, '--mode=ppo', '--updates=3', '--ppo_epochs=2', '--minibatches=2',
              '--kl_coef=0.1', '--kl_target=1.0', '--kl_horizon=100', '--ent_coef=0.01')
    assert ppo.returncode == 0, ppo.stderr
    dpo = run(*common, '--mode=dpo', '--updates=3', '--run=dpo')
    assert dpo.returncode == 0, dpo.stderr
    bon = run(*common, '--mode=bon', '--bon_n=4', '--run=bon')
    assert bon.returncode == 0, bon.stderr
    records = {name: [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
               for name in ('ppo_s1337', 'dpo', 'bon')}
    for name, rs in records.items():  # every number logged is finite
        numbers = [x for r in rs for v in r.values() for x in (v if isinstance(v, list) else [v])
                   if isinstance(x, (int, float))]
        assert numbers and all(math.isfinite(x) for x in numbers), name
    updates = [r for r in records['ppo_s1337'] if not r.get('eval')]
    assert [r['update'] for r in updates] == [1, 2, 3]
    assert updates[0]['beta'] == 0.1 and updates[1]['beta'] != 0.1  # the controller moved beta
    assert (updates[0]['ratio_first_max'] < 1e-5
            and updates[0]['logprob_mismatch'] < 1e-4)  # as above
    assert [r['step'] for r in records['ppo_s1337'] if r.get('eval')] == [0, 2, 3]
    assert records['ppo_s1337'][0]['kl'] == 0  # the untrained policy is the reference
    assert [r['step'] for r in records['dpo'] if not r.get('eval')] == [1, 2, 3]
    assert [r['n'] for r in records['bon']] == [1, 2, 4]
    assert {'ckpt.pt', 'tokenizer.json', 'ppo.png'} <= set(os.listdir(tmp_path / 'ppo_s1337'))
    assert 'dpo.png' in os.listdir(tmp_path / 'dpo')
    weights = torch.load(tmp_path / 'ppo_s1337' / 'ckpt.pt', weights_only=True)
    GPT(ModelConfig(**weights['model_config'])).load_state_dict(weights['model'])
    # the checkpoint records the run's settings, overrides included, and its data
    assert (weights['config']['response_len'] == 6 and weights['config']['kl_coef'] == 0.1
            and weights['config']['mode'] == 'ppo' and 'data_dir' in weights['config'])
    assert [line.split(':')[0] for line in ppo.stdout.splitlines()
            if line.startswith('update ')] == ['update 1', 'update 2', 'update 3']
    frontier = run(*common, '--mode=frontier')
    assert frontier.returncode == 0 and (tmp_path / 'gold_vs_kl.png').exists(), frontier.stderr
    assert not list(tmp_path.rglob('*.tmp'))  # every file was written whole, then renamed
    os.remove(tmp_path / 'pairs.pt')  # DPO without the judge's pairs: one line that says so
    dpo = run(*common, '--mode=dpo', '--updates=1', '--run=dpo')
    assert (dpo.returncode != 0 and dpo.stderr.count('\n') == 1
            and 'no pairs at' in dpo.stderr), dpo.stderr


def test_bad_input_gives_one_line_errors(pretrained, tmp_path):
    for args, message in ((['--mode=reinforce'], 'mode must be'),
                          ([f'--init_dir={tmp_path}/none'], 'no checkpoint at'),
                          ([f'--init_dir={pretrained}', '--mode=ppo', '--prompt_len=8',
                            '--response_len=6'], 'no judge at'),
                          (['--batch_size=8', '--minibatches=3'], 'must divide batch_size=8')):
        result = run('rlhf.py', f'--out_dir={tmp_path}', '--device=cpu', *args)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    settings = {k: v for k, v in vars(rlhf).items() if isinstance(v, (int, float, bool, str))}
    with pytest.raises(ValueError, match="unknown config key 'kl_coeff'.*did you mean kl_coef"):
        configure(settings, ['--kl_coeff=0.2'])
    with pytest.raises(ValueError, match='--updates expects int'):
        configure(settings, ['--updates=2.5'])
