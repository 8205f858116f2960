"""The benchmark harness's peers compute what they claim (speed itself is never asserted in tests)."""
import json

import numpy as np
import pytest
import torch

from sparseconv import SparseTensor
from sparseconv.bench import (BACKBONE_STRIDED, Measurement, _mm_floor, _gemm_gflop, backbone_kernel_maps,
                              format_table, main, minkunet, spconv_backbone_kernel_maps, spconv_minkunet,
                              spconv_state_dict, time_alternating, _spconv_indices)


def _random_sites(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(int(np.prod(shape)), generator=g)[:n]
    x, rest = flat // (shape[1] * shape[2]), flat % (shape[1] * shape[2])
    coords = torch.stack([torch.zeros_like(flat), x, rest // shape[2], rest % shape[2]], 1).int()
    return torch.randn(n, 4, generator=g), coords


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spconv 2.3.8's CPU scatter-add races under OpenMP
    yield
    torch.set_num_threads(threads)


def test_spconv_minkunet_matches_ours_with_the_same_weights(one_thread):
    spconv = pytest.importorskip("spconv.pytorch")
    shape = (48, 40, 32)
    feats, coords = _random_sites(3000, shape)
    torch.manual_seed(0)
    net = minkunet(4)
    with torch.no_grad():
        for m in net.modules():  # non-trivial affine batch-norm parameters
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ref = spconv_minkunet(4, spconv.ConvAlgo.Native)
    ref.load_state_dict(spconv_state_dict(net))
    # Train mode: batch norm normalises with the batch statistics, so every layer, down to the
    # stride-16 bottleneck, contributes O(1) to the output (in eval mode with fresh running
    # statistics the activations of the deep layers shrink until they hardly matter).
    net.train()
    ref.train()
    with torch.no_grad():
        y = net(SparseTensor(feats, coords, shape))
        z = ref(spconv.SparseConvTensor(feats, _spconv_indices(coords), list(reversed(shape)), 1))
    assert y.num_channels == 96 and torch.equal(y.coords, coords)
    assert torch.equal(_spconv_indices(y.coords), z.indices)
    assert y.features.abs().max() > 0.5
    torch.testing.assert_close(y.features, z.features, rtol=1e-4, atol=1e-4)


def test_kmap_workload_builds_the_backbone_maps_in_both_libraries(one_thread):
    pytest.importorskip("spconv.pytorch")
    shape = (48, 40, 33)
    feats, coords = _random_sites(3000, shape, seed=1)
    ours = backbone_kernel_maps(feats, coords, shape)
    theirs = spconv_backbone_kernel_maps(coords, shape)
    assert len(ours) == len(theirs) == 2 * len(BACKBONE_STRIDED)
    # Strided maps: the same pairs.
    for ours_map, (_, num) in list(zip(ours, theirs))[1::2]:
        assert int((ours_map >= 0).sum()) == int(num.sum()) > 0
    # Submanifold maps: every ordered pair of 3^3 neighbours, counted by brute force at the first level.
    keys = set(map(tuple, coords[:, 1:].tolist()))
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    expected = sum((x + a, y + b, z + c) in keys for x, y, z in keys for a, b, c in offsets)
    assert int((ours[0] >= 0).sum()) == expected


def test_mm_floor_and_gflop_count_the_same_gemms():
    shapes = [([3, 0, 5], 4, 8, True), ([2], 8, 16, False)]
    assert _gemm_gflop(shapes, False) == pytest.approx(2 * (8 * 4 * 8 + 2 * 8 * 16) / 1e9)
    assert _gemm_gflop(shapes, True) == pytest.approx(2 * (3 * 8 * 4 * 8 + 2 * 2 * 8 * 16) / 1e9)
    fwd, train = _mm_floor(shapes, False)(), _mm_floor(shapes, True)()
    assert [tuple(t.shape) for t in fwd] == [(3, 8), (5, 8), (2, 16)]
    assert [tuple(t.shape) for t in train] == [(3, 8), (3, 4), (4, 8), (5, 8), (5, 4), (4, 8), (2, 16), (8, 16)]


def test_format_table_shows_ratios_gflops_mm_fraction_and_peak_memory():
    rows = [Measurement("layers", "cfg", "sparseconv forward (fresh)", 2.0, [2.0],
                        {"gflops_per_s": 5.0, "mm_fraction": 0.5, "peak_mb": 12.25}),
            Measurement("layers", "cfg", "spconv ConvAlgo.Native forward (fresh)", 4.0, [4.0],
                        {"gflops_per_s": 2.5, "mm_fraction": 0.25, "peak_mb": None})]
    lines = format_table(rows).splitlines()
    assert "GFLOP/s" in lines[2] and "of mm" in lines[2] and "peak MB" in lines[2]
    assert lines[3].split()[-4:] == ["1.00x", "5.0", "50%", "12.2"]
    assert lines[4].split()[-4:] == ["2.00x", "2.5", "25%", "-"]


@pytest.mark.parametrize("back_to_back", [False, True], ids=["alternating", "back-to-back"])
def test_time_alternating_call_order(back_to_back):
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_alternating(fns, repeats=3, warmup=1, back_to_back=back_to_back)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    # warm-up a, b; then per round each function once (twice in a row when back to back).
    round_calls = ["a", "a", "b", "b"] if back_to_back else ["a", "b"]
    assert calls == ["a", "b"] + round_calls * 3


def test_back_to_back_is_recorded_in_the_json(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["-w", "voxelize", "--smoke", "--no-peak-memory", "--back-to-back", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["back_to_back"] is True
    assert {r["workload"] for r in payload["results"]} == {"voxelize"}
    assert "back to back" in capsys.readouterr().out
