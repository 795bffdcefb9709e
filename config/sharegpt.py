# MoE vs dense and the routers at equal compute, on ShareGPT (bench/RESULTS.md has the runs).
# $ python data/prepare.py --dataset=sharegpt && python train.py config/sharegpt.py    (one GPU)
# 64 sequences x 512 tokens = 32,768 tokens per iteration; 600 iterations = 19.7M tokens, about one
# epoch. The variants are overrides of this file: --moe=False (the dense twin: same active
# parameters), --router=softmax --capacity_factor=1.25, --router=bias, --n_experts=16.
out_dir = 'out/sharegpt'
data_dir = 'data/sharegpt'
batch_size = 64
block_size = 512
n_layer = 6
n_head = 6
n_embd = 384
n_experts = 8
top_k = 2
router = 'sinkhorn'
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 600
warmup = 30                   # iterations
eval_interval = 50
eval_iters = 10
log_interval = 10
