"""Activation sparsity: measures, ActivationMonitor, penalties, TopK, relufy, ``sparseconv sparsity``.

Measures are checked on hand-made vectors, the monitor against statistics computed by hand from
the outputs of the same layers applied one by one, the penalties against hand formulas and
``torch.autograd.gradcheck`` (float64).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sparseconv import SparseTensor
from sparseconv import nn as snn
from sparseconv.cli import main as cli_main
from sparseconv.sparsity import (ActivationMonitor, ActivationPenalty, format_table, hoyer, hoyer_penalty,
                                 kl_sparsity_penalty, l1_activation_penalty, near_zero_fraction, relufy,
                                 sparsity_report, zero_fraction)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE = torch.float64
SHAPE = (6, 6, 4)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Coarse voxels keep the CLI runs to about a second (about 9k voxels of a simulated scan).
FAST = ["--voxel-size", "0.4", "0.4", "0.1"]


def _tensor(n, channels=4, seed=0, shape=SHAPE):
    """A SparseTensor with ``n`` distinct random sites in batch element 0 and Gaussian features."""
    gen = torch.Generator().manual_seed(seed)
    cells = shape[0] * shape[1] * shape[2]
    idx = torch.randperm(cells, generator=gen)[:n]
    x, rest = idx // (shape[1] * shape[2]), idx % (shape[1] * shape[2])
    coords = torch.stack([torch.zeros_like(idx), x, rest // shape[2], rest % shape[2]], 1).int()
    return SparseTensor(torch.randn(n, channels, generator=gen, dtype=DTYPE), coords, shape, batch_size=1)


def _hoyer_by_hand(row):
    """Hoyer of one vector from its definition, with the documented special cases."""
    v = [float(a) for a in row.detach()]
    n = len(v)
    if all(a == 0 for a in v):
        return 1.0
    if n == 1:
        return 0.0
    l1 = sum(abs(a) for a in v)
    l2 = math.sqrt(sum(a * a for a in v))
    return (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)


# ----------------------------------------------------------------------------- measures
def test_hoyer_of_hand_made_vectors():
    assert hoyer(torch.tensor([0.0, 0.0, -5.0, 0.0])) == 1.0  # one-hot
    assert hoyer(torch.tensor([1e-30, 0.0, 0.0])) == 1.0  # tiny values do not underflow
    assert hoyer(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(0.0, abs=1e-6)  # constant
    assert hoyer(torch.tensor([1.0, -1.0, 1.0, -1.0])) == pytest.approx(0.0, abs=1e-6)  # equal magnitudes
    # (2 - 7/5) / (2 - 1)
    assert hoyer(torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=DTYPE)) == pytest.approx(0.6, abs=1e-12)
    assert hoyer(torch.zeros(5)) == 1.0  # all-zero: defined as maximally sparse
    # n = 1: the zero indicator.
    assert hoyer(torch.tensor([[0.0], [3.0], [-2.0], [0.0]]), reduction="none").tolist() == [1.0, 0.0, 0.0, 1.0]
    # Scale invariance, and the mean over rows.
    x = torch.randn(50, 7, dtype=DTYPE)
    per_row = hoyer(x, reduction="none")
    assert per_row.shape == (50,) and bool(((per_row >= 0) & (per_row <= 1)).all())
    torch.testing.assert_close(hoyer(1e6 * x, reduction="none"), per_row)
    torch.testing.assert_close(per_row, torch.tensor([_hoyer_by_hand(r) for r in x], dtype=DTYPE))
    assert hoyer(x) == pytest.approx(float(per_row.mean()))


def test_hoyer_dims_sparse_tensor_and_errors():
    x = _tensor(10, channels=6, seed=1)
    x = x.replace_feature(torch.relu(x.features))
    assert hoyer(x) == pytest.approx(sum(_hoyer_by_hand(r) for r in x.features) / 10)
    dense = torch.randn(2, 5, 3, 4, dtype=DTYPE)  # [B, C, X, Y]
    h = hoyer(dense, dim=1, reduction="none")
    assert h.shape == (2, 3, 4)
    assert h[1, 2, 3].item() == pytest.approx(_hoyer_by_hand(dense[1, :, 2, 3]))
    assert hoyer(torch.tensor([[1.0, 0.0]], dtype=torch.float16)) == 1.0  # half is upcast
    with pytest.raises(ValueError, match="empty"):
        hoyer(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="empty"):
        hoyer(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="reduction"):
        hoyer(torch.ones(3), reduction="sum")
    with pytest.raises(TypeError, match="SparseTensor or a torch.Tensor"):
        hoyer([1.0, 0.0])


def test_zero_and_near_zero_fractions_are_exact():
    a = torch.tensor([[0.0, -0.0, 1e-4, -1e-4], [1e-3, 0.5, float("nan"), 2.0]])
    assert zero_fraction(a) == 2 / 8
    assert near_zero_fraction(a, eps=1e-3) == 4 / 8  # |1e-3| < 1e-3 is false, NaN is not near zero
    assert near_zero_fraction(a, eps=1e-3 + 1e-9) == 5 / 8
    x = _tensor(9, channels=3, seed=2)
    x = x.replace_feature(torch.relu(x.features))
    assert zero_fraction(x) == int((x.features == 0).sum()) / 27
    with pytest.raises(ValueError, match="eps"):
        near_zero_fraction(a, eps=0)
    with pytest.raises(ValueError, match="empty"):
        zero_fraction(torch.zeros(0, 3))


# ----------------------------------------------------------------------------- monitor
def _small_net():
    torch.manual_seed(0)
    return snn.SparseSequential(
        snn.SubMConv3d(4, 8, 3),  # 0
        snn.ReLU(),  # 1: sparse wrapper, sees the SparseTensor
        snn.SubMConv3d(8, 6, 3),  # 2
        torch.nn.ReLU(),  # 3: torch module, sees the [N, C] features
        snn.Linear(6, 5),  # 4
        snn.TopK(2),  # 5
    ).double()


def _by_hand(outputs, eps):
    f = torch.cat(outputs)
    zero = f == 0
    active = ~zero.all(0)
    return {
        "rows": f.shape[0],
        "channels": f.shape[1],
        "values": f.numel(),
        "zero_fraction": int(zero.sum()) / f.numel(),
        "near_zero_fraction": int((f.abs() < eps).sum()) / f.numel(),
        "zero_row_fraction": int(zero.all(1).sum()) / f.shape[0],
        "hoyer": sum(_hoyer_by_hand(r) for r in f) / f.shape[0],
        "dead_unit_indices": torch.nonzero(~active).flatten().tolist(),
    }


def test_monitor_matches_statistics_of_captured_outputs():
    net = _small_net()
    with torch.no_grad():
        net[0].bias[3] = -1e3  # channel 3 of the first ReLU is dead
        net[2].bias.sub_(0.3)  # some all-zero rows after the second ReLU
    eps = 0.05
    batches = [_tensor(n, seed=10 + i) for i, n in enumerate([40, 25, 60])]
    captured = {"1": [], "3": [], "5": []}
    for x in batches:  # the same layers applied one by one
        h = net[1](net[0](x))
        captured["1"].append(h.features)
        f = torch.relu(net[2](h).features)
        captured["3"].append(f)
        captured["5"].append(net[5](net[4](h.replace_feature(f))).features)
    with ActivationMonitor(net, eps=eps) as mon:
        assert mon.layers == ["1", "3", "5"]
        for x in batches:
            net(x)
    stats = mon.stats()
    assert list(stats) == ["1", "3", "5"]
    assert [stats[n]["type"] for n in stats] == ["ReLU", "ReLU", "TopK"]
    for name, outs in captured.items():
        expected = _by_hand(outs, eps)
        got = stats[name]
        assert got["calls"] == 3
        for key in ("rows", "channels", "values", "dead_unit_indices"):
            assert got[key] == expected[key], (name, key)
        for key in ("zero_fraction", "near_zero_fraction", "zero_row_fraction", "hoyer"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), (name, key)
    assert stats["1"]["dead_unit_indices"] == [3] and stats["1"]["dead_units"] == 1
    assert stats["1"]["dead_unit_fraction"] == 1 / 8
    assert stats["3"]["zero_row_fraction"] > 0
    assert stats["5"]["zero_fraction"] >= 1 - 2 / 5  # TopK(2) of 5 channels
    table = mon.table()
    assert "TopK" in table and "1/8" in table and len(table.splitlines()) == 2 + 3 + 2
    # Hooks are gone after the with block; the statistics stay.
    assert not mon.attached and all(not m._forward_hooks for m in net.modules())
    net(batches[0])
    assert mon.stats() == stats


def test_monitor_disabled_reset_remove_and_extra_modules():
    net = _small_net()
    x = _tensor(30, seed=20)
    mon = ActivationMonitor(net, modules=["0", net[4]], enabled=False)
    assert mon.layers == ["0", "1", "3", "4", "5"]
    net(x)
    assert all(s["calls"] == 0 and s["zero_fraction"] is None for s in mon.stats().values())
    mon.enabled = True
    net(x)
    net(x)
    stats = mon.stats()
    assert all(s["calls"] == 2 and s["rows"] == 60 for s in stats.values())
    assert stats["0"]["type"] == "SubMConv3d" and stats["0"]["zero_fraction"] == 0.0  # a conv output is dense
    mon.reset()
    assert all(s["calls"] == 0 for s in mon.stats().values())
    mon.remove()
    net(x)
    assert all(s["calls"] == 0 for s in mon.stats().values())
    with pytest.raises(ValueError, match="no module named 'nope'"):
        ActivationMonitor(net, modules=["nope"])
    with pytest.raises(ValueError, match="no activation module"):
        ActivationMonitor(torch.nn.Linear(3, 3))


def test_monitor_dense_tensors_use_dim_1_as_channels():
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU())
    x = torch.randn(2, 3, 4, 5, dtype=DTYPE)  # [B, C, X, Y]
    x[:, 1] = -x[:, 1].abs() - 0.1  # channel 1 is always negative: dead after the ReLU
    x[0, :, 0, 0] = -1.0  # one position (a row) entirely zero
    with ActivationMonitor(model) as mon:
        y = model(x)
    s = mon.stats()["1"]
    assert s["channels"] == 3 and s["rows"] == 2 * 4 * 5
    assert s["dead_unit_indices"] == [1]
    assert s["zero_fraction"] == int((y == 0).sum()) / y.numel()
    rows = y.movedim(1, -1).reshape(-1, 3)
    assert s["zero_row_fraction"] == int((rows == 0).all(1).sum()) / 40 and s["zero_row_fraction"] >= 1 / 40
    assert s["hoyer"] == pytest.approx(sum(_hoyer_by_hand(r) for r in rows) / 40)


def test_monitor_does_not_change_gradients_and_handles_empty_input():
    net = _small_net()
    x = _tensor(20, seed=30)
    net(x).features.sum().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with ActivationMonitor(net) as mon:
        net(x).features.sum().backward()
        net(_tensor(0, seed=31))  # no voxel: counted as a call, no values
    for p, g in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert all(s["calls"] == 2 and s["rows"] == 20 for s in mon.stats().values())


def test_sparsity_report_runs_in_eval_mode_and_restores_modes():
    net = snn.SparseSequential(snn.SubMConv3d(4, 8, 3), snn.BatchNorm(8), snn.ReLU()).double()
    net[1].train(False)  # a mixed state that must come back as it was
    mean_before = net[1].running_mean.clone()
    batches = [_tensor(30, seed=40 + i) for i in range(3)]
    stats = sparsity_report(net, iter(batches), max_batches=2)
    assert stats["2"]["calls"] == 2 and stats["2"]["rows"] == 60
    assert net.training and net[0].training and not net[1].training
    torch.testing.assert_close(net[1].running_mean, mean_before, rtol=0, atol=0)  # eval: not updated
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="no batch"):
        sparsity_report(net, [])


def test_plot_writes_png(tmp_path):
    net = _small_net()
    with ActivationMonitor(net) as mon:
        net(_tensor(20, seed=50))
    path = tmp_path / "sparsity.png"
    mon.plot(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="nothing to plot"):
        mon.reset()
        mon.plot(tmp_path / "empty.png")
    assert "no activation recorded" in format_table(mon.stats())


# ----------------------------------------------------------------------------- penalties
def test_penalty_values_by_hand():
    a = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=DTYPE)
    assert l1_activation_penalty(a, lam=0.5).item() == pytest.approx(0.5 * 10 / 9)
    # Ratios: 7/5, 0 (zero row), 3/sqrt(3).
    assert hoyer_penalty(a, lam=2.0).item() == pytest.approx(2.0 * (7 / 5 + 0 + math.sqrt(3)) / 3)
    assert hoyer_penalty(1e3 * a).item() == pytest.approx(hoyer_penalty(a).item())  # scale-invariant
    p = torch.tensor([[0.1, 0.5], [0.3, 0.9]], dtype=DTYPE)  # unit means 0.2, 0.7
    rho = 0.1

    def kl(r, q):
        return r * math.log(r / q) + (1 - r) * math.log((1 - r) / (1 - q))

    assert kl_sparsity_penalty(p, rho=rho, lam=3.0).item() == pytest.approx(3.0 * (kl(rho, 0.2) + kl(rho, 0.7)))
    assert kl_sparsity_penalty(torch.full((4, 3), rho, dtype=DTYPE), rho=rho).item() == pytest.approx(0, abs=1e-12)
    assert math.isfinite(kl_sparsity_penalty(torch.zeros(4, 3), rho=rho).item())  # clamped
    dense = torch.rand(2, 3, 4, dtype=DTYPE)  # [B, C, X]: units along dim 1
    assert kl_sparsity_penalty(dense, rho=rho, dim=1).item() == pytest.approx(
        sum(kl(rho, float(dense[:, j].mean())) for j in range(3)))
    x = _tensor(5, seed=60)
    assert l1_activation_penalty(x).item() == pytest.approx(x.features.abs().mean().item())
    assert l1_activation_penalty(torch.zeros(0, 3)).item() == 0.0
    with pytest.raises(ValueError, match="rho"):
        kl_sparsity_penalty(p, rho=1.0)
    with pytest.raises(ValueError, match="lam"):
        l1_activation_penalty(p, lam=-1.0)


def test_penalty_gradients():
    gen = torch.Generator().manual_seed(70)
    a = (torch.randn(6, 5, generator=gen, dtype=DTYPE) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: l1_activation_penalty(t, lam=0.3), (a,))
    assert torch.autograd.gradcheck(lambda t: hoyer_penalty(t, lam=0.3), (a,))
    assert torch.autograd.gradcheck(lambda t: hoyer_penalty(t, dim=0), (a,))
    p = (0.1 + 0.8 * torch.rand(6, 5, generator=gen, dtype=DTYPE)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: kl_sparsity_penalty(t, rho=0.05, lam=0.3), (p,))
    # An all-zero row gives gradient 0, not NaN.
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=DTYPE, requires_grad=True)
    hoyer_penalty(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad[0].tolist() == [0.0, 0.0]


def test_activation_penalty_sums_the_chosen_layers():
    net = _small_net()
    x = _tensor(25, seed=80)
    h_st = net[1](net[0](x))  # the layers by hand, before any hook is in place
    h = h_st.features
    f = torch.relu(net[2](h_st).features)
    out5 = net[5](net[4](h_st.replace_feature(f))).features
    expected = hoyer_penalty(h, lam=0.7) + hoyer_penalty(f, lam=0.7)
    pen = ActivationPenalty(net, ["1", "3"], "hoyer", lam=0.7)
    assert pen.layers == ["1", "3"]
    y = net(x)
    assert pen.num_pending == 2
    loss = y.features.sum() + pen.loss()
    assert loss.item() == pytest.approx(y.features.sum().item() + expected.item())
    loss.backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    assert pen.num_pending == 0 and pen.loss().item() == 0.0  # cleared
    net.eval()
    net(x)
    assert pen.num_pending == 0  # only_training
    net.train()
    pen.enabled = False
    net(x)
    assert pen.num_pending == 0
    pen.enabled = True
    kl = ActivationPenalty(net, [net[5]], "kl", lam=2.0, rho=0.2)
    net(x)
    pen.clear()
    assert kl.loss().item() == pytest.approx(kl_sparsity_penalty(out5, rho=0.2, lam=2.0).item())
    pen.remove()
    kl.remove()
    net(x)
    assert pen.num_pending == 0 and all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="unknown penalty"):
        ActivationPenalty(net, ["1"], "l2")
    with pytest.raises(ValueError, match="no module named"):
        ActivationPenalty(net, ["9"], "l1")


# ----------------------------------------------------------------------------- TopK
def test_topk_keeps_exactly_k_largest_and_masks_gradient():
    gen = torch.Generator().manual_seed(90)
    f = torch.randn(12, 7, generator=gen, dtype=DTYPE, requires_grad=True)
    y = snn.TopK(3)(f)
    kept = y != 0
    assert kept.sum(1).tolist() == [3] * 12
    kth = f.detach().sort(1, descending=True).values[:, 2:3]
    assert torch.equal(kept, f.detach() >= kth)
    torch.testing.assert_close(y[kept], f.detach()[kept], rtol=0, atol=0)
    w = torch.randn(12, 7, generator=gen, dtype=DTYPE)
    (y * w).sum().backward()
    torch.testing.assert_close(f.grad, torch.where(kept, w, torch.zeros_like(w)), rtol=0, atol=0)


def test_topk_sparse_tensor_dense_and_errors():
    x = _tensor(15, channels=6, seed=91)
    y = snn.TopK(2)(x)
    assert isinstance(y, SparseTensor) and y.coordinate_set is x.coordinate_set
    torch.testing.assert_close(y.features, snn.TopK(2)(x.features), rtol=0, atol=0)
    assert ((y.features != 0).sum(1) == 2).all()
    assert snn.TopK(2)(_tensor(0, channels=6)).num_voxels == 0
    dense = torch.randn(2, 6, 3, 3, dtype=DTYPE)
    yd = snn.TopK(2, dim=1)(dense)
    assert ((yd != 0).sum(1) == 2).all() and yd.shape == dense.shape
    ties = torch.ones(4, 5)
    assert torch.equal(snn.TopK(2)(ties), snn.TopK(2)(ties))  # deterministic
    with pytest.raises(ValueError, match=r"k=7 .* C=6"):
        snn.TopK(7)(x)
    with pytest.raises(ValueError, match="positive integer"):
        snn.TopK(0)


# ----------------------------------------------------------------------------- relufy
def test_relufy_replaces_and_names():
    shared = torch.nn.SiLU()
    model = torch.nn.Sequential(
        snn.SparseSequential(snn.SubMConv3d(4, 8, 3), snn.GELU()),
        torch.nn.ModuleDict({"a": torch.nn.GELU(), "b": shared, "c": torch.nn.Tanh()}),
        torch.nn.Sequential(shared, torch.nn.Mish()),
    )
    new, names = relufy(model)
    assert names == ["0.1", "1.a", "1.b", "2.0", "2.1"]
    assert type(new[0][1]) is snn.ReLU and type(new[1]["a"]) is torch.nn.ReLU and type(new[2][0]) is torch.nn.ReLU
    assert type(new[1]["c"]) is torch.nn.Tanh
    assert type(model[0][1]) is snn.GELU and model[1]["b"] is shared  # the original is untouched
    x = _tensor(10, seed=100).to(torch.float32)
    torch.testing.assert_close(new[0](x).features, torch.relu(new[0][0](x).features))
    same, names2 = relufy(model, inplace=True)
    assert same is model and names2 == names and type(model[1]["a"]) is torch.nn.ReLU
    assert relufy(model)[1] == []
    relu, root = relufy(torch.nn.GELU())
    assert type(relu) is torch.nn.ReLU and root == [""]


# ----------------------------------------------------------------------------- CLI
def test_cli_sparsity_json_on_simulated_scan(tmp_path):
    png = tmp_path / "sparsity.png"
    p = subprocess.run([sys.executable, "-m", "sparseconv", "sparsity", "--json", "--plot", str(png), *FAST],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["model"] == "VoxelBackBone8x" and out["voxel_size"] == [0.4, 0.4, 0.1]
    assert len(out["scans"]) == 1 and out["scans"][0]["voxels"] > 1000
    layers = out["layers"]
    assert [s["channels"] for s in layers.values()] == [16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64, 128]
    assert list(layers)[0] == "conv_input.2" and list(layers)[-1] == "conv_out.2"
    for s in layers.values():
        assert s["type"] == "ReLU" and s["calls"] == 1 and s["rows"] > 0
        assert 0 < s["zero_fraction"] <= s["near_zero_fraction"] <= 1 and 0 <= s["hoyer"] <= 1
    assert layers["conv_input.2"]["rows"] == out["scans"][0]["voxels"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_sparsity_checkpoint_config_and_table(tmp_path, capsys):
    from sparseconv.models import VoxelBackBone8x

    net = VoxelBackBone8x(4, (176, 200, 40))
    with torch.no_grad():
        net.conv1[0][1].bias[5] = -1e4  # BatchNorm bias: channel 5 after conv1's ReLU is dead
    ckpt = tmp_path / "second.pt"
    torch.save({"model_state": net.state_dict(), "epoch": 3}, ckpt)
    assert cli_main(["sparsity", "--json", "--checkpoint", str(ckpt), *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == str(ckpt)
    assert out["layers"]["conv1.0.2"]["dead_unit_indices"] == [5]
    assert out["layers"]["conv_input.2"]["dead_units"] == 0

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "VoxelBackBone8x", "voxel_size": [0.4, 0.4, 0.1],
                               "point_range": [0, -20, -3, 40, 20, 1]}))
    assert cli_main(["sparsity", "--config", str(cfg), "--layers", "conv_out.0"]) == 0
    text = capsys.readouterr().out
    assert "conv_out.0" in text and "SubMConv3d" not in text and "SparseConv" in text and "all layers" in text
    cfg.write_text(json.dumps({"model": "VoxelBackBone8x", "voxelsize": [0.4, 0.4, 0.1]}))
    assert cli_main(["sparsity", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['voxelsize']" in capsys.readouterr().err


def test_cli_sparsity_bad_checkpoints(tmp_path, capsys):
    p = subprocess.run([sys.executable, "-m", "sparseconv", "sparsity", "--checkpoint", str(tmp_path / "no.pt")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1 and "checkpoint not found" in p.stderr and str(tmp_path / "no.pt") in p.stderr
    wrong = tmp_path / "wrong.pt"
    state = {k: v for k, v in snn.SparseSequential(snn.SubMConv3d(4, 16, 3)).state_dict().items()}
    torch.save(state, wrong)
    assert cli_main(["sparsity", "--checkpoint", str(wrong), *FAST]) == 1
    err = capsys.readouterr().err
    assert "does not fit VoxelBackBone8x" in err and "missing keys: conv_input.0.weight" in err
    assert "unexpected keys: 0.weight" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert cli_main(["sparsity", "--checkpoint", str(junk), *FAST]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert cli_main(["sparsity", "--model", "Nope"]) == 2
    assert "unknown model 'Nope'" in capsys.readouterr().err


def test_cli_sparsity_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["sparsity", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--checkpoint" in text and "--config" in text and "voxel_size" in text
