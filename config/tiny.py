# tiny: the smallest GPU model (10 layers, C=384, 4 experts, top-2).
# $ python train.py config/tiny.py       (one GPU; torchrun --nproc_per_node=N for N)
# Shakespeare (~1.4M tokens) is far too small for this model: prepare a larger corpus, e.g.
# $ python data/prepare.py --input=my_corpus/ --name=corpus --vocab_size=32768
# and set data_dir = 'data/corpus'.
# 16 sequences x 1024 tokens x 4 accumulation steps = 65536 tokens per iteration.
out_dir = 'out/tiny'
data_dir = 'data/shakespeare'
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 4
n_layer = 10
n_head = 6
n_embd = 384
n_experts = 4
top_k = 2
learning_rate = 3e-4
min_lr = 3e-05
max_iters = 5000
warmup = 150                  # iterations
eval_interval = 250
eval_iters = 50
log_interval = 10
