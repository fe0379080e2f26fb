"""The LEAP options: every hyper-parameter named, defaulted, documented and checked in one place.

Both hosts read this list: FastReID's ``MODEL.HEADS.LEAP.<NAME>`` keys are the names in upper case
(``fastreid/config.py`` adds one key per option), arcface_torch's ``config.leap`` dict and
``LEAPMarginLoss``'s keyword arguments use the names. An option added here reaches both hosts.
:class:`LEAPOptions` checks a set of values once, with errors that name the key as the user wrote it.

Spelling: the paper writes "center"; ``*_centre`` values (the first spelling) are accepted as
deprecated aliases of the ``*_center`` ones.
"""
import warnings
from dataclasses import dataclass, fields, make_dataclass
from dataclasses import field as dataclass_field
from typing import Callable, Mapping, Optional

import torch

__all__ = ["LEAPOptions", "OPTIONS", "Option", "VERSIONS", "CENTER_RATE_WEIGHTS", "ANGLES_TO",
           "ANGLE_REFERENCES", "CENTER_DTYPES", "canonical", "check_option", "check_head_threshold",
           "parse_center_dtype"]

VERSIONS = ("full", "vanilla")
# Eq. 4's two readings: what gamma weighs (the other term gets 1 - gamma)
CENTER_RATE_WEIGHTS = ("previous_center", "batch_mean")
# Eq. 3's center: after this batch's Eq. 4 update, or before it (this batch's features not in it)
ANGLES_TO = ("updated_center", "previous_center")
# what Eq. 3's angles are measured to: the EMA center (one of ANGLES_TO; "center" is
# "updated_center") or the classifier weight row W_y
ANGLE_REFERENCES = ("center", *ANGLES_TO, "weight")
CENTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# deprecated spellings -> the current ones
_ALIASES = {"centre": "center", "updated_centre": "updated_center", "previous_centre": "previous_center"}


def _is_int(value, low) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value >= low


def parse_center_dtype(value) -> Optional[torch.dtype]:
    """A centre storage dtype from a torch dtype or its name ("float16"), None if it is not one."""
    if isinstance(value, str):
        return {str(dtype).removeprefix("torch."): dtype for dtype in CENTER_DTYPES}.get(value.removeprefix("torch."))
    return value if value in CENTER_DTYPES else None


@dataclass(frozen=True)
class Option:
    """One hyper-parameter: its default, what values it takes (for the error) and what it means."""
    name: str
    default: object
    expected: str
    valid: Callable[[object], bool]
    help: str
    convert: Optional[Callable] = None  # to the stored type (int, float, torch.dtype)


OPTIONS = (
    Option("version", "full", f"one of {VERSIONS}", lambda v: v in VERSIONS,
           '"full" (Eq. 9: every class below the weighted mean variance gets a cloud) or "vanilla" '
           "(Eq. 6: the reference is the mean variance of the head classes, K_i > head_threshold)"),
    Option("head_threshold", None, "an integer >= 0 (T of the vanilla version)",
           lambda v: v is None or _is_int(v, 0),
           "T of the vanilla version: a class with more than T images is a head class (None: unset; "
           "required for the vanilla version)", lambda v: None if v is None else int(v)),
    Option("memory_factor", 1, "an integer >= 1 (P of Eq. 5)", lambda v: _is_int(v, 1),
           "P of Eq. 5: each class remembers its last K_i * P angles", int),
    Option("center_rate", 0.1, "a value in [0, 1) (gamma of Eq. 4)",
           lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
           "gamma of Eq. 4 (paper: 0.1)", float),
    Option("center_rate_weights", "batch_mean", f"one of {CENTER_RATE_WEIGHTS}", lambda v: v in CENTER_RATE_WEIGHTS,
           'which term of Eq. 4 gamma weighs: "batch_mean" (the center moves a step gamma toward the batch '
           'mean, centre loss\'s "learning rate of class center") or "previous_center" (Eq. 4 as printed: '
           "gamma on the old center). docs/choices.md measures both"),
    Option("start_epoch", 0, "an epoch >= 0", lambda v: _is_int(v, 0),
           "the epoch from which the feature cloud is applied (the statistics are tracked from the start)", int),
    Option("update_every", 1, "an integer >= 1", lambda v: _is_int(v, 1),
           "update the centers and angles every N training steps (paper, faces: 5)", int),
    Option("alpha_per_logit", True, "True or False", lambda v: isinstance(v, bool),
           'one alpha per (sample, logit) -- the paper\'s "alpha_x in R^{1 x C}" -- or one per sample'),
    Option("target_only", False, "True or False", lambda v: isinstance(v, bool),
           "alpha on the target logit only (Eq. 7 / 8 put it on every logit: False)"),
    Option("signed_alpha", True, "True or False", lambda v: isinstance(v, bool),
           "alpha ~ N(0, s^2) as the paper states (True) or |alpha| (False)"),
    Option("min_angles", 2, "an integer >= 2 (a variance needs 2 angles)", lambda v: _is_int(v, 2),
           "angles a class needs in memory before its variance is trusted", int),
    Option("angle_reference", "updated_center", f"one of {ANGLE_REFERENCES}", lambda v: v in ANGLE_REFERENCES,
           "what Eq. 3 measures the angles to: the EMA feature center after this batch's Eq. 4 update "
           '("updated_center"; "center" is the same), or before it ("previous_center"), or the '
           'classifier weight W_y ("weight")'),
    Option("center_dtype", "float32", "one of ('float32', 'float16', 'bfloat16')",
           lambda v: parse_center_dtype(v) is not None,
           "storage of the C x D centers (Eq. 4 is computed in float32 either way)", parse_center_dtype),
    Option("reset_stats", False, "True or False", lambda v: isinstance(v, bool),
           "on resume, load the model without its angular statistics, which start afresh (a checkpoint "
           "whose statistics were collected with another memory_factor, split or dimension is refused "
           "otherwise)"),
)
_BY_NAME = {option.name: option for option in OPTIONS}


def canonical(value):
    """A deprecated spelling ("previous_centre") replaced by the current one, with a warning."""
    if isinstance(value, str) and value in _ALIASES:
        warnings.warn(f"{value!r} is deprecated: use {_ALIASES[value]!r} (the paper's spelling)",
                      DeprecationWarning, stacklevel=4)
        return _ALIASES[value]
    return value


def check_option(name: str, value, key: Optional[str] = None):
    """``value`` of option ``name`` in its canonical form (deprecated spellings replaced, integers
    made ``int``), or a ValueError naming ``key`` (how the user wrote the option; default ``name``)."""
    option = _BY_NAME[name]
    value = canonical(value)
    if not option.valid(value):
        raise ValueError(f"{key or name}={value!r} is invalid: expected {option.expected}. {option.name}: "
                         f"{option.help}")
    return value if option.convert is None else option.convert(value)


def check_head_threshold(version, head_threshold, key=lambda name: name) -> None:
    """The vanilla version needs T (Eq. 6's head classes are those with more than T images)."""
    if version == "vanilla" and head_threshold is None:
        raise ValueError(f"{key('head_threshold')} must be set (>= 0) for {key('version')} 'vanilla': "
                         f"classes with more than T images are head (paper Section 3.4)")


class _Checked:
    """What ``LEAPOptions`` adds to its fields (which ``OPTIONS`` gives): one check, and the readings."""

    def __post_init__(self):
        for field in fields(self):
            object.__setattr__(self, field.name, check_option(field.name, getattr(self, field.name)))
        check_head_threshold(self.version, self.head_threshold)

    @classmethod
    def from_mapping(cls, values: Mapping, key: Callable[[str], str] = lambda name: name) -> "LEAPOptions":
        """Check ``values`` ({option name: value}; missing options take their default) once.

        ``key(name)`` is how the user wrote an option (e.g. ``MODEL.HEADS.LEAP.MEMORY_FACTOR``):
        every error names it. Unknown names are an error listing the known ones.
        """
        unknown = sorted(set(values) - set(_BY_NAME))
        if unknown:
            raise ValueError(f"unknown LEAP option(s) {[key(name) for name in unknown]}; known: "
                             f"{[key(option.name) for option in OPTIONS]}")
        checked = {name: check_option(name, value, key(name)) for name, value in values.items()}
        check_head_threshold(checked.get("version", "full"), checked.get("head_threshold"), key)
        return cls(**checked)

    @property
    def angles_to(self) -> str:
        """The ``angles_to`` of AngularStats (for "weight" the centers are still tracked, as
        "updated_center")."""
        return "previous_center" if self.angle_reference == "previous_center" else "updated_center"

    @property
    def angle_to_weight(self) -> bool:
        """Eq. 3's angles are measured to the classifier weight rows W_y (the host passes them)."""
        return self.angle_reference == "weight"


# one field per option, in OPTIONS' order and with its default: the list is written once
LEAPOptions = make_dataclass("LEAPOptions", [(o.name, object, dataclass_field(default=o.default)) for o in OPTIONS],
                             bases=(_Checked,), frozen=True)
LEAPOptions.__module__ = __name__
LEAPOptions.__doc__ = """One checked set of LEAP options: a frozen dataclass with one field per entry of ``OPTIONS``
(each one's meaning, default and allowed values are there). Build it with :meth:`from_mapping`
(what both adapters do, so errors name the user's key), or directly with keyword arguments (also
checked). ``center_dtype`` is stored as a torch dtype, ``head_threshold`` as an int or None."""
