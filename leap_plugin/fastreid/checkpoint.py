"""What keeps a run's OUTPUT_DIR sound: atomic checkpoints, clear load errors, one live run per folder.

* ``LEAPCheckpointer``: FastReID's Checkpointer whose ``save`` writes ``<name>.pth`` (and
  ``last_checkpoint``) under a temporary name and renames it, so a kill during a save leaves the
  previous checkpoint, never a truncated one; whose ``load`` names the file and says what to do
  when it is empty, truncated, not a checkpoint, or holds statistics that do not fit the run.
* ``lock_output_dir``: OUTPUT_DIR/.leap_lock holds the host and pid of the run that owns the
  folder; a second run on it is refused while that process lives (a stale lock is taken over).
"""
import atexit
import logging
import os
import socket

import torch
from fastreid.utils import comm
from fastreid.utils.checkpoint import Checkpointer

from ..core.integrity import StatsStateError

__all__ = ["LEAPCheckpointer", "CheckpointError", "lock_output_dir", "LOCK_NAME"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".leap_lock"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it and says what to do."""


def _atomic_write(path: str, write) -> None:
    """``write(f)`` into ``path`` through a temporary file in the same folder and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class LEAPCheckpointer(Checkpointer):
    """FastReID's Checkpointer with atomic saves and loads whose errors name the file."""

    def save(self, name: str, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(),
                **{key: obj.state_dict() for key, obj in self.checkpointables.items()}, **kwargs}
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str):
        _atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                      lambda f: f.write(last_filename_basename.encode()))

    def _advice(self, path: str) -> str:
        others = sorted(os.path.basename(p) for p in self.get_all_checkpoint_files()
                        if os.path.abspath(p) != os.path.abspath(path)) if self.save_dir else []
        if others:
            return (f"resume from another checkpoint of {self.save_dir} ({', '.join(others)}): write its "
                    f"file name into {os.path.join(self.save_dir, 'last_checkpoint')}, or set MODEL.WEIGHTS to it")
        return "set MODEL.WEIGHTS to a complete checkpoint, or train afresh in a new OUTPUT_DIR"

    def load(self, path: str, checkpointables=None):
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist (MODEL.WEIGHTS, or the file that "
                                  f"OUTPUT_DIR/last_checkpoint names)")
        try:
            return super().load(path, checkpointables)
        except StatsStateError as err:
            raise StatsStateError(f"checkpoint {path}: {err}", err.option) from None

    def _load_file(self, f: str):
        if os.path.getsize(f) == 0:
            raise CheckpointError(f"checkpoint {f} is empty (0 bytes: its save was interrupted); "
                                  f"{self._advice(f)}")
        try:
            checkpoint = super()._load_file(f)
        except Exception as err:  # torch.load: EOFError, RuntimeError, UnpicklingError, ... on bad bytes
            raise CheckpointError(f"checkpoint {f} cannot be read ({type(err).__name__}: {err}): it is "
                                  f"truncated or not a torch checkpoint; {self._advice(f)}") from None
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            raise CheckpointError(f"checkpoint {f} is not a FastReID checkpoint (no 'model' entry); "
                                  f"{self._advice(f)}")
        return checkpoint


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _release(path: str, owner: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() == owner:
                os.remove(path)
    except OSError:
        pass


def lock_output_dir(output_dir: str) -> None:
    """Make this process the owner of ``output_dir`` (main process only; released at exit).

    Raises RuntimeError if a live process owns it: two runs would overwrite each other's
    checkpoints and interleave their logs. Calling it again from the owner is a no-op.
    """
    if not output_dir or not comm.is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                owner = f.read().strip()
            if owner == me:
                return
            host, _, pid = owner.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                logger.warning(f"{path}: process {pid} that held OUTPUT_DIR is gone; taking the folder over")
                os.remove(path)
                continue
            raise RuntimeError(
                f"OUTPUT_DIR {output_dir} is in use by process {pid or '?'} on {host or '?'} (lock file "
                f"{path}): two runs in one folder overwrite each other's checkpoints and interleave "
                f"their logs. Use another OUTPUT_DIR or wait for that run; if that process is gone, "
                f"delete {path}") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        atexit.register(_release, path, me)
        return
