"""Long-tailed versions of FastReID's datasets (paper Section 4.1), registered as ``<NAME>_LT``.

``Market1501_LT``, ``DukeMTMC_LT`` and ``MSMT17_LT`` are the host's datasets with the training
identities cut by the rule in ``leap_plugin.core.longtail``: rank identities by image count, keep
the top H whole, keep S images of every other identity (seeded, deterministic). Query and gallery
are the host's, untouched. ``register_long_tail(name)`` makes the ``_LT`` of any registered
ImageDataset. H, S and the seed come from DATASETS.LONG_TAIL (``LEAPTrainer`` passes them as the
``long_tail`` argument).

Published splits: every ``_LT`` dataset built by LEAPTrainer writes its split (identity -> kept
images, with H, S and the seed) as JSON into OUTPUT_DIR; DATASETS.LONG_TAIL.SPLIT_FILE loads such
a file instead of recomputing the split, so two users with the same file train on the same images.
"""
import json
import logging
import os
from collections import defaultdict

from fastreid.data.datasets import DATASET_REGISTRY

from ..core.longtail import longtail_split

__all__ = ["register_long_tail", "long_tail_items", "LONG_TAIL_DEFAULTS"]

logger = logging.getLogger(__name__)

LONG_TAIL_DEFAULTS = {"num_head": 20, "tail_images": 5, "seed": 0}  # <H20, S5>, as add_leap_config


def long_tail_items(items, num_head, tail_images, seed):
    """FastReID train items (img_path, pid, camid) cut to <H num_head, S tail_images>."""
    by_pid = defaultdict(list)
    for item in items:
        by_pid[item[1]].append(tuple(item))
    split = longtail_split(by_pid, num_head=num_head, tail_images=tail_images, seed=seed)
    return [item for pid in split for item in split[pid]]


def _split_identities(items, root):
    identities = defaultdict(list)
    for img_path, pid, _ in items:
        identities[str(pid)].append(os.path.relpath(img_path, root))
    return identities


def save_split(path, name, items, params, root):
    """Write the kept training images per identity (paths relative to the datasets root).

    An existing file with another split is never overwritten (it belongs to the earlier run in
    that OUTPUT_DIR, whose checkpoints were trained on it); the file is written atomically.
    """
    identities = _split_identities(items, root)
    if os.path.exists(path):
        try:
            with open(path) as f:
                same = json.load(f).get("identities") == identities
        except (ValueError, AttributeError):
            same = False
        if same:
            return
        raise ValueError(
            f"{path} holds another split than this run's ({name}, {len(items)} images): it is the "
            f"split of the earlier run in this OUTPUT_DIR. Train on it with DATASETS.LONG_TAIL.SPLIT_FILE "
            f"{path}, or use a new OUTPUT_DIR for the new split (move the file away to replace it)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"dataset": name, "rule": "leap_plugin.core.longtail.longtail_split", **params,
                   "num_images": len(items), "identities": identities}, f, indent=1)  # order kept
    os.replace(path + ".tmp", path)


def _read_split(path):
    """The ``identities`` of a split file, checked: {identity: [image, ...]}, no image twice."""
    def bad(what):
        return ValueError(f"DATASETS.LONG_TAIL.SPLIT_FILE {path}: {what} (expected a file as written to "
                          f"OUTPUT_DIR/long_tail_split.json: {{'dataset': ..., 'identities': "
                          f"{{identity: [image path, ...]}}}})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DATASETS.LONG_TAIL.SPLIT_FILE={path!r} does not exist")
    def unique_keys(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key is repeated in one object: {sorted(k for k in keys if keys.count(k) > 1)[:3]}")
        return dict(pairs)
    try:
        with open(path) as f:
            split = json.load(f, object_pairs_hook=unique_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"not valid JSON ({err})") from None
    if not isinstance(split, dict):
        raise bad(f"the top level is a {type(split).__name__}, not an object")
    identities = split.get("identities")
    if not isinstance(identities, dict):
        raise bad("no 'identities' object" if identities is None else
                  f"'identities' is a {type(identities).__name__}, not an object")
    if not identities:
        raise bad("'identities' is empty: the split keeps no training image")
    seen = {}
    for pid, rels in identities.items():
        if not isinstance(rels, list) or not rels or not all(isinstance(r, str) for r in rels):
            raise bad(f"identity {pid!r} must map to a non-empty list of image paths, got {rels!r:.80}")
        for rel in rels:
            if rel in seen:
                raise bad(f"image {rel} is listed twice (identities {seen[rel]!r} and {pid!r}): it "
                          f"would count twice in K_i")
            seen[rel] = pid
    return split


def load_split(path, name, items, root):
    """The training items a split file keeps; an error names the file and what is wrong with it."""
    split = _read_split(path)
    if split.get("dataset") != name:
        raise ValueError(f"split file {path} is for {split.get('dataset')!r}, not {name}")
    by_key = {(str(pid), os.path.relpath(img_path, root)): (img_path, pid, camid) for img_path, pid, camid in items}
    wanted = [(pid, rel) for pid, rels in split["identities"].items() for rel in rels]  # file order
    missing = [key for key in wanted if key not in by_key]
    if missing:
        raise ValueError(f"split file {path}: {len(missing)} images are not in {name} under {root}, "
                         f"e.g. identity {missing[0][0]} image {missing[0][1]}")
    return [by_key[key] for key in wanted]


def register_long_tail(base_name: str):
    """Register ``<base_name>_LT``: the registered dataset ``base_name`` with a long-tailed train set."""
    name = base_name + "_LT"
    try:  # fastreid's Registry has no __contains__; get() raises KeyError for unknown names
        return DATASET_REGISTRY.get(name)
    except KeyError:
        pass
    base = DATASET_REGISTRY.get(base_name)

    def __init__(self, root="datasets", long_tail=None, **kwargs):
        params = dict(LONG_TAIL_DEFAULTS, **(long_tail or {}))
        split_file, save_to = params.pop("split_file", ""), params.pop("save_split", "")
        try:
            base.__init__(self, root=root, **kwargs)
        except RuntimeError as err:
            if "is not found" not in str(err):
                raise
            raise FileNotFoundError(
                f"{name}: {err}. FastReID looks for datasets under the folder in the environment "
                f"variable FASTREID_DATASETS (now {os.environ.get('FASTREID_DATASETS', 'unset: ./datasets')!r}); "
                f"put {base_name} there in its usual layout or point FASTREID_DATASETS at it") from None
        full = self.train
        if split_file:
            self._train = load_split(split_file, name, full, root)
            source = f"split file {split_file}"
        else:
            self._train = long_tail_items(full, **params)
            source = f"<H{params['num_head']}, S{params['tail_images']}> seed {params['seed']}"
        if not self._train:  # FastReID's sampler would wait for an image forever
            raise ValueError(f"{name}: {source} keeps no training image")
        if save_to:
            save_split(save_to, name, self._train, params, root)
        if self.mode == "train":
            self.data = self._train
        logger.info(f"{name}: {source}: {len(self._train)} of {len(full)} training images kept")

    cls = type(name, (base,), {"__init__": __init__, "__doc__": f"{base_name} with a long-tailed train set "
                               "(paper Section 4.1; DATASETS.LONG_TAIL)."})
    DATASET_REGISTRY.register(cls)
    return cls


for _name in ("Market1501", "DukeMTMC", "MSMT17"):
    register_long_tail(_name)
