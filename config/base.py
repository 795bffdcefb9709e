# base: 18 layers, C=768, 8 experts, top-2.
# $ python train.py config/base.py       (one GPU; torchrun --nproc_per_node=N for N)
# Shakespeare (~1.4M tokens) is far too small for this model: prepare a larger corpus, e.g.
# $ python data/prepare.py --input=my_corpus/ --name=corpus --vocab_size=32768
# and set data_dir = 'data/corpus'.
# 32 sequences x 1024 tokens x 4 accumulation steps = 131072 tokens per iteration.
out_dir = 'out/base'
data_dir = 'data/shakespeare'
batch_size = 32
block_size = 1024
gradient_accumulation_steps = 4
n_layer = 18
n_head = 12
n_embd = 768
n_experts = 8
top_k = 2
learning_rate = 2e-4
min_lr = 2e-05
max_iters = 5000
warmup = 150                  # iterations
eval_interval = 250
eval_iters = 50
log_interval = 10
