"""Smoke test of ``tools/sparsity_study.py`` (the activation-sparsity study) and checks of its pieces.

The ``--smoke`` run (2 simulated scans, 3 steps per variant) is done once per module and its
outputs are checked against independent recomputations: accuracy and mIoU from the saved
confusion matrix by NumPy, the TopK variant's zero fraction against the closed form
``1 - k / C``, the tables against ``results.json``; a second run from the cache must reproduce the
first bit for bit. The majority vote of the voxel labels is checked against a brute-force loop.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_study():
    spec = importlib.util.spec_from_file_location("sparsity_study", os.path.join(ROOT, "tools", "sparsity_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _load_study()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Two smoke runs: the first simulates the scans into the cache, the second reads them back."""
    threads = torch.get_num_threads()
    out1 = tmp_path_factory.mktemp("study1")
    out2 = tmp_path_factory.mktemp("study2")
    cache = str(out1 / "scans")
    try:
        args = study.parse_args(["--out", str(out1), "--smoke", "--cache", cache])
        first = study.run(args, log=lambda s: None)
        args = study.parse_args(["--out", str(out2), "--smoke", "--cache", cache])
        second = study.run(args, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return out1, first, second, cache


def test_outputs_written(smoke):
    out, results, _, cache = smoke
    for name in ("results.json", "table.md", "sparsity_study_layers.png", "sparsity_study_loss.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("sparsity_study_layers.png", "sparsity_study_loss.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(os.listdir(cache)) == sorted(f"scan_{s}.npz" for s in results["config"]["scan_seeds"])
    on_disk = json.loads((out / "results.json").read_text())
    assert list(on_disk["variants"]) == ["relu", "gelu", "topk", "relu+hoyer 0.003", "relu+hoyer 0.01",
                                         "gelu>relu", "gelu>relu+ft1"]
    assert on_disk["config"]["smoke"] is True and on_disk["config"]["steps"] == 3


def test_deterministic_and_cache(smoke):
    _, first, second, _ = smoke
    assert list(first["variants"]) == list(second["variants"])
    for name, a in first["variants"].items():
        b = second["variants"][name]
        assert a["history"]["loss"] == b["history"]["loss"], name
        assert a["confusion"] == b["confusion"], name
        assert a["layers"] == b["layers"], name


def test_metrics_match_confusion(smoke):
    _, results, _, _ = smoke
    val = results["config"]["val_voxels_per_class"]
    for name, v in results["variants"].items():
        conf = np.asarray(v["confusion"], np.float64)
        assert conf.sum(1).tolist() == [val[c] for c in study.CLASSES], name  # every labelled voxel counted once
        assert v["accuracy"] == pytest.approx(np.trace(conf) / conf.sum(), abs=1e-12)
        ious = []
        for c in range(len(study.CLASSES)):
            union = conf[c].sum() + conf[:, c].sum() - conf[c, c]
            if union > 0:
                ious.append(conf[c, c] / union)
        assert v["miou"] == pytest.approx(np.mean(ious), abs=1e-12)


def test_activation_statistics(smoke):
    _, results, _, _ = smoke
    var = results["variants"]
    layers = list(var["relu"]["layers"])
    assert layers == ["stem1.act", "stem2.act", "down1.act", "enc1.act", "down2.act", "enc2.act", "up2.act",
                      "dec1.act", "up1.act", "dec0.act"]
    for layer in layers:
        s = var["topk"]["layers"][layer]
        k = max(1, s["channels"] // 4)
        # TopK keeps k of C values per row: at least 1 - k/C zeros (exactly that unless a kept value is 0).
        assert s["zero_fraction"] >= 1 - k / s["channels"] - 1e-12
        assert s["zero_fraction"] <= 1 - k / s["channels"] + 1e-3
        assert var["gelu"]["layers"][layer]["zero_fraction"] < 0.01  # GELU is 0 only at exactly 0
        assert var["gelu"]["layers"][layer]["type"] == "GELU"
        assert var["gelu>relu"]["layers"][layer]["type"] == "ReLU"
        for v in var.values():
            st = v["layers"][layer]
            assert st["near_zero_fraction"] >= st["zero_fraction"]
            assert 0 <= st["hoyer"] <= 1
    # the penalty is recorded for the Hoyer variants only, lam times a sum of ratios in [1, sqrt(C)] per layer
    assert not any(var["relu"]["history"]["penalty"])
    for lam in (0.003, 0.01):
        pen = var[f"relu+hoyer {lam:g}"]["history"]["penalty"]
        assert len(pen) == 3
        assert all(0 < p <= lam * sum(np.sqrt(var["relu"]["layers"][l]["channels"]) for l in layers) for p in pen)


def test_table_matches_results(smoke):
    out, results, _, _ = smoke
    table = (out / "table.md").read_text()
    for name, v in results["variants"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{100 * v['accuracy']:.1f}" and cells[3] == f"{100 * v['miou']:.1f}"
        assert cells[8] == f"{100 * v['overall']['zero_fraction']:.1f}"


def test_voxel_labels_brute_force():
    rng = np.random.default_rng(0)
    n, v, c = 500, 40, 4
    p2v = rng.integers(-1, v, n)
    labels = rng.integers(0, c, n)
    labels[rng.random(n) < 0.1] = study.IGNORE
    got = study.voxel_labels(p2v, labels, v, c)
    for i in range(v):
        votes = Counter(int(l) for j, l in zip(p2v, labels) if j == i and l != study.IGNORE)
        if not votes:
            assert got[i] == study.IGNORE
        else:
            best = max(votes.values())
            assert got[i] == min(k for k, cnt in votes.items() if cnt == best)  # ties: lower class
    with pytest.raises(ValueError, match="labels"):
        study.voxel_labels(p2v[:-1], labels, v, c)
    with pytest.raises(ValueError, match="outside"):
        study.voxel_labels(np.array([0]), np.array([c]), 1, c)


def test_class_lookup():
    from sparseconv.datasets.synthetic import SEMANTIC_IDS

    table = study.class_lookup()
    assert table[SEMANTIC_IDS["car"]] == study.CLASSES.index("vehicle")
    assert table[SEMANTIC_IDS["bicyclist"]] == study.CLASSES.index("person")
    assert table[SEMANTIC_IDS["sidewalk"]] == study.CLASSES.index("ground")
    assert table[SEMANTIC_IDS["pole"]] == study.CLASSES.index("structure")
    assert table[SEMANTIC_IDS["unlabeled"]] == study.IGNORE
    assert set(study.CLASS_MAP) == set(SEMANTIC_IDS) - {"unlabeled"}  # every simulated class is mapped


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--variants", "relu", "elu"], ["--variants", "relufy"],
                                  ["--hoyer-lams", "-1"], ["--threads", "0"], ["--seed", "-1"],
                                  ["--finetune-steps", "-1"]])
def test_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        study.parse_args(["--out", str(tmp_path)] + argv)
    assert e.value.code == 2
