"""Repository-level checks: CI runs the README's test command; the CLI works end to end."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KITTI = os.path.join(ROOT, "..", "shared", "data", "kitti", "velodyne", "000000.bin")


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_command():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "sparseconv demo" in main_job and "pytest" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert tests in ci, "the .ci/run script must run the README's test command verbatim"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sparseconv", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_help_shows_examples():
    p = _run("--help")
    assert p.returncode == 0 and "examples:" in p.stdout and "demo" in p.stdout
    p = _run("demo", "--help")
    assert p.returncode == 0 and "--input" in p.stdout and "examples:" in p.stdout


def _shipped_weights():
    from sparseconv.models.pretrained import list_pretrained

    return list_pretrained()


def test_cli_demo_runs_shipped_detector_on_simulated_scan(tmp_path):
    """The README's main job: the shipped detector on the bundled simulated scan (tests/test_demo.py
    covers the command with weights trained here; this one runs what ships)."""
    import pytest

    if not _shipped_weights():
        pytest.skip("no detector weights in models/weights yet (tools/export_det.py)")
    image = tmp_path / "bev.png"
    p = _run("demo", "--json", "--check-dense", "-o", str(image))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["voxels"] > 1000 and out["subm_vs_dense_max_abs_diff"] < 1e-9
    assert open(image, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a trained detector finds some of the simulated objects of the bundled scan
    assert out["detections"] and out["ground_truth"]["found"]["found"] >= 1


def test_cli_demo_rejects_truncated_scan(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 18)
    p = _run("demo", "--input", str(bad))
    assert p.returncode != 0 and "not a multiple of 16" in p.stderr


def test_cli_demo_on_real_kitti_scan(tmp_path):
    import pytest

    if not os.path.exists(KITTI):
        pytest.skip("../shared/data/kitti is absent")
    if not _shipped_weights():
        pytest.skip("no detector weights in models/weights yet (tools/export_det.py)")
    kitti = os.path.dirname(os.path.dirname(KITTI))
    p = _run("demo", "--json", "--front", "--input", KITTI, "--labels", os.path.join(kitti, "label_2", "000000.txt"),
             "--calib", os.path.join(kitti, "calib", "000000.txt"), "-o", str(tmp_path / "bev.png"))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["front"] and out["points_used"] > 10000 and out["voxels"] > 2000
    assert len(out["ground_truth"]["boxes"]) >= 1


def test_benchmark_harness_smoke(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--smoke", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    rows = data["results"]
    impls = {r["impl"] for r in rows}
    assert {"sparseconv voxelize_padded", "sparseconv voxelize (mean)", "sparseconv forward (fresh)",
            "sparseconv forward (cached maps)", "sparseconv forward+backward (fresh)",
            "sparseconv kernel maps (fresh)"} <= impls
    assert {r["workload"] for r in rows} == {"voxelize", "layers", "layers-train", "backbone", "backbone-train",
                                             "minkunet", "minkunet-train", "kmap", "sparse-blocks"}
    assert all(r["median_ms"] > 0 and len(r["times_ms"]) == 2 for r in rows)
    assert all({"gflops_per_s", "mm_fraction", "mm_gflops_per_s", "peak_mb"} <= r.keys() for r in rows)
    # Every single-layer kind, forward and training, is there (SubM, strided, inverse, max-pool).
    layer_configs = {r["config"].split(": ", 1)[1].split(",")[0] for r in rows if r["workload"] == "layers"}
    assert {"SubMConv3d 3^3", "SparseConv3d 3^3 stride 2 padding 1", "SparseMaxPool3d 3^3 stride 2 padding 1",
            "SparseInverseConv3d 3^3 (inverse of the stride-2 conv)"} == layer_configs
    ours = [r for r in rows if r["impl"].startswith("sparseconv")]
    convs = [r for r in ours if r["workload"] in ("layers", "layers-train", "backbone", "backbone-train", "minkunet",
                                                  "minkunet-train") and "MaxPool" not in r["config"]]
    assert convs
    for r in convs:  # useful GFLOP/s and its fraction of torch.mm's, consistent with the medians
        assert r["gflop"] > 0 and r["mm_gflops_per_s"] > 0
        assert abs(r["gflops_per_s"] - r["gflop"] / (r["median_ms"] / 1000)) <= 1e-6 * r["gflops_per_s"]
        assert abs(r["mm_fraction"] - r["gflops_per_s"] / r["mm_gflops_per_s"]) <= 1e-6 * r["mm_fraction"]
    assert all(r["gflops_per_s"] is None and r["mm_fraction"] is None
               for r in rows if "MaxPool" in r["config"] or r["workload"] in ("kmap", "voxelize", "sparse-blocks"))
    floors = [r for r in rows if r["impl"].startswith("torch.mm")]
    assert floors and all(abs(r["mm_fraction"] - 1) < 1e-9 for r in floors)
    # Peak memory of one call of every forward implementation, in MB.
    forward = [r for r in ours if "backward" not in r["impl"]]
    assert {r["workload"] for r in forward} == {"voxelize", "layers", "backbone", "minkunet", "kmap", "sparse-blocks"}
    assert all(isinstance(r["peak_mb"], float) and r["peak_mb"] >= 0 for r in forward)
    assert any(r["peak_mb"] > 0 for r in forward)
    # The dense SubM peer allocates its dense output (128 x 128 x 40 voxels x 16 channels x 4 B = 40 MiB).
    dense = [r for r in rows if r["impl"] == "dense conv3d (input already dense)"]
    assert len(dense) == 1 and dense[0]["peak_mb"] >= 0.9 * 128 * 128 * 40 * 16 * 4 / 2 ** 20
    assert data["peak_memory_method"]


def test_readme_usage_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    x, y = namespace["x"], namespace["y"]
    assert y.coords.tolist() == x.coords.tolist() and y.num_channels == 16
