# nano with SwiGLU experts (expert_act='swiglu'), for the CPU comparison with GELU nano. Its width
# is 2/3 of GELU's 4 * 128 = 512, rounded to a multiple of 64: 320 (3.28M parameters, 2.30M active;
# GELU nano: 3.41M, 2.36M, so -3.8% and -2.8%) rather than 384 (3.67M, 2.49M: +7.7%, +5.6%).
# $ python train.py config/nano_swiglu.py       (run from the repository root: it reads nano.py)
exec(open('config/nano.py').read())  # every other setting as nano's, kept in step with it
out_dir = 'out/nano_swiglu'
expert_act = 'swiglu'
ffn_hidden = 320
