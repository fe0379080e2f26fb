"""LEAP core: torch only, no host framework imported here.

``AngularStats`` (Eq. 3-5), ``FeatureCloud`` (Eq. 6, Eq. 9, alpha sampling) and ``leap_logits``
(Eq. 7, Eq. 8).
"""
from .cloud import FeatureCloud
from .margins import leap_logits
from .stats import AngularStats

__all__ = ["AngularStats", "FeatureCloud", "leap_logits"]
