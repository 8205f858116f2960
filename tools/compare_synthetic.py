#!/usr/bin/env python
"""Compares simulated HDL-64E scans (``sparseconv.datasets.synthetic``) with real KITTI scans.

Measures, for the real scans under ``--kitti/velodyne`` and ``--scans`` simulated ones: points
per scan, points above the road, ranges, elevations, points per beam (ring), intensities, and
the overlap of the normalised range / elevation / intensity histograms. Prints a Markdown table
(``docs/synthetic.md`` quotes it) and draws two images: a side-by-side bird's-eye view of a real
and a simulated scan, and the histograms.

Rings of the real scans are recovered from the point order: KITTI's velodyne files store the
scan beam by beam, each beam one full turn of increasing azimuth, so the ring of a point is the
number of whole turns of the unwrapped azimuth before it.

``--fit-rings`` fits every ring of the real scans with a cone ``z = z0 + d tan(elevation)``
(``d`` the horizontal distance): the HDL-64E beam elevations and emitter heights that
``sparseconv.datasets.synthetic`` uses come from this fit.

Usage:
    python tools/compare_synthetic.py                      # 20 simulated scans, seeds scene_seed(0, i)
    python tools/compare_synthetic.py --scans 20 --images docs/images --json stats.json
    python tools/compare_synthetic.py --fit-rings
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_KITTI = os.path.join(ROOT, "..", "shared", "data", "kitti")
GROUND_Z = -1.4  # points above this (LiDAR frame, sensor 1.73 m above the road) count as "above the road"
RANGE_BINS = np.arange(0, 81, 1.0)
ELEV_BINS = np.arange(-26, 6.01, 0.25)
INT_BINS = np.arange(0, 1.0001, 0.02)


def real_rings(points: np.ndarray) -> np.ndarray:
    """Ring index of each point of a KITTI velodyne scan, from the point order (see the module doc)."""
    az = np.degrees(np.arctan2(points[:, 1], points[:, 0]))
    wraps = np.concatenate([[0], np.cumsum(np.diff(az) < -180)])
    unwrapped = az + 360.0 * wraps
    return np.floor((unwrapped - unwrapped[0] + 0.5) / 360.0).astype(np.int64)


def scan_stats(points: np.ndarray, rings: np.ndarray) -> dict:
    xyz, inten = points[:, :3].astype(np.float64), points[:, 3].astype(np.float64)
    r = np.linalg.norm(xyz, axis=1)
    el = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
    per_ring = np.bincount(rings, minlength=64)[:64]
    return {
        "points": len(points),
        "above_road": float((xyz[:, 2] > GROUND_Z).mean()),
        "range_p10": float(np.percentile(r, 10)), "range_p50": float(np.percentile(r, 50)),
        "range_p90": float(np.percentile(r, 90)),
        "beyond_20m": float((r > 20).mean()), "beyond_40m": float((r > 40).mean()),
        "upper_block": float((el > -8.6).mean()),
        "ring_upper": float(per_ring[:32].mean()), "ring_lower": float(per_ring[32:].mean()),
        "intensity_mean": float(inten.mean()), "intensity_p50": float(np.median(inten)),
        "intensity_p90": float(np.percentile(inten, 90)), "intensity_zero": float((inten == 0).mean()),
        "range_hist": np.histogram(r, RANGE_BINS)[0], "elev_hist": np.histogram(el, ELEV_BINS)[0],
        "int_hist": np.histogram(np.clip(inten, 0, 1), INT_BINS)[0], "per_ring": per_ring,
    }


def summarise(stats: list) -> dict:
    out = {}
    for key in stats[0]:
        v = np.array([s[key] for s in stats], np.float64)
        if v.ndim == 1:
            out[key] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
        else:  # histograms: pooled, normalised
            total = v.sum(0)
            out[key] = total / max(total.sum(), 1) if key != "per_ring" else v.mean(0)
    return out


def overlap(p: np.ndarray, q: np.ndarray) -> float:
    """Histogram intersection of two normalised histograms (1: identical, 0: disjoint)."""
    return float(np.minimum(p, q).sum())


def load_real(kitti: str):
    files = sorted(glob.glob(os.path.join(kitti, "velodyne", "*.bin")))
    scans = [np.fromfile(f, dtype=np.float32).reshape(-1, 4) for f in files]
    return files, scans


def simulate(n: int, seed: int):
    from sparseconv.datasets.synthetic import scene_seed, simulate_scan

    scans, times = [], []
    for i in range(n):
        t0 = time.perf_counter()
        scans.append(simulate_scan(scene_seed(seed, i), "hdl64"))
        times.append(time.perf_counter() - t0)
    return scans, times


def table(real: dict, sim: dict, n_real: int, n_sim: int) -> str:
    def fmt(d, scale=1.0, digits=1, pct=False):
        m = d["mean"] * (100 if pct else scale)
        lo, hi = d["min"] * (100 if pct else scale), d["max"] * (100 if pct else scale)
        unit = " %" if pct else ""
        return f"{m:,.{digits}f}{unit} ({lo:,.{digits}f} – {hi:,.{digits}f})"

    rows = [
        ("points per scan", "points", dict(digits=0)),
        ("points above the road (z > -1.4 m)", "above_road", dict(pct=True)),
        ("range p10 / m", "range_p10", {}), ("range median / m", "range_p50", {}), ("range p90 / m", "range_p90", {}),
        ("points beyond 20 m", "beyond_20m", dict(pct=True)), ("points beyond 40 m", "beyond_40m", dict(pct=True)),
        ("points in the upper block (elevation > -8.6°)", "upper_block", dict(pct=True)),
        ("points per ring, rings 0–31", "ring_upper", dict(digits=0)),
        ("points per ring, rings 32–63", "ring_lower", dict(digits=0)),
        ("intensity mean", "intensity_mean", dict(digits=3)), ("intensity median", "intensity_p50", dict(digits=3)),
        ("intensity p90", "intensity_p90", dict(digits=3)),
        ("intensity exactly 0", "intensity_zero", dict(pct=True)),
    ]
    lines = [f"| statistic | real KITTI ({n_real} scans) | simulated HDL-64E ({n_sim} scans) |", "|---|---|---|"]
    for label, key, kw in rows:
        lines.append(f"| {label} | {fmt(real[key], **kw)} | {fmt(sim[key], **kw)} |")
    for label, key in (("range histogram overlap (1 m bins, 0–80 m)", "range_hist"),
                       ("elevation histogram overlap (0.25° bins)", "elev_hist"),
                       ("intensity histogram overlap (0.02 bins)", "int_hist")):
        lines.append(f"| {label} | — | {overlap(real[key], sim[key]):.3f} |")
    return "\n".join(lines)


def draw_bev(real_pts, sim_pts, path, title_real, title_sim, extent=40.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(plt.get_cmap("turbo")(np.linspace(0.12, 1.0, 256)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2), dpi=100, facecolor="black")
    for ax, pts, title in zip(axes, (real_pts, sim_pts), (title_real, title_sim)):
        ax.set_facecolor("black")
        m = (np.abs(pts[:, 0]) <= extent) & (np.abs(pts[:, 1]) <= extent)
        p = pts[m]
        order = np.argsort(p[:, 2], kind="stable")
        sc = ax.scatter(p[order, 0], p[order, 1], c=p[order, 2], s=0.15, cmap=cmap, vmin=-2.0, vmax=1.0,
                        linewidths=0, rasterized=True)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_title(title, color="white", fontsize=10)
        ax.tick_params(colors="white", labelsize=8)
        ax.set_xlabel("x (m)", color="white", fontsize=9)
        for s in ax.spines.values():
            s.set_color("gray")
    axes[0].set_ylabel("y (m)", color="white", fontsize=9)
    cb = fig.colorbar(sc, ax=axes, fraction=0.025, pad=0.02)
    cb.set_label("height z (m)", color="white")
    cb.ax.tick_params(colors="white")
    fig.savefig(path, facecolor="black", dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def fit_rings(scans) -> np.ndarray:
    """Per real scan and ring: ``(z0, elevation_deg, median |residual|)`` of the cone fit, ``[S, 64, 3]``."""
    out = np.zeros((len(scans), 64, 3))
    for i, p in enumerate(scans):
        p = p.astype(np.float64)
        ring = real_rings(p)
        d = np.hypot(p[:, 0], p[:, 1])
        for k in range(64):
            m = (ring == k) & (d > 2)
            if m.sum() < 10:
                out[i, k] = np.nan
                continue
            A = np.c_[np.ones(m.sum()), d[m]]
            sol = np.linalg.lstsq(A, p[m, 2], rcond=None)[0]
            out[i, k] = sol[0], np.degrees(np.arctan(sol[1])), np.median(np.abs(p[m, 2] - A @ sol))
    return out


def draw_semantic(scan, path, extent=40.0):
    """Bird's-eye view of a simulated scan coloured by SemanticKITTI class, with its boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from sparseconv.cli.view import box_corners_bev
    from sparseconv.datasets.synthetic import SEMANTIC_IDS

    colours = {"car": "#f54242", "truck": "#ff9a40", "person": "#ffffff", "bicyclist": "#ff40ff", "road": "#7a7a7a",
               "parking": "#b070c0", "sidewalk": "#d8c890", "building": "#ffcc00", "fence": "#c07840",
               "vegetation": "#20b020", "trunk": "#8b5a2b", "terrain": "#90e890", "pole": "#40e0ff",
               "traffic-sign": "#4060ff"}
    fig, ax = plt.subplots(figsize=(8.2, 7), dpi=100, facecolor="black")
    ax.set_facecolor("black")
    p = scan.points
    m = (np.abs(p[:, 0]) <= extent) & (np.abs(p[:, 1]) <= extent)
    handles = []
    for name, colour in colours.items():
        k = m & (scan.semantic == SEMANTIC_IDS[name])
        if k.any():
            ax.scatter(p[k, 0], p[k, 1], s=0.2, c=colour, linewidths=0, rasterized=True)
            handles.append(Line2D([], [], marker="o", ls="", color=colour, label=name))
    for box, quad in zip(scan.boxes, box_corners_bev(scan.boxes)):
        if np.all(np.abs(box[:2]) < extent):
            ring = np.vstack([quad, quad[:1]])
            ax.plot(ring[:, 0], ring[:, 1], color="white", lw=0.8)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.tick_params(colors="white", labelsize=8)
    for s in ax.spines.values():
        s.set_color("gray")
    leg = ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, facecolor="black",
                    edgecolor="gray", markerscale=1.5)
    for t in leg.get_texts():
        t.set_color("white")
    ax.set_title(f"simulated scan: SemanticKITTI classes and 3D boxes ({len(scan.boxes)} objects)", color="white",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, facecolor="black")
    plt.close(fig)


def draw_hists(real: dict, sim: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=90)
    centres = lambda b: (b[:-1] + b[1:]) / 2  # noqa: E731
    panels = [
        (axes[0, 0], RANGE_BINS, "range_hist", "range (m)", "fraction of points per 1 m", True),
        (axes[0, 1], ELEV_BINS, "elev_hist", "elevation (deg)", "fraction of points per 0.25°", False),
        (axes[1, 1], INT_BINS, "int_hist", "intensity", "fraction of points per 0.02", False),
    ]
    for ax, bins, key, xlabel, ylabel, logy in panels:
        ax.step(centres(bins), real[key], where="mid", color="tab:blue", label="real KITTI")
        ax.step(centres(bins), sim[key], where="mid", color="tab:red", label="simulated", alpha=0.85)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    ax.plot(np.arange(64), real["per_ring"], "o-", ms=3, color="tab:blue", label="real KITTI (rings from point order)")
    ax.plot(np.arange(64), sim["per_ring"], "s-", ms=3, color="tab:red", label="simulated", alpha=0.85)
    ax.set_xlabel("ring (0 = highest beam)")
    ax.set_ylabel("points per ring (mean over scans)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle("Real KITTI HDL-64E scans vs simulated (sparseconv.datasets.synthetic)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kitti", default=DEFAULT_KITTI, help="folder with velodyne/*.bin (default ../shared/data/kitti)")
    ap.add_argument("--scans", type=int, default=20, help="simulated scans (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed: scan i uses scene_seed(seed, i)")
    ap.add_argument("--images", default=None,
                    help="folder for synthetic_vs_real_bev.png, synthetic_vs_real_hist.png, synthetic_semantic_bev.png")
    ap.add_argument("--bev-scan", type=int, default=0, help="which simulated scan to draw (default 0)")
    ap.add_argument("--json", default=None, help="also write the statistics as JSON")
    ap.add_argument("--fit-rings", action="store_true", help="fit each real ring with a cone and print the fit")
    args = ap.parse_args(argv)
    files, real_scans = load_real(args.kitti)
    if not real_scans:
        print(f"compare_synthetic: no KITTI scans under {args.kitti}/velodyne", file=sys.stderr)
        return 1
    if args.fit_rings:
        fit = fit_rings(real_scans)
        print("ring  emitter z0 (m) per scan        elevation (deg) per scan        median |residual| (m)")
        for k in range(64):
            print(f"{k:4d}  " + " ".join(f"{v:7.3f}" for v in fit[:, k, 0]) + "   " +
                  " ".join(f"{v:7.2f}" for v in fit[:, k, 1]) + "   " + " ".join(f"{v:6.3f}" for v in fit[:, k, 2]))
        return 0
    real = summarise([scan_stats(p, real_rings(p)) for p in real_scans])
    sims, times = simulate(args.scans, args.seed)
    sim = summarise([scan_stats(s.points, s.ring.astype(np.int64)) for s in sims])
    print(table(real, sim, len(real_scans), len(sims)))
    print(f"\nsimulation time per scan (scene generation + ray casting + sensor model, 1 process): "
          f"mean {np.mean(times):.3f} s, max {np.max(times):.3f} s over {len(times)} scans")
    ratio = sim["points"]["mean"] / real["points"]["mean"]
    print(f"points per scan, simulated / real: {ratio:.3f}")
    if args.images:
        os.makedirs(args.images, exist_ok=True)
        s = sims[args.bev_scan]
        draw_bev(real_scans[0], s.points, os.path.join(args.images, "synthetic_vs_real_bev.png"),
                 f"real KITTI {os.path.basename(files[0])}: {len(real_scans[0]):,} points",
                 f"simulated HDL-64E (scene_seed({args.seed}, {args.bev_scan})): {len(s.points):,} points")
        draw_hists(real, sim, os.path.join(args.images, "synthetic_vs_real_hist.png"))
        draw_semantic(s, os.path.join(args.images, "synthetic_semantic_bev.png"))
        print(f"wrote synthetic_vs_real_bev.png, synthetic_vs_real_hist.png and synthetic_semantic_bev.png "
              f"to {args.images}")
    if args.json:
        def plain(d):
            return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"real": plain(real), "simulated": plain(sim), "real_files": files,
                       "sim_seconds": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
