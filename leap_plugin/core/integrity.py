"""The statistics' state carries its own consistency (what ``AngularStats`` checks on load).

A saved state is refused, with a ``StatsStateError`` that names what is wrong, when

* it was made with other options: another number of classes, other K_i (a changed split), another
  feature dimension or another memory factor P (``error.option`` names which, so that an adapter
  can name its own config key and say how to start the statistics afresh);
* it is incomplete: some of its buffers are absent (a host loader that skips buffers whose shape
  changed, as FastReID's checkpointer does, would otherwise load the rest and mix two states);
* its values are corrupt: a non-finite centre or sum, an angle outside [0, pi], a negative write
  count, or running sums that do not add up to the angles in the memory. The error names the class.

The layout (P, C, D) is saved beside the buffers as the tensor ``<prefix>layout``, so that a changed
P is recognised even when the host has dropped the memory buffer (whose shape it changes).
"""
import math

import torch

__all__ = ["StatsStateError", "LAYOUT_KEY", "check_loadable", "check_values", "segment_sums", "load_checked"]

LAYOUT_KEY = "layout"  # LongTensor [P, C, D], written by AngularStats._save_to_state_dict
_OPTIONS = ("memory_factor", "num_classes", "feat_dim")
_SUM_RTOL = 1e-6  # float64 running sums of float32 angles drift far less than this


class StatsStateError(ValueError):
    """A saved statistics state that does not fit this run or is corrupt.

    ``option``: "memory_factor", "class_counts" or "feat_dim" when an option differs from the run
    that saved it, None when the state is incomplete or corrupt.
    """

    def __init__(self, message: str, option=None):
        super().__init__(message)
        self.option = option


def segment_sums(values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[C] float64 sums of consecutive segments of ``values`` with lengths ``sizes`` (no loop)."""
    total = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    ends = sizes.cumsum(0)
    return total[ends] - total[ends - sizes]


def _classes(mask: torch.Tensor, limit: int = 5) -> str:
    """'classes [3, 7] (2 of 100)' for a [C] bool mask (host sync: only on an error path)."""
    bad = torch.nonzero(mask).flatten()
    shown = bad[:limit].tolist()
    more = ", ..." if bad.numel() > limit else ""
    return f"class{'es' if bad.numel() > 1 else ''} {shown}{more} ({bad.numel()} of {mask.numel()})"


def _differ(what: str, mask: torch.Tensor, saved, now, now_means: str, option=None) -> StatsStateError:
    """'<what> for classes [..], e.g. class i: <saved> saved, <now> <now_means>'."""
    first = int(torch.nonzero(mask)[0])
    return StatsStateError(f"{what} for {_classes(mask)}, e.g. class {first}: {float(saved[first]):.6g} "
                           f"saved, {float(now[first]):.6g} {now_means}", option)


def check_values(state: dict, memory_size: torch.Tensor, where: str) -> None:
    """Raise StatsStateError unless the buffers in ``state`` (AngularStats names) are sound.

    Checks finite centres and sums, angles in [0, pi], non-negative write counts, and that
    angle_sum / angle_sq_sum equal the sums of each class's angle memory.
    """
    centres = state["centers"]
    bad = ~torch.isfinite(centres.float()).all(1)
    if bool(bad.any()):
        raise StatsStateError(f"{where}: non-finite class centre for {_classes(bad)}")
    sizes = memory_size.to(state["memory"].device)
    memory = state["memory"][:-1]  # the last slot is scratch
    slot_ok = torch.isfinite(memory) & (memory >= 0) & (memory <= math.pi + 1e-6)
    if not bool(slot_ok.all()):
        per_class = segment_sums((~slot_ok).double(), sizes) > 0
        raise StatsStateError(f"{where}: the angle memory holds non-finite values or angles outside "
                              f"[0, pi] for {_classes(per_class)}")
    if bool((state["num_written"] < 0).any()):
        raise StatsStateError(f"{where}: negative num_written for {_classes(state['num_written'] < 0)}")
    for name, angles in (("angle_sum", memory), ("angle_sq_sum", memory.double().square())):
        saved, expected = state[name].double(), segment_sums(angles, sizes)
        bad = ~torch.isfinite(saved)
        if bool(bad.any()):
            raise StatsStateError(f"{where}: non-finite {name} for {_classes(bad)}")
        bad = (saved - expected).abs() > _SUM_RTOL * (1 + expected.abs())
        if bool(bad.any()):
            raise _differ(f"{where}: {name} does not match the angle memory", bad, saved, expected,
                          "in its memory (the buffers come from different states or were edited)")


def _saved_layout(state: dict, layout) -> dict:
    """P, C, D of a saved state: from its layout record, else from the buffers' shapes."""
    if layout is not None:
        return dict(zip(_OPTIONS, (int(v) for v in layout.tolist())))
    found = {}
    counts, memory, centres = (state.get(k) for k in ("class_counts", "memory", "centers"))
    if counts is not None:
        found["num_classes"] = counts.numel()
        if memory is not None and int(counts.sum()) > 0:
            found["memory_factor"] = (memory.numel() - 1) / int(counts.sum())
    elif centres is not None:
        found["num_classes"] = centres.shape[0]
    if centres is not None and centres.dim() == 2:
        found["feat_dim"] = centres.shape[1]
    return found


def check_loadable(stats, state_dict: dict, prefix: str) -> None:
    """Raise StatsStateError unless ``state_dict``'s entries under ``prefix`` fit ``stats``.

    Nothing under ``prefix`` (a checkpoint without statistics): nothing to check. Otherwise the
    options, the completeness and the values are checked before a single buffer is copied.
    """
    names = [n for n in stats._buffers if n not in stats._non_persistent_buffers_set]
    state = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
    layout = state_dict.get(prefix + LAYOUT_KEY)
    if not state and layout is None:
        return
    where = f"the saved statistics '{prefix}*'" if prefix else "the saved statistics"
    saved = _saved_layout(state, layout)
    run = {"memory_factor": stats.memory_factor, "num_classes": stats.num_classes, "feat_dim": stats.feat_dim}
    what = {"num_classes": "classes", "feat_dim": "feature dimension D",
            "memory_factor": "memory factor P (Eq. 5: K_i * P angles per class)"}
    for key in ("num_classes", "feat_dim", "memory_factor"):
        if key in saved and saved[key] != run[key]:
            raise StatsStateError(f"{where} have {what[key]} {saved[key]:g}, this run {run[key]}",
                                  "class_counts" if key == "num_classes" else key)
    counts = state.get("class_counts")
    if counts is not None:
        differ = counts.to(stats.class_counts.device) != stats.class_counts
        if bool(differ.any()):
            raise _differ(f"{where} were collected on other class counts: K_i differs", differ, counts,
                          stats.class_counts, "images now (a different training split)", "class_counts")
    missing = [n for n in names if n not in state]
    if missing:
        raise StatsStateError(f"{where} are incomplete: {missing} absent while {sorted(state)} are "
                              f"present (a loader that skips buffers whose shape changed drops them)")
    for name, tensor in state.items():
        own = getattr(stats, name)
        if tuple(tensor.shape) != tuple(own.shape):
            raise StatsStateError(f"{where}: {name} has shape {tuple(tensor.shape)}, this run "
                                  f"{tuple(own.shape)}")
    check_values(state, stats.memory_size, where)


def load_checked(stats, state_dict: dict, prefix: str, fresh: bool, options: dict, afresh: str) -> None:
    """What an adapter's ``_load_from_state_dict`` does for its ``stats`` submodule under ``prefix``.

    ``fresh``: replace the saved statistics by ``stats``' own (fresh) state, so the rest of the
    checkpoint loads and the statistics start afresh. Otherwise check them, and re-raise a
    StatsStateError with the host's name of the changed option (``options``: core option ->
    host name) and the host's way of starting afresh (``afresh``).
    """
    if fresh:
        state_dict.update(stats.state_dict(prefix=prefix))
        return
    try:
        check_loadable(stats, state_dict, prefix)
    except StatsStateError as err:
        if err.option is None:
            advice = f"resume from a sound checkpoint, or {afresh}"
        else:
            advice = (f"{options[err.option]} differs from the run that saved them: use its value again, "
                      f"or {afresh}")
        raise StatsStateError(f"{err}. To proceed: {advice}", err.option) from None
