"""SyncBatchNorm under DistributedDataParallel on the CPU (gloo, 2 processes).

One module-scoped fixture spawns two ranks once; each runs every distributed scenario and saves
what it saw, and the tests compare that with single-process references computed here.
"""
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as TF

import sparseconv
from sparseconv.nn import (
    BatchNorm,
    ReLU,
    SparseConv3d,
    SparseGlobalAvgPool,
    SparseSequential,
    SubMConv3d,
    SyncBatchNorm,
)

WORLD = 2
SHAPE = (6, 6, 6)
BATCH = 2  # batch elements per rank (equal, so the mean loss over ranks is the mean over all samples)
VOXELS = (30, 17)  # voxels per rank in the model run (different on purpose)
STEPS = 3
LR = 0.1
MOMENTUM = 0.3
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


# ----------------------------------------------------------------------------- shared by ranks and reference
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = SparseSequential(
            SubMConv3d(3, 8, 3),
            BatchNorm(8, momentum=MOMENTUM),
            ReLU(),
            SparseConv3d(8, 8, 3, stride=2, padding=1),
        )
        self.pool = SparseGlobalAvgPool()
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.pool(self.body(x)))


def _make_net() -> _Net:
    torch.manual_seed(0)
    return _Net().double()


def _random_coords(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    cells = torch.randperm(batch * SHAPE[0] * SHAPE[1] * SHAPE[2], generator=gen)[:n].sort().values
    b, rest = cells // (SHAPE[0] * SHAPE[1] * SHAPE[2]), cells % (SHAPE[0] * SHAPE[1] * SHAPE[2])
    x, rest = rest // (SHAPE[1] * SHAPE[2]), rest % (SHAPE[1] * SHAPE[2])
    y, z = rest // SHAPE[2], rest % SHAPE[2]
    return torch.stack([b, x, y, z], 1).int()


def _rank_input(rank: int, step: int):
    """Input SparseTensor and regression target of one rank at one step (float64)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    n = VOXELS[rank] + step  # counts also change from step to step
    coords = _random_coords(n, BATCH, gen)
    assert set(coords[:, 0].tolist()) == set(range(BATCH))
    feats = torch.randn(coords.shape[0], 3, generator=gen, dtype=torch.float64)
    target = torch.randn(BATCH, 2, generator=gen, dtype=torch.float64)
    return sparseconv.SparseTensor(feats, coords, SHAPE, batch_size=BATCH), target


def _concat(tensors):
    """The ranks' inputs as one batch (rank r's batch elements after those of ranks < r)."""
    coords, offset = [], 0
    for t in tensors:
        c = t.coords.clone()
        c[:, 0] += offset
        coords.append(c)
        offset += t.batch_size
    feats = torch.cat([t.features for t in tensors])
    return sparseconv.SparseTensor(feats, torch.cat(coords), SHAPE, batch_size=offset)


def _standalone_feats(rank: int, scenario: str, step: int = 0):
    gen = torch.Generator().manual_seed(50_000 + 100 * step + 10 * rank + len(scenario))
    if scenario == "float32":
        n = (23, 41)[rank]
        return (1000.0 + 0.1 * torch.randn(n, 4, generator=gen, dtype=torch.float64)).float()
    if scenario == "empty_rank":
        n = (9, 0)[rank]
        return torch.randn(n, 4, generator=gen, dtype=torch.float64)
    if scenario == "all_empty":
        return torch.zeros(0, 4, dtype=torch.float64)
    if scenario == "three_d":
        n = (5, 2)[rank]
        return torch.randn(n, 4, 3, generator=gen, dtype=torch.float64)
    raise AssertionError(scenario)


def _upstream_grad(rank: int, shape, dtype):
    gen = torch.Generator().manual_seed(70_000 + rank)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _affine_init(bn: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.rand(bn.num_features, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))


# ----------------------------------------------------------------------------- ranks
def _rank_model_run(rank: int) -> dict:
    net = _make_net()
    model = SyncBatchNorm.convert_sync_batchnorm(net)
    bn = model.body[1]
    assert isinstance(bn, SyncBatchNorm)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    seen = {}

    def hook(module, args, out):
        seen["x"], seen["y"] = args[0].features, out.features
        seen["x"].retain_grad()
        seen["y"].retain_grad()

    handle = bn.register_forward_hook(hook)
    steps = []
    for step in range(STEPS):
        x, target = _rank_input(rank, step)
        w, b = bn.weight.detach().clone(), bn.bias.detach().clone()
        out = ddp(x)
        loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append({
            "weight": w, "bias": b,
            "bn_in": seen["x"].detach().clone(), "bn_out": seen["y"].detach().clone(),
            "bn_in_grad": seen["x"].grad.clone(), "bn_out_grad": seen["y"].grad.clone(),
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": bn.num_batches_tracked.clone(),
        })
    handle.remove()
    ddp.eval()
    x, _ = _rank_input(rank, STEPS)
    with torch.no_grad():
        eval_out = ddp(x)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"steps": steps, "state": state, "eval_out": eval_out}


def _rank_standalone(rank: int) -> dict:
    res = {}
    group = dist.new_group(list(range(WORLD)))  # every rank must create it

    # float32 data far from 0: a one-pass (E[x^2] - E[x]^2) variance would be garbage here.
    # momentum=None (cumulative average) and an explicit process_group, over two steps.
    bn = SyncBatchNorm(4, momentum=None, process_group=group)
    _affine_init(bn)
    res["float32"] = []
    for step in range(2):
        f = _standalone_feats(rank, "float32", step).requires_grad_()
        y = bn(f)
        g = _upstream_grad(rank, y.shape, y.dtype)
        bn.zero_grad()
        (y * g).sum().backward()
        res["float32"].append({
            "out": y.detach(), "in_grad": f.grad, "weight_grad": bn.weight.grad.clone(),
            "bias_grad": bn.bias.grad.clone(), "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(), "num_batches_tracked": bn.num_batches_tracked.clone(),
        })

    # One rank without voxels (a SparseTensor with N = 0), then every rank without voxels.
    for scenario in ("empty_rank", "all_empty"):
        bn = SyncBatchNorm(4).double()
        _affine_init(bn)
        f = _standalone_feats(rank, scenario).requires_grad_()
        coords = torch.zeros(f.shape[0], 4, dtype=torch.int32)
        coords[:, 3] = torch.arange(f.shape[0], dtype=torch.int32)
        x = sparseconv.SparseTensor(f, coords, spatial_shape=(1, 1, 16), batch_size=1)
        y = bn(x)
        assert isinstance(y, sparseconv.SparseTensor) and y.coordinate_set is x.coordinate_set
        g = _upstream_grad(rank, y.features.shape, y.dtype)
        (y.features * g).sum().backward()
        res[scenario] = {
            "out": y.features.detach(), "in_grad": f.grad, "weight_grad": bn.weight.grad.clone(),
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": bn.num_batches_tracked.clone(),
        }

    # [N, C, L] input (a converted plain BatchNorm1d may see one); no running stats.
    bn = SyncBatchNorm(4, track_running_stats=False).double()
    _affine_init(bn)
    f = _standalone_feats(rank, "three_d").requires_grad_()
    y = bn(f)
    (y * _upstream_grad(rank, y.shape, y.dtype)).sum().backward()
    res["three_d"] = {"out": y.detach(), "in_grad": f.grad}

    # Eval mode: no communication, running statistics (exactly BatchNorm).
    bn = SyncBatchNorm(4).double()
    _affine_init(bn)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    f = _standalone_feats(rank, "three_d")[:, :, 0]
    res["eval"] = {"out": bn(f), "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}
    return res


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=timedelta(seconds=TIMEOUT_S),
        )
        result = {"model": _rank_model_run(rank), "standalone": _rank_standalone(rank)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs both ranks once (killed and failed after TIMEOUT_S); returns their results by rank."""
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    # A fork server imports torch once for both ranks (faster than spawning two interpreters) and
    # forks them from a process that has run no parallel region; Windows only has spawn.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "sparseconv", __name__])
    else:
        ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out_dir), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = ""
    for r in range(WORLD):
        path = os.path.join(out_dir, f"rank{r}.err")
        if os.path.exists(path):
            errors += f"--- rank {r}:\n" + open(path).read()
    if hung:
        pytest.fail(f"ranks {hung} did not finish within {TIMEOUT_S} s\n{errors}")
    codes = [p.exitcode for p in procs]
    if any(codes) or errors:
        pytest.fail(f"ranks exited with codes {codes}\n{errors}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- single-process references
def _close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, **kw)


@pytest.fixture(scope="module")
def reference():
    """The same model (plain BatchNorm) trained on the concatenation of both ranks' batches."""
    net = _make_net()
    bn = net.body[1]
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    seen = {}
    handle = bn.register_forward_hook(lambda m, a, o: seen.update(x=a[0].features, y=o.features))
    steps = []
    for step in range(STEPS):
        inputs = [_rank_input(r, step) for r in range(WORLD)]
        x = _concat([i[0] for i in inputs])
        target = torch.cat([i[1] for i in inputs])
        out = net(x)
        loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append({
            "bn_in": seen["x"].detach(), "bn_out": seen["y"].detach(),
            "rows": [i[0].num_voxels for i in inputs],
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": bn.num_batches_tracked.clone(),
        })
    handle.remove()
    net.eval()
    with torch.no_grad():
        eval_out = [net(_rank_input(r, STEPS)[0]) for r in range(WORLD)]
    return {"steps": steps, "state": net.state_dict(), "eval_out": eval_out}


def test_ddp_sync_bn_forward_matches_single_process(ranks, reference):
    for step in range(STEPS):
        ref = reference["steps"][step]
        ref_in = ref["bn_in"].split(ref["rows"])
        ref_out = ref["bn_out"].split(ref["rows"])
        for r in range(WORLD):
            got = ranks[r]["model"]["steps"][step]
            _close(got["bn_in"], ref_in[r])
            _close(got["bn_out"], ref_out[r])


def test_ddp_sync_bn_matches_batch_norm_of_concatenation(ranks):
    """Output and input gradient of every rank equal torch batch_norm over all ranks' voxels."""
    for step in range(STEPS):
        got = [ranks[r]["model"]["steps"][step] for r in range(WORLD)]
        assert got[0]["bn_in"].shape[0] != got[1]["bn_in"].shape[0]
        torch.testing.assert_close(got[0]["weight"], got[1]["weight"], rtol=0, atol=0)
        x = torch.cat([g["bn_in"] for g in got]).requires_grad_()
        y = TF.batch_norm(x, None, None, got[0]["weight"], got[0]["bias"], training=True, eps=1e-5)
        _close(torch.cat([g["bn_out"] for g in got]), y)
        # Rank r's upstream gradient is that of its own loss; the total is the sum over ranks.
        (y * torch.cat([g["bn_out_grad"] for g in got])).sum().backward()
        _close(torch.cat([g["bn_in_grad"] for g in got]), x.grad)


def test_ddp_sync_bn_running_stats(ranks, reference):
    for step in range(STEPS):
        ref = reference["steps"][step]
        for r in range(WORLD):
            got = ranks[r]["model"]["steps"][step]
            _close(got["running_mean"], ref["running_mean"])
            _close(got["running_var"], ref["running_var"])
            assert int(got["num_batches_tracked"]) == int(ref["num_batches_tracked"]) == step + 1


def test_ddp_weights_identical_and_equal_single_process(ranks, reference):
    s0, s1 = ranks[0]["model"]["state"], ranks[1]["model"]["state"]
    assert list(s0) == list(s1) == list(reference["state"])
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
        _close(s0[key], reference["state"][key], msg=key)
    # The weights moved: the comparison above is not between untouched initial values.
    assert not torch.allclose(s0["head.weight"], _make_net().state_dict()["head.weight"])


def test_ddp_eval_uses_running_stats(ranks, reference):
    for r in range(WORLD):
        _close(ranks[r]["model"]["eval_out"], reference["eval_out"][r])


def test_sync_bn_float32_two_pass_momentum_none(ranks):
    """Offset float32 data over 2 steps with momentum=None and an explicit process_group."""
    ref_bn = BatchNorm(4, momentum=None).double()
    _affine_init(ref_bn)
    for step in range(2):
        got = [ranks[r]["standalone"]["float32"][step] for r in range(WORLD)]
        x = torch.cat([_standalone_feats(r, "float32", step) for r in range(WORLD)]).double().requires_grad_()
        g = torch.cat([_upstream_grad(r, (_standalone_feats(r, "float32", step).shape), torch.float32)
                       for r in range(WORLD)]).double()
        ref_bn.zero_grad()
        y = ref_bn(x)
        (y * g).sum().backward()
        assert got[0]["out"].dtype == torch.float32
        tol = dict(rtol=2e-3, atol=2e-3)
        _close(torch.cat([o["out"] for o in got]).double(), y, **tol)
        _close(torch.cat([o["in_grad"] for o in got]).double(), x.grad, rtol=2e-3, atol=0.2)
        # Parameter gradients are local (DDP would average them): their sum is the total.
        _close(sum(o["weight_grad"] for o in got).double(), ref_bn.weight.grad, **tol)
        _close(sum(o["bias_grad"] for o in got).double(), ref_bn.bias.grad, **tol)
        for o in got:
            _close(o["running_mean"].double(), ref_bn.running_mean, rtol=1e-6, atol=0)
            _close(o["running_var"].double(), ref_bn.running_var, rtol=1e-2, atol=1e-5)
            assert int(o["num_batches_tracked"]) == int(ref_bn.num_batches_tracked) == step + 1


def test_sync_bn_rank_without_voxels(ranks):
    """A rank with no voxels contributes nothing; statistics are those of the other rank's voxels."""
    got = [ranks[r]["standalone"]["empty_rank"] for r in range(WORLD)]
    assert got[1]["out"].shape == (0, 4)
    ref_bn = BatchNorm(4).double()
    _affine_init(ref_bn)
    x = torch.cat([_standalone_feats(r, "empty_rank") for r in range(WORLD)]).requires_grad_()
    y = ref_bn(x)
    (y * torch.cat([_upstream_grad(r, (_standalone_feats(r, "empty_rank").shape[0], 4), torch.float64)
                    for r in range(WORLD)])).sum().backward()
    _close(torch.cat([o["out"] for o in got]), y)
    _close(torch.cat([o["in_grad"] for o in got]), x.grad)
    _close(got[0]["weight_grad"] + got[1]["weight_grad"], ref_bn.weight.grad)
    _close(got[1]["weight_grad"], torch.zeros(4, dtype=torch.float64))
    for o in got:
        _close(o["running_mean"], ref_bn.running_mean)
        _close(o["running_var"], ref_bn.running_var)
        assert int(o["num_batches_tracked"]) == 1


def test_sync_bn_all_ranks_empty_leaves_buffers(ranks):
    fresh = BatchNorm(4).double()
    for r in range(WORLD):
        got = ranks[r]["standalone"]["all_empty"]
        assert got["out"].shape == (0, 4)
        _close(got["running_mean"], fresh.running_mean)
        _close(got["running_var"], fresh.running_var)
        assert int(got["num_batches_tracked"]) == 0
        _close(got["weight_grad"], torch.zeros(4, dtype=torch.float64))


def test_sync_bn_three_d_input(ranks):
    x = torch.cat([_standalone_feats(r, "three_d") for r in range(WORLD)]).requires_grad_()
    bn = torch.nn.BatchNorm1d(4, track_running_stats=False).double()
    _affine_init(bn)
    y = bn(x)
    (y * torch.cat([_upstream_grad(r, (_standalone_feats(r, "three_d").shape), torch.float64)
                    for r in range(WORLD)])).sum().backward()
    got = [ranks[r]["standalone"]["three_d"] for r in range(WORLD)]
    _close(torch.cat([o["out"] for o in got]), y)
    _close(torch.cat([o["in_grad"] for o in got]), x.grad)


def test_sync_bn_eval_in_process_group_is_local(ranks):
    for r in range(WORLD):
        got = ranks[r]["standalone"]["eval"]
        f = _standalone_feats(r, "three_d")[:, :, 0]
        bn = BatchNorm(4).double()
        _affine_init(bn)
        bn.eval()
        with torch.no_grad():
            bn.running_mean.copy_(got["running_mean"])
            bn.running_var.copy_(got["running_var"])
            _close(got["out"], bn(f))


# ----------------------------------------------------------------------------- without a process group
def test_convert_sync_batchnorm_nested_and_shared_state():
    net = _make_net()
    inner = SparseSequential(torch.nn.BatchNorm1d(8), ReLU())
    net.extra = torch.nn.ModuleDict({"seq": inner})
    old_bn, old_plain = net.body[1], inner[0]
    with torch.no_grad():
        old_bn.running_mean.add_(1.5)
    old_bn.eval()
    converted = SyncBatchNorm.convert_sync_batchnorm(net)
    assert converted is net
    for old, new in ((old_bn, net.body[1]), (old_plain, net.extra["seq"][0])):
        assert type(new) is SyncBatchNorm
        assert new.weight is old.weight and new.bias is old.bias
        assert new.running_mean is old.running_mean and new.running_var is old.running_var
        assert new.num_batches_tracked is old.num_batches_tracked
        assert (new.eps, new.momentum, new.training) == (old.eps, old.momentum, old.training)
        assert list(new.state_dict()) == list(old.state_dict())
    assert [type(m) for m in net.body] == [SubMConv3d, SyncBatchNorm, ReLU, SparseConv3d]
    # A batch norm passed itself comes back converted, with its process group.
    marker = object()
    bn = SyncBatchNorm.convert_sync_batchnorm(BatchNorm(4), process_group=marker)
    assert type(bn) is SyncBatchNorm and bn.process_group is marker
    # torch's DDP refuses torch.nn.SyncBatchNorm in CPU models; ours must not be one.
    assert not isinstance(bn, torch.nn.SyncBatchNorm)


def test_sync_bn_without_process_group_is_batch_norm():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    x, _ = _rank_input(0, 0)
    x = x.replace_feature(feats[: x.num_voxels])
    for momentum in (0.1, None):
        ref, sync = BatchNorm(8, momentum=momentum).double(), SyncBatchNorm(8, momentum=momentum).double()
        _affine_init(ref)
        _affine_init(sync)
        for _ in range(2):
            _close(sync(x).features, ref(x).features)
        for key, value in ref.state_dict().items():
            _close(sync.state_dict()[key], value)
        ref.eval()
        sync.eval()
        _close(sync(x).features, ref(x).features)
        empty = sparseconv.SparseTensor(torch.zeros(0, 8, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int32),
                                        SHAPE)
        sync.train()
        assert sync(empty) is empty
