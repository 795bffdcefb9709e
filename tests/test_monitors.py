"""
train.py's schedules and monitors.py's monitors, driven with synthetic numbers and checked against
hand-derived values.
    python -m pytest -q tests/test_monitors.py
"""

import math

import numpy as np
import pytest

from bench import suggest_lr
from monitors import (DeadExpertTracker, GradNormMonitor, PlateauLR, agreed_stop, memory_action,
                      memory_level, model_flops_utilisation)
from train import as_iters, clip_at, scheduled_lr, seq_len_at


def test_warmup_cosine_and_restarts():
    """peak 1, floor 0.1, 10 warmup iterations, decay to 110. Warmup: (it+1)/11.
    Cosine: 0.1 + 0.45 (1 + cos(pi p))."""
    lr = lambda it, cycles=1: scheduled_lr(it, 1.0, 0.1, 10, 110, cycles)
    assert lr(0) == pytest.approx(1 / 11) and lr(9) == pytest.approx(10 / 11)
    assert lr(10) == pytest.approx(1.0)                   # p = 0
    assert lr(60) == pytest.approx(0.55)                  # p = 1/2: halfway between peak and floor
    assert lr(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == lr(500) == pytest.approx(0.1)
    # two cycles of 50: each restarts at the peak and reaches the floor's neighbourhood before
    # the restart
    assert lr(60, cycles=2) == pytest.approx(1.0) and lr(35, cycles=2) == pytest.approx(0.55)
    assert lr(59, cycles=2) < 0.11


def test_warmup_fraction_or_iterations():
    assert as_iters(0.03, 600) == 18 and as_iters(30, 600) == 30 and as_iters(0, 600) == 0


def test_clip_warms_from_start_to_final():
    assert (clip_at(0, 10, 2.0, 1.0) == 2.0 and clip_at(5, 10, 2.0, 1.0) == 1.5
            and clip_at(10, 10, 2.0, 1.0) == 1.0)


def test_progressive_sequence_length_doubles_to_block_size():
    lengths = [seq_len_at(it, 128, 1024, 300) for it in range(0, 400, 50)]
    assert lengths == [128, 128, 256, 256, 512, 512, 1024, 1024]
    # rows = 32*1024/n: tokens per micro-step stay 32,768
    assert all(32 * 1024 % n == 0 for n in lengths)
    assert seq_len_at(0, 0, 1024, 300) == 1024        # off


def test_gradient_explosion_is_clipped_to_the_running_mean():
    monitor = GradNormMonitor(threshold=3.0, warmup=10)
    for norm in [1.0, 1.2, 0.8, 1.1, 0.9] * 4:
        clip, exploded = monitor.check(norm, clip=5.0)
        assert clip == 5.0 and not exploded
    mean = monitor.mean
    clip, exploded = monitor.check(10.0, clip=5.0)  # 10 > 3 x ~1: explosion
    assert exploded and clip == pytest.approx(mean) and monitor.explosions == 1
    assert monitor.mean == mean                      # the spike does not enter the running mean
    assert monitor.check(2.5, clip=5.0) == (5.0, False)  # below 3 x mean: normal


def test_plateau_lr_boosts_stable_plateaus_and_cuts_noisy_ones():
    stable, noisy = [1.0, 1.05, 0.95, 1.0], [0.2, 3.0, 0.5, 2.0]
    improving = PlateauLR(patience=100, threshold=0.01, boost=1.15)
    for it in range(50, 1000, 50):
        assert improving.update(it, 5.0 * 0.9 ** (it / 50), stable) is None
    assert improving.scale == 1.0
    flat = PlateauLR(patience=100, threshold=0.01, boost=1.15)
    messages = [flat.update(it, 3.0, stable) for it in range(50, 400, 50)]
    # progress only at it=50 (first value); changes at 150 (100 iterations later) and at 250, 350
    assert [it for it, m in zip(range(50, 400, 50), messages) if m] == [150, 250, 350]
    assert flat.scale == pytest.approx(1.15 ** 3)
    rough = PlateauLR(patience=100, threshold=0.01, boost=1.15)
    for it in range(50, 200, 50):
        rough.update(it, 3.0, noisy)
    assert rough.scale == pytest.approx(0.7)
    restored = PlateauLR(patience=100, threshold=0.01, boost=1.15)
    restored.load_state_dict(flat.state_dict())
    assert restored.state_dict() == flat.state_dict()


def test_dead_expert_warning_after_a_sustained_window():
    tracker = DeadExpertTracker(window=100)
    alive = np.full((2, 4), 0.25)
    dead = alive.copy()
    dead[1, 3] = 0.0  # below 1/(10*4)
    assert tracker.update(10, alive) == []
    warnings = [w for it in range(20, 200, 10) for w in tracker.update(it, dead)]
    assert len(warnings) == 1 and 'layer 1 expert 3' in warnings[0]  # once, at iteration 120
    assert tracker.update(200, alive) == []
    # dead for < 100 again
    assert [w for it in range(210, 300, 10) for w in tracker.update(it, dead)] == []


def test_memory_levels():
    assert [memory_level(f) for f in (0.5, 0.76, 0.82, 0.87, 0.95)] == [0, 1, 2, 3, 4]


def test_each_memory_level_has_its_own_behaviour():
    """MEMORY_LEVELS names four behaviours: note, empty the cache, warn, stop. Each level adds its
    own."""
    actions = [memory_action(f) for f in (0.5, 0.76, 0.82, 0.87, 0.95)]
    assert actions[0] == (None, False, False)
    assert actions[1][0] and actions[1][1:] == (False, False)                 # a note only
    # the cache is emptied
    assert actions[2][1] and not actions[2][2] and 'warning' not in actions[2][0]
    assert actions[3][0].startswith('warning') and actions[3][1:] == (True, False)  # and a warning
    assert actions[4][2]                                                      # the run stops
    # three different lines (the stop has its own message)
    assert len({a[0] for a in actions[1:4]}) == 3


def test_plateau_lr_observes_a_window_and_checkpoints_it():
    """observe() keeps the last `window` losses and norms; check() is update() on their mean; the
    window is part of the state, so a resumed run checks what an uninterrupted one would."""
    plateau = PlateauLR(patience=100, threshold=0.01, boost=1.15, window=3)
    for loss in (9.0, 5.0, 4.0, 3.0):
        plateau.observe(loss, 1.0)
    assert plateau.losses == [5.0, 4.0, 3.0] and plateau.norms == [1.0] * 3
    twin, by_hand = (PlateauLR(patience=100, threshold=0.01, boost=1.15, window=3)
                     for _ in range(2))
    twin.load_state_dict(plateau.state_dict())
    assert plateau.check(50) is None and plateau.losses == [] and plateau.norms == []
    assert twin.check(50) is None and twin.state_dict() == plateau.state_dict()
    assert (by_hand.update(50, 4.0, [1.0] * 3) is None
            and by_hand.smoothed == plateau.smoothed == pytest.approx(4.0))


def test_mfu_divides_by_every_gpu_that_shares_the_tokens():
    """1e9 FLOPs per token, 131,072 tokens per iteration in 0.5 s = 2.62e14 FLOP/s: 26.5% of one
    989 TFLOP/s GPU; the same iteration spread over 8 GPUs is 8x their peak's denominator, 3.3%."""
    one = model_flops_utilisation(1e9, 131072, 0.5, 1, 989.0)
    assert (one == pytest.approx(1e9 * 131072 / 0.5 / 989e12)
            and one == pytest.approx(0.265, abs=1e-3))
    assert model_flops_utilisation(1e9, 131072, 0.5, 8, 989.0) == pytest.approx(one / 8)


def test_lr_finder_suggests_the_steepest_descent():
    """Loss = 5 - 2 tanh(log10(lr) + 4) until 1e-2, then divergence: steepest at lr = 1e-4."""
    lrs = np.logspace(-8, -1, 141)
    losses = 5 - 2 * np.tanh(np.log10(lrs) + 4) + np.where(lrs > 1e-2, 50 * (np.log10(lrs) + 2), 0)
    assert suggest_lr(lrs, losses) == pytest.approx(1e-4, rel=0.15)


def test_the_stop_decision_names_its_reason_and_when():
    """agreed_stop in one process (under torchrun each reason is first the largest over the ranks):
    out of memory stops before the step (now), and outranks the memory level and a signal, which
    stop after it."""
    assert agreed_stop([], 0.0, False, False, 'cpu') is None
    assert agreed_stop([15], 0.0, False, False, 'cpu') == ('stopped by signal SIGTERM', 143, False)
    assert agreed_stop([15], 0.93, False, False, 'cpu') == ('memory at 93% of the device', 3, False)
    oom = agreed_stop([15], 0.93, True, False, 'cpu')
    assert oom.now and oom.code == 3 and oom.why.startswith('CUDA out of memory')
