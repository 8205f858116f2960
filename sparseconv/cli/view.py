"""``sparseconv view``: a bird's-eye-view image of a scan or a voxel file, with KITTI boxes.

The KITTI readers (``calib/*.txt``, ``label_2/*.txt``) and the camera-to-LiDAR box conversion live in
:mod:`sparseconv.datasets.kitti`; they are imported here under their old names.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Optional, Tuple

import numpy as np

from sparseconv.datasets.kitti import (  # noqa: F401  (re-exported under their former home)
    camera_boxes_to_lidar,
    camera_to_lidar_transform,
    read_kitti_calib,
    read_kitti_labels,
)

EPILOG = """examples:
  sparseconv view ../shared/data/kitti/velodyne/000000.bin -o bev.png \\
      --labels ../shared/data/kitti/label_2/000000.txt --calib ../shared/data/kitti/calib/000000.txt \\
      --range 0 -40 70.4 40
  sparseconv view voxels/000000.npz -o voxels.png --color intensity
  sparseconv view scan.ply -o scan.png --size 1600 1200

The image looks down on the x-y plane (x to the right, y up, metres). Voxel files are drawn
as voxel centres (point_range min + (coords + 0.5) * voxel_size). KITTI boxes (label_2
format, camera frame) are moved to the LiDAR frame with the calib file's R0_rect and
Tr_velo_to_cam and drawn as rotated rectangles, with a line towards the front.
"""

CLASS_COLORS = {
    "Car": "#ff3030", "Van": "#ff9a40", "Truck": "#ffd040", "Pedestrian": "#ffffff", "Person_sitting": "#d0d0d0",
    "Cyclist": "#ff40ff", "Tram": "#a0ff40", "Misc": "#c080ff",
}  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser(
        "view",
        help="draw a bird's-eye-view PNG of a scan or a voxel file, optionally with KITTI boxes",
        description=textwrap.fill(
            "Draws the points (or voxel centres) of FILE seen from above, coloured by height or "
            "intensity, and the 3D boxes of a KITTI label file, into a PNG image.",
            88,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="point-cloud file or voxel file (.npz from sparseconv voxelize)")
    p.add_argument("-o", "--output", required=True, metavar="IMAGE", help="the PNG file to write")
    p.add_argument("--color", choices=("height", "intensity"), default="height",
                   help="colour by z, or by intensity (voxel files: the intensity column, else the first "
                   "feature after x, y, z)")
    p.add_argument("--labels", metavar="LABEL_TXT", help="KITTI label_2 file: draw its boxes (needs --calib)")
    p.add_argument("--calib", metavar="CALIB_TXT", help="KITTI calib file (R0_rect, Tr_velo_to_cam)")
    p.add_argument("--range", type=float, nargs=4, dest="bev_range", metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="area to draw, metres (default: the points' bounds, or the voxel file's range)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="image size in pixels (default: 1000 wide, height from the range)")
    p.add_argument("--3d", action="store_true", dest="three_d",
                   help="also try an Open3D offscreen 3D rendering into IMAGE with '_3d' before the extension "
                   "(needs a working OpenGL/EGL; a clear message is printed where there is none)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- KITTI boxes
def box_corners_bev(boxes: np.ndarray) -> np.ndarray:
    """The 4 ground corners ``[M, 4, 2]`` (x, y) of LiDAR boxes ``[M, 7]``, front-left first, counter-clockwise."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float64) * 0.5  # front-left, rear-left, ...
    local = half[None] * boxes[:, None, 3:5]  # l along the heading, w across
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rot = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)  # [M, 2, 2]
    return np.einsum("mij,mkj->mki", rot, local) + boxes[:, None, :2]


# ----------------------------------------------------------------------------- data to draw
def load_bev_points(path: str, color: str) -> Tuple[np.ndarray, np.ndarray, str, Optional[Tuple[float, ...]], str]:
    """Points to draw: ``(xyz [N, 3], values [N], value label, default range or None, description)``."""
    from ..io import load_voxels, read_points
    from .info import is_voxel_file
    from .voxelize import voxel_centres

    if is_voxel_file(path):
        x, meta = load_voxels(path)
        coords, feats = x.coords.numpy(), x.features.float().numpy()
        if "voxel_size" in meta and "point_range" in meta:
            vs, pr = [float(v) for v in meta["voxel_size"]], [float(v) for v in meta["point_range"]]
            xyz = voxel_centres(coords, vs, pr, x.stride)
            default = (pr[0], pr[1], pr[3], pr[4])
        else:
            print(f"sparseconv view: {path} stores no voxel_size / point_range: drawing voxel indices",
                  file=sys.stderr)
            xyz = coords[:, 1:4].astype(np.float64) + 0.5
            s = x.spatial_shape
            default = (0.0, 0.0, float(s[0]), float(s[1]))
        desc = f"{x.num_voxels:,} voxels"
        if color == "intensity":
            names = list(meta.get("feature_names", []))
            if "intensity" in names:
                col, label = names.index("intensity"), "intensity (voxel)"
            elif feats.shape[1] > 3:
                col = 3
                label = f"feature {names[3] if len(names) > 3 else 3}"
            else:
                col, label = 0, f"feature {names[0] if names else 0}"
            values = feats[:, col] if len(feats) else np.zeros(0)
        else:
            values, label = xyz[:, 2], "height z (m)"
        return xyz, values, label, default, desc
    cloud = read_points(path)
    finite = cloud.finite_mask()
    xyz = cloud.xyz[finite].astype(np.float64)
    desc = f"{len(xyz):,} points"
    if color == "intensity":
        if "intensity" not in cloud.fields:
            raise ValueError(f"{path} has no intensity field (fields: {list(cloud.fields) or 'none'}); "
                             f"use --color height")
        values, label = np.asarray(cloud.fields["intensity"], np.float64).reshape(len(cloud), -1)[finite, 0], \
            "intensity"
    else:
        values, label = xyz[:, 2], "height z (m)"
    return xyz, values, label, None, desc


def render_bev(xyz, values, value_label, out_path, bev_range, size=None, boxes=None, box_types=None,
               title="", box_sets=()) -> None:
    """Draws points (and LiDAR boxes ``[M, 7]``) seen from above into a PNG, atomically.

    ``boxes`` / ``box_types`` are drawn in their class colours (:data:`CLASS_COLORS`). ``box_sets``
    adds more groups of boxes, each a dict with ``boxes`` ``[M, 7]`` and optionally ``types``
    (``[M]`` class names), ``color`` (one colour for the group instead of the class colours),
    ``linestyle`` (e.g. ``"--"``), ``label`` (one legend entry for the group instead of one per
    class) and ``scores`` (``[M]``, written beside each box).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    from ..io import atomic_write

    x0, y0, x1, y1 = bev_range
    margin_l, margin_r, margin_b, margin_t = 70, 110, 50, 30  # pixels: axis labels, colour bar, title
    if size is None:
        w = 1000
        h = int(round(min(max((w - margin_l - margin_r) * (y1 - y0) / (x1 - x0), 200), 3000))) + margin_b + margin_t
    else:
        w, h = size
    # the plot keeps 1 m = 1 m on both axes, centred in the space left by the margins
    avail_w, avail_h = max(w - margin_l - margin_r, 8), max(h - margin_b - margin_t, 8)
    scale = min(avail_w / (x1 - x0), avail_h / (y1 - y0))
    pw, ph = (x1 - x0) * scale, (y1 - y0) * scale
    left, bottom = margin_l + (avail_w - pw) / 2, margin_b + (avail_h - ph) / 2
    dpi = 100
    fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor="black")
    try:
        ax = fig.add_axes((left / w, bottom / h, pw / w, ph / h), facecolor="black")
        cax = fig.add_axes(((left + pw + 12) / w, bottom / h, 16 / w, ph / h))
        inside = (xyz[:, 0] >= x0) & (xyz[:, 0] <= x1) & (xyz[:, 1] >= y0) & (xyz[:, 1] <= y1)
        p, v = xyz[inside], np.asarray(values)[inside]
        order = np.argsort(p[:, 2], kind="stable")  # higher points drawn on top
        p, v = p[order], v[order]
        ok = np.isfinite(v)  # NaN values (e.g. a NaN intensity) are drawn transparent
        if ok.any():
            lo, hi = np.percentile(v[ok], [1, 99]) if ok.sum() > 100 else (v[ok].min(), v[ok].max())
            hi = hi if hi > lo else lo + 1e-6
        else:
            lo, hi = 0.0, 1.0
        # marker area: about 1.5 pixels across, more when zoomed in (few metres per image)
        px = max(1.5, min(4.0, 0.05 * scale))
        cmap = ListedColormap(plt.get_cmap("turbo")(np.linspace(0.12, 1.0, 256)))  # no near-black low end
        sc = ax.scatter(p[:, 0], p[:, 1], c=v, s=(px * 72 / dpi) ** 2, marker="o", linewidths=0, cmap=cmap,
                        vmin=lo, vmax=hi, rasterized=True)
        cb = fig.colorbar(sc, cax=cax)
        cb.set_label(value_label, color="white")
        cb.ax.tick_params(colors="white")
        shown = {}
        sets = [{"boxes": boxes, "types": box_types}] if boxes is not None else []
        outline = [patheffects.withStroke(linewidth=3.5, foreground="black")]  # readable on any point colour
        for group in list(sets) + list(box_sets or ()):
            group_boxes = np.asarray(group["boxes"], np.float64).reshape(-1, 7)
            if not len(group_boxes):
                continue
            types = group.get("types")
            types = ["box"] * len(group_boxes) if types is None else [str(t) for t in types]
            scores = group.get("scores")
            ls = group.get("linestyle", "-")
            for i, (box, quad) in enumerate(zip(group_boxes, box_corners_bev(group_boxes))):
                c = group.get("color") or CLASS_COLORS.get(types[i], "#80ff80")
                ring = np.vstack([quad, quad[:1]])
                ax.plot(ring[:, 0], ring[:, 1], color=c, linewidth=1.5, linestyle=ls, zorder=3, path_effects=outline)
                front = quad[[0, 3]].mean(0)
                ax.plot([box[0], front[0]], [box[1], front[1]], color=c, linewidth=1.5, zorder=3, path_effects=outline)
                if scores is not None:
                    ax.text(quad[:, 0].max(), quad[:, 1].max(), f"{float(scores[i]):.2f}", color=c, fontsize=6,
                            zorder=4, clip_on=True, path_effects=outline)
                shown[group.get("label") or types[i]] = (c, ls)
        if shown:
            handles = [Line2D([], [], color=c, linestyle=ls, label=k) for k, (c, ls) in shown.items()]
            leg = ax.legend(handles=handles, loc="upper right", fontsize=8, facecolor="black", edgecolor="gray")
            for t in leg.get_texts():
                t.set_color("white")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("x (m)", color="white")
        ax.set_ylabel("y (m)", color="white")
        ax.tick_params(colors="white")
        for spine in ax.spines.values():
            spine.set_color("gray")
        if title:
            ax.set_title(title, color="white", fontsize=9)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[:, :, :3]  # opaque figure: RGB is enough (smaller file)
        from PIL import Image  # a matplotlib dependency

        with atomic_write(out_path) as f:
            Image.fromarray(np.ascontiguousarray(rgb)).save(f, format="png", optimize=True)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- optional 3D view
def _render_3d_child(xyz, values, boxes, out_path, size, problems) -> None:
    """Runs in a separate process: an Open3D offscreen rendering (may crash without OpenGL/EGL)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # Open3D's C++ warnings about missing displays
    os.dup2(devnull, 2)
    try:
        _render_3d(xyz, values, boxes, out_path, size)
    except Exception as e:
        problems.put(f"{type(e).__name__}: {e}")
        raise SystemExit(1)


def _render_3d(xyz, values, boxes, out_path, size) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import open3d as o3d
    from matplotlib import cm

    from ..io import atomic_write

    w, h = size
    renderer = o3d.visualization.rendering.OffscreenRenderer(w, h)
    v = np.asarray(values, np.float64)
    span = np.ptp(v) if len(v) else 1.0
    colors = cm.viridis((v - (v.min() if len(v) else 0)) / (span if span > 0 else 1.0))[:, :3]
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(xyz, np.float64)))
    pcd.colors = o3d.utility.Vector3dVector(colors)
    mat = o3d.visualization.rendering.MaterialRecord()
    mat.shader, mat.point_size = "defaultUnlit", 2.0
    renderer.scene.add_geometry("points", pcd, mat)
    for i, b in enumerate(np.asarray(boxes).reshape(-1, 7)):
        rot = o3d.geometry.get_rotation_matrix_from_xyz((0.0, 0.0, float(b[6])))
        obb = o3d.geometry.OrientedBoundingBox(b[:3], rot, b[3:6])
        lines = o3d.geometry.LineSet.create_from_oriented_bounding_box(obb)
        lines.paint_uniform_color((1.0, 0.2, 0.2))
        renderer.scene.add_geometry(f"box{i}", lines, mat)
    centre = np.asarray(xyz).mean(0) if len(xyz) else np.zeros(3)
    renderer.setup_camera(60.0, centre, centre + np.array([-25.0, 0.0, 20.0]), [0.0, 0.0, 1.0])
    image = np.asarray(renderer.render_to_image())
    with atomic_write(out_path) as f:
        plt.imsave(f, image, format="png")


def try_render_3d(xyz, values, boxes, out_path, size) -> Optional[str]:
    """The 3D rendering in a child process, so that a missing OpenGL cannot crash the command.

    Returns None on success, else why it failed.
    """
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    problems = ctx.Queue()
    proc = ctx.Process(target=_render_3d_child, args=(xyz, values, boxes, out_path, size, problems))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return "the renderer did not finish in 120 s"
    if proc.exitcode == 0 and os.path.exists(out_path):
        return None
    try:
        return problems.get(timeout=1)
    except queue.Empty:
        return f"the rendering process ended with exit code {proc.exitcode}"


# ----------------------------------------------------------------------------- the command
def _boxes(n: int) -> str:
    return f"{n} box" if n == 1 else f"{n} boxes"


def _usage(msg: str) -> int:
    print(f"sparseconv view: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    from ..io import PointCloudError

    if args.labels and not args.calib:
        return _usage("--labels needs --calib: KITTI boxes are in the camera frame")
    if args.size is not None and min(args.size) < 16:
        return _usage(f"--size must be at least 16 x 16 pixels, got {args.size}")
    if args.bev_range is not None and (args.bev_range[0] >= args.bev_range[2] or
                                       args.bev_range[1] >= args.bev_range[3]):
        return _usage(f"--range must be XMIN YMIN XMAX YMAX with min < max, got {args.bev_range}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        return _usage(f"-o {args.output}: the folder {folder} does not exist")
    try:
        xyz, values, label, default, desc = load_bev_points(args.file, args.color)
        boxes, types = None, None
        if args.labels:
            labels = read_kitti_labels(args.labels)
            boxes, types = camera_boxes_to_lidar(labels, read_kitti_calib(args.calib)), labels["type"]
    except (ValueError, OSError, KeyError, ImportError) as e:  # PointCloudError is a ValueError
        reason = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"sparseconv view: error: {reason}", file=sys.stderr)
        return 1
    bev_range = args.bev_range or default
    if bev_range is None:
        if len(xyz):
            lo, hi = xyz[:, :2].min(0), xyz[:, :2].max(0)
            pad = 0.02 * max(float((hi - lo).max()), 1.0)
            bev_range = (lo[0] - pad, lo[1] - pad, hi[0] + pad, hi[1] + pad)
        else:
            bev_range = (-1.0, -1.0, 1.0, 1.0)
    title = f"{os.path.basename(args.file)}: {desc}"
    if boxes is not None:
        title += f", {_boxes(len(boxes))} from {os.path.basename(args.labels)}"
    try:
        render_bev(xyz, values, label, args.output, bev_range, args.size, boxes, types, title)
    except (OSError, PointCloudError) as e:
        print(f"sparseconv view: error: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({desc}{'' if boxes is None else ', ' + _boxes(len(boxes))})")
    if args.three_d:
        stem, ext = os.path.splitext(args.output)
        path3d = f"{stem}_3d{ext or '.png'}"
        size = tuple(args.size) if args.size else (1000, 750)
        problem = try_render_3d(xyz, values, np.zeros((0, 7)) if boxes is None else boxes, path3d, size)
        if problem is None:
            print(f"wrote {path3d} (Open3D 3D view)")
        else:
            print(f"sparseconv view: --3d: Open3D offscreen rendering is not available here ({problem}); it needs "
                  f"a working OpenGL/EGL or a display. {path3d} was not written; the bird's-eye view {args.output} "
                  f"is complete.", file=sys.stderr)
    return 0
