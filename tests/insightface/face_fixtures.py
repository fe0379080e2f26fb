"""Helpers of the InsightFace tests (fixtures are in conftest.py): arcface_torch's modules loaded from
a checkout, small training batches and loops through the real PartialFC_V2, the synthetic MS1M
source's images, and the make_longtail_rec command line."""
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_longtail_rec.py"


def load_host(arcface, name):
    """An arcface_torch module (partial_fc_v2, losses, ...) loaded from its file, under its own name."""
    spec = importlib.util.spec_from_file_location(f"host_{name}", Path(arcface) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_batch(step, classes=9, dim=8, batch=12):
    """A seeded batch of embeddings (class-separated) and labels."""
    g = torch.Generator().manual_seed(step)
    labels = torch.randint(0, classes, (batch,), generator=g)
    return torch.randn(batch, dim, generator=g) + 2 * torch.eye(classes, dim)[labels] * 3, labels


def train(pfc, loss, steps, opt, start=0):
    """Steps [start, steps) of SGD through PartialFC_V2 (epoch = step // 3); the losses."""
    values = []
    for step in range(start, steps):
        loss.set_epoch(step // 3)  # as the tool's hooks do at each epoch start
        emb, labels = train_batch(step)
        emb.requires_grad_()
        value = pfc(emb, labels.clone())
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    return values


# images per identity of the synthetic source; identities 3 and 9 tie at 6 (ties: by ordinal)
COUNTS = [4, 9, 2, 6, 20, 1, 11, 7, 3, 6, 15, 5]


def jpeg(identity: int, n: int) -> bytes:
    """A small gradient JPEG, different for every (identity, image)."""
    y, x = np.mgrid[0:10, 0:12]
    img = np.stack([x * 20 + n, y * 25 + identity * 7, np.full_like(x, 11 * identity + 3 * n)], -1)
    ok, buf = cv2.imencode(".jpg", (img % 256).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def make_longtail_rec_tool():
    """tools/make_longtail_rec.py loaded as a module (its main is the CLI)."""
    spec = importlib.util.spec_from_file_location("make_longtail_rec", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
