"""LEAP core: torch only, no host framework imported here.

``LEAP`` (``leap.py``) is the method as one object: the options (``LEAPOptions``, ``options.py``),
``AngularStats`` (Eq. 3-5), ``FeatureCloud`` (Eq. 6, Eq. 9, alpha sampling), the epoch gating and
the noise (``noise.py``); ``leap_logits`` (Eq. 7, Eq. 8) makes the logits.
"""
from .cloud import FeatureCloud
from .leap import LEAP
from .margins import leap_logits
from .options import OPTIONS, LEAPOptions
from .stats import AngularStats

__all__ = ["LEAP", "LEAPOptions", "OPTIONS", "AngularStats", "FeatureCloud", "leap_logits"]
