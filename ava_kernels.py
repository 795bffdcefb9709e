"""
Ava's hand-written CUDA kernels for the hot spots of an Ava training step and decode step
(kernels/README.md says which and why). Each op lives in two files: `<op>.cu` (the kernels, with a
header comment on shapes and testing) and `<op>.py` (its pure-PyTorch `_ref` twin of the same
signature, and the `torch.library` custom op, with autograd for the ops that train, so
torch.compile can trace through it).

    from ava_kernels import rms_norm
    y = rms_norm(x, weight, eps)        # CUDA kernel on a CUDA tensor once built, else rms_norm_ref

The .cu files are JIT-built together into one library the first time a CUDA tensor reaches an op
(`torch.utils.cpp_extension.load`, for this device's arch, into kernels/build/; cached after the
first build). Without CUDA or nvcc every op runs its `_ref` twin, and one line says so.
`ava_kernels.enabled = False` forces the twins (bench.py --kernels=ref, and the tests that compare
the two).

The ops live in the folder kernels/, imported under this module's name: `kernels` is the import
name of Hugging Face's kernels package (which transformers imports), and a package of that name in
the repository would hide it. A module with a `__path__` is a package: `import ava_kernels.rope`
reads kernels/rope.py.
"""

import glob
import os
import shutil

import torch

enabled = True           # False: always use the _ref twins (for comparisons)
_status = None           # None: not tried yet; True: built and loaded; str: why not
_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels')
__path__ = [_HERE]  # the package's modules: kernels/*.py


def build():
    """Build and load the CUDA library if possible; returns True, or the reason it is unavailable
    (printed once). Under torchrun, call it after init_process_group: rank 0 compiles while the
    others wait, then they load its build."""
    global _status
    if _status is not None:
        return _status
    if not torch.cuda.is_available():
        _status = 'no CUDA device'
    elif shutil.which('nvcc') is None and not os.path.exists(
            os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'), 'bin', 'nvcc')):
        _status = 'nvcc not found (install the CUDA toolkit or set CUDA_HOME)'
    if _status is not None:
        print(f"kernels: CUDA ops unavailable ({_status}); using the PyTorch _ref twins")
        return _status
    from torch.utils.cpp_extension import load
    major, minor = torch.cuda.get_device_capability()
    os.environ['TORCH_CUDA_ARCH_LIST'] = f'{major}.{minor}'  # this device's arch: one compile pass
    build_dir = os.path.join(_HERE, 'build')
    os.makedirs(build_dir, exist_ok=True)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = not distributed or torch.distributed.get_rank() == 0
    if not first:
        torch.distributed.barrier()  # wait for rank 0 to compile; then load its build
    try:
        load(name='ava_kernels', sources=sorted(glob.glob(os.path.join(_HERE, '*.cu'))),
             build_directory=build_dir, extra_cuda_cflags=['-O3', '-lineinfo'],
             is_python_module=False, verbose=False)
        _status = True
    except Exception as e:  # a failed build must not stop training: the twins compute the same
        _status = f"build failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        print(f"kernels: CUDA ops unavailable ({_status}); using the PyTorch _ref twins")
    if distributed and first:
        torch.distributed.barrier()
    return _status


def use_cuda(*tensors):
    """True when these tensors should go through the CUDA ops."""
    return enabled and all(t.is_cuda for t in tensors) and build() is True


def autocast_dtype(x):
    """The dtype a matmul right after this op would compute in: autocast's, else x's own."""
    if x.is_cuda and torch.is_autocast_enabled('cuda'):
        return torch.get_autocast_dtype('cuda')
    return x.dtype


# the ops (they import the helpers above)
from ava_kernels.cached_attention import cached_attention, cached_attention_ref  # noqa: E402
from ava_kernels.cross_entropy import cross_entropy, cross_entropy_ref  # noqa: E402
from ava_kernels.moe_decode import moe_decode, moe_decode_ref  # noqa: E402
from ava_kernels.moe_permute import (moe_permute, moe_permute_ref, moe_sort, moe_sort_ref,  # noqa
                                 moe_unpermute, moe_unpermute_ref)
from ava_kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from ava_kernels.rope import norm_qkv_rope, norm_qkv_rope_ref, qkv_rope, qkv_rope_ref  # noqa: E402
from ava_kernels.sinkhorn import sinkhorn, sinkhorn_topk, sinkhorn_topk_ref  # noqa: E402
