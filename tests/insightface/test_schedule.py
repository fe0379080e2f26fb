"""The triangular LR: exact cycles (odd lengths too), resume, errors."""
import pytest
import torch

from leap_plugin.insightface.schedule import TriangularLR, triangular_scheduler


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def _optimizer(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_odd_cycle_is_exact():
    # train_v2's count: 63 steps over 9 epochs = 7 a epoch; 3-epoch cycles = 21 steps, not 20
    opt = _optimizer(0.1)
    sched = triangular_scheduler(opt, total_iters=63, num_epoch=9, cycle_epochs=3, lr_min=0.001, lr_max=0.1)
    assert sched.cycle_steps == 21
    lrs = _lrs(sched, opt, 64)
    for t in (0, 21, 42, 63):
        assert lrs[t] == pytest.approx(0.001)
    assert all(lrs[t] == pytest.approx(lrs[t + 21]) for t in range(42))  # period 21 exactly
    assert lrs[10] == pytest.approx(lrs[11]) and lrs[10] < 0.1  # the peak, 10.5, falls between steps
    assert lrs[10] == pytest.approx(0.001 + (0.1 - 0.001) * (1 - 1 / 21))
    assert all(a < b for a, b in zip(lrs[:11], lrs[1:11]))  # rises, then falls
    assert all(a > b for a, b in zip(lrs[11:21], lrs[12:22]))


def test_resume_continues_the_cycle():
    opt = _optimizer()
    sched = TriangularLR(opt, cycle_steps=9, min_ratio=0.1)
    straight = _lrs(sched, opt, 20)
    opt = _optimizer()
    sched = TriangularLR(opt, cycle_steps=9, min_ratio=0.1)
    _lrs(sched, opt, 7)
    state = sched.state_dict()
    opt = _optimizer()
    resumed = TriangularLR(opt, cycle_steps=9, min_ratio=0.1)
    resumed.load_state_dict(state)
    assert _lrs(resumed, opt, 13) == pytest.approx(straight[7:])


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="cycle_steps=0"):
        TriangularLR(_optimizer(), cycle_steps=0, min_ratio=0.1)
    with pytest.raises(ValueError, match="lr_min / lr = 2"):
        triangular_scheduler(_optimizer(), 10, 1, 1, lr_min=0.2, lr_max=0.1)
