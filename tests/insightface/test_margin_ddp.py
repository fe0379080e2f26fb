"""LEAPMarginLoss under model parallelism: 2 processes, gloo, CPU.

Each rank holds the class block PartialFC_V2 gives it. Against a single process holding every
class, with the same data, seed and steps:

* the logits of each rank's (all or sampled) columns, the loss of the whole softmax, and the
  gradients w.r.t. the weight shard and the embeddings are the same;
* each rank's per-class statistics are the single-process statistics of its block, and the
  cloud std of every row (one all-reduce over the blocks) is the single-process one.

Then the same with arcface_torch's REAL ``PartialFC_V2`` (forward/backward through its own
AllGather and DistCrossEntropy), when an insightface checkout is available. PartialFC_V2 puts a
few buffers on the GPU with ``Tensor.cuda()``; the worker makes that call return the tensor
unchanged (CPU), which is the only change: the module, its sampling and its collectives run as is.
"""
import importlib.util
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from leap_plugin.insightface import LEAPMarginLoss, class_block

WORLD = 2
C, D, B_LOCAL, STEPS = 11, 8, 6, 4
COUNTS = torch.tensor([60, 50, 40, 30, 5, 5, 4, 5, 3, 5, 2])
S, M = 64.0, 0.5
SAMPLE_RATE = 0.7  # 4 of 6 / 3 of 5 columns: at least every positive, as PartialFC_V2 samples


def make_loss(per_logit, **kw):
    """float32 centres: the comparisons below are exact to float32 (16-bit storage: tests/core)."""
    return LEAPMarginLoss(COUNTS, D, margin="arc", scale=S, margin_value=M, version="full",
                          update_every=2, start_epoch=1, alpha_per_logit=per_logit, seed=11,
                          center_dtype=torch.float32, **kw)


def make_data():
    """The same global batches on every process: weights [C, D], per step (embeddings, labels)."""
    g = torch.Generator().manual_seed(2024)
    weight = torch.randn(C, D, generator=g)
    probs = COUNTS.double() / COUNTS.sum()
    steps = []
    for _ in range(STEPS):
        labels = torch.multinomial(probs, WORLD * B_LOCAL, replacement=True, generator=g)
        centers = weight[labels] * 2
        emb = centers + torch.randn(WORLD * B_LOCAL, D, generator=g)
        steps.append((emb, labels))
    return weight, steps


def sample_columns(labels_local, num_local, generator):
    """PartialFC_V2's rule: every positive class, then random others, sorted (local indices)."""
    positive = torch.unique(labels_local[labels_local >= 0])
    num_sample = int(SAMPLE_RATE * num_local)
    perm = torch.rand(num_local, generator=generator)
    perm[positive] = 2.0
    return torch.topk(perm, k=max(num_sample, positive.numel()))[1].sort()[0]


def _sharded_run(rank, per_logit, sampled):
    """This rank's side of a PartialFC_V2-style class-sharded classifier with the LEAP loss."""
    weight, steps = make_data()
    start, local = class_block(C, rank, WORLD)
    loss = make_loss(per_logit).train()
    assert (loss.class_start, loss.num_local) == (start, local)
    gen = torch.Generator().manual_seed(100 + rank)
    record = []
    for step, (emb_all, lab_all) in enumerate(steps):
        if step == 2:
            loss.set_epoch(1)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        loss.observe(emb_all[rows], lab_all[rows][:, None])  # what the pre-hook would see
        std = loss.observed.std if loss.observed.cloud else None  # every global row's cloud std
        # PartialFC_V2's forward: gather, remap labels, (sample), cosines of the local shard
        parts = [torch.empty(B_LOCAL, D) for _ in range(WORLD)]
        dist.all_gather(parts, emb_all[rows].contiguous())
        emb = torch.cat(parts).requires_grad_()
        w = weight[start:start + local].clone().requires_grad_()
        inside = (lab_all >= start) & (lab_all < start + local)
        labels = torch.where(inside, lab_all - start, torch.full_like(lab_all, -1))
        index = sample_columns(labels, local, gen) if sampled else torch.arange(local)
        labels = torch.where(labels >= 0, torch.searchsorted(index, labels.clamp(min=0)), labels)
        cosine = (F.normalize(emb) @ F.normalize(w[index]).t()).clamp(-1, 1)
        out = loss(cosine, labels[:, None], columns=start + index if sampled else None)
        # the softmax over every rank's columns (gathered, padded), its loss and the gradient
        width = torch.tensor([index.numel()])
        widths = [torch.zeros_like(width) for _ in range(WORLD)]
        dist.all_gather(widths, width)
        pad = int(max(widths)) - index.numel()
        padded_out = torch.cat([out.detach(), out.new_full((out.shape[0], pad), float("-inf"))], 1)
        padded_cols = torch.cat([start + index, index.new_full((pad,), -1)])
        outs = [torch.empty_like(padded_out) for _ in range(WORLD)]
        cols = [torch.empty_like(padded_cols) for _ in range(WORLD)]
        dist.all_gather(outs, padded_out)
        dist.all_gather(cols, padded_cols)
        full = torch.cat([o[:, :int(n)] for o, n in zip(outs, widths)], 1).requires_grad_()
        full_cols = torch.cat([c[:int(n)] for c, n in zip(cols, widths)])
        target = torch.searchsorted(full_cols, lab_all)
        ce = F.cross_entropy(full, target)
        ce.backward()
        offset = sum(int(n) for n in widths[:rank])
        out.backward(full.grad[:, offset:offset + index.numel()])
        dist.all_reduce(emb.grad)
        record.append(dict(out=out.detach(), columns=start + index, loss=ce.detach(),
                           w_grad=w.grad, emb_grad=emb.grad, union=full_cols, std=std))
    state = {k: v.clone() for k, v in loss.stats.state_dict().items()}
    return dict(steps=record, stats=state, var=loss.stats.var)


def _real_partial_fc_run(rank, arcface_dir, per_logit, sample_rate):
    spec = importlib.util.spec_from_file_location("partial_fc_v2", Path(arcface_dir) / "partial_fc_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weight, steps = make_data()
    loss = make_loss(per_logit)
    pfc = module.PartialFC_V2(loss, D, C, sample_rate, False).train()
    start, local = class_block(C, rank, WORLD)
    assert (pfc.class_start, pfc.num_local) == (start, local)
    with torch.no_grad():
        pfc.weight.copy_(weight[start:start + local])
    loss.attach(pfc)
    torch.manual_seed(300 + rank)  # PartialFC_V2 samples with the global generator
    record = []
    for step, (emb_all, lab_all) in enumerate(steps):
        if step == 2:
            loss.set_epoch(1)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        emb = emb_all[rows].clone().requires_grad_()
        pfc.zero_grad()
        value = pfc(emb, lab_all[rows].clone()[:, None])
        value.backward()
        index = pfc.weight_index.clone() if sample_rate < 1 else torch.arange(local)
        record.append(dict(loss=value.detach(), w_grad=pfc.weight.grad.clone(), emb_grad=emb.grad.clone(),
                           columns=start + index))
    state = {k: v.clone() for k, v in loss.stats.state_dict().items()}
    return dict(steps=record, stats=state, pfc_keys=sorted(pfc.state_dict()))


def _worker(rank, port, out_dir, arcface_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        results = {}
        for per_logit in (True, False):
            for sampled in (False, True):
                results[("sharded", per_logit, sampled)] = _sharded_run(rank, per_logit, sampled)
        if arcface_dir:
            torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU: see the module docstring
            for per_logit, rate in ((True, 1.0), (True, SAMPLE_RATE), (False, SAMPLE_RATE)):
                results[("pfc", per_logit, rate)] = _real_partial_fc_run(rank, arcface_dir, per_logit, rate)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, arcface_lookup):
    arcface, _ = arcface_lookup
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out), str(arcface) if arcface else ""), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], arcface


def _single_process(per_logit, columns_per_step):
    """All classes in one process; the loss over the given global columns, float grads."""
    weight, steps = make_data()
    loss = make_loss(per_logit).train()
    record = []
    for step, ((emb_all, lab_all), union) in enumerate(zip(steps, columns_per_step)):
        if step == 2:
            loss.set_epoch(1)
        loss.observe(emb_all, lab_all)
        std = loss.observed.std if loss.observed.cloud else None
        emb = emb_all.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        out = loss((F.normalize(emb) @ F.normalize(w).t()).clamp(-1, 1), lab_all[:, None])
        ce = F.cross_entropy(out[:, union], torch.searchsorted(union, lab_all))
        ce.backward()
        record.append(dict(out=out.detach(), loss=ce.detach(), w_grad=w.grad, emb_grad=emb.grad, std=std))
    return record, loss


@pytest.mark.parametrize("per_logit", [True, False])
@pytest.mark.parametrize("sampled", [False, True])
def test_sharded_equals_single_process(ranks, per_logit, sampled):
    results, _ = ranks
    runs = [r[("sharded", per_logit, sampled)] for r in results]
    unions = [step["union"] for step in runs[0]["steps"]]
    single, loss = _single_process(per_logit, unions)
    for step, ref in enumerate(single):
        for rank, run in enumerate(runs):
            got = run["steps"][step]
            start, local = class_block(C, rank, WORLD)
            torch.testing.assert_close(got["out"], ref["out"][:, got["columns"]], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got["loss"], ref["loss"])
            torch.testing.assert_close(got["w_grad"], ref["w_grad"][start:start + local],
                                       rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["emb_grad"], ref["emb_grad"], rtol=1e-4, atol=1e-6)
            assert (got["std"] is None) == (ref["std"] is None) == (step < 2)
            if step >= 2:
                assert (ref["std"] > 0).any()
                torch.testing.assert_close(got["std"], ref["std"])
    # not vacuous: the cloud is off in steps 0-1 (plain ArcFace) and changes the logits in 2-3
    weight, steps = make_data()
    plain = make_loss(per_logit).eval()
    for step, ref in enumerate(single):
        emb, lab = steps[step]
        logits = plain((F.normalize(emb) @ F.normalize(weight).t()).clamp(-1, 1), lab[:, None])
        assert torch.allclose(ref["out"], logits) == (step < 2)
    # statistics: each rank's block equals the single-process statistics of those classes
    for rank, run in enumerate(runs):
        start, local = class_block(C, rank, WORLD)
        block = slice(start, start + local)
        ref_state = loss.stats.state_dict()
        for key in ("centers", "num_written", "angle_sum", "angle_sq_sum", "class_counts"):
            torch.testing.assert_close(run["stats"][key], ref_state[key][block], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run["var"], loss.stats.var[block], equal_nan=True)


@pytest.mark.parametrize("case", [(True, 1.0), (True, SAMPLE_RATE), (False, SAMPLE_RATE)])
def test_real_partial_fc_v2_equals_single_process(ranks, arcface_lookup, case):
    results, arcface = ranks
    if not arcface:
        pytest.skip(f"the real PartialFC_V2 needs arcface_torch: {arcface_lookup[1]}")
    per_logit, rate = case
    runs = [r[("pfc", per_logit, rate)] for r in results]
    assert any(k.startswith("margin_softmax.stats.") for k in runs[0]["pfc_keys"])  # in its checkpoint
    unions = [torch.cat([run["steps"][s]["columns"] for run in runs]) for s in range(STEPS)]
    if rate < 1:
        assert all(u.numel() < C for u in unions)  # the sampling really dropped columns
    single, loss = _single_process(per_logit, unions)
    for step, ref in enumerate(single):
        for rank, run in enumerate(runs):
            got = run["steps"][step]
            start, local = class_block(C, rank, WORLD)
            torch.testing.assert_close(got["loss"].reshape(()), ref["loss"], rtol=1e-5, atol=1e-5)
            w_ref = torch.zeros(local, D)
            cols = got["columns"]
            w_ref[cols - start] = ref["w_grad"][cols]
            torch.testing.assert_close(got["w_grad"], w_ref, rtol=1e-4, atol=1e-6)
            # PartialFC_V2's AllGather backward scales by the world size (DDP then averages)
            rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            torch.testing.assert_close(got["emb_grad"], WORLD * ref["emb_grad"][rows], rtol=1e-4, atol=1e-6)
    for rank, run in enumerate(runs):
        start, local = class_block(C, rank, WORLD)
        ref_state = loss.stats.state_dict()
        for key in ("centers", "num_written", "angle_sum"):
            torch.testing.assert_close(run["stats"][key], ref_state[key][start:start + local],
                                       rtol=1e-5, atol=1e-6)
