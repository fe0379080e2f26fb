"""The Omniglot source both hosts' demos train on (no host imported here).

Omniglot (Lake et al., Science 2015; MIT licence) holds handwritten characters, each drawn once by
20 people: ``<alphabet>/character<NN>/<charid>_<drawer>.png``. ``find_omniglot_source`` finds it,
``prepare`` unpacks it once (keyed by content), ``index_characters`` lists every character's
drawings and ``round_robin`` gives the fixed character order whose position ``i`` sets the role of
a character (``i % 4 == 3`` test, ``== 2`` validation, the rest training): the FastReID protocol
(``leap_plugin.fastreid.omniglot``) and the face benchmark (``leap_plugin.insightface.omniglot``).

The source is found in this order: the ``OMNIGLOT_ROOT`` environment variable (a folder or a
zip), ``<datasets root>/omniglot/`` (a folder or ``images_background_small1.zip``), the copy in
``../shared/data/omniglot/`` beside this repository, and finally a download of
``images_background_small1.zip`` (into ``<datasets root>/omniglot/``) from the public
brendenlake/omniglot repository, checked by
sha256.
"""
import hashlib
import logging
import os
import re
import shutil
import urllib.request
import zipfile

from PIL import Image
from tqdm import tqdm

__all__ = ["find_omniglot_source", "prepare", "content_key", "index_characters", "round_robin", "OMNIGLOT_URL",
           "OMNIGLOT_SHA256", "NUM_QUERY_DRAWERS"]

logger = logging.getLogger(__name__)

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/images_background_small1.zip"
OMNIGLOT_SHA256 = "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"
ZIP_NAME = "images_background_small1.zip"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ZIP = os.path.join(REPO, "..", "shared", "data", "omniglot", ZIP_NAME)
NUM_QUERY_DRAWERS = 5
_IMAGE = re.compile(r"(?:^|/)([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    logger.info(f"downloading Omniglot from {OMNIGLOT_URL}")
    try:
        with urllib.request.urlopen(OMNIGLOT_URL, timeout=60) as response, open(dest + ".part", "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as err:
        raise FileNotFoundError(
            f"Omniglot was not found locally and could not be downloaded ({err}). Download "
            f"{OMNIGLOT_URL} by hand and set OMNIGLOT_ROOT to the zip (or its unpacked folder), or put "
            f"it at {dest}") from None
    if _sha256(dest + ".part") != OMNIGLOT_SHA256:
        os.remove(dest + ".part")
        raise ValueError(f"the download of {OMNIGLOT_URL} has the wrong sha256 (expected {OMNIGLOT_SHA256})")
    os.replace(dest + ".part", dest)


def find_omniglot_source(datasets_root):
    """The Omniglot folder or zip to use (see the module docstring for the order)."""
    explicit = os.environ.get("OMNIGLOT_ROOT")
    if explicit:
        if not os.path.exists(explicit):
            raise FileNotFoundError(f"OMNIGLOT_ROOT={explicit!r} does not exist: point it at an Omniglot "
                                    f"folder (<alphabet>/character<NN>/<id>_<drawer>.png) or zip")
        return explicit
    local = os.path.join(datasets_root, "omniglot")
    if os.path.isfile(os.path.join(local, ZIP_NAME)):
        return os.path.join(local, ZIP_NAME)
    if os.path.isdir(local) and any(not name.endswith(".zip") for name in os.listdir(local)):
        return local
    if os.path.isfile(SHARED_ZIP):
        return os.path.normpath(SHARED_ZIP)
    _download(os.path.join(local, ZIP_NAME))
    return os.path.join(local, ZIP_NAME)


def _source_files(source):
    """(relative path, opener) of every PNG in an Omniglot folder or zip."""
    if os.path.isdir(source):
        for dirpath, _, filenames in os.walk(source):
            for name in sorted(filenames):
                if name.endswith(".png"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, source), lambda path=path: open(path, "rb")
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        for name in sorted(archive.namelist()):
            if name.endswith(".png"):
                yield name, lambda name=name: archive.open(name)
    else:
        raise ValueError(f"{source} is neither a folder nor a zip file")


def content_key(source):
    """12 hex digits of sha256 over the source's PNG paths and bytes (a zip's members or a folder's
    files): the same images give the same key at any path (so the prepared folder, and the image
    paths in a published split, are the same everywhere), and changed images give a new one."""
    digest = hashlib.sha256()
    for rel, opener in sorted(_source_files(source), key=lambda item: item[0]):
        with opener() as f:
            digest.update(f"{rel.replace(os.sep, '/')}\0".encode() + f.read())
    return digest.hexdigest()[:12]


def prepare(source, datasets_root):
    """The images of ``source`` as 8-bit grayscale PNGs, written once under the datasets root.

    Omniglot's PNGs are 1-bit; fastreid's ``read_image`` turns those into a boolean RGB array that
    PIL cannot convert back (``Cannot handle this data type: (1, 1, 3), |b1``). The folder is
    keyed by the images' content (``content_key``), not by the source's path.
    """
    dest = os.path.join(datasets_root, "omniglot-prepared", content_key(source))
    if os.path.isfile(os.path.join(dest, ".complete")):
        return dest
    files = list(_source_files(source))
    if not files:
        raise FileNotFoundError(f"no Omniglot images (<alphabet>/character<NN>/<id>_<drawer>.png) in {source}")
    for rel, opener in tqdm(files, desc="preparing Omniglot", unit="img", disable=None):
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with opener() as f:
            Image.open(f).convert("L").save(out)
    with open(os.path.join(dest, ".complete"), "w") as f:
        f.write(os.path.abspath(source) + "\n")
    return dest


def index_characters(folder):
    """{(alphabet, character): [(path, drawer), ...]} of every Omniglot image below ``folder``."""
    characters = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            match = _IMAGE.search(path.replace(os.sep, "/"))
            if match:
                alphabet, character, _, drawer = match.groups()
                characters.setdefault((alphabet, character), []).append((path, int(drawer)))
    if not characters:
        raise FileNotFoundError(f"no Omniglot images (<alphabet>/character<NN>/<id>_<drawer>.png) under {folder}")
    return characters


def round_robin(characters):
    """Characters ordered by character number, then alphabet: each slice spans all alphabets."""
    return sorted(characters, key=lambda key: (int(key[1][len("character"):]), key[0]))
