# small with SwiGLU experts (expert_act='swiglu', the Llama/Mixtral FFN) at GELU small's size: 3
# matrices per expert instead of 2, so the width is 2/3 of GELU's 4 * 512 = 2048, rounded to a
# multiple of 64: 1344. At vocab 8192: 250.2M parameters, 76.7M active per token (GELU small:
# 253.8M, 77.7M; -1.4% and -1.2%).
# $ python train.py config/small_swiglu.py      (run from the repository root: it reads small.py)
# $ python bench.py config/small_swiglu.py      (beside python bench.py config/small.py)
exec(open('config/small.py').read())  # every other setting as small's, kept in step with it
out_dir = 'out/small_swiglu'
expert_act = 'swiglu'
ffn_hidden = 1344
