"""
The export of a trained Ava model to Hugging Face transformers (sample.py --export=hf:FOLDER): a
folder that AutoModelForCausalLM and AutoTokenizer load as Mixtral, with no Ava code: config.json,
generation_config.json, tokenizer_config.json, the run's tokenizer.json and model.safetensors. Only
a SwiGLU MoE with a softmax or Sinkhorn router can be expressed so; export_hf refuses the others.

    from export import export_hf
    export_hf(model, 'out/nano', 'out/nano-hf')

The safetensors file is written here by hand (a JSON header, then the raw bytes): the export needs
no package beyond torch, and the weights travel without pickle, whose loading can run code.
"""

import inspect
import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch

from failsafe import check, fail, write_atomic
from model import rope_tables
from tokenizer import load_run_tokenizer

# safetensors' dtype names. The format is little-endian, as every machine torch runs on is.
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}


def save_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file, written atomically: 8 bytes (little-endian u64) of
    header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__':
    {str: str}} padded with spaces to 8 bytes, then each tensor's raw bytes in header order."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {'__metadata__': dict(metadata or {})}, [], 0
    for name, t in tensors.items():
        raw = t.detach().to('cpu').contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # the data starts 8-aligned, as safetensors' own writer does

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(len(text).to_bytes(8, 'little'))
            f.write(text)
            for raw in blobs:
                f.write(raw)
    write_atomic(os.fspath(path), write)


def mixtral_weights(model):
    """Ava's weights under the names of Mixtral's original checkpoints, in fp32. The experts go
    out one by one as block_sparse_moe.experts.{j}.w1 (gate), w3 (up), w2 (down): the layout vLLM,
    llama.cpp's converter and transformers 4.x read, and that transformers 5.x fuses on loading
    (its conversion mapping: w1 and w3 -> gate_up_proj, w2 -> down_proj). No Q/K permutation:
    Ava's RoPE rotates the half-split pairs (x[:D/2], x[D/2:]), transformers' rotate_half layout.
    The embedding goes out once; tie_word_embeddings makes it the lm_head too."""
    Fh = model.config.ffn_hidden
    weights = {'model.embed_tokens.weight': model.wte.weight,
               'model.norm.weight': model.norm_f.weight}
    for i, block in enumerate(model.blocks):
        layer, moe = f'model.layers.{i}.', block.ffn
        q, k, v = block.attn.qkv.weight.chunk(3)  # packed [q; k; v], heads in order within each
        weights.update({layer + 'input_layernorm.weight': block.norm1.weight,
                        layer + 'self_attn.q_proj.weight': q,
                        layer + 'self_attn.k_proj.weight': k,
                        layer + 'self_attn.v_proj.weight': v,
                        layer + 'self_attn.o_proj.weight': block.attn.proj.weight,
                        layer + 'post_attention_layernorm.weight': block.norm2.weight,
                        layer + 'block_sparse_moe.gate.weight': moe.router.weight})
        for j in range(moe.w_in.size(0)):  # w_in (E, 2F, C): rows [W1 (gate); W3 (up)]
            expert = f'{layer}block_sparse_moe.experts.{j}.'
            weights.update({expert + 'w1.weight': moe.w_in[j, :Fh],
                            expert + 'w3.weight': moe.w_in[j, Fh:],
                            expert + 'w2.weight': moe.w_out[j]})
    return {name: w.detach().float().contiguous() for name, w in weights.items()}


def mixtral_files(config, eps, eos, eos_id):
    """config.json, generation_config.json and tokenizer_config.json for a Mixtral folder. Ava has
    no BOS: documents are separated by the end-of-text token, so it stands for both, and pads."""
    C, H = config.n_embd, config.n_head
    theta = inspect.signature(rope_tables).parameters['base'].default  # the base trunk() uses
    hf_config = dict(
        architectures=['MixtralForCausalLM'], model_type='mixtral', vocab_size=config.vocab_size,
        hidden_size=C, intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer,
        num_attention_heads=H, num_key_value_heads=H, head_dim=C // H, hidden_act='silu',
        max_position_embeddings=config.block_size, rms_norm_eps=eps, rope_theta=theta,
        rope_parameters=dict(rope_type='default', rope_theta=theta),  # 5.x's form of rope_theta
        sliding_window=None, attention_dropout=0.0, num_local_experts=config.n_experts,
        num_experts_per_tok=config.top_k, router_jitter_noise=0.0, output_router_logits=False,
        tie_word_embeddings=True, torch_dtype='float32', bos_token_id=eos_id, eos_token_id=eos_id,
        use_cache=True)
    generation = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    # the class named, or AutoTokenizer picks Mixtral's own (Mistral's) and ignores tokenizer.json;
    # no clean-up of spaces, so that decoding gives Ava's text byte for byte
    tokenizer = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token=eos, eos_token=eos,
                     pad_token=eos, add_bos_token=False, add_eos_token=False,
                     clean_up_tokenization_spaces=False, model_max_length=config.block_size,
                     padding_side='left')
    return {'config.json': hf_config, 'generation_config.json': generation,
            'tokenizer_config.json': tokenizer}


def export_hf(model, run_dir, folder):
    """Write model (SwiGLU experts, softmax or Sinkhorn router) and its run's tokenizer as a folder
    that transformers' AutoModelForCausalLM and AutoTokenizer load as Mixtral: config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json. At inference
    both of those routers are plain top-k of softmax(logits) renormalised over the K chosen,
    Mixtral's rule (the Sinkhorn bias only balances training). The folder appears whole or not at
    all: it is written beside itself under a temporary name, then renamed."""
    cfg = model.config
    check([(cfg.moe, "a dense model (moe=False) cannot be expressed in Mixtral: it needs MoE "
            "layers"),
           (cfg.expert_act == 'swiglu',
            "Mixtral experts are SwiGLU: train with --expert_act=swiglu"),
           (cfg.router != 'bias', "router='bias' cannot be expressed in Mixtral: its routing adds "
            "a learned bias"),
           (not os.path.isfile(folder), f"{folder} is a file; export into a new folder"),
           (not os.path.exists(folder) or os.path.isdir(folder) and not os.listdir(folder),
            f"{folder} exists and is not an empty folder; export into a new one")])
    enc = load_run_tokenizer(run_dir)
    eos = enc.decode([enc.eot_token])
    files = mixtral_files(cfg, model.norm_f.eps, eos, enc.eot_token)
    weights, target = mixtral_weights(model), os.path.abspath(folder)
    tmp = os.path.join(os.path.dirname(target), f'.{os.path.basename(target)}.tmp{os.getpid()}')
    try:  # a full disk or a signal (SystemExit) on the way leaves no temporary folder behind
        os.makedirs(tmp)
        save_safetensors(weights, os.path.join(tmp, 'model.safetensors'),
                         metadata={'format': 'pt'})  # transformers checks the format
        write_atomic(os.path.join(tmp, 'tokenizer.json'), partial(
            shutil.copyfile, os.path.join(run_dir, 'tokenizer.json')))
        for file, content in files.items():
            text = json.dumps(content, indent=2)
            write_atomic(os.path.join(tmp, file),
                         lambda path, text=text: Path(path).write_text(text))
        os.replace(tmp, target)  # onto nothing, or onto an empty folder
    except OSError as e:
        fail(f"cannot write {folder} ({e.strerror or e}); nothing was written")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the folder was renamed
    if model.mtp_heads:
        print(f"note: the {len(model.mtp_heads)} multi-token-prediction heads are not exported "
              "(Mixtral has none); the next-token model is")
    n_params = sum(w.numel() for w in weights.values())
    print(f"wrote {folder}: MixtralForCausalLM ({n_params / 1e6:.2f}M parameters, "
          f"{cfg.n_layer} layers, {cfg.n_experts} experts, top-{cfg.top_k}), "
          f"{', '.join(sorted(os.listdir(folder)))}")
