"""Point-cloud, label and voxel files.

Reads LiDAR scans into a :class:`PointCloud` (KITTI and nuScenes ``.bin``, NumPy ``.npy`` /
``.npz``, PLY and PCD through Open3D, LAS / LAZ through laspy), reads and writes SemanticKITTI
``.label`` files, and saves / loads voxelized :class:`~sparseconv.SparseTensor` s as ``.npz``.

Every reader raises :class:`PointCloudError` naming the file and the problem for a truncated,
corrupt or mis-shaped file, and :class:`FileNotFoundError` for a missing one. Every writer is
atomic (see :func:`atomic_write`): a failed write leaves neither a partial file nor a temporary
one. Open3D and laspy are imported only when a PLY / PCD or LAS / LAZ file is used.

Example:
    >>> cloud = read_points("velodyne/000000.bin")
    >>> len(cloud), cloud.field_names
    (115384, ('intensity',))
    >>> cloud.to_array().shape            # x, y, z, intensity
    (115384, 4)
"""
from __future__ import annotations

import contextlib
import errno
import io as _stdio
import os
import re
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .tensor import SparseTensor

__all__ = [
    "SUPPORTED_FORMATS",
    "PointCloudError",
    "PointCloud",
    "read_points",
    "read_labels",
    "write_labels",
    "write_kitti_bin",
    "write_ply",
    "write_npz_points",
    "save_voxels",
    "load_voxels",
    "atomic_write",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Point-cloud file extensions read by :func:`read_points`, with what each holds.
SUPPORTED_FORMATS: Dict[str, str] = {
    ".bin": "KITTI velodyne scan: float32 x, y, z, intensity per point",
    ".pcd.bin": "nuScenes lidar scan: float32 x, y, z, intensity, ring index per point",
    ".npy": "NumPy float array [N, >=3]: x, y, z, then intensity and extra columns",
    ".npz": "NumPy archive: 'xyz' [N, 3] or 'points' [N, >=3], plus per-point arrays as fields",
    ".ply": "PLY, binary or ASCII (needs open3d)",
    ".pcd": "PCL point cloud, ascii / binary / binary_compressed (needs open3d)",
    ".las": "ASPRS LAS lidar (needs laspy)",
    ".laz": "compressed LAS (needs laspy and lazrs)",
}
_FORMAT_ALIASES = {"kitti": ".bin", "nuscenes": ".pcd.bin"}

#: Version written by :func:`save_voxels`; :func:`load_voxels` reads this version and older.
VOXEL_FORMAT_VERSION = 1
_VOXEL_KEYS = ("coords", "feats", "spatial_shape", "stride", "batch_size", "version")
_INTENSITY_ALIASES = ("intensity", "intensities", "scalar_intensity")
_MAX_HEADER_BYTES = 1 << 20


class PointCloudError(ValueError):
    """A point-cloud, label or voxel file is truncated, corrupt or of an unsupported kind.

    The message names the file and the problem.
    """


# ----------------------------------------------------------------------------- PointCloud
@dataclass(eq=False)
class PointCloud:
    """Points with per-point fields.

    Args:
        xyz: ``[N, 3]`` coordinates, stored as float32. NaN / inf rows are kept (see
            :meth:`finite_mask`).
        fields: per-point arrays by name, each ``[N]`` or ``[N, k]``, dtypes as read
            (e.g. ``intensity``, ``ring``, ``rgb``, ``classification``, ``time``).
        path: the file the points were read from, if any.

    Raises:
        ValueError: ``xyz`` is not ``[N, 3]`` numbers, or a field is not ``[N]`` / ``[N, k]``.

    Example:
        >>> cloud = PointCloud(np.random.rand(100, 3), {"intensity": np.random.rand(100)})
        >>> len(cloud), cloud.to_array().shape, cloud.to_array(()).shape
        (100, (100, 4), (100, 3))
    """

    xyz: np.ndarray
    fields: Dict[str, np.ndarray] = field(default_factory=dict)
    path: Optional[str] = None

    def __post_init__(self):
        xyz = np.asarray(self.xyz)
        if xyz.ndim != 2 or xyz.shape[1] != 3 or not (np.issubdtype(xyz.dtype, np.number)):
            raise ValueError(f"PointCloud.xyz must be numbers [N, 3], got {xyz.dtype} {xyz.shape}")
        self.xyz = np.ascontiguousarray(xyz, dtype=np.float32)
        fields = {}
        for name, value in dict(self.fields).items():
            value = np.asarray(value)
            if value.ndim not in (1, 2) or value.shape[0] != len(self.xyz):
                raise ValueError(
                    f"PointCloud field {name!r} must be [N] or [N, k] with N = {len(self.xyz)} points, "
                    f"got shape {value.shape}"
                )
            fields[str(name)] = value
        self.fields = fields
        if self.path is not None:
            self.path = os.fspath(self.path)

    def __len__(self) -> int:
        return len(self.xyz)

    def __repr__(self) -> str:
        return f"PointCloud({len(self)} points, fields={list(self.fields)}, path={self.path!r})"

    @property
    def field_names(self) -> Tuple[str, ...]:
        """Names of the per-point fields, in order."""
        return tuple(self.fields)

    def to_array(self, fields: Union[str, Sequence[str]] = ("intensity",)) -> np.ndarray:
        """``xyz`` followed by the given fields as one float32 ``[N, 3 + F]`` array.

        A ``[N, k]`` field adds ``k`` columns; ``fields=()`` gives just ``xyz``.

        Raises:
            KeyError: a requested field is missing (the message lists those available).
        """
        names = (fields,) if isinstance(fields, str) else tuple(fields)
        columns = [self.xyz]
        for name in names:
            if name not in self.fields:
                where = f" from {self.path}" if self.path else ""
                raise KeyError(
                    f"point cloud{where} has no field {name!r}; available fields: {list(self.fields) or 'none'}"
                )
            columns.append(self.fields[name].reshape(len(self), -1).astype(np.float32))
        return np.concatenate(columns, axis=1)

    def finite_mask(self) -> np.ndarray:
        """bool ``[N]``: True where all three coordinates are finite."""
        return np.isfinite(self.xyz).all(axis=1)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(min, max)`` float32 ``[3]`` corners of the finite points.

        Raises:
            ValueError: no point has finite coordinates.
        """
        xyz = self.xyz[self.finite_mask()]
        if len(xyz) == 0:
            raise ValueError(f"point cloud has no finite points ({len(self)} points in all); it has no bounds")
        return xyz.min(axis=0), xyz.max(axis=0)


# ----------------------------------------------------------------------------- atomic writes
def _temp_beside(path: str, suffix: str = "") -> str:
    if path == "":
        raise ValueError("empty output path")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "the output folder does not exist", folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}")
    os.close(fd)
    return tmp


def _commit(tmp: str, path: str) -> None:
    """fsyncs ``tmp``, gives it the usual permissions and moves it onto ``path``."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _atomic_path(path: PathLike, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside ``path`` (ending in ``suffix``) that replaces ``path`` on success."""
    path = os.fspath(path)
    tmp = _temp_beside(path, suffix)
    try:
        yield tmp
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator:
    """Opens a temporary file beside ``path`` that replaces ``path`` only if the block succeeds.

    The data is flushed and fsynced, then moved over ``path`` with ``os.replace``; readers see
    either the old file or the complete new one. If the block raises, the temporary file is
    removed and ``path`` is left as it was.

    Args:
        path: the file to write.
        mode: ``"wb"`` (binary) or ``"w"`` (text).
        **open_kwargs: passed to ``open`` (e.g. ``encoding``, ``newline``).

    Example:
        >>> with atomic_write("stats.json", "w", encoding="utf-8") as f:
        ...     json.dump(stats, f)
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write mode must be 'w', 'wt' or 'wb', got {mode!r}")
    with _atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()


# ----------------------------------------------------------------------------- reading points
def _check_file(path: PathLike) -> str:
    p = os.fspath(path)
    if p == "":
        raise PointCloudError("empty path: give the file to read")
    if not os.path.exists(p):
        raise FileNotFoundError(errno.ENOENT, "no such file", p)
    if os.path.isdir(p):
        raise PointCloudError(f"{p}: is a directory, not a file")
    return p


def _formats_text() -> str:
    return ", ".join(SUPPORTED_FORMATS)


def _format_of(path: str, format: Optional[str]) -> str:
    if format is not None:
        key = format.lower()
        key = _FORMAT_ALIASES.get(key, key if key.startswith(".") else "." + key)
        if key not in SUPPORTED_FORMATS:
            raise ValueError(
                f"unknown point cloud format {format!r}; supported: {_formats_text()} (or 'kitti', 'nuscenes')"
            )
        return key
    name = os.path.basename(path).lower()
    for ext in sorted(SUPPORTED_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    ext = os.path.splitext(name)[1] or "(none)"
    hint = "; .label files hold SemanticKITTI labels: use read_labels()" if ext == ".label" else ""
    raise PointCloudError(
        f"{path}: unknown point cloud extension {ext}; supported formats: {_formats_text()}{hint}"
    )


def read_points(path: PathLike, format: Optional[str] = None) -> PointCloud:
    """Reads a point cloud file.

    The format comes from the extension (see :data:`SUPPORTED_FORMATS`) or from ``format``
    (an extension such as ``"ply"`` / ``".pcd.bin"``, or ``"kitti"`` / ``"nuscenes"``):

    * ``.bin``: KITTI velodyne, float32 ``x, y, z, intensity`` -> field ``intensity``.
    * ``.pcd.bin``: nuScenes, float32 ``x, y, z, intensity, ring`` -> ``intensity``, ``ring``
      (both float32, as stored).
    * ``.npy``: float ``[N, >=3]``; column 3 -> ``intensity``, columns 4, 5, ... -> ``f4``, ``f5``, ...
    * ``.npz``: ``xyz`` ``[N, 3]`` or ``points`` ``[N, >=3]`` (extra columns as for ``.npy``);
      every other array with ``N`` rows becomes a field, others are ignored.
    * ``.ply`` / ``.pcd``: Open3D's tensor reader; every point attribute but ``positions``
      becomes a field (``colors``, ``normals``, ``intensity``, ...). ``intensities`` and
      ``scalar_intensity`` are renamed ``intensity``; PLY columns ``name_0 .. name_{k-1}``
      (how Open3D stores a ``[N, k]`` attribute) are regrouped into one ``[N, k]`` field.
    * ``.las`` / ``.laz``: scaled coordinates; ``intensity``, ``classification``,
      ``return_number``, ``time`` (GPS time, when the point format has it), ``rgb`` (when present).

    Non-finite coordinates are kept; use :meth:`PointCloud.finite_mask` to drop them.

    Args:
        path: the file.
        format: overrides the extension.

    Returns:
        the :class:`PointCloud`, with ``path`` set.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PointCloudError: empty path, unknown extension, or a truncated / corrupt / mis-shaped file.
        ImportError: Open3D or laspy (or a LAZ backend) is needed and missing.

    Example:
        >>> cloud = read_points("scan.pcd.bin")
        >>> cloud.field_names
        ('intensity', 'ring')
    """
    p = _check_file(path)
    ext = _format_of(p, format)
    if ext == ".bin":
        xyz, fields = _read_float32_records(p, ("intensity",), "KITTI velodyne")
    elif ext == ".pcd.bin":
        xyz, fields = _read_float32_records(p, ("intensity", "ring"), "nuScenes lidar")
    elif ext == ".npy":
        xyz, fields = _read_npy(p)
    elif ext == ".npz":
        xyz, fields = _read_npz(p)
    elif ext in (".ply", ".pcd"):
        xyz, fields = _read_open3d(p, ext)
    else:
        xyz, fields = _read_las(p, ext)
    return PointCloud(xyz, fields, path=p)


def _read_float32_records(p: str, names: Sequence[str], kind: str):
    columns = 3 + len(names)
    size = os.path.getsize(p)
    if size % (4 * columns):
        raise PointCloudError(
            f"{p}: {size} bytes is not a multiple of {4 * columns} ({columns} float32 per point: "
            f"x, y, z, {', '.join(names)}); the file is truncated or not a {kind} scan"
        )
    data = np.fromfile(p, dtype="<f4").reshape(-1, columns)
    return data[:, :3], {name: data[:, 3 + i].copy() for i, name in enumerate(names)}


def _split_matrix(p: str, arr: np.ndarray, what: str):
    if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.floating):
        raise PointCloudError(
            f"{p}: {what} must be a float array [N, >=3] (x, y, z, then intensity, ...), "
            f"got {arr.dtype} array of shape {arr.shape}"
        )
    fields = {("intensity" if j == 3 else f"f{j}"): arr[:, j].copy() for j in range(3, arr.shape[1])}
    return arr[:, :3], fields


def _read_npy(p: str):
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PointCloudError(f"{p}: not a valid .npy file ({e})") from e
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise PointCloudError(f"{p}: is an .npz archive, not a single .npy array; rename it to .npz")
    return _split_matrix(p, arr, "the .npy array")


def _load_npz(p: str) -> Dict[str, np.ndarray]:
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise PointCloudError(f"{p}: not a valid .npz archive (not a zip file); the file is corrupt or of another kind")
    try:
        with np.load(p, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        raise PointCloudError(
            f"{p}: not a valid .npz archive ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from e


def _read_npz(p: str):
    arrays = _load_npz(p)
    if "xyz" in arrays:
        xyz = arrays["xyz"]
        if xyz.ndim != 2 or xyz.shape[1] != 3 or not np.issubdtype(xyz.dtype, np.floating):
            raise PointCloudError(
                f"{p}: 'xyz' must be a float array [N, 3], got {xyz.dtype} array of shape {xyz.shape}"
            )
        fields = {}
    elif "points" in arrays:
        xyz, fields = _split_matrix(p, arrays["points"], "'points'")
    else:
        raise PointCloudError(f"{p}: the .npz archive has no 'xyz' or 'points' array (keys: {sorted(arrays)})")
    for key, value in arrays.items():
        if key not in ("xyz", "points") and value.ndim in (1, 2) and value.shape[0] == len(xyz):
            fields[key] = value
    return xyz, fields


# ------------------------------------------------------------------- Open3D (PLY / PCD)
def _import_open3d(purpose: str):
    try:
        import open3d
    except (ImportError, OSError) as e:  # OSError: a shared library (e.g. libusb) is missing
        raise ImportError(
            f"{purpose} needs Open3D: pip install open3d-cpu (or open3d); importing it failed: {e}"
        ) from e
    return open3d


def _open3d_call(o3d, fn, *args):
    """Calls an Open3D I/O function; returns ``(result, problem)``.

    Open3D reports failed reads as warnings (printed through Python's ``sys.stdout``) and
    returns an empty or partly filled cloud; ``problem`` is the text of such a warning, or None.
    Other captured output is passed on to ``sys.stdout``.
    """
    log = _stdio.StringIO()
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Warning):
        with contextlib.redirect_stdout(log):
            result = fn(*args)
    lines = [re.sub(r"\x1b\[[0-9;]*m|\[Open3D [A-Z]+\] ", "", s).strip() for s in log.getvalue().splitlines()]
    problems = [s for s in lines if "fail" in s.lower() or "error" in s.lower()]
    if not problems and log.getvalue():
        sys.stdout.write(log.getvalue())
    return result, ("; ".join(problems) or None)


_PLY_SIZES = {
    "char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2,
    "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8,
}  # fmt: skip


def _header_lines(f, p: str, kind: str, last: str) -> Iterator[list]:
    """Yields the split header lines of a PLY / PCD file up to and including the ``last`` keyword."""
    while True:
        line = f.readline(4096)
        if not line or f.tell() > _MAX_HEADER_BYTES:
            raise PointCloudError(
                f"{p}: the {kind} header has no '{last}' line; the file is truncated or not a {kind} file"
            )
        words = line.decode("ascii", "replace").split()
        if words:
            yield words
            if words[0].upper() == last.upper():
                return


def _count_data_lines(f) -> int:
    return sum(1 for line in f if line.strip())


def _ply_vertex_count(p: str) -> int:
    """Validates a PLY header against the file size; returns the declared vertex count."""
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        if f.readline(8).rstrip(b"\r\n") != b"ply":
            raise PointCloudError(f"{p}: not a PLY file (it does not start with 'ply')")
        fmt, elements = None, []  # elements: [name, count, [property size or None (list)], {names}]
        for words in _header_lines(f, p, "PLY", "end_header"):
            try:
                if words[0] == "format":
                    fmt = words[1]
                elif words[0] == "element":
                    elements.append([words[1], int(words[2]), [], set()])
                elif words[0] == "property":
                    elements[-1][2].append(None if words[1] == "list" else _PLY_SIZES[words[1]])
                    elements[-1][3].add(words[-1])
                elif words[0] not in ("comment", "obj_info", "end_header"):
                    raise ValueError
            except (IndexError, ValueError, KeyError):
                raise PointCloudError(f"{p}: bad PLY header line {' '.join(words)!r}; the file is corrupt") from None
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise PointCloudError(f"{p}: unknown PLY format {fmt!r} (expected ascii or binary_*_endian)")
        vertex = next((e for e in elements if e[0] == "vertex"), None)
        if vertex is None or not {"x", "y", "z"} <= vertex[3]:
            raise PointCloudError(f"{p}: the PLY file has no vertex element with x, y, z properties")
        before = elements[: elements.index(vertex) + 1]  # the elements stored up to the vertices
        count = vertex[1]
        if fmt == "ascii":
            need, have = sum(e[1] for e in before), _count_data_lines(f)
            if have < need:
                raise PointCloudError(
                    f"{p}: the PLY header declares {count} vertices but the ASCII body has only {have} "
                    f"data lines; the file is truncated"
                )
        elif all(s is not None for e in before for s in e[2]):
            need, have = sum(e[1] * sum(e[2]) for e in before), size - f.tell()
            if have < need:
                raise PointCloudError(
                    f"{p}: the PLY header declares {count} vertices ({need} bytes) but the body has only "
                    f"{have} bytes; the file is truncated"
                )
    return count


def _pcd_point_count(p: str) -> int:
    """Validates a PCD header against the file size; returns the declared point count."""
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        header = {w[0].upper(): w[1:] for w in _header_lines(f, p, "PCD", "DATA") if not w[0].startswith("#")}
        names = header.get("FIELDS", [])
        if not {"x", "y", "z"} <= set(names):
            raise PointCloudError(f"{p}: the PCD header has no x, y, z fields (FIELDS {' '.join(names)!r})")
        try:
            if "POINTS" in header:
                count = int(header["POINTS"][0])
            else:
                count = int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
            sizes = [int(s) for s in header.get("SIZE", [])]
            counts = [int(c) for c in header.get("COUNT", ["1"] * len(names))]
            data = header["DATA"][0].lower()
        except (KeyError, IndexError, ValueError):
            raise PointCloudError(f"{p}: bad PCD header (POINTS / WIDTH / HEIGHT / SIZE / COUNT / DATA)") from None
        if data == "ascii":
            have = _count_data_lines(f)
            if have < count:
                raise PointCloudError(
                    f"{p}: the PCD header declares {count} points but the ASCII body has only {have} lines; "
                    f"the file is truncated"
                )
        elif data == "binary":
            if len(sizes) != len(names) or len(counts) != len(names):
                raise PointCloudError(f"{p}: bad PCD header: FIELDS, SIZE and COUNT have different lengths")
            need, have = count * sum(s * c for s, c in zip(sizes, counts)), size - f.tell()
            if have < need:
                raise PointCloudError(
                    f"{p}: the PCD header declares {count} points ({need} bytes) but the body has only "
                    f"{have} bytes; the file is truncated"
                )
        elif data != "binary_compressed":
            raise PointCloudError(f"{p}: unknown PCD DATA type {data!r} (expected ascii, binary or binary_compressed)")
    return count


def _tidy_attributes(attrs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """[N, 1] -> [N]; PLY columns name_0..name_{k-1} -> one [N, k] field; intensity aliases -> intensity."""
    fields = {name: (a[:, 0] if a.ndim == 2 and a.shape[1] == 1 else a) for name, a in sorted(attrs.items())}
    groups: Dict[str, set] = {}
    for name in fields:
        m = re.fullmatch(r"(.+)_(\d+)", name)
        if m:
            groups.setdefault(m[1], set()).add(int(m[2]))
    for base, idx in groups.items():
        parts = [f"{base}_{i}" for i in range(len(idx))]
        if (
            len(idx) >= 2 and idx == set(range(len(idx))) and base not in fields
            and all(fields[q].ndim == 1 and fields[q].dtype == fields[parts[0]].dtype for q in parts)
        ):  # fmt: skip
            fields[base] = np.stack([fields.pop(q) for q in parts], axis=1)
    if "intensity" not in fields:
        alias = next((n for n in fields if n.lower() in _INTENSITY_ALIASES), None)
        if alias is not None:
            fields["intensity"] = fields.pop(alias)
    return fields


def _read_open3d(p: str, ext: str):
    declared = _ply_vertex_count(p) if ext == ".ply" else _pcd_point_count(p)
    o3d = _import_open3d(f"reading {ext} files")
    try:
        pc, problem = _open3d_call(o3d, o3d.t.io.read_point_cloud, p)
    except RuntimeError as e:
        problem = str(e)
    if problem:
        raise PointCloudError(f"{p}: Open3D could not read the file ({problem}); the file is truncated or corrupt")
    attrs = {name: pc.point[name].numpy() for name in pc.point}
    xyz = attrs.pop("positions", np.zeros((0, 3), np.float32))
    if len(xyz) != declared:
        # a failure that Open3D did not report
        raise PointCloudError(
            f"{p}: the {ext[1:].upper()} header declares {declared} points but Open3D read {len(xyz)}; "
            f"the file is truncated or corrupt"
        )
    return xyz, _tidy_attributes(attrs)


def _ply_column(name: str, value: np.ndarray) -> np.ndarray:
    """A field as a 2-D array of a dtype Open3D's PLY writer supports (uint8/16, int32, float32/64)."""
    a = value.reshape(len(value), -1)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if a.dtype == np.float32 and np.isinf(a).any():
        return a.astype(np.float64)  # RPly refuses to write +-inf as float; double works
    if np.issubdtype(a.dtype, np.integer) and a.dtype not in (np.uint8, np.uint16, np.int32):
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError(f"field {name!r} ({a.dtype}) has values outside int32, which PLY cannot store exactly")
        return a.astype(np.int32)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"field {name!r} has dtype {a.dtype}, which PLY cannot store")
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------- LAS / LAZ
def _read_las(p: str, ext: str):
    try:
        import laspy
    except ImportError as e:
        raise ImportError(f"reading {ext} files needs laspy: pip install laspy lazrs") from e
    if ext == ".laz" and not laspy.LazBackend.detect_available():
        raise ImportError(f"reading {ext} files needs a LAZ backend: pip install lazrs")
    try:
        las = laspy.read(p)
    except Exception as e:  # laspy raises LaspyException, ValueError, lazrs errors, ... on bad files
        raise PointCloudError(f"{p}: not a valid {ext[1:].upper()} file ({type(e).__name__}: {e})") from e
    declared = int(las.header.point_count)
    if len(las.points) != declared:
        raise PointCloudError(
            f"{p}: the LAS header declares {declared} points but the file holds {len(las.points)}; "
            f"the file is truncated"
        )
    xyz = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1)
    dims = set(las.point_format.dimension_names)
    fields = {
        "intensity": np.asarray(las.intensity),
        "classification": np.asarray(las.classification),
        "return_number": np.asarray(las.return_number),
    }
    if "gps_time" in dims:
        fields["time"] = np.asarray(las.gps_time)
    if {"red", "green", "blue"} <= dims:
        fields["rgb"] = np.stack([np.asarray(las.red), np.asarray(las.green), np.asarray(las.blue)], axis=1)
    return xyz, fields


# ----------------------------------------------------------------------------- labels
def read_labels(path: PathLike, num_points: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a SemanticKITTI ``.label`` file: one little-endian uint32 per point.

    Args:
        path: the ``.label`` file.
        num_points: if given, the number of points of the scan the labels belong to.

    Returns:
        ``(semantic, instance)``, uint16 ``[N]`` each: the low and the high 16 bits.

    Raises:
        PointCloudError: the size is not a multiple of 4, or there are not ``num_points`` labels.

    Example:
        >>> semantic, instance = read_labels("labels/000000.label", num_points=len(cloud))
    """
    p = _check_file(path)
    size = os.path.getsize(p)
    if size % 4:
        raise PointCloudError(
            f"{p}: {size} bytes is not a multiple of 4 (one uint32 label per point); "
            f"the file is truncated or not a SemanticKITTI .label file"
        )
    raw = np.fromfile(p, dtype="<u4")
    if num_points is not None and len(raw) != num_points:
        raise PointCloudError(
            f"{p}: {len(raw)} labels but the scan has {num_points} points; the labels belong to another scan"
        )
    return (raw & 0xFFFF).astype(np.uint16), (raw >> 16).astype(np.uint16)


def write_labels(path: PathLike, semantic, instance=None) -> None:
    """Writes a SemanticKITTI ``.label`` file (atomically).

    Args:
        path: the output file.
        semantic: integer ``[N]`` semantic ids in ``[0, 65535]``.
        instance: integer ``[N]`` instance ids in ``[0, 65535]``; default all 0.

    Raises:
        ValueError: shapes differ, not integers, or ids out of range.
    """
    sem = np.asarray(semantic)
    ins = np.zeros_like(sem) if instance is None else np.asarray(instance)
    for name, a in (("semantic", sem), ("instance", ins)):
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise ValueError(f"{name} labels must be integers [N], got {a.dtype} array of shape {a.shape}")
        if a.size and (a.min() < 0 or a.max() > 0xFFFF):
            raise ValueError(f"{name} labels must be in [0, 65535], got [{a.min()}, {a.max()}]")
    if sem.shape != ins.shape:
        raise ValueError(f"semantic has {len(sem)} labels but instance has {len(ins)}")
    raw = sem.astype("<u4") | (ins.astype("<u4") << np.uint32(16))
    with atomic_write(path) as f:
        f.write(raw.astype("<u4").tobytes())


# ----------------------------------------------------------------------------- writing points
def _as_cloud(cloud) -> PointCloud:
    if not isinstance(cloud, PointCloud):
        raise TypeError(f"expected a PointCloud, got {type(cloud).__name__}")
    return cloud


def write_kitti_bin(path: PathLike, cloud: Union[PointCloud, np.ndarray]) -> None:
    """Writes a KITTI velodyne ``.bin`` (float32 ``x, y, z, intensity`` per point, atomically).

    Args:
        path: the output file.
        cloud: a :class:`PointCloud` (its ``intensity`` field, 0 if absent) or an
            ``[N, 3]`` / ``[N, 4]`` array.

    Example:
        >>> write_kitti_bin("scan.bin", np.random.rand(100, 4))
    """
    if isinstance(cloud, PointCloud):
        intensity = cloud.fields.get("intensity", np.zeros(len(cloud), np.float32))
        if intensity.ndim != 1:
            raise ValueError(f"intensity must be [N] to write a KITTI scan, got shape {intensity.shape}")
        data = np.column_stack([cloud.xyz, intensity])
    else:
        data = np.asarray(cloud)
        if data.ndim != 2 or data.shape[1] not in (3, 4):
            raise ValueError(f"a KITTI scan is [N, 4] (x, y, z, intensity) or [N, 3], got shape {data.shape}")
        if data.shape[1] == 3:
            data = np.column_stack([data, np.zeros(len(data))])
    with atomic_write(path) as f:
        f.write(np.ascontiguousarray(data, dtype="<f4").tobytes())


def write_ply(path: PathLike, cloud: PointCloud) -> None:
    """Writes a binary PLY with every field, through Open3D's tensor API (atomically).

    ``[N]`` fields become one PLY property each, ``[N, k]`` fields ``name_0 .. name_{k-1}``
    (``colors`` and ``normals`` become ``red, green, blue`` and ``nx, ny, nz``);
    :func:`read_points` reads them back. PLY stores uint8, uint16, int32, float32 and float64:
    bool and other integer fields are converted, and float32 columns holding +-inf are written
    as float64 (Open3D's PLY writer rejects inf as float).

    Raises:
        ValueError: the cloud has no points (Open3D cannot write an empty PLY), or a field
            cannot be stored in PLY.
        ImportError: Open3D is missing.
    """
    cloud = _as_cloud(cloud)
    p = os.fspath(path)
    if len(cloud) == 0:
        raise ValueError(f"{p}: cannot write a PLY with 0 points (Open3D refuses empty point clouds)")
    columns = {"positions": _ply_column("positions", cloud.xyz)}
    for name, value in cloud.fields.items():
        if name == "positions":
            raise ValueError(f"{p}: a field may not be called 'positions' in a PLY file")
        columns[name] = _ply_column(name, value)
    o3d = _import_open3d("writing .ply files")
    pc = o3d.t.geometry.PointCloud()
    for name, value in columns.items():
        pc.point[name] = o3d.core.Tensor(value)
    with _atomic_path(p, ".ply") as tmp:
        ok, problem = _open3d_call(o3d, o3d.t.io.write_point_cloud, tmp, pc)
        if not ok or problem:
            raise OSError(f"{p}: Open3D failed to write the PLY file ({problem or 'no reason given'})")
        try:  # RPly may report success after a failed write: check the size
            _ply_vertex_count(tmp)
        except PointCloudError as e:
            raise OSError(f"{p}: Open3D wrote an incomplete PLY file ({str(e).split(': ', 1)[1]})") from e


def write_npz_points(path: PathLike, cloud: PointCloud) -> None:
    """Writes a cloud as a compressed ``.npz`` (``xyz`` plus one array per field, atomically).

    :func:`read_points` reads it back with the same fields.
    """
    cloud = _as_cloud(cloud)
    clash = {"xyz", "points"} & set(cloud.fields)
    if clash:
        raise ValueError(f"{os.fspath(path)}: field names {sorted(clash)} are reserved in a points .npz")
    with atomic_write(path) as f:
        np.savez_compressed(f, xyz=cloud.xyz, **cloud.fields)


# ----------------------------------------------------------------------------- voxels
def save_voxels(path: PathLike, tensor: SparseTensor, /, **meta) -> None:
    """Saves a :class:`~sparseconv.SparseTensor` and metadata as a compressed ``.npz`` (atomically).

    The archive holds ``coords`` (int32 ``[V, 4]`` rows ``batch, x, y, z``), ``feats``
    (``[V, C]``; bfloat16 is stored as float32), ``spatial_shape`` and ``stride`` (int64 ``[3]``),
    ``batch_size`` and ``version`` (scalars), the voxel geometry when the tensor has one
    (``geometry_voxel_size``, ``geometry_origin``; restored by :func:`load_voxels`, so a loaded
    tensor can be devoxelized), and one array per ``meta`` entry.

    Args:
        path: the output file (written as given; no extension is added).
        tensor: the voxels.
        **meta: numbers, strings or arrays (e.g. ``voxel_size=(0.05, 0.05, 0.1)``,
            ``point_range=...``, per-voxel ``counts``).

    Raises:
        ValueError: a ``meta`` name is one of the reserved keys above.
        TypeError: a ``meta`` value is not numbers, strings or an array of them.

    Example:
        >>> save_voxels("000000.voxels.npz", x, voxel_size=(0.05, 0.05, 0.1))
        >>> x2, meta = load_voxels("000000.voxels.npz")
    """
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"save_voxels expects a SparseTensor, got {type(tensor).__name__}")
    feats = tensor.features.detach().cpu()
    if feats.dtype == torch.bfloat16:
        feats = feats.float()
    arrays = {
        "coords": tensor.coords.cpu().numpy().astype(np.int32),
        "feats": feats.numpy(),
        "spatial_shape": np.asarray(tensor.spatial_shape, np.int64),
        "stride": np.asarray(tensor.stride, np.int64),
        "batch_size": np.int64(tensor.batch_size),
        "version": np.int64(VOXEL_FORMAT_VERSION),
    }
    if tensor.geometry is not None:  # voxel size and origin, so that a loaded tensor can devoxelize
        arrays["geometry_voxel_size"] = np.asarray(tensor.geometry.voxel_size, np.float64)
        arrays["geometry_origin"] = np.asarray(tensor.geometry.origin, np.float64)
    for name, value in meta.items():
        if name in arrays or name.startswith("geometry_"):
            raise ValueError(f"metadata name {name!r} is reserved in a voxel file ({', '.join(_VOXEL_KEYS)})")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        if value.dtype == object:
            raise TypeError(f"metadata {name!r} must be numbers, strings or an array of them, got {value!r}")
        arrays[name] = value
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)


def load_voxels(path: PathLike) -> Tuple[SparseTensor, Dict[str, object]]:
    """Loads a file written by :func:`save_voxels`.

    Returns:
        ``(tensor, meta)``: the :class:`~sparseconv.SparseTensor` (on the CPU) and the extra
        metadata (0-d arrays as Python scalars, others as NumPy arrays).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PointCloudError: not an ``.npz``, truncated, keys missing, a newer format version, or
            coordinates the tensor rejects (e.g. duplicated or outside ``spatial_shape``).
    """
    p = _check_file(path)
    arrays = _load_npz(p)
    missing = [k for k in _VOXEL_KEYS if k not in arrays]
    if missing:
        raise PointCloudError(f"{p}: not a sparseconv voxel file: missing {missing} (keys: {sorted(arrays)})")
    try:
        version = int(arrays.pop("version"))
        if not 1 <= version <= VOXEL_FORMAT_VERSION:
            raise PointCloudError(
                f"{p}: voxel file version {version} is not supported (this sparseconv reads versions 1 to "
                f"{VOXEL_FORMAT_VERSION}); upgrade sparseconv"
            )
        coords = arrays.pop("coords")
        geometry = {}
        if "geometry_voxel_size" in arrays and "geometry_origin" in arrays:
            geometry = dict(voxel_size=tuple(float(v) for v in arrays.pop("geometry_voxel_size")),
                            origin=tuple(float(v) for v in arrays.pop("geometry_origin")))
        if not np.issubdtype(coords.dtype, np.integer):
            raise TypeError(f"coords must be integers, got {coords.dtype}")
        tensor = SparseTensor(
            torch.from_numpy(arrays.pop("feats")),
            torch.from_numpy(coords.astype(np.int32)),
            spatial_shape=tuple(int(v) for v in arrays.pop("spatial_shape")),
            stride=tuple(int(v) for v in arrays.pop("stride")),
            batch_size=int(arrays.pop("batch_size")),
            **geometry,
        )
    except PointCloudError:
        raise
    except (ValueError, TypeError) as e:
        raise PointCloudError(f"{p}: invalid voxel data: {e}") from e
    meta = {k: (v.item() if v.ndim == 0 else v) for k, v in arrays.items()}
    return tensor, meta
