"""The training engine (sparseconv.engine) and tools/train_det.py / tools/eval_det.py.

A tiny detector registered here (``engine_test_det``: sparse convs, sparse and dense batch norm,
dropout, a centre-heatmap head) stands in for the real ones, so these tests do not depend on
them; a smoke run with a real detector runs when ``sparseconv.models`` has it.
"""
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparseconv import nn as snn
from sparseconv.engine import (CheckpointManager, ConfigError, DenseSyncBatchNorm, EpochSampler, load_checkpoint,
                               load_config, save_checkpoint)
from sparseconv.engine.config import REQUIRED, FreeForm
from sparseconv.engine.det import (DET_SCHEMA, build_eval_loader, evaluate, gt_record, load_det_config)
from sparseconv.engine.distributed import convert_sync_batchnorm
from sparseconv.models import height_compression, list_models, register_model

yaml = pytest.importorskip("yaml", reason="the engine's configs need PyYAML")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
MODEL = "engine_test_det"


# ----------------------------------------------------------------------------- the test detector
class TinyDet(torch.nn.Module):
    """A minimal detector following the contract of docs/training.md (and the detectors')."""

    def __init__(self, class_names, point_range, voxel_size, in_channels=4, width=8, dropout=0.2, top_k=20,
                 loss_scale=1.0):
        super().__init__()
        self.class_names = tuple(class_names)
        lo, hi, vs = np.array(point_range[:3]), np.array(point_range[3:]), np.array(voxel_size)
        grid = [int(round(v)) for v in (hi - lo) / vs]
        self.lo, self.cell = lo, 2 * vs  # BEV cells after one stride-2 conv
        nz = (grid[2] - 1) // 2 + 1
        self.sparse = snn.SparseSequential(
            snn.SubMConv3d(in_channels, width, 3, bias=False), snn.BatchNorm(width), snn.ReLU(),
            snn.SparseConv3d(width, width, 3, stride=2, padding=1, bias=False), snn.BatchNorm(width), snn.ReLU())
        self.bev = torch.nn.Sequential(torch.nn.Conv2d(width * nz, width, 3, padding=1, bias=False),
                                       torch.nn.BatchNorm2d(width), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.head = torch.nn.Conv2d(width, len(self.class_names) + 8, 1)
        self.top_k, self.loss_scale = top_k, loss_scale

    def forward(self, batch):
        x = self.sparse(batch["voxels"])
        bev = height_compression(x)  # [B, C * Z, Y, X]
        out = self.head(self.bev(bev)).float()
        nc = len(self.class_names)
        hm, reg = out[:, :nc], out[:, nc:]
        B, _, H, W = hm.shape
        if self.training:
            return self._loss(hm, reg, batch["gt_boxes"].to(out.device))
        return self._decode(hm, reg)

    def _loss(self, hm, reg, gt):
        B, _, H, W = hm.shape
        target = torch.zeros_like(hm)
        reg_loss = hm.new_zeros(())
        for b in range(B):
            boxes = gt[b][gt[b, :, 7] > 0]
            ix = ((boxes[:, 0] - self.lo[0]) / self.cell[0]).floor().long()
            iy = ((boxes[:, 1] - self.lo[1]) / self.cell[1]).floor().long()
            ok = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
            boxes, ix, iy = boxes[ok], ix[ok], iy[ok]
            target[b, boxes[:, 7].long() - 1, iy, ix] = 1.0
            cx = self.lo[0] + (ix.double() + 0.5) * self.cell[0]
            cy = self.lo[1] + (iy.double() + 0.5) * self.cell[1]
            t = torch.stack([(boxes[:, 0] - cx.float()) / float(self.cell[0]),
                             (boxes[:, 1] - cy.float()) / float(self.cell[1]), boxes[:, 2],
                             boxes[:, 3].log(), boxes[:, 4].log(), boxes[:, 5].log(),
                             boxes[:, 6].sin(), boxes[:, 6].cos()], 1)
            reg_loss = reg_loss + torch.nn.functional.smooth_l1_loss(reg[b, :, iy, ix].t(), t, reduction="sum")
        hm_loss = torch.nn.functional.binary_cross_entropy_with_logits(hm, target)
        reg_loss = 0.05 * reg_loss / B  # per scan (not per object): DDP's gradient mean is the global mean
        terms = {"hm": hm_loss.detach(), "reg": reg_loss.detach()}
        return {"loss": self.loss_scale * (hm_loss + reg_loss), "terms": terms}

    def _decode(self, hm, reg):
        B, C, H, W = hm.shape
        preds = []
        for b in range(B):
            scores, idx = hm[b].sigmoid().reshape(-1).topk(min(self.top_k, C * H * W))
            cls, rest = idx // (H * W), idx % (H * W)
            iy, ix = rest // W, rest % W
            r = reg[b, :, iy, ix].t()
            x = self.lo[0] + (ix.double() + 0.5 + r[:, 0].double()) * self.cell[0]
            y = self.lo[1] + (iy.double() + 0.5 + r[:, 1].double()) * self.cell[1]
            boxes = torch.stack([x.float(), y.float(), r[:, 2], r[:, 3].clamp(-3, 3).exp(),
                                 r[:, 4].clamp(-3, 3).exp(), r[:, 5].clamp(-3, 3).exp(),
                                 torch.atan2(r[:, 6], r[:, 7])], 1)
            preds.append({"boxes": boxes, "scores": scores, "labels": cls + 1})
        return preds


if MODEL not in list_models():  # this module may be imported under two names (pytest, model.imports)
    register_model(MODEL)(TinyDet)


class OracleDet(torch.nn.Module):
    """Eval mode: the batch's ground-truth boxes as detections (scores descending), optionally moved."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.shift = shift

    def forward(self, batch):
        out = []
        for b in range(batch["batch_size"]):
            g = batch["gt_boxes"][b]
            g = g[g[:, 7] > 0]
            boxes = g[:, :7].clone()
            boxes[:, 0] += self.shift
            out.append({"boxes": boxes, "scores": torch.linspace(1.0, 0.5, len(g)), "labels": g[:, 7].long()})
        return out


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """6 simulated scenes: train 0, 1, 3, 4 and val 2, 5."""
    from sparseconv.datasets import generate_dataset

    root = str(tmp_path_factory.mktemp("synth"))
    generate_dataset(root, scenes=6, seed=0, val_fraction=0.34)
    assert open(os.path.join(root, "ImageSets", "val.txt")).read().split() == ["000002", "000005"]
    return root


def _write_config(path, root, **sections):
    cfg = {
        "model": {"name": MODEL, "imports": ["test_engine"], "args": {"width": 8}},
        "data": {"root": root, "point_range": [0, -20, -3, 40, 20, 1], "voxel_size": [0.5, 0.5, 0.5],
                 "augment": {"gt_sampling": {"Car": 8, "Pedestrian": 4, "Cyclist": 4}}},
        "train": {"epochs": 2, "batch_size": 2, "workers": 0, "lr": 0.01, "log_every": 1, "ckpt_keep": 20,
                  "tensorboard": False, "seed": 3},
        "eval": {"workers": 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(*argv):
    assert _load_tool("train_det").main([*map(str, argv), "--no-progress"]) == 0


def _final_state(out_dir):
    path = CheckpointManager(out_dir).latest()
    return load_checkpoint(path)


def _log_rows(out_dir):
    import csv

    with open(os.path.join(out_dir, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    timing = ("samples_per_s", "seconds")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.abspath(__file__))
               + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


# ----------------------------------------------------------------------------- config
def test_config_inheritance_overrides_and_defaults(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {name: a, args: {w: 1, d: 2}}\ntrain: {lr: 0.1, betas: [1, 2]}\n")
    (tmp_path / "mid.yaml").write_text("_base_: base.yaml\ntrain: {epochs: 3}\nmodel: {args: {d: 5}}\n")
    (tmp_path / "top.yaml").write_text("_base_: [mid.yaml]\ntrain: {betas: [0.5, 0.6]}\n")
    schema = {"model": {"name": REQUIRED, "args": FreeForm()},
              "train": {"lr": 0.001, "epochs": 1, "betas": [0.9, 0.99], "amp": False, "note": None}}
    cfg = load_config(str(tmp_path / "top.yaml"), [("train.lr", "3e-3"), ("train.amp", "true"),
                                                    ("model.args.extra", "[1, 2.5, x]"), ("train.note", "null")],
                      schema=schema)
    assert cfg == {"model": {"name": "a", "args": {"w": 1, "d": 5, "extra": [1, 2.5, "x"]}},
                   "train": {"lr": 0.003, "epochs": 3, "betas": [0.5, 0.6], "amp": True, "note": None}}
    assert isinstance(cfg["train"]["lr"], float) and isinstance(cfg["train"]["betas"], list)
    # "KEY=VALUE" strings, ints accepted for floats, defaults filled
    cfg = load_config(str(tmp_path / "base.yaml"), ["train.lr=1"], schema=schema)
    assert cfg["train"] == {"lr": 1.0, "epochs": 1, "betas": [1, 2], "amp": False, "note": None}
    # without a schema: the merged tree as is
    assert load_config(str(tmp_path / "mid.yaml")) == {"model": {"name": "a", "args": {"w": 1, "d": 5}},
                                                        "train": {"lr": 0.1, "betas": [1, 2], "epochs": 3}}


def test_config_errors_name_key_and_file(tmp_path):
    schema = {"model": {"name": REQUIRED, "args": FreeForm()}, "train": {"lr": 0.001, "epochs": 1}}
    base = tmp_path / "base.yaml"
    base.write_text("model: {name: a}\ntrian: {lr: 0.1}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown config top-level section 'trian' \(set in .*base\.yaml\)"):
        load_config(str(child), schema=schema)
    child.write_text("model: {name: a}\ntrain: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(set in .*child\.yaml\).*lr, epochs"):
        load_config(str(child), schema=schema)
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.x' \(set in --set\)"):
        load_config(str(base), [("train.x", "1")], schema={**schema, "trian": {"lr": 0.1}})
    child.write_text("train: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"missing required config key 'model\.name' in .*child\.yaml"):
        load_config(str(child), schema=schema)
    child.write_text("model: {name: a}\ntrain: {epochs: ten}\n")
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer .* got 'ten' \(set in .*child\.yaml"):
        load_config(str(child), schema=schema)
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer"):
        load_config(str(child), [("train.epochs", "1.5")], schema=schema)
    child.write_text("model: {name: a}\n")
    with pytest.raises(ConfigError, match=r"override train\.lr\.x: train\.lr is 0\.5, not a section"):
        load_config(str(child), [("train.lr", "0.5"), ("train.lr.x", "1")], schema=schema)
    child.write_text("_base_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml \(the _base_ of .*child\.yaml\)"):
        load_config(str(child))
    child.write_text("_base_: child.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(str(child))
    child.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(str(child))


@pytest.mark.parametrize("name", ["second_synth", "centerpoint_synth", "centerpoint_attn_synth"])
def test_shipped_configs_load(name):
    cfg = load_det_config(os.path.join(ROOT, "configs", f"{name}.yaml"), [("train.epochs", "3")])
    assert cfg["model"]["name"] == name.replace("_synth", "")
    assert cfg["data"]["root"] == "data/synth_kitti" and cfg["data"]["fov_only"] is True
    assert cfg["data"]["classes"] == ["Car", "Pedestrian", "Cyclist"]
    assert cfg["data"]["point_range"] == [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]
    assert cfg["train"]["epochs"] == 3 and cfg["output_dir"] == f"output/{name}"
    assert set(cfg) == set(DET_SCHEMA)


# ----------------------------------------------------------------------------- checkpoints
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_checkpoint_atomic_write_and_keep_n(tmp_path):
    path = str(tmp_path / "ck" / "a.pt")
    save_checkpoint({"w": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint({"w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert os.listdir(tmp_path / "ck") == ["a.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))  # the old file is intact
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        load_checkpoint(str(tmp_path / "junk.pt"))
    mgr = CheckpointManager(str(tmp_path / "run"), keep=2)
    assert mgr.latest() is None
    for epoch, step in ((1, 10), (1, 15), (2, 20), (3, 30)):
        mgr.save({"step": step}, epoch, step)
    assert [os.path.basename(p) for _, _, p in mgr.list()] == ["ckpt_e002_s00000020.pt", "ckpt_e003_s00000030.pt"]
    assert load_checkpoint(mgr.latest())["step"] == 30
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointManager(str(tmp_path), keep=0)


# ----------------------------------------------------------------------------- sampling and batch norm
@pytest.mark.parametrize("n,world,shuffle", [(10, 1, True), (11, 3, True), (7, 2, False)])
def test_epoch_sampler_matches_distributed_sampler(n, world, shuffle):
    ds = list(range(n))
    for epoch in (0, 1, 5):
        for rank in range(world):
            ref = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=7)
            ref.set_epoch(epoch)
            s = EpochSampler(n, shuffle=shuffle, seed=7, rank=rank, world_size=world)
            s.set_epoch(epoch)
            assert list(s) == list(ref) and len(s) == len(ref)
            s.set_epoch(epoch, start=2)
            assert list(s) == list(ref)[2:] and len(s) == len(ref) - 2
    with pytest.raises(ValueError, match="start must be in"):
        EpochSampler(4).set_epoch(0, start=5)


def test_dense_sync_batchnorm_without_group_is_batchnorm2d():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1).double(), ref)
    conv = convert_sync_batchnorm(torch.nn.Sequential(net[0], torch.nn.BatchNorm2d(5).double()))
    conv[1].load_state_dict(ref.state_dict())
    assert isinstance(conv[1], DenseSyncBatchNorm) and set(conv[1].state_dict()) == set(ref.state_dict())
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64)
    for _ in range(2):  # training: batch statistics and running-stat updates
        torch.testing.assert_close(conv(x), net(x))
    torch.testing.assert_close(conv[1].running_var, ref.running_var)
    conv.eval()
    net.eval()
    torch.testing.assert_close(conv(x), net(x))
    # sparse batch norms become sparseconv SyncBatchNorm, sharing the parameters
    sparse = snn.SparseSequential(snn.SubMConv3d(4, 4, 3), snn.BatchNorm(4))
    w = sparse[1].weight
    out = convert_sync_batchnorm(sparse)
    assert isinstance(out[1], snn.SyncBatchNorm) and out[1].weight is w


# ----------------------------------------------------------------------------- training and resuming
def test_resume_is_bitwise_exact(synth, tmp_path):
    cfg = _write_config(tmp_path / "cfg.yaml", synth)
    straight, stopped_epoch, stopped_mid = (str(tmp_path / n) for n in ("straight", "epoch", "mid"))
    _train("--config", cfg, "--output", straight)
    state = _final_state(straight)
    assert state["epoch"] == 2 and state["global_step"] == 4 and state["steps_per_epoch"] == 2
    # stopped after epoch 1, then resumed; stopped mid-epoch 2 (global step 3), then resumed
    _train("--config", cfg, "--output", stopped_epoch, "--max-steps", 2)
    assert _final_state(stopped_epoch)["global_step"] == 2 and _final_state(stopped_epoch)["epoch"] == 1
    _train("--config", cfg, "--output", stopped_epoch, "--resume")
    _train("--config", cfg, "--output", stopped_mid, "--max-steps", 3)
    mid = _final_state(stopped_mid)
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 1, 3)
    _train("--config", cfg, "--output", stopped_mid, "--resume")
    ref = state["model"]
    init = torch.load(os.path.join(straight, "ckpt_e001_s00000002.pt"), weights_only=False)["model"]
    assert any(not torch.equal(ref[k], init[k]) for k in ref)  # epoch 2 changed the weights
    for other in (stopped_epoch, stopped_mid):
        got = _final_state(other)
        assert got["global_step"] == 4
        for k in ref:
            assert torch.equal(got["model"][k], ref[k]), (other, k)
        assert got["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])
        assert got["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"] == 4
        # the resumed run's log is the straight run's (rows after the checkpoint were dropped)
        assert _log_rows(other) == _log_rows(straight)
    rows = _log_rows(straight)
    assert [r["kind"] for r in rows] == ["step", "step", "epoch", "step", "step", "epoch"]
    # one-cycle over 4 steps (lr 0.01, pct_start 0.4, div 10, final div 1e4): the rate of each step
    # is OneCycleLR's closed form: up from lr / 10 to the peak at step 0.4 * 4 - 1 = 0.6, cosine down after
    lrs = [float(r["lr"]) for r in rows if r["kind"] == "step"]
    lo, peak, final = 0.001, 0.01, 0.001 / 1e4

    def cos(a, b, pct):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))

    expect = [lo] + [cos(peak, final, (t - 0.6) / (3 - 0.6)) for t in (1, 2, 3)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-5)
    assert all(math.isfinite(float(r["loss"])) and float(r["hm"]) > 0 for r in rows)
    with open(os.path.join(straight, "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["seed"] == 3
    # starting over in a folder with checkpoints is refused
    with pytest.raises(FileExistsError, match="resume it"):
        _train("--config", cfg, "--output", straight)


def test_resume_refuses_changed_batch_size(synth, tmp_path):
    cfg = _write_config(tmp_path / "cfg.yaml", synth)
    out = str(tmp_path / "run")
    _train("--config", cfg, "--output", out, "--max-steps", 1)
    with pytest.raises(ValueError, match="steps_per_epoch=2, this run has steps_per_epoch=1"):
        _train("--config", cfg, "--output", out, "--resume", "--batch-size", 4)


def test_amp_bfloat16_and_nonfinite_loss(synth, tmp_path):
    cfg = _write_config(tmp_path / "cfg.yaml", synth, train={"ckpt_keep": 1})
    out = str(tmp_path / "amp")
    _train("--config", cfg, "--output", out, "--amp", "--max-steps", 2)
    assert all(math.isfinite(float(r["loss"])) for r in _log_rows(out))
    bad = _write_config(tmp_path / "bad.yaml", synth, model={"args": {"loss_scale": float("nan")}})
    with pytest.raises(FloatingPointError, match="non-finite gradient norm at epoch 1, global step 1"):
        _train("--config", bad, "--output", str(tmp_path / "nan"))


# ----------------------------------------------------------------------------- distributed
WORLD = 2


def _ddp_rank_trainer(rank, port, cfg_path, out_dir):
    """One rank: the same steps as tools/train_det.py (init, seed, model, data, Trainer), then its weights."""
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from sparseconv.engine import Trainer, cleanup_distributed, init_distributed, set_seed, unwrap_model
        from sparseconv.engine.det import build_detector, build_train_set, det_collate_fn

        cfg = load_det_config(cfg_path)
        env = init_distributed("pytorch", "cpu")
        set_seed(cfg["train"]["seed"] + rank)
        model = build_detector(cfg)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = Trainer(model, build_train_set(cfg, env), det_collate_fn(cfg), cfg["train"],
                          os.path.join(out_dir, "run"), env=env, config=cfg, progress=False)
        summary = trainer.fit()
        state = unwrap_model(trainer.model).state_dict()
        kinds = sorted({type(m).__name__ for m in trainer.model.modules()})
        torch.save({"state": state, "init": init, "summary": summary, "kinds": kinds},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        cleanup_distributed(env)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_ddp_two_processes_gloo_sync_bn_equals_single_process(synth, tmp_path):
    """2 ranks x batch 1 with synchronised batch norm (sparse and BEV) take the same steps as one
    process with batch 2: the sampler gives rank r the r-th sample of each pair, DDP averages
    gradients, the loss is a mean over scans."""
    common = dict(train={"batch_size": 1, "epochs": 1, "sync_bn": True}, model={"args": {"width": 8, "dropout": 0.0}},
                  data={"augment": {"gt_sampling": None}})
    cfg = _write_config(tmp_path / "ddp.yaml", synth, **common)
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    if "forkserver" in mp.get_all_start_methods():  # imports torch once for both ranks (as tests/test_ddp.py)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "sparseconv", __name__])
    else:
        ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank_trainer, args=(r, port, cfg, out), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = "".join(open(os.path.join(out, f"rank{r}.err")).read() for r in range(WORLD)
                     if os.path.exists(os.path.join(out, f"rank{r}.err")))
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    assert {"SyncBatchNorm", "DenseSyncBatchNorm", "DistributedDataParallel"} <= set(ranks[0]["kinds"])
    assert ranks[0]["summary"]["global_step"] == 2  # 4 scans / (2 ranks x 1)
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert not torch.equal(s0["head.weight"], ranks[0]["init"]["head.weight"])
    # the same training in one process with batch 2
    single = _write_config(tmp_path / "single.yaml", synth, **{**common, "train": {**common["train"], "batch_size": 2,
                                                                                  "sync_bn": False}})
    _train("--config", single, "--output", str(tmp_path / "single"))
    ref = _final_state(str(tmp_path / "single"))
    assert ref["global_step"] == 2
    for k, v in ref["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(s0[k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(s0[k], v), k
    rows = _log_rows(os.path.join(out, "run"))
    assert rows and all(math.isfinite(float(r["loss"])) for r in rows)


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_oracle_gets_full_ap_and_matching_2d_boxes(synth, tmp_path):
    # a range that holds every labelled object, so the batch's boxes are all the label file's
    cfg = load_det_config(_write_config(tmp_path / "cfg.yaml", synth,
                                        data={"point_range": [-100, -100, -10, 100, 100, 10]}))
    loader = build_eval_loader(cfg, "val")
    classes = cfg["data"]["classes"]
    res = evaluate(OracleDet(), loader, classes, save_dir=str(tmp_path / "txt"))
    assert res["frames"] == 2 and res["detections"] > 0 and res["ms_per_scan"] >= 0
    present = [c for c in classes if res["result"][c]["num_gt"]["moderate"] > 0]
    assert "Car" in present
    for c in present:
        for m in ("bev", "3d"):
            for rk in ("R40", "R11"):
                assert res["result"][c][m][rk]["moderate"] == pytest.approx(100.0), (c, m, rk)
    assert "Car" in res["table"] and "R40" in res["table"] and "R11" in res["table"]
    shifted = evaluate(OracleDet(shift=5.0), loader, classes)
    assert shifted["result"]["Car"]["3d"]["R40"]["moderate"] == 0.0
    # the written result files read back as KITTI labels with the boxes and 2D boxes of the labels
    from sparseconv.datasets import KittiDetection, read_kitti_labels

    ds = KittiDetection(synth, "val")
    for i, fid in enumerate(ds.frame_ids):
        pred = read_kitti_labels(str(tmp_path / "txt" / f"{fid}.txt"))
        label = read_kitti_labels(ds.paths(i)["label_2"])
        keep = np.isin(label["type"], classes)
        assert sorted(pred["type"].tolist()) == sorted(label["type"][keep].tolist())
        order_p = np.lexsort(pred["location"].T)
        order_l = np.lexsort(label["location"][keep].T)
        np.testing.assert_allclose(pred["location"][order_p], label["location"][keep][order_l], atol=2e-4)
        np.testing.assert_allclose(pred["bbox"][order_p], label["bbox"][keep][order_l], atol=0.011)


def test_gt_record_boxes_are_the_dataset_boxes(synth):
    from sparseconv.datasets import KittiDetection

    ds = KittiDetection(synth, "train")
    s = ds[0]
    rec = gt_record(s["annos"], s["calib"], s["dontcare"])
    np.testing.assert_allclose(rec["boxes_lidar"], s["gt_boxes"], atol=1e-5)
    assert rec["name"].tolist() == s["gt_names"].tolist() + s["dontcare"]["name"].tolist()


# ----------------------------------------------------------------------------- the command-line tools
def test_train_and_eval_tools_end_to_end(synth, tmp_path):
    cfg = _write_config(tmp_path / "cfg.yaml", synth, eval={"every_epochs": 1, "limit": 1})
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "train_det.py"), "--config", cfg, "--output", out,
                        "--epochs", "1", "--set", "train.log_every", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "evaluation after epoch 1" in p.stdout and "Car" in p.stdout
    assert os.path.isfile(os.path.join(out, "eval_epoch_001.json"))
    assert any(n.startswith("gt_database_train_") for n in os.listdir(synth))
    ckpt = CheckpointManager(out).latest()
    js = str(tmp_path / "eval.json")
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "eval_det.py"), "--ckpt", ckpt, "--json", js,
                        "--no-progress", "--set", "eval.workers", "1", "--set", "eval.limit", "null"],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "ms per scan" in p.stdout and "moderate" in p.stdout
    report = json.loads(open(js).read())
    assert report["frames"] == 2 and report["split"] == "val" and report["threads"] >= 1
    assert set(report["result"]) == {"Car", "Pedestrian", "Cyclist"}
    assert report["ms_per_scan"] > 0 and report["global_step"] == 2
    # a config file instead of the stored one (in this process); --limit wins over eval.limit
    assert _load_tool("eval_det").main(["--config", cfg, "--ckpt", ckpt, "--limit", "1", "--set", "eval.limit", "2",
                                        "--json", js, "--no-progress"]) == 0
    assert json.loads(open(js).read())["frames"] == 1


@pytest.mark.parametrize("name", ["second", "centerpoint", "centerpoint_attn"])
def test_real_detector_smoke(name, synth, tmp_path):
    """One training step and a one-frame evaluation of a shipped config's detector (small grid)."""
    if name not in list_models():
        pytest.skip(f"sparseconv.models has no {name!r} yet")
    out, js = str(tmp_path / "run"), str(tmp_path / "eval.json")
    small = ["--set", "data.point_range", "[0, -25.6, -3, 51.2, 25.6, 1]",
             "--set", "data.voxel_size", "[0.4, 0.4, 0.2]",
             "--set", "data.root", synth, "--set", "train.tensorboard", "false", "--set", "train.log_every", "1"]
    _train("--config", os.path.join(ROOT, "configs", f"{name}_synth.yaml"), "--output", out, "--max-steps", 1,
           "--batch-size", 2, "--workers", 0, *small)
    state = _final_state(out)
    assert state["global_step"] == 1 and math.isfinite(float(_log_rows(out)[0]["loss"]))
    assert _load_tool("eval_det").main(["--ckpt", CheckpointManager(out).latest(), "--limit", "1", "--json", js,
                                        "--no-progress", "--set", "eval.workers", "0"]) == 0
    report = json.loads(open(js).read())
    assert report["model"] == name and report["frames"] == 1 and report["result"]["Car"]["num_gt"]["hard"] > 0
