"""Fixtures of the InsightFace tests: arcface_torch (the host), a tiny Omniglot face set, and the real
mxnet 1.9.1 in a venv of its own for the RecordIO cross-checks.

arcface_torch is found by ``leap_plugin.insightface.host.locate_arcface_torch``: ``$INSIGHTFACE_ROOT``,
else ``~/.cache/leap-plugin/insightface`` (an insightface checkout or its arcface_torch folder); the
tests that need it skip, saying so, where there is none.

mxnet 1.9.1 imports only with numpy < 1.24, so it cannot live in the project's .venv (numpy 2).
The session fixture ``mxnet_env`` creates ``.venv-mxnet`` at the repository root once
(``python -m venv`` + ``pip install`` of ``MXNET_REQUIREMENTS``; about 20 s with a package
registry, then reused) and runs small scripts in it with ``subprocess``.

Environment variables:
  LEAP_MXNET_VENV=PATH  use or create the venv at PATH instead of .venv-mxnet
  LEAP_NO_MXNET=1       do not use mxnet at all (the tests then check against the committed
                        golden files in tests/insightface/golden/ and skip what needs mxnet live)

If the venv cannot be created (no network), the fixture says why, and the same fallback applies.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from face_fixtures import COUNTS, jpeg

from leap_plugin.insightface.ms1m import write_ms1m
from leap_plugin.insightface.recordio import IndexedRecordWriter

from leap_plugin.insightface.host import locate_arcface_torch

REPO = Path(__file__).resolve().parents[2]
MXNET_REQUIREMENTS = ("numpy==1.23.5", "mxnet==1.9.1", "opencv-python-headless==4.8.1.78")
_STAMP = ".leap-mxnet-requirements"


class MXNetEnv:
    """A Python interpreter with mxnet 1.9.1, or the reason there is none."""

    def __init__(self, python: Optional[str], reason: str = ""):
        self.python = python
        self.reason = reason

    @property
    def available(self) -> bool:
        return self.python is not None

    def require(self) -> None:
        """Skip the calling test when mxnet is not available."""
        if not self.available:
            pytest.skip(f"real mxnet unavailable: {self.reason}")

    def run(self, script: str, *args, timeout: float = 300) -> str:
        """Run ``script`` (Python source) with mxnet's interpreter; returns its stdout."""
        self.require()
        proc = subprocess.run([self.python, "-c", script, *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, cwd=str(REPO))
        if proc.returncode != 0:
            raise AssertionError(f"mxnet script failed (exit {proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def run_json(self, script: str, *args, timeout: float = 300):
        """Run ``script`` and parse the JSON object it prints last."""
        return json.loads(self.run(script, *args, timeout=timeout).strip().splitlines()[-1])


def _create_venv(path: Path) -> str:
    """Create (or reuse) the mxnet venv at ``path``; returns its python. Raises on failure."""
    python = path / "bin" / "python"
    want = "\n".join(MXNET_REQUIREMENTS)
    stamp = path / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    if path.exists():
        shutil.rmtree(path)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True,
                       text=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--timeout", "30", "--retries", "2", *MXNET_REQUIREMENTS],
                       check=True, capture_output=True, text=True, timeout=900)
        subprocess.run([str(python), "-c", "import mxnet, cv2"], check=True, capture_output=True,
                       text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(path, ignore_errors=True)
        detail = (getattr(exc, "stderr", "") or "").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(map(str, exc.cmd))[:200]} failed: {' | '.join(detail)}")
    stamp.write_text(want)
    return str(python)


@pytest.fixture(scope="session")
def mxnet_env() -> MXNetEnv:
    """mxnet 1.9.1 in .venv-mxnet (created on first use), or why it is not available."""
    if os.environ.get("LEAP_NO_MXNET", "") not in ("", "0"):
        return MXNetEnv(None, "LEAP_NO_MXNET is set")
    path = Path(os.environ.get("LEAP_MXNET_VENV") or REPO / ".venv-mxnet").resolve()
    lock_name = "leap-mxnet-venv-" + hashlib.sha1(str(path).encode()).hexdigest()[:12] + ".lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest runs at once build the venv only once
        try:
            return MXNetEnv(_create_venv(path))
        except (OSError, RuntimeError) as exc:
            return MXNetEnv(None, f"could not create the mxnet venv at {path}: {exc}")


@pytest.fixture(scope="session")
def arcface_lookup():
    """(arcface_torch folder, "") or (None, why there is none)."""
    try:
        return locate_arcface_torch(), ""
    except FileNotFoundError as error:
        return None, str(error)


@pytest.fixture(scope="session")
def arcface_torch(arcface_lookup) -> Path:
    """arcface_torch's folder; the test skips with the reason where there is none."""
    root, reason = arcface_lookup
    if root is None:
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def tiny_face(tmp_path_factory) -> Path:
    """A tiny long-tailed face set from the shared Omniglot images: the test-split ``train.rec``
    (102 characters) cut by ``tools/make_longtail_rec.py`` to 4 head characters (20 images) and 8
    tail characters (5 images), and ``omniglot_test.bin``: 68 pairs of the never-trained test
    characters (symlinked beside ``train.rec``, where arcface_torch looks for it)."""
    from leap_plugin.insightface.omniglot import make_omniglot_face
    root = tmp_path_factory.mktemp("face")
    make_omniglot_face(root / "source", "test", pairs_per_character=1)
    subprocess.run([sys.executable, str(REPO / "tools" / "make_longtail_rec.py"), "--src", str(root / "source"),
                    "--dst", str(root / "lt"), "--num-head", "4", "--num-tail", "8", "--tail-images", "5",
                    "--no-progress"], check=True, capture_output=True, text=True, timeout=300)
    return root / "lt"


@pytest.fixture
def host_modules(arcface_torch, tmp_path):
    """arcface_torch first on sys.path for one test; sys.path / sys.modules restored after it (the host's
    modules, and what compat patched in them, are gone afterwards)."""
    path, modules = list(sys.path), dict(sys.modules)
    sys.path.insert(0, str(arcface_torch))
    yield arcface_torch
    sys.path[:] = path
    for name in set(sys.modules) - set(modules):  # only arcface_torch's
        origin = str(getattr(sys.modules[name], "__file__", "") or "")
        if origin.startswith((str(arcface_torch), str(tmp_path))) or \
                name.split(".")[0] in ("configs", "utils", "eval"):
            del sys.modules[name]
    sys.modules.update(modules)


@pytest.fixture(scope="module")
def arcface(arcface_torch):
    return arcface_torch


@pytest.fixture
def world1(monkeypatch):
    """A world-1 gloo process group (single-GPU arcface_torch), torn down after the test."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An MS1M-style train.rec/train.idx written by our writer, plus {payload: (key, identity)}."""
    src = tmp_path_factory.mktemp("ms1m")
    images = [(float(i), jpeg(i, n)) for i, count in enumerate(COUNTS) for n in range(count)]
    with IndexedRecordWriter(src / "train.idx", src / "train.rec") as writer:
        write_ms1m(writer, COUNTS, images)
    (src / "lfw.bin").write_bytes(b"verification pairs")
    (src / "property").write_text("12,112,112\n")
    payload_of = {payload: (key, int(label)) for key, (label, payload) in enumerate(images, 1)}
    assert len(payload_of) == len(images)
    return src, payload_of
