"""Omniglot as a FastReID identity-retrieval dataset: ``Omniglot`` and ``Omniglot_LT``.

Omniglot (Lake et al., Science 2015; MIT licence) holds handwritten characters, each drawn once by
20 people: ``<alphabet>/character<NN>/<charid>_<drawer>.png``. A character is an identity, its
drawings are its images, the drawer is the "camera". Any Omniglot-layout folder or zip works
(the background set, the evaluation set, or the small subsets).

Protocol (fixed, identity-disjoint, the same on every machine):

* characters are put in round-robin order over alphabets (sorted by character number, then
  alphabet), so every slice of that order spans all alphabets; position ``i`` in that order is
  the character's pid;
* ``i % 4 == 3``: test characters, never seen in training. Drawers 1-5 of each test character
  are its queries, drawers 6-20 its gallery (each drawer its own camera id, so FastReID's
  same-camera filter removes no true match);
* ``i % 4 == 2``: validation characters. In ``OmniglotVal`` they become the query/gallery set
  (same rule) and the training set is the remaining half: choose hyper-parameters there, never
  on the test characters. In ``Omniglot`` they join the training set;
* ``Omniglot_LT`` / ``OmniglotVal_LT`` cut the training set by the long-tail rule of the re-ID
  datasets.

The source: ``leap_plugin.omniglot.find_omniglot_source`` (``OMNIGLOT_ROOT``, the datasets root,
the shared copy beside this repository, or a checked download).
"""
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset

from ..omniglot import (NUM_QUERY_DRAWERS, OMNIGLOT_SHA256, OMNIGLOT_URL, find_omniglot_source,  # noqa: F401
                        index_characters, prepare, round_robin)
from .datasets import register_long_tail

__all__ = ["Omniglot", "OmniglotVal", "find_omniglot_source", "index_characters", "OMNIGLOT_URL", "OMNIGLOT_SHA256"]


@DATASET_REGISTRY.register()
class Omniglot(ImageDataset):
    """Omniglot characters as identities, drawers as cameras (protocol: module docstring);
    query/gallery are the test characters."""
    dataset_name = "omniglot"
    split = "test"

    def __init__(self, root="datasets", **kwargs):
        split = self.split
        folder = prepare(find_omniglot_source(root), root)
        characters = index_characters(folder)
        train, query, gallery = [], [], []
        for pid, key in enumerate(round_robin(characters)):
            role = pid % 4
            held_out = role == 3 if split == "test" else role == 2
            if split == "val" and role == 3:
                continue  # the test characters take no part in validation
            for path, drawer in sorted(characters[key]):
                if held_out:
                    (query if drawer <= NUM_QUERY_DRAWERS else gallery).append((path, pid, drawer - 1))
                else:
                    train.append((path, f"{self.dataset_name}_{pid:04d}", f"{self.dataset_name}_{drawer - 1}"))
        super().__init__(train, query, gallery, **kwargs)


@DATASET_REGISTRY.register()
class OmniglotVal(Omniglot):
    """Omniglot's validation protocol: query/gallery are the validation characters and training
    uses the rest of the training characters (choose hyper-parameters here, not on the test set)."""
    split = "val"


register_long_tail("Omniglot")
register_long_tail("OmniglotVal")
