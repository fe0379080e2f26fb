"""The trainer hook that drives ``LEAPHead``: the epoch (survives resume) and the training log."""
from fastreid.engine.train_loop import HookBase

from .head import find_leap_head

__all__ = ["LEAPEpochHook"]


class LEAPEpochHook(HookBase):
    """Tells the LEAPHead the epoch before each epoch, so the feature cloud switches on at
    MODEL.HEADS.LEAP.START_EPOCH also after ``--resume`` (the trainer's epoch comes from the
    checkpoint), and logs the cloud's numbers to the EventStorage (TensorBoard, metrics.json)
    every ``period`` iterations."""

    def __init__(self, period: int = 20):
        self.period = period

    def before_epoch(self):
        head = find_leap_head(self.trainer.model)
        if head is not None:
            head.set_epoch(self.trainer.epoch)

    def after_step(self):
        if (self.trainer.iter + 1) % self.period:
            return
        head = find_leap_head(self.trainer.model)
        if head is not None and head.last_metrics:
            self.trainer.storage.put_scalars(
                **{k: float(v) for k, v in head.last_metrics.items()}, smoothing_hint=False)
