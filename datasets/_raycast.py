"""Exact, vectorised ray casting for the synthetic LiDAR scenes of :mod:`sparseconv.datasets.synthetic`.

A :class:`Scene` holds a piecewise-planar :class:`Ground` (road-frame regions at road level or
raised by a curb height, on a longitudinal profile of constant-grade segments) and four kinds
of primitives: upright oriented boxes (yaw only), vertical cylinders with caps, ellipsoids
(yaw only) and parallelograms. Every ray starts at the sensor, the origin of the LiDAR frame.

:func:`cast` intersects all rays of a :class:`RayGrid` (beams x columns, one azimuth step) with
the scene and keeps the nearest hit of each ray:

* the ground analytically, ray against each (segment, level) plane for all rays, a hit being
  valid where the plane's region map says that level;
* every primitive only against the rays of its angular footprint: the block of beams and
  columns its bounding cylinder covers seen from the origin (so a scan costs about as many
  ray-primitive tests as rays, not rays x primitives), and only rays whose ground hit is not
  nearer than the primitive's bounding sphere;
* ray-plane, ray-slab, ray-cylinder and ray-ellipsoid tests in float64, in chunks of pairs.

Porous primitives (foliage, fences) let a ray through with probability ``porosity`` and
ellipsoids with ``jitter > 0`` are shrunk by a random factor in ``[1 - jitter, 1]`` per ray;
both draws come from a hash of (ray, primitive, salt), so a scan does not depend on chunking or
culling and is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["RayGrid", "Ground", "Scene", "CastResult", "cast", "hash_uniform"]

_EPS_T = 1e-6  # hits closer than this to the sensor are ignored (m)
_PAIR_CHUNK = 1 << 19  # ray-primitive pairs tested at once


# ----------------------------------------------------------------------------- rays
@dataclass(frozen=True)
class RayGrid:
    """The rays of one revolution: ``beams x columns``, ray ``b * columns + j``.

    Args:
        elevations: ``[B]`` beam elevations in radians, strictly decreasing (beam 0 on top).
        columns: rays per beam and revolution.
        az_start: azimuth of column 0 in radians; column ``j`` points at
            ``az_start + j * 2 pi / columns`` (counter-clockwise from +x).
        origin_z: ``[B]`` height of each beam's origin above the LiDAR frame origin (m): the
            rays of beam ``b`` start at ``(0, 0, origin_z[b])`` (the emitters of a real sensor
            sit above or below its frame origin). Default 0.
    """

    elevations: np.ndarray
    columns: int
    az_start: float = -np.pi
    origin_z: Optional[np.ndarray] = None

    def __post_init__(self):
        el = np.asarray(self.elevations, np.float64).reshape(-1)
        if len(el) == 0 or not np.all(np.isfinite(el)) or (len(el) > 1 and np.any(np.diff(el) >= 0)):
            raise ValueError(f"beam elevations must be finite and strictly decreasing, got {el}")
        if int(self.columns) < 1:
            raise ValueError(f"columns must be >= 1, got {self.columns}")
        object.__setattr__(self, "elevations", el)
        object.__setattr__(self, "columns", int(self.columns))
        oz = np.zeros(len(el)) if self.origin_z is None else np.asarray(self.origin_z, np.float64).reshape(-1)
        if oz.shape != el.shape or not np.all(np.isfinite(oz)):
            raise ValueError(f"origin_z must be {len(el)} finite numbers (one per beam), got {oz}")
        object.__setattr__(self, "origin_z", oz)

    @property
    def beams(self) -> int:
        return len(self.elevations)

    @property
    def step(self) -> float:
        return 2 * np.pi / self.columns

    @property
    def azimuths(self) -> np.ndarray:
        """``[C]`` column azimuths (radians)."""
        return self.az_start + np.arange(self.columns) * self.step

    def directions(self) -> np.ndarray:
        """Unit directions ``[B * C, 3]``, beam-major."""
        el = self.elevations[:, None]
        az = self.azimuths[None, :]
        d = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), -1)
        return d.reshape(-1, 3)

    def ray_origin_z(self) -> np.ndarray:
        """``[B * C]`` height of each ray's origin (beam-major)."""
        return np.repeat(self.origin_z, self.columns)


def hash_uniform(a: np.ndarray, b, salt: int) -> np.ndarray:
    """Deterministic pseudo-random numbers in ``[0, 1)`` from integer keys (splitmix64 finalizer).

    Example:
        >>> u = hash_uniform(np.arange(5), 3, salt=7)     # same numbers on every call
    """
    with np.errstate(over="ignore"):
        x = np.asarray(a).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= (np.asarray(b).astype(np.uint64) + np.uint64(salt & 0xFFFFFFFFFFFF)) * np.uint64(0xC2B2AE3D27D4EB4F)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- ground
@dataclass
class Ground:
    """A piecewise-planar ground in a road frame.

    Road coordinates: ``u`` along the road (heading ``heading`` from +x), ``v`` across it (to the
    left), origin at LiDAR ``(x0, y0)``. The road-level surface is
    ``z = c_k + g_k * u + cross_slope * v`` on segment ``k`` (``u`` between ``breaks[k - 1]`` and
    ``breaks[k]``); raised regions (sidewalks) lie ``curb_height`` above it.

    Args:
        regions: float ``[G, 4]`` rectangles ``u0, u1, v0, v1`` (may be infinite), not overlapping
            within one level.
        region_raised: bool ``[G]``.
        region_semantic: ``[G]`` SemanticKITTI ids.
        region_reflectivity: ``[G]``.
        breaks: ``[K - 1]`` increasing ``u`` where the grade changes.
        grades: ``[K]`` grade (dz / du) of each segment.
        z0: road-level height at ``u = 0, v = 0``.
        paint: ``[P, 7]`` dashed lines ``v_centre, width, period, dash, phase, u0, u1`` on road
            regions (semantic 40): reflectivity ``paint_reflectivity`` where
            ``(u - phase) mod period < dash``.

    Example:
        >>> g = Ground.flat(-1.73)          # an infinite flat road 1.73 m below the sensor
    """

    regions: np.ndarray
    region_raised: np.ndarray
    region_semantic: np.ndarray
    region_reflectivity: np.ndarray
    x0: float = 0.0
    y0: float = 0.0
    heading: float = 0.0
    breaks: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grades: np.ndarray = field(default_factory=lambda: np.zeros(1))
    z0: float = -1.73
    cross_slope: float = 0.0
    curb_height: float = 0.15
    paint: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    paint_reflectivity: float = 0.8

    def __post_init__(self):
        self.regions = np.asarray(self.regions, np.float64).reshape(-1, 4)
        g = len(self.regions)
        self.region_raised = np.asarray(self.region_raised, bool).reshape(g)
        self.region_semantic = np.asarray(self.region_semantic, np.uint16).reshape(g)
        self.region_reflectivity = np.asarray(self.region_reflectivity, np.float64).reshape(g)
        self.breaks = np.asarray(self.breaks, np.float64).reshape(-1)
        self.grades = np.asarray(self.grades, np.float64).reshape(-1)
        if len(self.grades) != len(self.breaks) + 1:
            raise ValueError(f"{len(self.breaks)} grade breaks need {len(self.breaks) + 1} grades, "
                             f"got {len(self.grades)}")
        if len(self.breaks) > 1 and np.any(np.diff(self.breaks) <= 0):
            raise ValueError("grade breaks must be increasing")
        self.paint = np.asarray(self.paint, np.float64).reshape(-1, 7)
        # intercepts c_k of the continuous profile z = c_k + g_k u with z(0) = z0
        k0 = int(np.searchsorted(self.breaks, 0.0, side="right"))
        c = np.zeros(len(self.grades))
        c[k0] = self.z0
        for k in range(k0 + 1, len(self.grades)):  # continuity at breaks[k - 1]
            u = self.breaks[k - 1]
            c[k] = c[k - 1] + (self.grades[k - 1] - self.grades[k]) * u
        for k in range(k0 - 1, -1, -1):
            u = self.breaks[k]
            c[k] = c[k + 1] + (self.grades[k + 1] - self.grades[k]) * u
        self._intercepts = c

    @classmethod
    def flat(cls, z: float, semantic: int = 40, reflectivity: float = 0.3) -> "Ground":
        """An infinite horizontal plane ``z = z`` of one class."""
        return cls(regions=[[-np.inf, np.inf, -np.inf, np.inf]], region_raised=[False], region_semantic=[semantic],
                   region_reflectivity=[reflectivity], z0=z, curb_height=0.0)

    # coordinates
    def to_road(self, x, y) -> Tuple[np.ndarray, np.ndarray]:
        """LiDAR ``(x, y)`` to road ``(u, v)``."""
        c, s = np.cos(self.heading), np.sin(self.heading)
        dx, dy = np.asarray(x, np.float64) - self.x0, np.asarray(y, np.float64) - self.y0
        return c * dx + s * dy, -s * dx + c * dy

    def to_lidar(self, u, v) -> Tuple[np.ndarray, np.ndarray]:
        """Road ``(u, v)`` to LiDAR ``(x, y)``."""
        c, s = np.cos(self.heading), np.sin(self.heading)
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        return self.x0 + c * u - s * v, self.y0 + s * u + c * v

    def segment_of(self, u) -> np.ndarray:
        return np.searchsorted(self.breaks, np.asarray(u, np.float64), side="right")

    def road_level(self, u, v) -> np.ndarray:
        """Road-level height at road coordinates ``(u, v)``."""
        k = self.segment_of(u)
        return self._intercepts[k] + self.grades[k] * np.asarray(u, np.float64) + self.cross_slope * np.asarray(v)

    def region_at(self, u, v) -> np.ndarray:
        """Index of the region holding ``(u, v)`` (raised regions first), -1 where none."""
        u, v = np.broadcast_arrays(np.asarray(u, np.float64), np.asarray(v, np.float64))
        out = np.full(u.shape, -1, np.int64)
        for i in np.argsort(~self.region_raised, kind="stable"):
            u0, u1, v0, v1 = self.regions[i]
            inside = (out < 0) & (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)
            out[inside] = i
        return out

    def height_at(self, x, y) -> np.ndarray:
        """Ground surface height under LiDAR ``(x, y)`` (raised where a raised region is)."""
        u, v = self.to_road(x, y)
        r = self.region_at(u, v)
        raised = np.where(r >= 0, self.region_raised[np.maximum(r, 0)], False)
        return self.road_level(u, v) + raised * self.curb_height

    def normal(self, k: int) -> np.ndarray:
        """Upward unit normal of segment ``k``'s planes in the LiDAR frame."""
        c, s = np.cos(self.heading), np.sin(self.heading)
        g, gv = self.grades[k], self.cross_slope
        n = np.array([-g * c + gv * s, -g * s - gv * c, 1.0])
        return n / np.linalg.norm(n)


# ----------------------------------------------------------------------------- scene
_KINDS = ("box", "cylinder", "ellipsoid", "quad")


class Scene:
    """Primitives to ray-cast, each with a SemanticKITTI class, an instance id (0 for stuff), a
    reflectivity in [0, 1] and a porosity (probability that a ray passes through).

    Args:
        ground: the :class:`Ground`, or None for none.

    Example:
        >>> scene = Scene(Ground.flat(-1.73))
        >>> scene.add_box((10, 0, -0.95), (4.0, 1.6, 1.56), yaw=0.0, semantic=10, instance=1)
        >>> scene.add_cylinder((5, 3, -1.73), radius=0.1, height=6.0, semantic=80)
    """

    def __init__(self, ground: Optional[Ground] = None):
        self.ground = ground
        self._rows: Dict[str, List[tuple]] = {k: [] for k in _KINDS}
        self._compiled: Optional[Dict[str, Dict[str, np.ndarray]]] = None
        #: labelled objects: dicts with ``name``, ``instance``, ``semantic``, ``box`` (``[7]``)
        self.objects: List[dict] = []
        #: free-form description of the generated layout (for the docs and debugging)
        self.info: Dict[str, object] = {}

    def _add(self, kind, geometry, semantic, instance, reflectivity, porosity, jitter=0.0):
        if not 0 <= semantic <= 0xFFFF or not 0 <= instance <= 0xFFFF:
            raise ValueError(f"semantic and instance ids must be in [0, 65535], got {semantic}, {instance}")
        self._rows[kind].append((tuple(float(v) for v in geometry), int(semantic), int(instance),
                                 float(reflectivity), float(porosity), float(jitter)))
        self._compiled = None

    def add_box(self, centre, size, yaw=0.0, semantic=0, instance=0, reflectivity=0.3, porosity=0.0):
        """An upright box: ``centre`` (x, y, z), ``size`` (l, w, h) along its heading ``yaw``."""
        if min(size) <= 0:
            raise ValueError(f"box size must be positive, got {size}")
        self._add("box", (*centre, *size, yaw), semantic, instance, reflectivity, porosity)

    def add_cylinder(self, base, radius, height, semantic=0, instance=0, reflectivity=0.3, porosity=0.0):
        """A vertical cylinder with caps: bottom centre ``base`` (x, y, z), ``radius``, ``height``."""
        if radius <= 0 or height <= 0:
            raise ValueError(f"cylinder radius and height must be positive, got {radius}, {height}")
        self._add("cylinder", (*base, radius, height), semantic, instance, reflectivity, porosity)

    def add_ellipsoid(self, centre, radii, yaw=0.0, semantic=0, instance=0, reflectivity=0.3, porosity=0.0,
                      jitter=0.0):
        """An ellipsoid with semi-axes ``radii`` (along its heading ``yaw``, across, up)."""
        if min(radii) <= 0 or not 0 <= jitter < 1:
            raise ValueError(f"ellipsoid radii must be positive and jitter in [0, 1), got {radii}, {jitter}")
        self._add("ellipsoid", (*centre, *radii, yaw), semantic, instance, reflectivity, porosity, jitter)

    def add_quad(self, origin, edge_a, edge_b, semantic=0, instance=0, reflectivity=0.3, porosity=0.0):
        """A parallelogram ``origin + alpha * edge_a + beta * edge_b``, ``alpha, beta`` in [0, 1]."""
        if np.linalg.norm(np.cross(edge_a, edge_b)) <= 0:
            raise ValueError("quad edges must not be parallel")
        self._add("quad", (*origin, *edge_a, *edge_b), semantic, instance, reflectivity, porosity)

    def add_object(self, name: str, instance: int, semantic: int, box) -> None:
        """Registers a labelled object (its parts are added separately with its ``instance``)."""
        self.objects.append({"name": str(name), "instance": int(instance), "semantic": int(semantic),
                             "box": np.asarray(box, np.float64).reshape(7)})

    def count(self, kind: Optional[str] = None) -> int:
        return sum(len(v) for v in self._rows.values()) if kind is None else len(self._rows[kind])

    def compiled(self) -> Dict[str, Dict[str, np.ndarray]]:
        """Struct-of-arrays form of the primitives with their bounding cylinders and spheres."""
        if self._compiled is not None:
            return self._compiled
        out = {}
        gid = 0
        for kind in _KINDS:
            rows = self._rows[kind]
            n = len(rows)
            width = {"box": 7, "cylinder": 5, "ellipsoid": 7, "quad": 9}[kind]
            geo = np.array([r[0] for r in rows], np.float64).reshape(n, width)
            d = {
                "geo": geo,
                "semantic": np.array([r[1] for r in rows], np.uint16),
                "instance": np.array([r[2] for r in rows], np.uint16),
                "reflectivity": np.array([r[3] for r in rows], np.float64),
                "porosity": np.array([r[4] for r in rows], np.float64),
                "jitter": np.array([r[5] for r in rows], np.float64),
                "gid": np.arange(gid, gid + n, dtype=np.int64),
            }
            gid += n
            # bounding vertical cylinder (cx, cy, r, z0, z1)
            if kind == "box":
                c, half = geo[:, :3], geo[:, 3:6] / 2
                cx, cy, r = c[:, 0], c[:, 1], np.hypot(half[:, 0], half[:, 1])
                z0, z1 = c[:, 2] - half[:, 2], c[:, 2] + half[:, 2]
            elif kind == "cylinder":
                cx, cy, r, z0 = geo[:, 0], geo[:, 1], geo[:, 3], geo[:, 2]
                z1 = z0 + geo[:, 4]
            elif kind == "ellipsoid":
                cx, cy = geo[:, 0], geo[:, 1]
                r = np.maximum(geo[:, 3], geo[:, 4])
                z0, z1 = geo[:, 2] - geo[:, 5], geo[:, 2] + geo[:, 5]
            else:
                o, a, b = geo[:, 0:3], geo[:, 3:6], geo[:, 6:9]
                corners = np.stack([o, o + a, o + b, o + a + b], 1)  # [n, 4, 3]
                lo, hi = corners.min(1), corners.max(1)
                cx, cy = (lo[:, 0] + hi[:, 0]) / 2, (lo[:, 1] + hi[:, 1]) / 2
                r = np.hypot(hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1]) / 2
                z0, z1 = lo[:, 2], hi[:, 2]
            d["bound"] = np.stack([cx, cy, r, z0, z1], 1) if n else np.zeros((0, 5))
            # nearest possible hit distance: distance from the origin to the bounding cylinder
            if n:
                dxy = np.maximum(np.hypot(cx, cy) - r, 0.0)
                dz = np.maximum(np.maximum(z0, -z1), 0.0)
                d["near"] = np.hypot(dxy, dz)
            else:
                d["near"] = np.zeros(0)
            out[kind] = d
        self._compiled = out
        return out


# ----------------------------------------------------------------------------- per-kind tests
def _test_boxes(oz, D, geo):
    """Slab test of rays from ``(0, 0, oz)``: returns t (inf for no hit) and world normals."""
    c, half, yaw = geo[:, 0:3], geo[:, 3:6] * 0.5, geo[:, 6]
    cs, sn = np.cos(yaw), np.sin(yaw)
    # local frame: rotate by -yaw about z, origin at the centre
    dl = np.stack([cs * D[:, 0] + sn * D[:, 1], -sn * D[:, 0] + cs * D[:, 1], D[:, 2]], 1)
    ol = np.stack([-(cs * c[:, 0] + sn * c[:, 1]), sn * c[:, 0] - cs * c[:, 1], oz - c[:, 2]], 1)
    tiny = np.where(dl >= 0, 1e-300, -1e-300)
    inv = 1.0 / np.where(np.abs(dl) < 1e-300, tiny, dl)
    t1 = (-half - ol) * inv
    t2 = (half - ol) * inv
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    axis = np.argmax(tnear, 1)
    t_in = np.take_along_axis(tnear, axis[:, None], 1)[:, 0]
    t_out = tfar.min(1)
    hit = (t_in <= t_out) & (t_in > _EPS_T)
    t = np.where(hit, t_in, np.inf)
    # normal: the entry face, facing the ray
    sign = -np.sign(np.take_along_axis(dl, axis[:, None], 1)[:, 0])
    nl = np.zeros_like(dl)
    nl[np.arange(len(dl)), axis] = sign
    n = np.stack([cs * nl[:, 0] - sn * nl[:, 1], sn * nl[:, 0] + cs * nl[:, 1], nl[:, 2]], 1)
    return t, n


def _test_cylinders(oz, D, geo):
    cx, cy, r, h = geo[:, 0], geo[:, 1], geo[:, 3], geo[:, 4]
    z0 = geo[:, 2] - oz  # heights relative to the ray origin
    z1 = z0 + h
    a = D[:, 0] ** 2 + D[:, 1] ** 2
    b = -2 * (D[:, 0] * cx + D[:, 1] * cy)
    c = cx * cx + cy * cy - r * r
    disc = b * b - 4 * a * c
    outside = c > 0
    ok = (disc >= 0) & (a > 1e-18) & outside
    sq = np.sqrt(np.where(ok, disc, 0.0))
    ts = np.where(ok, (-b - sq) / np.where(a > 1e-18, 2 * a, 1.0), np.inf)
    zs = ts * D[:, 2]
    side = ok & (ts > _EPS_T) & (zs >= z0) & (zs <= z1)
    t_side = np.where(side, ts, np.inf)
    # caps: the top one seen from above, the bottom one from below
    dz = D[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        zc = np.where(z1 < 0, z1, z0)
        tc = np.where(((z1 < 0) & (dz < 0)) | ((z0 > 0) & (dz > 0)), zc / dz, np.inf)
    with np.errstate(invalid="ignore"):  # inf * 0 for rays without a cap hit
        px, py = tc * D[:, 0] - cx, tc * D[:, 1] - cy
        cap = np.isfinite(tc) & (tc > _EPS_T) & (px * px + py * py <= r * r)
    t_cap = np.where(cap, tc, np.inf)
    t = np.minimum(t_side, t_cap)
    use_side = t_side <= t_cap
    tt = np.where(np.isfinite(t), t, 0.0)
    nx, ny = tt * D[:, 0] - cx, tt * D[:, 1] - cy
    nr = np.maximum(np.hypot(nx, ny), 1e-12)
    n = np.where(use_side[:, None], np.stack([nx / nr, ny / nr, np.zeros_like(nx)], 1),
                 np.stack([np.zeros_like(nx), np.zeros_like(nx), np.where(z1 < 0, 1.0, -1.0)], 1))
    return t, n


def _test_ellipsoids(oz, D, geo, scale):
    c, radii, yaw = geo[:, 0:3], geo[:, 3:6] * scale[:, None], geo[:, 6]
    cs, sn = np.cos(yaw), np.sin(yaw)
    dl = np.stack([cs * D[:, 0] + sn * D[:, 1], -sn * D[:, 0] + cs * D[:, 1], D[:, 2]], 1) / radii
    ol = np.stack([-(cs * c[:, 0] + sn * c[:, 1]), sn * c[:, 0] - cs * c[:, 1], oz - c[:, 2]], 1) / radii
    a = (dl * dl).sum(1)
    b = 2 * (ol * dl).sum(1)
    cc = (ol * ol).sum(1) - 1.0
    disc = b * b - 4 * a * cc
    ok = (disc >= 0) & (cc > 0)
    t = np.where(ok, (-b - np.sqrt(np.where(ok, disc, 0.0))) / (2 * a), np.inf)
    t = np.where(t > _EPS_T, t, np.inf)
    tt = np.where(np.isfinite(t), t, 0.0)
    q = (ol + tt[:, None] * dl) / radii  # gradient of the implicit function in the local frame
    n = np.stack([cs * q[:, 0] - sn * q[:, 1], sn * q[:, 0] + cs * q[:, 1], q[:, 2]], 1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return t, n


def _test_quads(oz, D, geo):
    o, a, b = geo[:, 0:3].copy(), geo[:, 3:6], geo[:, 6:9]
    o[:, 2] -= oz  # the quad relative to the ray origin
    ab = np.cross(a, b)
    den = np.linalg.norm(ab, axis=1)
    n = ab / den[:, None]
    dn = (D * n).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (o * n).sum(1) / dn
    t = np.where(np.isfinite(t) & (t > _EPS_T), t, np.inf)
    tt = np.where(np.isfinite(t), t, 0.0)
    q = tt[:, None] * D - o
    alpha = (q * np.cross(b, n)).sum(1) / den
    beta = (q * np.cross(n, a)).sum(1) / den
    inside = (alpha >= 0) & (alpha <= 1) & (beta >= 0) & (beta <= 1)
    t = np.where(inside, t, np.inf)
    n = np.where((dn > 0)[:, None], -n, n)
    return t, n


# ----------------------------------------------------------------------------- culling
def _footprints(bound: np.ndarray, grid: RayGrid):
    """Per primitive: first beam, beam count, first column, column count of its angular footprint."""
    cx, cy, r, z0, z1 = bound.T
    z0 = z0 - grid.origin_z.max()  # conservative over the beams' origins
    z1 = z1 - grid.origin_z.min()
    C = grid.columns
    dist = np.hypot(cx, cy)
    inside = dist <= r * (1 + 1e-9) + 1e-9
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(inside, np.pi, np.arcsin(np.clip(r / np.where(inside, 1.0, dist), 0, 1)))
    az = np.arctan2(cy, cx)
    margin = 1e-7
    j_lo = np.ceil((az - half - margin - grid.az_start) / grid.step).astype(np.int64)
    j_hi = np.floor((az + half + margin - grid.az_start) / grid.step).astype(np.int64)
    ncol = np.clip(j_hi - j_lo + 1, 0, C)
    full = inside | (ncol >= C)
    j_lo = np.where(full, 0, np.mod(j_lo, C))
    ncol = np.where(full, C, ncol)
    dmin = np.maximum(dist - r, 0.0)
    dmax = dist + r
    el_hi = np.where(z1 > 0, np.arctan2(z1, dmin), np.arctan2(z1, dmax)) + margin
    el_lo = np.where(z0 < 0, np.arctan2(z0, dmin), np.arctan2(z0, dmax)) - margin
    neg = -grid.elevations  # increasing
    b_lo = np.searchsorted(neg, -el_hi, side="left")
    b_hi = np.searchsorted(neg, -el_lo, side="right")
    nbeam = np.maximum(b_hi - b_lo, 0)
    return b_lo, nbeam, j_lo, ncol


def _pairs(bound: np.ndarray, grid: RayGrid) -> Tuple[np.ndarray, np.ndarray]:
    """All (primitive, ray) pairs of the footprints, as two int64 arrays."""
    if len(bound) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    b_lo, nbeam, j_lo, ncol = _footprints(bound, grid)
    counts = nbeam * ncol
    total = int(counts.sum())
    prim = np.repeat(np.arange(len(bound), dtype=np.int64), counts)
    if total == 0:
        return prim, np.zeros(0, np.int64)
    start = np.cumsum(counts) - counts
    k = np.arange(total, dtype=np.int64) - start[prim]
    nc = ncol[prim]
    beam = b_lo[prim] + k // nc
    col = (j_lo[prim] + k % nc) % grid.columns
    return prim, beam * grid.columns + col


# ----------------------------------------------------------------------------- ground
def _cast_ground(g: Ground, D: np.ndarray, oz: np.ndarray):
    """Nearest ground hit of every ray (from ``(0, 0, oz)``): t, semantic, reflectivity, normal."""
    R = len(D)
    t_best = np.full(R, np.inf)
    region = np.full(R, -1, np.int64)
    seg = np.zeros(R, np.int64)
    c, s = np.cos(g.heading), np.sin(g.heading)
    du, dv = c * D[:, 0] + s * D[:, 1], -s * D[:, 0] + c * D[:, 1]
    u0, v0 = g.to_road(0.0, 0.0)
    bounds = np.concatenate([[-np.inf], g.breaks, [np.inf]])
    for k in range(len(g.grades)):
        gk = g.grades[k]
        den = D[:, 2] - gk * du - g.cross_slope * dv
        for raised in (False, True):
            idx = np.nonzero(g.region_raised == raised)[0]
            if len(idx) == 0:
                continue
            num0 = g._intercepts[k] + gk * u0 + g.cross_slope * v0 + (g.curb_height if raised else 0.0)
            # rays from above the plane going down towards it (num < 0: the origin is above it)
            cand = np.nonzero((den < 0) & (num0 - oz < 0))[0]
            t = (num0 - oz[cand]) / den[cand]
            u = u0 + t * du[cand]
            keep = (u >= bounds[k]) & (u <= bounds[k + 1]) & (t < t_best[cand]) & (t > _EPS_T)
            cand, t, u = cand[keep], t[keep], u[keep]
            v = v0 + t * dv[cand]
            reg = np.full(len(cand), -1, np.int64)
            for i in idx:
                u_lo, u_hi, v_lo, v_hi = g.regions[i]
                inside = (reg < 0) & (u >= u_lo) & (u <= u_hi) & (v >= v_lo) & (v <= v_hi)
                reg[inside] = i
            ok = reg >= 0
            cand = cand[ok]
            t_best[cand] = t[ok]
            region[cand] = reg[ok]
            seg[cand] = k
    hit = region >= 0
    sem = np.zeros(R, np.uint16)
    refl = np.zeros(R, np.float64)
    sem[hit] = g.region_semantic[region[hit]]
    refl[hit] = g.region_reflectivity[region[hit]]
    normals = np.zeros((R, 3))
    for k in range(len(g.grades)):
        normals[hit & (seg == k)] = g.normal(k)
    # paint on road regions
    if len(g.paint):
        r_idx = np.nonzero(hit & (sem == 40))[0]
        tt = t_best[r_idx]
        u, v = u0 + tt * du[r_idx], v0 + tt * dv[r_idx]
        painted = np.zeros(len(r_idx), bool)
        for vc, w, period, dash, phase, pu0, pu1 in g.paint:
            painted |= (np.abs(v - vc) <= w / 2) & (u >= pu0) & (u <= pu1) & (np.mod(u - phase, period) < dash)
        refl[r_idx[painted]] = g.paint_reflectivity
    return t_best, sem, refl, normals


# ----------------------------------------------------------------------------- casting
@dataclass
class CastResult:
    """Nearest hit per ray (``t`` is inf where a ray hits nothing).

    Attributes:
        t: float64 ``[R]`` distance along the unit ray.
        semantic, instance: uint16 ``[R]``.
        reflectivity: float64 ``[R]`` of the surface hit.
        cos_incidence: float64 ``[R]``: cosine between the ray and the surface normal (0..1).
        normal: float64 ``[R, 3]``: unit normal of the surface hit, facing the sensor (0 for no hit).
        any_hits: int64 ``[H, 2]`` unique ``(instance, ray)`` pairs: every ray that hits an
            object's geometry at all (nearest or not, ground-occluded rays excluded), for
            occlusion estimates.
    """

    t: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    reflectivity: np.ndarray
    cos_incidence: np.ndarray
    normal: np.ndarray
    any_hits: np.ndarray


def cast(scene: Scene, grid: RayGrid, salt: int = 0) -> CastResult:
    """Casts every ray of ``grid`` from the origin into ``scene``; keeps the nearest hit.

    Args:
        scene: the primitives and ground.
        grid: the rays.
        salt: seeds the porosity / jitter hash.

    Returns:
        :class:`CastResult` with ``R = beams * columns`` rays, beam-major.

    Example:
        >>> grid = RayGrid(np.radians([-10.0]), columns=360)
        >>> res = cast(Scene(Ground.flat(-1.73)), grid)
        >>> bool(np.allclose(res.t, 1.73 / np.sin(np.radians(10.0))))
        True
    """
    D = grid.directions()
    OZ = grid.ray_origin_z()
    R = len(D)
    if scene.ground is not None:
        t_best, sem, refl, normals = _cast_ground(scene.ground, D, OZ)
    else:
        t_best, sem, refl, normals = np.full(R, np.inf), np.zeros(R, np.uint16), np.zeros(R), np.zeros((R, 3))
    ground_t = t_best.copy()
    ins = np.zeros(R, np.uint16)
    comp = scene.compiled()
    hits_r, hits_t, hits_kind, hits_prim, hits_n = [], [], [], [], []
    for kind_i, kind in enumerate(_KINDS):
        d = comp[kind]
        if len(d["geo"]) == 0:
            continue
        prim, ray = _pairs(d["bound"], grid)
        slack = np.abs(grid.origin_z).max()
        keep = d["near"][prim] - slack < ground_t[ray]  # the ground hides everything behind its hit
        prim, ray = prim[keep], ray[keep]
        for s in range(0, len(prim), _PAIR_CHUNK):
            p, r = prim[s:s + _PAIR_CHUNK], ray[s:s + _PAIR_CHUNK]
            geo, Dr, oz = d["geo"][p], D[r], OZ[r]
            if kind == "box":
                t, n = _test_boxes(oz, Dr, geo)
            elif kind == "cylinder":
                t, n = _test_cylinders(oz, Dr, geo)
            elif kind == "ellipsoid":
                jit = d["jitter"][p]
                scale = 1.0 - jit * hash_uniform(r, d["gid"][p], salt + 1)
                t, n = _test_ellipsoids(oz, Dr, geo, scale)
            else:
                t, n = _test_quads(oz, Dr, geo)
            hit = np.isfinite(t)
            por = d["porosity"][p]
            if np.any(por > 0):
                hit &= ~((por > 0) & (hash_uniform(r, d["gid"][p], salt + 2) < por))
            hit &= t < ground_t[r]
            hits_r.append(r[hit])
            hits_t.append(t[hit])
            hits_kind.append(np.full(int(hit.sum()), kind_i, np.int8))
            hits_prim.append(p[hit])
            hits_n.append(n[hit])
    any_hits = np.zeros((0, 2), np.int64)
    if hits_r:
        hr = np.concatenate(hits_r)
        ht = np.concatenate(hits_t)
        hk = np.concatenate(hits_kind)
        hp = np.concatenate(hits_prim)
        hn = np.concatenate(hits_n)
        best = t_best.copy()
        np.minimum.at(best, hr, ht)
        win = np.nonzero(ht <= best[hr])[0]
        # ties (equal t): the first in (kind, primitive) order, deterministic
        order = np.lexsort((win, hr[win]))
        win = win[order]
        first = np.ones(len(win), bool)
        first[1:] = hr[win][1:] != hr[win][:-1]
        win = win[first]
        rw = hr[win]
        t_best[rw] = ht[win]
        normals[rw] = hn[win]
        for kind_i, kind in enumerate(_KINDS):
            m = hk[win] == kind_i
            if not m.any():
                continue
            d, p = comp[kind], hp[win[m]]
            sem[rw[m]] = d["semantic"][p]
            ins[rw[m]] = d["instance"][p]
            refl[rw[m]] = d["reflectivity"][p]
        # every ray that meets each object (instance > 0)
        inst = np.zeros(len(hr), np.int64)
        for kind_i, kind in enumerate(_KINDS):
            m = hk == kind_i
            if m.any():
                inst[m] = comp[kind]["instance"][hp[m]]
        th = inst > 0
        if th.any():
            key = np.unique(inst[th] * R + hr[th])
            any_hits = np.stack([key // R, key % R], 1)
    cos_inc = np.abs((normals * D).sum(1))
    return CastResult(t_best, sem, ins, refl, np.clip(cos_inc, 0.0, 1.0), normals, any_hits)
