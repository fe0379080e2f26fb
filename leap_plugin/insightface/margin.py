"""Deprecated module name: the face loss lives in ``leap_plugin.insightface.loss`` (this name was
too close to ``leap_plugin.core.margins``); the keyed draws in ``leap_plugin.core.noise``."""
import warnings

from ..core.noise import KeyedNormal, keyed_normal  # noqa: F401
from .loss import LEAPMarginLoss, class_block  # noqa: F401

warnings.warn("leap_plugin.insightface.margin is deprecated: import LEAPMarginLoss from leap_plugin.insightface",
              DeprecationWarning, stacklevel=2)
