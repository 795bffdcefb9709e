# RLHF on the nano model (CPU): judge, PPO, DPO and best-of-n on the Shakespeare line task
# (rlhf.py's docstring).
# $ python data/prepare.py && python train.py config/nano.py  # the pretrained model, out/nano
# $ python rlhf.py config/rlhf_nano.py --mode=judge           # pairs + judge
# $ python rlhf.py config/rlhf_nano.py --mode=ppo --seed=1    # one PPO run, out/rlhf_nano/ppo_s1
init_dir = 'out/nano'
out_dir = 'out/rlhf_nano'
device = 'cpu'
