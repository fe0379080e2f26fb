"""Two-process gloo DDP on CPU: LEAPHead statistics identical on both ranks and equal to a
single-process run on the concatenated batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from leap_plugin.fastreid import LEAPHead

from reid_fixtures import tiny_cfg

COUNTS = torch.tensor([8, 8, 3, 3, 2])
STEPS = 4


def _batches():
    gen = torch.Generator().manual_seed(0)
    # rank 0 gets 6 samples per step, rank 1 gets 4: unequal sizes are padded and dropped
    return [[(torch.randn(n, 512, 1, 1, generator=gen), torch.randint(0, 5, (n,), generator=gen))
             for n in (6, 4)] for _ in range(STEPS)]


def _make_head():
    torch.manual_seed(1)
    # no BN neck: BN batch statistics differ per rank and would change the features themselves
    head = LEAPHead(tiny_cfg(**{"MODEL.HEADS.NUM_CLASSES": 5, "MODEL.HEADS.LEAP.START_EPOCH": 0,
                                "MODEL.HEADS.WITH_BNNECK": False}))
    head.set_class_counts(COUNTS)
    return head.train()


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    head = _make_head()
    model = DistributedDataParallel(head)
    for step in _batches():
        feats, labels = step[rank]
        model(feats, labels)["cls_outputs"].sum().backward()
    torch.save({k: v.clone() for k, v in head.stats.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_statistics_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = _make_head()
    for step in _batches():
        single(torch.cat([step[0][0], step[1][0]]), torch.cat([step[0][1], step[1][1]]))
    want = single.stats.state_dict()
    assert int(want["num_written"].sum()) == STEPS * 10
    for key, value in want.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, atol=1e-6, rtol=0, msg=key)
