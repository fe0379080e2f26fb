"""Deprecated module name: the MS1M long-tail tool is ``leap_plugin.insightface.ms1m`` (this name was
too close to ``leap_plugin.core.longtail``, the split rule both hosts share)."""
import warnings

from .ms1m import *  # noqa: F401,F403
from .ms1m import __all__  # noqa: F401

warnings.warn("leap_plugin.insightface.longtail is deprecated: use leap_plugin.insightface.ms1m",
              DeprecationWarning, stacklevel=2)
