"""The paper's triangular cyclical learning rate (Smith, 2017) for arcface_torch's train_v2.

``config.lr_policy = "triangular"`` replaces arcface_torch's ``PolynomialLRWarmup``: cycles of
``config.lr_cycle_epochs`` epochs, from ``config.lr_min`` up to ``config.lr`` at mid-cycle and back.
A cycle is exactly ``steps_per_epoch * cycle_epochs`` steps, odd lengths included (torch's
``CyclicLR`` takes a whole number of steps per half cycle and would round 21 to 20).
"""
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["TriangularLR", "triangular_scheduler"]


class TriangularLR(LRScheduler):
    """lr(t) = lr_min + (lr_max - lr_min) * (1 - |2 (t mod L) / L - 1|), L = ``cycle_steps``.

    ``lr_max`` is each parameter group's initial lr; ``lr_min`` is given as a fraction of it
    (``min_ratio``), so groups with different lrs keep their ratio.
    """

    def __init__(self, optimizer, cycle_steps: int, min_ratio: float, last_epoch: int = -1):
        if cycle_steps < 1:
            raise ValueError(f"a triangular cycle needs at least 1 step, got cycle_steps={cycle_steps}")
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"lr_min must lie in [0, lr]: lr_min / lr = {min_ratio}")
        self.cycle_steps = int(cycle_steps)
        self.min_ratio = float(min_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """lr / lr_max at ``step``."""
        phase = (step % self.cycle_steps) / self.cycle_steps
        return self.min_ratio + (1 - self.min_ratio) * (1 - abs(2 * phase - 1))

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def triangular_scheduler(optimizer, total_iters: int, num_epoch: int, cycle_epochs: int, lr_min: float,
                         lr_max: float) -> TriangularLR:
    """The triangular schedule with cycles of ``cycle_epochs`` epochs, steps per epoch as train_v2
    counts them (``total_iters // num_epoch``: train_v2's total_step is steps per epoch x epochs)."""
    if lr_max <= 0:
        raise ValueError(f"config.lr must be > 0 for the triangular policy, got {lr_max}")
    steps_per_epoch = max(total_iters // num_epoch, 1)
    return TriangularLR(optimizer, steps_per_epoch * cycle_epochs, lr_min / lr_max)
