"""The long-tailed split rule shared by both adapters (paper Section 4.1).

Rank the classes by their number of samples (ties broken by class key, so the order never depends
on how the data was listed), keep the top ``num_head`` classes whole, take the next ``num_tail``
classes (default: all the rest) and keep ``tail_images`` randomly chosen samples of each.

* re-ID: <H20, S5> = ``longtail_split(items, num_head=20, tail_images=5, seed=...)``
* faces: <H5K, T10K> = ``longtail_split(items, num_head=5000, tail_images=5, num_tail=10000, ...)``

The random choice of a class's samples depends only on (seed, class key, that class's sorted
items): adding or removing other classes never changes it, and it is the same on every machine.
"""
import hashlib
import random
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

__all__ = ["longtail_split", "rank_classes"]


def rank_classes(class_items: Mapping[Hashable, Sequence]) -> List[Hashable]:
    """Class keys sorted by sample count (descending), ties by key (ascending)."""
    return sorted(class_items, key=lambda k: (-len(class_items[k]), _sort_key(k)))


def _sort_key(value):
    return (type(value).__name__, value)


def _class_rng(seed: int, key) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{key!r}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def longtail_split(class_items: Mapping[Hashable, Sequence], num_head: int, tail_images: int,
                   seed: int = 0, num_tail: Optional[int] = None) -> Dict[Hashable, list]:
    """Apply the long-tail rule: {class key: kept items (sorted)} for head and tail classes.

    Args:
        class_items: every class's samples (any sortable items: paths, record indices).
        num_head: H, the number of largest classes kept whole.
        tail_images: S, the samples kept per tail class (a class with fewer keeps all it has).
        seed: the split's seed.
        num_tail: T, how many classes after the head become tail classes (None: all the rest).
    """
    for name, value in (("num_head", num_head), ("tail_images", tail_images)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if tail_images < 1:
        raise ValueError(f"tail_images (S) must be >= 1, got {tail_images}")
    if num_tail is not None and (int(num_tail) != num_tail or num_tail < 0):
        raise ValueError(f"num_tail (T) must be a non-negative integer or None, got {num_tail!r}")
    ranked = rank_classes(class_items)
    if num_head > len(ranked):
        raise ValueError(f"num_head={num_head} exceeds the {len(ranked)} classes in the data")
    tail_end = len(ranked) if num_tail is None else num_head + num_tail
    if tail_end > len(ranked):
        raise ValueError(f"num_head + num_tail = {tail_end} exceeds the {len(ranked)} classes in the data")
    split = {}
    for rank, key in enumerate(ranked[:tail_end]):
        items = sorted(class_items[key], key=_sort_key)
        if rank >= num_head and len(items) > tail_images:
            items = sorted(_class_rng(seed, key).sample(items, tail_images), key=_sort_key)
        split[key] = items
    return split
