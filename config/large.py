# large: 24 layers, C=1024, 16 experts, top-2; use several GPUs (torchrun).
# $ python train.py config/large.py       (one GPU; torchrun --nproc_per_node=N for N)
# Shakespeare (~1.4M tokens) is far too small for this model: prepare a larger corpus, e.g.
# $ python data/prepare.py --input=my_corpus/ --name=corpus --vocab_size=32768
# and set data_dir = 'data/corpus'.
# 8 sequences x 1024 tokens x 8 accumulation steps = 65536 tokens per iteration: 16 sequences x 4
# steps do not fit in an 80 GB GPU at vocab 32768, 8 x 8 (the same tokens per iteration) does.
out_dir = 'out/large'
data_dir = 'data/shakespeare'
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 8
n_layer = 24
n_head = 16
n_embd = 1024
n_experts = 16
top_k = 2
learning_rate = 1.5e-4
min_lr = 1.5e-05
max_iters = 5000
warmup = 150                  # iterations
eval_interval = 250
eval_iters = 50
log_interval = 10
