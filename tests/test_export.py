"""
The export to Hugging Face transformers against the real thing: tiny SwiGLU models (random fp32
weights, softmax and Sinkhorn routers) written by `sample.py --export=hf:FOLDER` and loaded by
AutoModelForCausalLM and AutoTokenizer with no Ava code give Ava's logits to 1e-5 (a left-padded
batch too), the same greedy tokens and the same token ids. Also export.py's safetensors writer and
the reader here, against the safetensors package where it is installed, and the one-line errors.
    python -m pytest -q tests/test_export.py
transformers is a test-only extra (.ci/run installs it); without it those tests skip.
"""

import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data.prepare import train_tokenizer
from decode import generate
from export import SAFETENSORS_DTYPES, save_safetensors
from model import GPT, ModelConfig
from tokenizer import load_run_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec('transformers') is None,
    reason="transformers is not installed: it is a test-only extra, "
           "pip install transformers==5.25.0 (as .ci/run does)")
TEXT = "ROMEO: What's  this?\n\nJULIET. ünïcödé 123, 4.5 \t end-of-line\n  spaces  "


def run_sample(*args):
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope='module')
def tokenizer_file(tmp_path_factory):
    """A 400-token byte-level BPE trained the way data/prepare.py trains it."""
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 7)))
             for _ in range(200)]
    docs = [' '.join(rng.choice(words) for _ in range(300)) + '.\n' for _ in range(20)]
    path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.json'
    train_tokenizer(docs + [TEXT], 400).save(str(path))
    return path


def save_run(folder, tokenizer_file, seed=0, **overrides):
    """A run folder as train.py leaves it (ckpt.pt: weights, model_config, ...; tokenizer.json)
    holding a tiny model with random weights, norms and router included. -> the model."""
    vocab_size = load_run_tokenizer(os.path.dirname(tokenizer_file)).n_vocab
    config = dict(vocab_size=vocab_size, block_size=64, n_layer=3, n_head=4, n_embd=64,
                  n_experts=4, top_k=2, ffn_hidden=48, expert_act='swiglu')
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**config, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif 'router' in name:  # routing far from uniform: no near-ties between experts
                p.normal_(0, 0.5)
        for router in model.routers():
            if hasattr(router, 'bias'):  # only balances Sinkhorn's training: not used at inference
                router.bias.normal_(0, 1)
    os.makedirs(folder, exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_config=asdict(model.config), iter_num=0,
                    best_val_loss=float('inf'), config={}), os.path.join(folder, 'ckpt.pt'))
    shutil.copyfile(tokenizer_file, os.path.join(folder, 'tokenizer.json'))
    return model.eval()


ROUTERS = {'softmax': dict(router='softmax'),
           'sinkhorn': dict(router='sinkhorn', sinkhorn_bias_rate=0.01, n_future_tokens=2)}


@pytest.fixture(scope='module', params=list(ROUTERS))
def exported(request, tokenizer_file, tmp_path_factory):
    """(Ava's model, the folder sample.py exported it to, the export's stdout), per router; the
    Sinkhorn model also has a moving router bias and an MTP head."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = save_run(tmp / 'run', tokenizer_file, **ROUTERS[request.param])
    (tmp / 'hf').mkdir()  # an empty folder is a fine target
    result = run_sample(f'--out_dir={tmp / "run"}', f'--export=hf:{tmp / "hf"}')
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp)) == ['hf', 'run']  # the temporary folder is gone
    return model, tmp / 'hf', result.stdout


def load_safetensors(path):
    """A .safetensors file -> ({name: tensor on the CPU}, metadata dict), read by the format's
    definition (save_safetensors' docstring). A malformed file raises ValueError."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], 'little')
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if len(data) < 8 + n or not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
    metadata, body, tensors = header.pop('__metadata__', {}), memoryview(data)[8 + n:], {}
    for name, spec in header.items():
        dtype = SAFETENSORS_DTYPES.get(spec.get('dtype'))
        begin, end = spec.get('data_offsets', (0, -1))
        size = math.prod(spec.get('shape', ())) * (dtype.itemsize if dtype else 0)
        if dtype is None or end - begin != size or not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: tensor {name!r} has a bad dtype, shape or offsets: {spec}")
        raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8) if size else None
        tensors[name] = (raw.view(dtype) if size else torch.empty(0, dtype=dtype)).view(
            spec['shape'])
    return tensors, metadata


def test_safetensors_round_trip_and_layout(tmp_path):
    tensors = {'f32': torch.randn(3, 5), 'bf16': torch.randn(4, 2).bfloat16(),
               'f16': torch.randn(7).half(), 'i64': torch.arange(-3, 9).view(3, 4),
               'u8': torch.arange(5, dtype=torch.uint8), 'bool': torch.tensor([True, False]),
               'empty': torch.zeros(0, 3), 'scalar': torch.tensor(2.5),
               'view': torch.randn(6, 4).t()}  # not contiguous
    path = tmp_path / 'w.safetensors'
    save_safetensors(tensors, path, metadata={'format': 'pt'})
    loaded, metadata = load_safetensors(path)
    assert metadata == {'format': 'pt'} and loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    data = path.read_bytes()
    n = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + n])
    assert (8 + n) % 8 == 0 and header['bf16'] == dict(dtype='BF16', shape=[4, 2],
                                                        data_offsets=[60, 76])
    assert len(data) == 8 + n + max(s['data_offsets'][1] for k, s in header.items()
                                    if k != '__metadata__')
    for broken in (data[:8 + n + 10], b'\x05\x00\x00\x00\x00\x00\x00\x00{"a":', b''):
        path.write_bytes(broken)
        with pytest.raises(ValueError):
            load_safetensors(path)


def test_safetensors_matches_the_package(tmp_path):
    st = pytest.importorskip('safetensors.torch', reason="the safetensors package is not "
                             "installed (transformers brings it)")
    tensors = {'a': torch.randn(3, 4), 'b': torch.randn(5).bfloat16(), 'c': torch.arange(6),
               'd': torch.randn(2, 2).half(), 'e': torch.zeros(0)}
    save_safetensors(tensors, tmp_path / 'ours.safetensors', metadata={'format': 'pt'})
    theirs = st.load_file(tmp_path / 'ours.safetensors')
    st.save_file(tensors, tmp_path / 'theirs.safetensors', metadata={'format': 'pt'})
    ours, metadata = load_safetensors(tmp_path / 'theirs.safetensors')
    assert metadata == {'format': 'pt'}
    for loaded in (theirs, ours):
        assert loaded.keys() == tensors.keys()
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_export_writes_a_mixtral_folder(exported):
    model, folder, stdout = exported
    assert sorted(os.listdir(folder)) == ['config.json', 'generation_config.json',
                                          'model.safetensors', 'tokenizer.json',
                                          'tokenizer_config.json']
    config = json.loads((folder / 'config.json').read_text())
    cfg = model.config
    assert config['architectures'] == ['MixtralForCausalLM'] and config['tie_word_embeddings']
    assert (config['num_local_experts'], config['num_experts_per_tok'], config['vocab_size'],
            config['intermediate_size'], config['max_position_embeddings']) == (
        cfg.n_experts, cfg.top_k, cfg.vocab_size, cfg.ffn_hidden, cfg.block_size)
    weights, _ = load_safetensors(folder / 'model.safetensors')
    assert not any('mtp' in name or 'lm_head' in name for name in weights)
    assert torch.equal(weights['model.layers.1.block_sparse_moe.experts.2.w3.weight'],
                       model.blocks[1].ffn.w_in[2, cfg.ffn_hidden:])
    assert ('multi-token-prediction heads are not exported' in stdout) == bool(model.mtp_heads)
    assert f'wrote {folder}' in stdout


def left_padded(vocab_size, pad, T, seed):
    """Random prompts (B, T) whose row b starts with pad[b] padding tokens (id 0), and the
    transformers attention_mask and position_ids that say so."""
    torch.manual_seed(seed)
    x = torch.randint(0, vocab_size, (len(pad), T))
    mask = (torch.arange(T) >= pad[:, None]).long()          # (B, T) 0 on the padding
    x = torch.where(mask.bool(), x, 0)
    return x, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@needs_transformers
@torch.no_grad()
def test_transformers_logits_equal_avas(exported):
    from transformers import AutoModelForCausalLM
    model, folder, _ = exported
    hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # every weight found a place, none left over
    assert type(hf).__name__ == 'MixtralForCausalLM' and hf.dtype == torch.float32
    hf.eval()
    for seed, T in ((0, 1), (1, 17), (2, 64)):  # 64 = block_size
        torch.manual_seed(seed)
        x = torch.randint(0, model.config.vocab_size, (3, T))
        diff = (hf(x).logits - model(x)[0]).abs().max().item()
        assert diff < 1e-5, (T, diff)
    pad = torch.tensor([0, 3, 9, 20])
    x, mask, positions = left_padded(model.config.vocab_size, pad, 24, seed=3)
    ours = model(x, pad=pad)[0]
    theirs = hf(x, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # compare the text, not the padding
    assert (theirs[real] - ours[real]).abs().max().item() < 1e-5


@needs_transformers
@torch.no_grad()
def test_transformers_greedy_generate_equals_avas(exported):
    from transformers import AutoModelForCausalLM
    model, folder, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    eos = load_run_tokenizer(folder).eot_token
    pad = torch.tensor([0, 2, 5])
    x, mask, _ = left_padded(model.config.vocab_size, pad, 10, seed=4)
    ours = generate(model, x, 20, temperature=0, eos_id=eos, pad=pad)
    theirs = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(theirs, ours)
    one = generate(model, x[:1], 40, temperature=0, eos_id=eos)  # one prompt, no mask
    assert torch.equal(hf.generate(input_ids=x[:1], max_new_tokens=40, do_sample=False), one)


@needs_transformers
def test_transformers_tokenizer_gives_avas_ids(exported):
    from transformers import AutoTokenizer
    _, folder, _ = exported
    tok, enc = AutoTokenizer.from_pretrained(folder), load_run_tokenizer(folder)
    ids = enc.encode_ordinary(TEXT)
    assert tok(TEXT)['input_ids'] == ids  # no BOS or EOS added
    assert tok.decode(ids) == TEXT == enc.decode(ids)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == (
        '<|endoftext|>', enc.eot_token, enc.eot_token)


def test_export_errors_are_one_line_and_write_nothing(tokenizer_file, tmp_path):
    runs = {name: tmp_path / name for name in ('bias', 'gelu', 'dense', 'good')}
    save_run(runs['bias'], tokenizer_file, router='bias')
    save_run(runs['gelu'], tokenizer_file, expert_act='gelu')
    save_run(runs['dense'], tokenizer_file, moe=False)
    save_run(runs['good'], tokenizer_file)
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'keep.txt').write_text('mine')
    (tmp_path / 'a_file').write_text('mine')
    target = tmp_path / 'target'
    cases = [(runs['bias'], f'hf:{target}', "cannot be expressed in Mixtral: its routing adds"),
             (runs['gelu'], f'hf:{target}', "Mixtral experts are SwiGLU: train with "
                                            "--expert_act=swiglu"),
             (runs['dense'], f'hf:{target}', "moe=False"),
             (runs['good'], f'gguf:{target}', "export must be 'hf:FOLDER'"),
             (runs['good'], 'hf:', "export must be 'hf:FOLDER'"),
             (runs['good'], f'hf:{full}', "not an empty folder"),
             (runs['good'], f"hf:{tmp_path / 'a_file'}", "a_file is a file")]
    before = sorted(os.listdir(tmp_path))
    for run, export, message in cases:
        result = run_sample(f'--out_dir={run}', f'--export={export}')
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(full) == ['keep.txt']
    assert (tmp_path / 'a_file').read_text() == 'mine'
