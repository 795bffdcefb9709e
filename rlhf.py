"""
RLHF for a pretrained Ava model, offline: a judge (reward model), PPO against it, DPO and
best-of-n, on a task built from the pretraining text with a programmatic gold score that
nothing optimises directly.

    python rlhf.py config/rlhf_nano.py --mode=judge     # pairs from the model, labelled by gold
    python rlhf.py config/rlhf_nano.py --mode=ppo --seed=1   # PPO on the judge: out_dir/ppo_s1/
    python rlhf.py config/rlhf_nano.py --mode=dpo --dpo_beta=0.1 --run=dpo_b0.1
    python rlhf.py config/rlhf_nano.py --mode=bon       # best-of-n on held-out prompts (judge)
    python rlhf.py config/rlhf_nano.py --mode=frontier  # gold and judge vs KL of every run

The task (a miniature of Ziegler et al. 2019's mock sentiment and Gao et al. 2022's
gold-vs-proxy), class LineTask: a prompt is prompt_len tokens of Shakespeare ending at a line
break; the response is the next line, i.e. it ends at its first token that holds a line break
(our EOS). gold_score() rates a line: + positive words, - negative words, - words the corpus
never uses, - repeated words, - 1 if the line never ends. Pairs of pretrained samples are
labelled by gold (Bradley-Terry with a temperature), the judge learns from the labels, PPO and
DPO learn from the judge or the labels, and we report gold on held-out (val) prompts against
the KL to the pretrained model.

PPO's four models: the policy (a copy of the pretrained GPT), the reference (the pretrained
GPT, frozen), the judge (the pretrained GPT + a scalar head, frozen) and the critic (a copy of
the judge, trained by the value loss): a critic of its own keeps the noisy value gradients out
of the policy, and starts out knowing what scores well.

Every model stays in eval() mode, in every phase, and everything runs in fp32: dropout is off,
and MoE routing is plain per-token top-k, so the rollout (KV cache, one token at a time) and the
training forward (whole sequences, other batch compositions) route every token alike. In
train() mode the Sinkhorn router balances over the whole batch, a different function, and the
PPO ratio would no longer start at 1.

Settings are read one way: main() reads the settings below as module globals, as nanoGPT's
train.py does, and hands each function what it needs. The maths that the tests drive with
hand-worked numbers (gold_score, whiten, gae, adapt_kl, ppo_losses, dpo_loss, explained_variance,
best_of) and the small steps take plain arguments; a LineTask holds the task's three settings;
the jobs with many knobs (train_judge, ppo_update, train_ppo, train_dpo, Run) take the settings
dict s (configurator.settings_of). Sizes come from the tensors (P = prompts.size(1)): prompt_len
and response_len are read only where prompts and responses are made.

Shape legend: B rows (episodes or pairs), P prompt tokens, R response tokens, T = P + R,
V vocab, C channels.
"""

import copy
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from failsafe import check, fail, stop_on_signals, write_atomic

if __name__ == '__main__':  # before numpy and torch load: a stop while they do is one line too
    stop_on_signals(lambda: '; nothing was written')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (load_checkpoint, load_data, load_torch, pyplot, read_metrics,  # noqa: E402
                    resolve_device, trained_data_dir)
from configurator import configure_or_exit, settings_of  # noqa: E402
from decode import forget, generate  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from tokenizer import load_run_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
mode = 'ppo'                 # 'judge' | 'ppo' | 'dpo' | 'bon' | 'frontier' (see the docstring)
init_dir = 'out/nano'        # the pretrained model: a train.py run folder (ckpt.pt, tokenizer.json)
out_dir = 'out/rlhf_nano'    # pairs.pt and judge.pt; each ppo/dpo/bon run in its own subfolder
run = ''                     # that subfolder's name; '' = <mode>_s<seed>
device = 'auto'              # 'auto' (cuda if available), 'cpu', 'cuda', ...
seed = 1337
# the task
prompt_len = 32              # P: prompt tokens, ending at a line break (val ones to evaluate)
response_len = 24            # R: tokens sampled at temperature 1; a response ends at a line break
label_temperature = 0.5      # P(a preferred to b) = sigmoid((gold_a - gold_b) / label_temperature)
# judge (Bradley-Terry) on preference pairs sampled from the pretrained model
n_pairs = 32000              # training pairs, from train prompts (fewer: a judge less like gold)
n_val_pairs = 500            # held-out pairs, from val prompts: the judge's accuracy
judge_epochs = 1
judge_lr = 2e-4              # AdamW, annealed linearly to 0 (also: batch_size pairs per step)
# PPO (and DPO: updates, batch_size, learning_rate)
updates = 100                # PPO iterations (rollout + ppo_epochs) or DPO steps
batch_size = 64              # episodes per PPO iteration; pairs per DPO or judge step
learning_rate = 5e-5         # AdamW, annealed linearly to 0; 0 = a sanity run (ratio 1, KL 0)
ppo_epochs = 4               # passes over each rollout batch (policy and critic)
minibatches = 2              # per pass; must divide batch_size
kl_coef = 0.25               # beta of the per-token penalty -beta * (log pi - log pi_ref), at the
                             # start: near where the controller settles for kl_target 2.5, so the
                             # KL does not overshoot the target first
kl_target = 2.5              # adaptive beta (Ziegler et al.): the sequence KL (nats) to aim for;
                             # 0 = beta stays fixed
kl_horizon = 1000            # the controller's horizon in episodes (batch_size / horizon ~
                             # Ziegler's 512 / 10000)
clip_range = 0.2             # PPO's ratio clip epsilon
clip_range_value = 0.2       # the value clip around the rollout's values
ent_coef = 0.0               # entropy bonus (0 = entropy only logged)
gamma = 1.0                  # GAE discount
lam = 0.95                   # GAE lambda
max_grad_norm = 1.0
ratio_threshold = 10.0       # skip a minibatch whose mean ratio exceeds this (stale or broken)
missing_eos_penalty = 1.0    # subtracted from the judge's score of a response with no line break
# DPO (Rafailov et al. 2023) on the judge's training pairs
dpo_beta = 0.1
# evaluation on held-out prompts (the same ones for every run)
eval_interval = 10           # updates (or DPO steps) between evaluations; also the first and last
eval_prompts = 512
bon_n = 64                   # best-of-n: n = 1, 2, 4, ... up to this many samples per prompt
# -----------------------------------------------------------------------------

# gold: a hand-written positivity lexicon for Shakespeare's English (a point per distinct word)
POSITIVE = set("""love loves loved lovely loving lover sweet sweetly sweetest joy joys joyful
fair fairest gentle good kind happy dear dearest blessed bless grace gracious honour honest
noble true heaven heavenly smile merry mirth delight peace hope virtue beauty beauteous bright
glad laugh friend friends faith pretty welcome wise thanks pleasure comfort praise worthy brave
rich best excellent kiss""".split())
NEGATIVE = set("""death dead die dies dying kill killed hate hated blood bloody grief woe sorrow
fear foul false villain traitor curse cursed damned hell devil poison murder war sick pain weep
tears wretch wretched vile evil ill shame fool slave base cruel grave mad rage plague despair
wicked sin coward knave scorn revenge bitter""".split())
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def gold_score(text, known, finished):
    """The gold score of one response line -> (sentiment, fluency); gold is their sum.
    sentiment: distinct positive minus distinct negative words (repeating 'love' earns nothing).
    fluency: -1 per word the training text never uses (the model's glued half-words), -1 per
    repeat of a word of 4+ letters, -1 if it is not a whole line: fewer than 4 words (an empty
    line, a speaker's name), or no line break within response_len tokens."""
    words = WORD.findall(text.lower())
    distinct = set(words)
    sentiment = len(distinct & POSITIVE) - len(distinct & NEGATIVE)
    unknown = sum(w not in known for w in words)
    repeats = sum(c - 1 for w, c in Counter(words).items() if len(w) >= 4)
    return sentiment, -unknown - repeats - (len(words) < 4 or not finished)


class LineTask:
    """The line task on the pretrained model's own data: prompts that end at a line break, where
    a response ends (its first token that holds a line break), and the gold score of its line.
    enc: the tokenizer (a tiktoken Encoding); tokens: {'train': ..., 'val': ...} token arrays;
    vocab_size: the model's V; prompt_len, response_len, label_temperature: the task's settings."""

    def __init__(self, enc, tokens, vocab_size, device, prompt_len, response_len,
                 label_temperature):
        self.enc, self.device = enc, device
        self.prompt_len, self.response_len = prompt_len, response_len
        self.label_temperature = label_temperature
        self.tokens = {s: np.array(t, dtype=np.int64) for s, t in tokens.items()}
        ends = [b'\n' in enc.decode_single_token_bytes(i) for i in range(vocab_size)]
        self.ends = torch.tensor(ends, device=device)            # (V,) the tokens that end a line
        self.ends[enc.eot_token] = True                          # a document's end ends a line
        newline = enc.encode_ordinary('\n')[0]
        # the line breaks a prompt can end at (a response starts after): prompt_len - 1 tokens in
        self.starts = {s: np.nonzero(t[prompt_len - 1:] == newline)[0] + prompt_len - 1
                       for s, t in self.tokens.items()}
        self.known = set(WORD.findall(enc.decode(self.tokens['train'].tolist()).lower()))

    def prompts(self, split, n, generator=None):
        """n prompts (n, P) from a split: the prompt_len tokens up to and including a random line
        break, drawn with generator (None: torch's global one)."""
        starts, tokens, P = self.starts[split], self.tokens[split], self.prompt_len
        at = starts[torch.randint(len(starts), (n,), generator=generator).numpy()]
        rows = np.stack([tokens[i - P + 1:i + 1] for i in at])
        return torch.from_numpy(rows).to(self.device)

    def line_end(self, responses):
        """responses (B, R) -> the index of each row's last token (its first line break, else R-1)
        (B,), whether it has one (B,), and the mask of the tokens up to it (B, R). Tokens after
        the end are never looked at: every model is causal, so they need no padding."""
        is_end = self.ends[responses]                            # (B, R)
        has_eos = is_end.any(1)
        end = torch.where(has_eos, is_end.int().argmax(1), responses.size(1) - 1)
        mask = torch.arange(responses.size(1), device=responses.device) <= end[:, None]
        return end, has_eos, mask

    def gold(self, responses, end, has_eos):
        """(sentiment, fluency) of each response (B,) x 2, from its text up to (not including) its
        line break."""
        rows = [gold_score(self.enc.decode(r[:e + (not eos)]), self.known, eos)
                for r, e, eos in zip(responses.tolist(), end.tolist(), has_eos.tolist())]
        return torch.tensor(rows, dtype=torch.float, device=self.device).T

    def sample_pairs(self, gpt, split, n, generator):
        """n prompts, two samples of gpt each, their gold scores and a sampled Bradley-Terry label
        (1: a preferred)."""
        p = self.prompts(split, n, generator)
        responses = sample_responses(gpt, p.repeat(2, 1), self.response_len)
        g = self.gold(responses, *self.line_end(responses)[:2]).sum(0)  # (2n,)
        prob = torch.sigmoid((g[:n] - g[n:]) / self.label_temperature)
        label = (torch.rand(n, generator=generator) < prob.cpu()).float().to(self.device)
        return dict(prompts=p, a=responses[:n], b=responses[n:], gold_a=g[:n], gold_b=g[n:],
                    prob=prob, label=label)


def load_task(init_dir, data_dir, vocab_size, dev, prompt_len, response_len, label_temperature):
    """The LineTask of the pretrained model: its tokenizer (init_dir/tokenizer.json), its data."""
    enc = load_run_tokenizer(init_dir, vocab_size)
    _, tokens = load_data(data_dir)
    check([(len(enc.encode_ordinary('\n')) == 1, "the tokenizer has no single line-break token")])
    task = LineTask(enc, tokens, vocab_size, dev, prompt_len, response_len, label_temperature)
    check([(min(map(len, task.starts.values())) >= 2,
            f"{data_dir} has too few line breaks after {prompt_len} tokens to make prompts")])
    return task


class HeadedGPT(nn.Module):
    """A GPT and a scalar head (C -> 1) on its final normed states: the judge's score, or the
    critic's value."""

    def __init__(self, gpt):
        super().__init__()
        C = gpt.config.n_embd
        self.gpt, self.head = gpt, nn.Linear(C, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(C + 1))  # as Stiennon et al. 2020
        nn.init.zeros_(self.head.bias)

    def forward(self, seq):
        """seq (B, T) -> one number per position (B, T)."""
        return self.head(self.gpt.norm_f(self.gpt.trunk(seq)[0])).squeeze(-1)


def response_logprobs(gpt, seq, P):
    """seq (B, T) = prompt (P) + response (R) -> the log-probabilities of the response tokens
    (B, R) and the entropies of those next-token distributions (B, R). Policy and reference take
    exactly this path: KL 0 when they are equal."""
    states = gpt.norm_f(gpt.trunk(seq)[0][:, P - 1:-1])           # position t predicts token t+1
    logp = gpt.lm_head(states).float().log_softmax(-1)            # (B, R, V)
    return logp.gather(-1, seq[:, P:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def rollout(gpt, prompts, response_len):
    """Sample response_len tokens after each prompt (B, P) at temperature 1, no top-k/top-p (the
    ratio and the KL need the policy's own probabilities), with the KV cache -> the tokens (B, R)
    and their log-probabilities (B, R)."""
    seq, logprobs = generate(gpt, prompts, response_len, return_logprobs=True)
    forget(gpt)  # its decode cache would otherwise sit through the PPO update
    return seq[:, prompts.size(1):], logprobs


def sample_responses(gpt, prompts, response_len, chunk=512):
    """rollout()'s tokens (B, R) for many prompts, chunk rows at a time (a KV cache per chunk)."""
    return torch.cat([rollout(gpt, rows, response_len)[0] for rows in prompts.split(chunk)])


@torch.no_grad()
def judge_scores(judge, seq, end, P, chunk=256):
    """The judge's score of each prompt + response, read at the response's last token (B,)."""
    scores = [judge(seq[i:i + chunk]) for i in range(0, len(seq), chunk)]
    return torch.cat(scores).gather(1, (P + end)[:, None]).squeeze(1)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x, mask):
    """(x - mean) / std over the masked entries (biased variance, as OAI's TF code), 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked prefix
    (B, R): the value after a row's last token is 0 (the episode ends).
    -> advantages, returns = advantages + values; 0 where masked."""
    rewards, values = rewards * mask, values * mask
    advantages, next_value, next_adv = torch.zeros_like(rewards), 0.0, 0.0
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def adapt_kl(beta, kl, target, n, horizon):
    """Ziegler et al.'s adaptive KL coefficient, after a batch of n episodes with mean sequence
    KL kl: beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)."""
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip,
               clip_value):
    """PPO's clipped surrogate and clipped value loss, as masked means over the response tokens
    (all (B, R)). -> policy loss, value loss, ratio (B, R), clip fraction."""
    ratio = (logprobs - old_logprobs).exp()
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return masked_mean(policy_loss, mask), masked_mean(value_loss, mask), ratio, clipfrac


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """DPO: -log sigmoid(beta * (log-ratio to the reference of the chosen - that of the
    rejected)), mean over the pairs; the inputs are summed response log-probabilities (B,).
    -> loss, and the implicit reward margins (B,)."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 = perfect, 0 = no
    better than a constant."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # noqa: E731
    return float(1 - var(returns - values) / var(returns).clamp_min(1e-8))


def best_of(score, value, n):
    """score, value (S, N): S samples for each of N prompts. The samples split into S // n
    disjoint groups of n; in each group, the value of the sample with the highest score
    -> (S // n, N)."""
    groups = lambda x: x[:len(x) // n * n].view(-1, n, x.size(1))  # noqa: E731 (S // n, n, N)
    return groups(value).gather(1, groups(score).argmax(1, keepdim=True)).squeeze(1)


# ---- the judge ----

def pair_margins(judge, task, pairs, idx):
    """The judge's score(a) - score(b) for the pairs idx."""
    P = pairs['prompts'].size(1)
    a, b = (torch.cat([pairs['prompts'][idx], pairs[k][idx]], 1) for k in 'ab')
    end = torch.cat([task.line_end(pairs[k][idx])[0] for k in 'ab'])
    s = judge(torch.cat([a, b])).gather(1, (P + end)[:, None]).squeeze(1)
    return s[:len(idx)] - s[len(idx):]


@torch.no_grad()
def judge_accuracy(judge, task, pairs):
    """How often the judge prefers the labelled winner; the best that any judge can do against
    sampled labels (Bayes); how often it orders the pairs that gold does not tie as gold does."""
    m = torch.cat([pair_margins(judge, task, pairs, idx)
                   for idx in torch.arange(len(pairs['label'])).split(256)])
    decided = pairs['gold_a'] != pairs['gold_b']
    gold_order = ((m > 0) == (pairs['gold_a'] > pairs['gold_b']))[decided]
    return dict(accuracy=((m > 0).float() == pairs['label']).float().mean().item(),
                bayes=torch.max(pairs['prob'], 1 - pairs['prob']).mean().item(),
                gold_order=gold_order.float().mean().item())


def train_judge(task, gpt, s):
    """Sample and label the pairs, train the judge on them, report held-out accuracy, normalise
    its scores, and save it (out_dir/judge.pt), then the pairs (out_dir/pairs.pt, for DPO): both at
    the end, so that a run stopped before leaves out_dir as it was."""
    t0, seed, n_pairs, n_val_pairs = time.time(), s['seed'], s['n_pairs'], s['n_val_pairs']
    pairs = task.sample_pairs(gpt, 'train', n_pairs, torch.Generator().manual_seed(seed))
    val = task.sample_pairs(gpt, 'val', n_val_pairs, torch.Generator().manual_seed(seed + 1))
    g = torch.cat([pairs['gold_a'], pairs['gold_b']])
    ties = (pairs['gold_a'] == pairs['gold_b']).float().mean()
    print(f"sampled {n_pairs} + {n_val_pairs} pairs in {time.time() - t0:.0f}s; pretrained gold "
          f"{g.mean():+.3f} (sd {g.std():.3f}); {ties:.0%} of pairs tie on gold")
    judge = HeadedGPT(copy.deepcopy(gpt).requires_grad_(True)).to(gpt.wte.weight.device)
    held_out = fit_judge(judge, task, pairs, val, s['judge_epochs'], s['judge_lr'],
                         s['batch_size'], s['max_grad_norm'])
    normalise_judge(judge, task, pairs)
    path = os.path.join(s['out_dir'], 'judge.pt')
    state = dict(model=judge.state_dict(), model_config=asdict(gpt.config),
                 train=judge_accuracy(judge, task, pairs), val=held_out,
                 tokenizer=tokenizer_digest(s['init_dir']))
    save(state, path)
    save(dict(train=pairs, val=val), os.path.join(s['out_dir'], 'pairs.pt'))
    print(f"wrote {path} and pairs.pt in {time.time() - t0:.0f}s; "
          f"train accuracy {state['train']['accuracy']:.3f}")


def fit_judge(judge, task, pairs, val, epochs, lr, batch_size, max_grad_norm):
    """The Bradley-Terry loss on the labelled pairs: epochs passes of batch_size pairs, AdamW at lr
    annealed linearly to 0. -> the held-out accuracies on val after the last epoch."""
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0)
    n = len(pairs['label'])
    steps, step = epochs * math.ceil(n / batch_size), 0
    for epoch in range(epochs):
        losses = []
        for idx in torch.randperm(n).split(batch_size):
            for group in optimizer.param_groups:
                group['lr'] = lr * (1 - step / steps)
            sign = 2 * pairs['label'][idx] - 1                   # +1: a preferred
            loss = -F.logsigmoid(sign * pair_margins(judge, task, pairs, idx)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(judge.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        held_out = judge_accuracy(judge, task, val)
        print(f"judge epoch {epoch + 1}: loss {np.mean(losses):.4f}, held-out accuracy "
              f"{held_out['accuracy']:.3f} (Bayes {held_out['bayes']:.3f}; agrees with gold's "
              f"order on {held_out['gold_order']:.3f} of untied pairs)")
    return held_out


def normalise_judge(judge, task, pairs):
    """Fold into the head the normalisation of the judge's scores to mean 0 and std 1 on the
    pretrained model's samples (both responses of every pair)."""
    responses = torch.cat([pairs['a'], pairs['b']])
    seq = torch.cat([pairs['prompts'].repeat(2, 1), responses], 1)
    raw = judge_scores(judge, seq, task.line_end(responses)[0], pairs['prompts'].size(1))
    with torch.no_grad():  # score' = (score - mean) / std, as the head's own weights
        judge.head.weight /= raw.std()
        judge.head.bias.sub_(raw.mean()).div_(raw.std())


def load_from_judge_mode(out_dir, name, what):
    """out_dir/name, which --mode=judge writes -> (its path, its contents)."""
    path = os.path.join(out_dir, name)
    check([(os.path.exists(path),
            f"no {what} at {path}: run python rlhf.py ... --mode=judge first (same out_dir)")])
    return path, load_torch(path, f'the {what} from rlhf.py --mode=judge')


def tokenizer_digest(init_dir):
    """The SHA-1 of init_dir/tokenizer.json: a judge scores token ids, so it fits only the
    pretrained models of that tokenizer."""
    return hashlib.sha1(open(os.path.join(init_dir, 'tokenizer.json'), 'rb').read()).hexdigest()


def load_judge(out_dir, init_dir, dev):
    """The judge that --mode=judge wrote to out_dir, frozen; one made with another tokenizer than
    init_dir's is refused."""
    path, saved = load_from_judge_mode(out_dir, 'judge.pt', 'judge')
    try:
        judge = HeadedGPT(GPT(ModelConfig(**saved['model_config'])))
        judge.load_state_dict(saved['model'])
    except Exception as e:
        fail(f"cannot load {path} ({type(e).__name__}); is it a judge from rlhf.py --mode=judge?")
    digest = tokenizer_digest(init_dir)
    check([(saved.get('tokenizer', digest) == digest,
            f"{path} was trained on another tokenizer than {init_dir}/tokenizer.json; run "
            "--mode=judge again with this --init_dir (or another --out_dir)")])
    return judge.eval().requires_grad_(False).to(dev)


def load_pairs(out_dir, dev, config):
    """The training pairs that --mode=judge wrote to out_dir; a file of another kind (a judge, a
    checkpoint), or pairs that the model (config) cannot read, is refused in one line."""
    path, saved = load_from_judge_mode(out_dir, 'pairs.pt', 'pairs')
    pairs = saved.get('train') if isinstance(saved, dict) else None
    tokens = ('prompts', 'a', 'b')
    shaped = (isinstance(pairs, dict)
              and all(isinstance(pairs.get(k), torch.Tensor) for k in (*tokens, 'label'))
              and all(pairs[k].dim() == 2 and not pairs[k].is_floating_point() for k in tokens)
              and pairs['a'].shape == pairs['b'].shape
              and len(pairs['prompts']) == len(pairs['a']) == len(pairs['label']) > 0)
    check([(shaped, f"{path} holds no preference pairs (a dict whose 'train' has prompts, a, b "
            "and label); is it the pairs.pt of rlhf.py --mode=judge? Run --mode=judge again")])
    P, R = pairs['prompts'].size(1), pairs['a'].size(1)
    ids = torch.cat([pairs[k].flatten() for k in tokens])
    lo, hi = ids.min().item(), ids.max().item()
    check([(P + R <= config.block_size and 0 <= lo and hi < config.vocab_size,
            f"{path} holds pairs of {P} + {R} tokens with ids {lo}..{hi}, which the "
            f"model (block_size {config.block_size}, vocab_size {config.vocab_size}) cannot "
            "read; run --mode=judge again with this --init_dir")])
    return {k: pairs[k].to(dev) for k in (*tokens, 'label')}


# ---- PPO ----

@torch.no_grad()
def experience(policy, critic, ref, judge, task, prompts, *, beta, gamma, lam,
               missing_eos_penalty):
    """One PPO batch: sample responses from the policy, score them with the judge (minus
    missing_eos_penalty without a line break), put the score on the last token on top of the
    per-token KL penalty (beta), and run GAE (gamma, lam). Old log-probabilities come from a full
    forward of the policy (what training recomputes); the rollout's own (KV-cache)
    log-probabilities are kept to measure the difference. The critic's value of the state before
    response token t is its output at the token before it."""
    P = prompts.size(1)
    responses, rollout_lp = rollout(policy, prompts, task.response_len)
    end, has_eos, mask = task.line_end(responses)
    seq = torch.cat([prompts, responses], 1)                     # (B, T)
    old_lp, ref_lp = response_logprobs(policy, seq, P)[0], response_logprobs(ref, seq, P)[0]
    old_values = critic(seq)[:, P - 1:-1]                        # (B, R)
    score = judge_scores(judge, seq, end, P)                     # (B,)
    kl = (old_lp - ref_lp) * mask                                # (B, R) log pi - log pi_ref
    rewards = -beta * kl
    last = torch.arange(len(seq), device=seq.device), end
    rewards[last] += score - missing_eos_penalty * (~has_eos).float()
    advantages, returns = gae(rewards, old_values, mask, gamma, lam)
    return dict(seq=seq, responses=responses, end=end, has_eos=has_eos, mask=mask.float(),
                rollout_lp=rollout_lp, old_lp=old_lp, old_values=old_values, score=score,
                kl=kl.sum(1), advantages=whiten(advantages, mask.float()), returns=returns)


def first_minibatch_checks(policy, logprobs, ratio, mb):
    """Before any step, on the first minibatch: how far its ratio is from 1, how far its
    log-probabilities are from the rollout's, and each MoE layer's expert load / even share."""
    loads = policy.router_stats()  # [{'load': (E,)}] per MoE layer, once watch_routing() ran
    mask = mb['mask']
    return dict(ratio_first_max=((ratio - 1).abs() * mask).max().item(),
                logprob_mismatch=((logprobs - mb['rollout_lp']).abs() * mask).max().item(),
                **({'expert_load': [(layer['load'] * len(layer['load'])).tolist()
                                    for layer in loads]} if loads else {}))


def ppo_update(policy, critic, optimizer, batch, s):
    """s['ppo_epochs'] passes of s['minibatches'] minibatches over one experience() batch. The
    first minibatch is checked before any step: its ratio must be 1, and its log-probabilities
    those of the rollout. -> statistics."""
    B, P = batch['responses'].shape[0], batch['seq'].size(1) - batch['responses'].size(1)
    keys = ('policy_loss', 'value_loss', 'clipfrac', 'approxkl', 'entropy', 'grad_norm')
    stats, first, skipped = {k: [] for k in keys}, {}, 0
    for epoch in range(s['ppo_epochs']):
        for idx in torch.randperm(B, device=batch['seq'].device).chunk(s['minibatches']):
            mb = {k: v[idx] for k, v in batch.items()}
            logprobs, entropy = response_logprobs(policy, mb['seq'], P)
            values = critic(mb['seq'])[:, P - 1:-1]
            mask = mb['mask']
            policy_loss, value_loss, ratio, clipfrac = ppo_losses(
                logprobs, mb['old_lp'], mb['advantages'], values, mb['old_values'],
                mb['returns'], mask, s['clip_range'], s['clip_range_value'])
            if not first:
                first = first_minibatch_checks(policy, logprobs, ratio, mb)
            if not masked_mean(ratio, mask) < s['ratio_threshold']:  # also catches NaN
                skipped += 1
                continue
            loss = policy_loss + value_loss - s['ent_coef'] * masked_mean(entropy, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), s['max_grad_norm'])
            torch.nn.utils.clip_grad_norm_(critic.parameters(), s['max_grad_norm'])
            optimizer.step()
            log_ratio = (logprobs - mb['old_lp']).detach()
            approxkl = masked_mean(log_ratio.exp() - 1 - log_ratio, mask)  # the k3 estimator
            for key, value in (('policy_loss', policy_loss), ('value_loss', value_loss),
                               ('clipfrac', clipfrac), ('approxkl', approxkl),
                               ('entropy', masked_mean(entropy.detach(), mask)),
                               ('grad_norm', grad_norm)):
                stats[key].append(float(value.detach()))
    means = {k: float(np.mean(v)) if v else float('nan') for k, v in stats.items()}
    return {**means, **first, 'skipped': skipped}


# ---- runs: PPO, DPO and best-of-n, evaluated on the same held-out prompts ----

class Run:
    """One ppo, dpo or bon run, in out_dir/<run>: metrics.jsonl (a JSON record a line) and, after
    each evaluation, the evaluated policy as a train.py-style ckpt.pt (sample.py
    --out_dir=<folder> reads it) and the curves so far, <mode>.png: a run stopped early keeps
    both. The folder (with the pretrained model's tokenizer.json) is written at the first record:
    a run stopped before leaves none, and a folder of an earlier run as it was. The held-out
    prompts are the same for every run; ref (the pretrained model) and the judge are frozen. s:
    the settings, saved in the checkpoint with data_dir."""

    def __init__(self, task, ref, judge, data_dir, s):
        self.task, self.ref, self.judge, self.mode = task, ref, judge, s['mode']
        self.config = {**s, 'data_dir': data_dir}
        self.eval_set = task.prompts('val', s['eval_prompts'], torch.Generator().manual_seed(0))
        self.folder = os.path.join(s['out_dir'], s['run'] or f"{s['mode']}_s{s['seed']}")
        self.metrics = os.path.join(self.folder, 'metrics.jsonl')
        self.tokenizer = os.path.join(s['init_dir'], 'tokenizer.json')
        self.records, self.saved_step = [], None

    def log(self, record):
        """Add record to metrics.jsonl, rewritten whole (a stop never leaves a line cut off)."""
        if not self.records:
            write_file(os.path.join(self.folder, 'tokenizer.json'),
                       lambda tmp: shutil.copyfile(self.tokenizer, tmp))
        self.records.append(record)
        text = ''.join(json.dumps(r) + '\n' for r in self.records)
        write_file(self.metrics, lambda tmp: Path(tmp).write_text(text))

    def leaves(self):
        """What a stop leaves of this run, for the line it ends with (stop_on_signals)."""
        if self.saved_step is None:
            return written()
        return (f"; {self.folder} keeps the policy of step {self.saved_step} (ckpt.pt) and the "
                "records so far (metrics.jsonl)")

    @torch.no_grad()
    def evaluate(self, policy, step, show=0):
        """One sample per held-out prompt: gold, judge, sequence KL to the pretrained model, line
        ends, length; show samples printed; then the checkpoint and the plot."""
        task, prompts, P = self.task, self.eval_set, self.eval_set.size(1)
        responses = sample_responses(policy, prompts, task.response_len)
        end, has_eos, mask = task.line_end(responses)
        seq = torch.cat([prompts, responses], 1)
        kl = torch.cat([((response_logprobs(policy, rows, P)[0]
                          - response_logprobs(self.ref, rows, P)[0]) * m).sum(1)
                        for rows, m in zip(seq.split(128), mask.split(128))])
        sentiment, fluency = task.gold(responses, end, has_eos)
        g, score = sentiment + fluency, judge_scores(self.judge, seq, end, P)
        r = dict(eval=True, mode=self.mode, step=step, kl=kl.mean().item(), gold=g.mean().item(),
                 gold_sd=g.std().item(), sentiment=sentiment.mean().item(),
                 fluency=fluency.mean().item(), judge=score.mean().item(),
                 eos_rate=has_eos.float().mean().item(), length=(end + 1).float().mean().item())
        print(f"eval {step}: gold {r['gold']:+.3f} (sd {r['gold_sd']:.3f}; sentiment "
              f"{r['sentiment']:+.3f}, fluency {r['fluency']:+.3f}), judge {r['judge']:+.3f}, "
              f"KL {r['kl']:.3f} nats, eos {r['eos_rate']:.1%}, length {r['length']:.1f}")
        for i in range(show):
            prompt = task.enc.decode(prompts[i, -8:].tolist())
            response = task.enc.decode(responses[i, :end[i] + 1].tolist())
            print(f"   ...{prompt!r} -> {response!r} gold {g[i]:+.0f} judge {score[i]:+.2f} "
                  f"KL {kl[i]:.2f}")
        self.log(r)
        state = dict(model=policy.state_dict(), model_config=asdict(policy.config),
                     iter_num=step, config=self.config)
        save(state, os.path.join(self.folder, 'ckpt.pt'))
        self.saved_step = step
        plot_policy_run(self.records, os.path.join(self.folder, f'{self.mode}.png'), self.mode)


def rl_optimizer(models, lr):
    """AdamW for RL fine-tuning: no weight decay (the KL to the reference is the regulariser),
    eps 1e-5."""
    return torch.optim.AdamW([p for m in models for p in m.parameters()], lr=lr,
                             betas=(0.9, 0.95), eps=1e-5, weight_decay=0)


def annealed_steps(job, policy, optimizer, lr, updates, eval_interval):
    """Steps 0 .. updates-1 of PPO or DPO, each after setting the LR, annealed linearly from lr to
    0; the policy is evaluated every eval_interval steps and after the last (showing 3 samples
    then)."""
    for step in range(updates + 1):
        if step % eval_interval == 0 or step == updates:
            job.evaluate(policy, step, show=3 if step == updates else 0)
        if step == updates:
            return
        for group in optimizer.param_groups:
            group['lr'] = lr * (1 - step / updates)
        yield step


def train_ppo(task, job, policy, critic, s):
    """s['updates'] PPO iterations: experience, ppo_update, adaptive beta, one log line each;
    evaluations between."""
    optimizer, beta = rl_optimizer([policy, critic], s['learning_rate']), s['kl_coef']
    policy.watch_routing()
    for update in annealed_steps(job, policy, optimizer, s['learning_rate'], s['updates'],
                                 s['eval_interval']):
        t0 = time.time()
        prompts = task.prompts('train', s['batch_size'])
        batch = experience(policy, critic, job.ref, job.judge, task, prompts, beta=beta,
                           gamma=s['gamma'], lam=s['lam'],
                           missing_eos_penalty=s['missing_eos_penalty'])
        t1 = time.time()
        stats = ppo_update(policy, critic, optimizer, batch, s)
        t2 = time.time()
        r = dict(update=update + 1, **batch_record(task, batch, beta), t_rollout=t1 - t0,
                 t_train=t2 - t1, lr=optimizer.param_groups[0]['lr'], **stats)
        if 'expert_load' in r:
            r['load_max_mean'] = [max(layer) for layer in r['expert_load']]
        print(update_line(r))
        job.log(r)
        if s['kl_target'] > 0:
            beta = adapt_kl(beta, r['kl'], s['kl_target'], s['batch_size'], s['kl_horizon'])


def batch_record(task, batch, beta):
    """What one experience() batch scored: judge, KL, gold, the KL-penalised reward, the critic's
    explained variance, line lengths and ends."""
    score, end, has_eos = batch['score'], batch['end'], batch['has_eos']
    return dict(score=score.mean().item(), kl=batch['kl'].mean().item(), beta=beta,
                gold=task.gold(batch['responses'], end, has_eos).sum(0).mean().item(),
                rlhf_reward=(score - beta * batch['kl']).mean().item(),
                explained_variance=explained_variance(batch['old_values'], batch['returns'],
                                                      batch['mask']),
                length=(end + 1).float().mean().item(), eos_rate=has_eos.float().mean().item())


def update_line(r):
    """One PPO iteration's record r as the line train_ppo prints."""
    skipped = f", {r['skipped']} minibatches skipped" if r['skipped'] else ''
    return (f"update {r['update']}: judge {r['score']:+.3f}, gold {r['gold']:+.3f}, "
            f"KL {r['kl']:.3f}, beta {r['beta']:.4f}, entropy {r['entropy']:.3f}, clipfrac "
            f"{r['clipfrac']:.3f}, approxkl {r['approxkl']:.4f}, value loss "
            f"{r['value_loss']:.4f}, expl.var {r['explained_variance']:.2f}, length "
            f"{r['length']:.1f}, eos {r['eos_rate']:.0%}, ratio-1 {r['ratio_first_max']:.1e}, "
            f"rollout/train logprob gap {r['logprob_mismatch']:.1e}, load max/mean "
            f"{max(r.get('load_max_mean', [1])):.2f}, {r['t_rollout']:.1f}s + "
            f"{r['t_train']:.1f}s{skipped}")


def train_dpo(task, job, policy, pairs, s):
    """s['updates'] DPO steps of s['batch_size'] pairs (the label picks chosen and rejected), the
    reference log-probabilities computed once up front."""
    updates, batch_size = s['updates'], s['batch_size']
    optimizer = rl_optimizer([policy], s['learning_rate'])
    P, n = pairs['prompts'].size(1), len(pairs['label'])
    chosen = torch.where(pairs['label'][:, None] == 1, pairs['a'], pairs['b'])
    rejected = torch.where(pairs['label'][:, None] == 1, pairs['b'], pairs['a'])
    seq = torch.cat([torch.cat([pairs['prompts'], chosen], 1),
                     torch.cat([pairs['prompts'], rejected], 1)])  # (2n, T)
    mask = torch.cat([task.line_end(chosen)[2], task.line_end(rejected)[2]]).float()
    with torch.no_grad():
        ref_lp = torch.cat([(response_logprobs(job.ref, rows, P)[0] * m).sum(1)
                            for rows, m in zip(seq.split(256), mask.split(256))])
    order = torch.cat([torch.randperm(n) for _ in range(math.ceil(updates * batch_size / n))])
    for step in annealed_steps(job, policy, optimizer, s['learning_rate'], updates,
                               s['eval_interval']):
        idx = order[step * batch_size:(step + 1) * batch_size].to(seq.device)
        rows = torch.cat([idx, idx + n])                         # chosen, then rejected
        lp = (response_logprobs(policy, seq[rows], P)[0] * mask[rows]).sum(1)
        loss, margin = dpo_loss(lp[:len(idx)], lp[len(idx):], ref_lp[idx], ref_lp[idx + n],
                                s['dpo_beta'])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), s['max_grad_norm'])
        optimizer.step()
        r = dict(step=step + 1, loss=loss.item(),
                 reward_accuracy=(margin > 0).float().mean().item(), margin=margin.mean().item(),
                 grad_norm=grad_norm.item())
        print(f"step {step + 1}: DPO loss {r['loss']:.4f}, implicit reward accuracy "
              f"{r['reward_accuracy']:.2f}, margin {r['margin']:+.3f}")
        job.log(r)


@torch.no_grad()
def best_of_n(task, job, bon_n):
    """bon_n pretrained samples per held-out prompt; for n = 1, 2, 4, ...: the gold of the judge's
    favourite among n, at the analytic KL bound log n - (n-1)/n (Beirami et al. 2024: the true
    KL is at most this), averaged over the bon_n // n disjoint groups of n. n = 1 is the
    pretrained model's gold over all bon_n samples: the baseline."""
    N, prompts = len(job.eval_set), job.eval_set.repeat(bon_n, 1)
    responses = sample_responses(job.ref, prompts, task.response_len)
    end, has_eos, _ = task.line_end(responses)
    seq = torch.cat([prompts, responses], 1)
    score = judge_scores(job.judge, seq, end, prompts.size(1)).view(bon_n, N)
    g = task.gold(responses, end, has_eos).sum(0).view(bon_n, N)
    n = 1
    while n <= bon_n:
        picked = best_of(score, g, n)
        r = dict(eval=True, mode='bon', n=n, kl=math.log(n) - (n - 1) / n,
                 gold=picked.mean().item(), gold_sd=picked.std().item(),
                 judge=best_of(score, score, n).mean().item(),
                 gold_oracle=best_of(g, g, n).mean().item())
        print(f"best of {n}: gold {r['gold']:+.3f} (sd {r['gold_sd']:.3f}), judge "
              f"{r['judge']:+.3f}, KL <= {r['kl']:.3f}; picked by gold itself: "
              f"{r['gold_oracle']:+.3f}")
        job.log(r)
        n *= 2


# ---- plots ----

def plot_policy_run(records, path, mode):
    """The per-update curves of a PPO or DPO run (mode), and its evaluations."""
    plt = pyplot()
    steps = [r for r in records if not r.get('eval')]
    evals = [r for r in records if r.get('eval')]
    x = 'update' if mode == 'ppo' else 'step'
    keys = (['score', 'gold', 'kl', 'beta', 'entropy', 'clipfrac', 'approxkl', 'value_loss',
             'explained_variance', 'length', 'eos_rate', 't_rollout', 't_train',
             'logprob_mismatch', 'load_max_mean'] if mode == 'ppo'
            else ['loss', 'reward_accuracy', 'margin', 'grad_norm'])
    rows = math.ceil((len(keys) + 1) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 2.6 * rows))
    axes = axes.ravel()
    for ax, key in zip(axes, [k for k in keys if steps and k in steps[0]]):
        ax.plot([r[x] for r in steps], [r[key] for r in steps], lw=0.8)
        ax.set_title(key, fontsize=9)
    ax = axes[len(keys)]
    for key in ('gold', 'judge', 'kl'):
        ax.plot([r['step'] for r in evals], [r[key] for r in evals], 'o-', ms=3, label=key)
    ax.set_title('held-out evaluation', fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes[len(keys) + 1:]:
        ax.axis('off')
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=80, format='png'), optional=True)
    plt.close(fig)


EVAL_KEYS = {'mode', 'kl', 'gold', 'judge'}  # what frontier() reads of an evaluation record


def whole_record(record):
    """Whether a metrics record holds what frontier() reads: an evaluation needs EVAL_KEYS."""
    return not record.get('eval') or EVAL_KEYS <= set(record)


def frontier(out_dir):
    """Gold and judge score against KL for every run in out_dir (PPO and DPO along their
    evaluations, best-of-n): the top row up to 4.5 nats, where the methods compete; the bottom
    row everything (KL on a log scale past 4)."""
    plt = pyplot()
    runs = {}
    for path in sorted(glob.glob(os.path.join(out_dir, '*', 'metrics.jsonl'))):
        evals = [r for r in read_metrics(path, whole_record) if r.get('eval')]
        if evals:
            runs[os.path.basename(os.path.dirname(path))] = evals
    if not runs:
        fail(f"no evaluated runs in {out_dir}/*/metrics.jsonl; run --mode=ppo, dpo or bon first")
    base = next((r for evals in runs.values() for r in evals
                 if r['mode'] == 'bon' and r.get('n') == 1), None)
    styles = {'ppo': '-o', 'dpo': '-s', 'bon': 'k--^'}
    titles = {'gold': 'gold score (what we want)', 'judge': 'judge score (what PPO optimises)'}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for row, zoom in enumerate((4.5, None)):
        for ax, key in zip(axes[row], ('gold', 'judge')):
            for name, evals in runs.items():
                points = [(r['kl'], r[key]) for r in evals if zoom is None or r['kl'] <= zoom]
                ax.plot(*zip(*points), styles[evals[0]['mode']], ms=4, lw=1,
                        label=name + (' (at the KL bound)' if evals[0]['mode'] == 'bon' else ''))
            if key == 'gold' and base:
                ax.axhline(base['gold'] + base['gold_sd'], color='grey', lw=0.8, ls=':',
                           label='pretrained + 1 sd')
            if zoom is None:
                ax.set_xscale('symlog', linthresh=4)
            ax.set(xlabel='KL to the pretrained model (nats per response)', ylabel=key,
                   title=titles[key])
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, 'gold_vs_kl.png')
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=90, format='png'))
    print(f"wrote {path} ({len(runs)} runs)")


# ---- files: each written whole (failsafe.write_atomic), into a folder made just before ----

MADE = []     # the folders this process made, in order: a run that stops removes those left empty
WRITTEN = []  # the files it wrote, each once


def written():
    """What a stop leaves, for the line it ends with (stop_on_signals); a Run says it per step."""
    if not WRITTEN:
        return f"; nothing was written to {out_dir}"
    return f"; what it wrote is whole: {', '.join(WRITTEN)}"


def make_folder(folder):
    """folder, with its missing parents, each noted in MADE; one line when it cannot be made."""
    folder = os.path.abspath(folder)
    if os.path.isdir(folder):
        return
    make_folder(os.path.dirname(folder))
    try:
        os.mkdir(folder)
    except OSError as e:
        fail(f"cannot make the folder {folder} ({e.strerror}); check --out_dir")
    MADE.append(folder)


def remove_unused_folders():
    """Remove the folders this process made and left empty: it stopped before writing into them."""
    for folder in reversed(MADE):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def write_file(path, write, optional=False):
    """write(tmp) through failsafe.write_atomic, into path's folder, made now if missing."""
    make_folder(os.path.dirname(path))
    done = write_atomic(path, write, optional=optional)
    if done and path not in WRITTEN:
        WRITTEN.append(path)
    return done


def save(obj, path):
    """torch.save of obj to path, through write_file."""
    write_file(path, lambda tmp: torch.save(obj, tmp))


# ---- main ----

def check_settings(s):
    """Impossible settings s end the run before any work, with one line."""
    sizes = ('prompt_len', 'response_len', 'batch_size', 'ppo_epochs', 'minibatches',
             'eval_interval', 'eval_prompts', 'bon_n', 'n_pairs', 'n_val_pairs', 'judge_epochs')
    check([
        (s['mode'] in ('judge', 'ppo', 'dpo', 'bon', 'frontier'),
         f"mode must be judge, ppo, dpo, bon or frontier, not {s['mode']!r}"),
        (min(s[k] for k in sizes) >= 1, "sizes, counts and intervals must be >= 1"),
        (s['updates'] >= 0 and s['learning_rate'] >= 0 and s['judge_lr'] > 0,
         "need updates >= 0, learning_rate >= 0, judge_lr > 0"),
        (s['batch_size'] % s['minibatches'] == 0,
         f"minibatches={s['minibatches']} must divide batch_size={s['batch_size']}"),
        (min(s[k] for k in ('kl_coef', 'kl_target', 'ent_coef', 'missing_eos_penalty')) >= 0
         and s['kl_horizon'] > 0,
         "kl_coef, kl_target, ent_coef, missing_eos_penalty must be >= 0 and kl_horizon > 0"),
        (s['clip_range'] > 0 and s['clip_range_value'] > 0 and s['ratio_threshold'] > 1
         and s['max_grad_norm'] > 0,
         "need clip_range, clip_range_value, max_grad_norm > 0 and ratio_threshold > 1"),
        (0 <= s['gamma'] <= 1 and 0 <= s['lam'] <= 1 and s['label_temperature'] > 0
         and s['dpo_beta'] > 0,
         "need gamma and lam in [0, 1], label_temperature > 0, dpo_beta > 0"),
        (s['device'] in ('auto', 'cpu') or s['device'].startswith('cuda'),
         "device must be auto, cpu or cuda[:N]"),
    ])


def main():
    """The one reader of the settings (this module's globals): checks them, loads the pretrained
    model, the task and what --mode=judge wrote, and runs the mode."""
    s = settings_of(globals())
    check_settings(s)
    if mode == 'frontier':
        return frontier(out_dir)
    dev, _ = resolve_device(device)
    torch.manual_seed(seed)
    ckpt, cfg, gpt = load_checkpoint(os.path.join(init_dir, 'ckpt.pt'))
    gpt.eval().requires_grad_(False).to(dev)
    check([(prompt_len + response_len <= cfg.block_size,
            f"prompt_len + response_len = {prompt_len + response_len} exceeds the model's "
            f"block_size {cfg.block_size}")])
    data_dir = trained_data_dir(ckpt)
    task = load_task(init_dir, data_dir, cfg.vocab_size, dev, prompt_len, response_len,
                     label_temperature)
    if mode == 'judge':
        return train_judge(task, gpt, s)
    judge = load_judge(out_dir, init_dir, dev)
    pairs = load_pairs(out_dir, dev, cfg) if mode == 'dpo' else None
    job = Run(task, gpt, judge, data_dir, s)
    stop_on_signals(job.leaves)
    if mode == 'bon':
        return best_of_n(task, job, bon_n)
    policy = copy.deepcopy(gpt).requires_grad_(True)
    if mode == 'dpo':
        train_dpo(task, job, policy, pairs, s)
    else:
        # the critic starts as a copy of the judge (Huang et al. 2024): its values mean something
        # from the start
        train_ppo(task, job, policy, copy.deepcopy(judge).requires_grad_(True), s)
    print(f"wrote {job.folder}/ckpt.pt, metrics.jsonl and {mode}.png")


if __name__ == '__main__':
    stop_on_signals(written)  # from here on the line names out_dir
    configure_or_exit(globals())
    try:
        main()
    finally:
        remove_unused_folders()
