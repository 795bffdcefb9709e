# The embedded default: a small MoE on Shakespeare that trains on a 2-core CPU in a few minutes.
# $ python data/prepare.py && python train.py config/nano.py && python sample.py --out_dir=out/nano
# 32 sequences x 128 tokens = 4,096 tokens per iteration; 600 iterations = 2.5M tokens (~2 epochs).
out_dir = 'out/nano'
data_dir = 'data/shakespeare'
batch_size = 32
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
n_experts = 4
top_k = 2
router = 'sinkhorn'
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 600
warmup = 30                  # iterations
eval_interval = 100
eval_iters = 20
log_interval = 20
device = 'cpu'
