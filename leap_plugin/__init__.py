"""leap-plugin: LEAP (learnable embedding augmentation, "feature cloud") for FastReID and
InsightFace arcface_torch.

``leap_plugin.core`` holds the method (torch only); ``import leap_plugin.fastreid`` registers the
FastReID head, trainer hook and long-tailed datasets; ``leap_plugin.insightface`` holds the
PartialFC_V2 margin loss and the RecordIO tools.
"""
__version__ = "0.1.0"
