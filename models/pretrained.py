"""Shipped detector weights: :func:`list_pretrained`, :func:`load_pretrained`, and the file format.

A *pretrained file* (``models/weights/NAME.pt``, installed as ``sparseconv/models/weights/``) is a
small ``torch.save`` dict written by ``tools/export_det.py`` from a training checkpoint
(:func:`pretrained_from_checkpoint`, :func:`save_pretrained`). It holds only tensors and plain
containers (dict, list, str, int, float, bool, None), so it loads with
``torch.load(..., weights_only=True)`` (no code is unpickled):

* ``format``: ``"sparseconv.pretrained/1"``;
* ``model``: the registered model name (``second``, ``centerpoint``, ``centerpoint_attn``);
* ``model_args``: every constructor keyword argument: ``class_names``, ``point_range``,
  ``voxel_size``, ``in_channels`` and the config's ``model.args``;
* ``state_dict``: the weights, floating tensors as float32 (no optimizer state);
* ``data``: the training config's ``data`` section (classes, range, voxel size, FOV crop, ...);
* ``provenance``: how the weights were made: the checkpoint (file name, SHA-256, epoch, global
  step, steps per epoch, total steps), the whole resolved training config, the training command,
  the evaluation figures when given (the JSON of ``tools/eval_det.py``), versions and export time.

Example:
    >>> from sparseconv.models.pretrained import list_pretrained, load_pretrained
    >>> list_pretrained()
    ['second_synth']
    >>> model, info = load_pretrained("second_synth")          # eval mode, on the CPU
    >>> info["class_names"], info["point_range"], info["voxel_size"]
    (('Car', 'Pedestrian', 'Cyclist'), (0.0, -40.0, -3.0, 70.4, 40.0, 1.0), (0.2, 0.2, 0.2))
    >>> batch = collate([{"points": points}], info["voxel_size"], info["point_range"])
    >>> with torch.no_grad():
    ...     dets = model(batch)[0]                             # boxes [K, 7], scores [K], labels [K]
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["WEIGHTS_DIR", "FORMAT", "DEFAULT_METRIC", "list_pretrained", "resolve_pretrained", "read_pretrained",
           "load_pretrained", "default_pretrained", "pretrained_from_checkpoint", "save_pretrained",
           "float32_state_dict", "plain", "check_name"]

#: The folder of the shipped weights (package data of ``sparseconv.models``).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
#: The ``format`` entry of a pretrained file.
FORMAT = "sparseconv.pretrained/1"
#: The evaluation figure that ranks shipped weights for :func:`default_pretrained`.
DEFAULT_METRIC = "mAP/3d_R40_moderate"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REQUIRED = ("format", "model", "model_args", "state_dict", "data", "provenance")
_GEOMETRY = ("class_names", "point_range", "voxel_size", "in_channels")

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- helpers
def plain(obj: Any) -> Any:
    """``obj`` as plain containers that ``torch.load(weights_only=True)`` accepts: mappings become
    ``dict`` (keys ``str``), tuples / sets / arrays become ``list``, NumPy scalars Python numbers;
    tensors are kept.

    Raises:
        TypeError: a value of another type (the path to it is named).

    Example:
        >>> plain({"a": (1, 2), "b": np.float32(0.5)})
        {'a': [1, 2], 'b': 0.5}
    """
    return _plain(obj, "obj")


def _plain(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj.item() if isinstance(obj, np.generic) else obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), where)
    raise TypeError(f"{where} is a {type(obj).__name__} ({obj!r}); a pretrained file holds only tensors, dicts, "
                    f"lists, strings, numbers, booleans and None")


def float32_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A copy with floating-point tensors as contiguous float32 CPU tensors (integer buffers such as
    ``num_batches_tracked`` keep their type); a DDP ``module.`` prefix is removed.

    Raises:
        TypeError: a value is not a tensor.
    """
    out = {}
    strip = bool(state_dict) and all(str(k).startswith("module.") for k in state_dict)
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu")
        v = v.float() if v.is_floating_point() else v
        out[str(k)[len("module."):] if strip else str(k)] = v.contiguous().clone()
    return out


def _weights_dir(weights_dir: Optional[PathLike]) -> str:
    return os.fspath(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def _torch_load(path: str, mmap: bool = False) -> Any:
    kwargs = {"map_location": "cpu", "weights_only": True}
    if mmap:
        kwargs["mmap"] = True
    return torch.load(path, **kwargs)


# ----------------------------------------------------------------------------- finding files
def list_pretrained(weights_dir: Optional[PathLike] = None) -> List[str]:
    """The names of the pretrained files in ``weights_dir`` (default: the shipped
    :data:`WEIGHTS_DIR`): the ``NAME`` of every ``NAME.pt``, sorted.

    Example:
        >>> list_pretrained()
        ['centerpoint_synth', 'second_synth']
    """
    folder = _weights_dir(weights_dir)
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(glob.escape(folder), "*.pt"))
                  if os.path.isfile(p))


def resolve_pretrained(name_or_path: PathLike, weights_dir: Optional[PathLike] = None) -> str:
    """The file of a shipped name (``weights_dir/NAME.pt``) or an existing path.

    A value naming an existing file is that file; one that looks like a path (it contains a
    directory separator or ends in ``.pt``) must exist; anything else is a name.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unknown name (the message lists the available names and how to make one).
    """
    value = os.fspath(name_or_path)
    if not isinstance(value, str) or not value:
        raise ValueError(f"name_or_path must be a non-empty name or path, got {name_or_path!r}")
    if os.path.isfile(value):
        return value
    if os.sep in value or (os.altsep and os.altsep in value) or value.endswith(".pt"):
        raise FileNotFoundError(2, f"no such weights file: {value}", value)
    folder = _weights_dir(weights_dir)
    path = os.path.join(folder, value + ".pt")
    if os.path.isfile(path):
        return path
    names = list_pretrained(folder)
    have = f"available: {', '.join(names)}" if names else f"none are installed in {folder}"
    raise ValueError(f"no pretrained weights named {value!r} ({have}); export a training checkpoint with "
                     f"'python tools/export_det.py --ckpt CKPT --name NAME', or give the path of a .pt file")


def read_pretrained(path: PathLike, mmap: bool = False) -> Dict[str, Any]:
    """Reads and checks a pretrained file with ``torch.load(weights_only=True)`` (tensors on the CPU).

    Args:
        path: the ``.pt`` file.
        mmap: map the tensors instead of reading them (cheap access to the metadata).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a pretrained file (e.g. a training checkpoint, which holds optimizer state
            and pickled objects: export it with ``tools/export_det.py``), or entries are missing.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, f"no such weights file: {path}", path)
    try:
        obj = _torch_load(path, mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a sparseconv pretrained file readable with weights_only=True "
                         f"({type(e).__name__}: {first[:300]}); a training checkpoint must first be exported "
                         f"with 'python tools/export_det.py --ckpt CKPT --name NAME'") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        hint = " (this looks like a training checkpoint: export it with tools/export_det.py)" \
            if isinstance(obj, dict) and "optimizer" in obj else ""
        raise ValueError(f"{path}: not a sparseconv pretrained file (format {got!r}, expected {FORMAT!r}){hint}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"{path}: the pretrained file lacks {missing}")
    args = obj["model_args"]
    if not isinstance(args, dict) or any(k not in args for k in _GEOMETRY):
        raise ValueError(f"{path}: model_args must hold {list(_GEOMETRY)}, got "
                         f"{sorted(args) if isinstance(args, dict) else type(args).__name__}")
    if not isinstance(obj["state_dict"], dict):
        raise ValueError(f"{path}: state_dict is a {type(obj['state_dict']).__name__}, not a dict")
    return obj


def _metric(obj: Mapping[str, Any], key: str) -> float:
    m = (obj.get("provenance") or {}).get("metrics") or {}
    v = (m.get("summary") or {}).get(key) if isinstance(m, dict) else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else -math.inf


def default_pretrained(weights_dir: Optional[PathLike] = None, metric: str = DEFAULT_METRIC) -> Optional[str]:
    """The name of the best shipped weights: the largest evaluation figure ``metric`` (from
    ``provenance.metrics.summary``; weights without it rank last), ties broken by name. None when
    there are none.

    Example:
        >>> default_pretrained()
        'second_synth'
    """
    folder = _weights_dir(weights_dir)
    best, best_key = None, None
    for name in list_pretrained(folder):
        try:
            obj = read_pretrained(os.path.join(folder, name + ".pt"), mmap=True)
        except ValueError:
            continue
        key = (-_metric(obj, metric), name)
        if best_key is None or key < best_key:
            best, best_key = name, key
    return best


# ----------------------------------------------------------------------------- loading
def load_pretrained(name_or_path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                    weights_dir: Optional[PathLike] = None, **overrides: Any) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Builds a detector from a pretrained file and loads its weights.

    Args:
        name_or_path: a name of :func:`list_pretrained` or the path of a pretrained ``.pt`` file
            (default: :func:`default_pretrained`).
        device: where to put the model.
        weights_dir: where names are looked up (default: the shipped :data:`WEIGHTS_DIR`).
        **overrides: constructor arguments replacing the stored ones, for post-processing settings
            such as ``score_threshold``, ``nms_threshold`` or ``max_detections`` (geometry and
            layer widths must match the weights).

    Returns:
        ``(model, info)``: the model in eval mode; ``info`` with ``name``, ``path``, ``model`` (the
        registered name), ``model_args``, ``class_names`` (tuple), ``point_range`` (6 floats),
        ``voxel_size`` (3 floats), ``in_channels``, ``data`` (the training data section),
        ``provenance`` and ``num_parameters``.

    Raises:
        ValueError: unknown name, no shipped weights, a file that is not a pretrained file, a model
            name that is not registered, or weights that do not fit the model.
        FileNotFoundError: a path that does not exist.

    Example:
        >>> model, info = load_pretrained("second_synth", score_threshold=0.3)
        >>> info["provenance"]["global_step"]
        40800
    """
    from .registry import create_model, list_models

    folder = _weights_dir(weights_dir)
    if name_or_path is None:
        name_or_path = default_pretrained(folder)
        if name_or_path is None:
            raise ValueError(f"no pretrained detector weights are installed in {folder}; export a training "
                             f"checkpoint with 'python tools/export_det.py --ckpt CKPT --name NAME', or give the "
                             f"path of a .pt file")
    path = resolve_pretrained(name_or_path, folder)
    obj = read_pretrained(path)
    name = obj["model"]
    if name not in list_models():
        raise ValueError(f"{path}: model {name!r} is not registered in sparseconv.models (registered: "
                         f"{', '.join(list_models())}); import the module that registers it first")
    args = dict(obj["model_args"])
    args["class_names"] = tuple(str(c) for c in args["class_names"])
    args["point_range"] = tuple(float(v) for v in args["point_range"])
    args["voxel_size"] = tuple(float(v) for v in args["voxel_size"])
    args["in_channels"] = int(args["in_channels"])
    bad = [k for k in overrides if k in _GEOMETRY]
    if bad:
        raise ValueError(f"overrides may not change {bad}: the weights were trained for "
                         f"{ {k: args[k] for k in bad} }")
    args.update(overrides)
    try:
        model = create_model(name, **args)
    except TypeError as e:
        raise ValueError(f"{path}: cannot build {name!r} with the stored arguments {sorted(args)} ({e})") from None
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit {name!r} built with {obj['model_args']} "
                         f"({str(e).splitlines()[0]} ...)") from None
    model.to(device).eval()
    info = {
        "name": os.path.basename(path)[:-3] if path.endswith(".pt") else os.path.basename(path),
        "path": path,
        "model": name,
        "model_args": args,
        "class_names": args["class_names"],
        "point_range": args["point_range"],
        "voxel_size": args["voxel_size"],
        "in_channels": args["in_channels"],
        "data": obj["data"],
        "provenance": obj["provenance"],
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return model, info


# ----------------------------------------------------------------------------- writing
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrained_from_checkpoint(state: Mapping[str, Any], checkpoint_path: Optional[PathLike] = None,
                               command: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None,
                               extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The pretrained dict of a training checkpoint of ``tools/train_det.py``.

    Args:
        state: the checkpoint dict (``model``: the state dict; ``config``: the resolved experiment
            config; ``epoch``, ``global_step``, ...), e.g. from
            :func:`sparseconv.engine.load_checkpoint`.
        checkpoint_path: the checkpoint file (its name and SHA-256 go into the provenance).
        command: the training command to record.
        metrics: evaluation figures to record (e.g. the JSON of ``tools/eval_det.py --json``).
        extra: more provenance entries.

    Returns:
        A dict of the format described in the module docs (plain containers and tensors).

    Raises:
        ValueError: the checkpoint holds no model weights or no config with ``model.name`` and the
            ``data`` geometry.
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise ValueError("state must be a training checkpoint dict with the model weights under 'model'")
    cfg = state.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping) or "name" not in cfg["model"] \
            or not isinstance(cfg.get("data"), Mapping):
        raise ValueError("the checkpoint holds no experiment config (model.name, data): it was not written by "
                         "tools/train_det.py")
    d = cfg["data"]
    missing = [k for k in ("classes", "point_range", "voxel_size") if k not in d]
    if missing:
        raise ValueError(f"the checkpoint's config has no data.{', data.'.join(missing)}")
    model_args = dict(plain(cfg["model"].get("args") or {}))
    model_args.update(class_names=[str(c) for c in d["classes"]], point_range=[float(v) for v in d["point_range"]],
                      voxel_size=[float(v) for v in d["voxel_size"]], in_channels=4)
    sd = float32_state_dict(state["model"])
    prov: Dict[str, Any] = {
        "checkpoint": os.path.basename(os.fspath(checkpoint_path)) if checkpoint_path is not None else None,
        "checkpoint_sha256": _sha256(os.fspath(checkpoint_path)) if checkpoint_path is not None else None,
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "steps_per_epoch": state.get("steps_per_epoch"),
        "total_steps": state.get("total_steps"),
        "world_size": state.get("world_size"),
        "epochs_configured": (cfg.get("train") or {}).get("epochs"),
        "config": plain(cfg),
        "command": command,
        "metrics": plain(metrics) if metrics is not None else None,
        "num_parameters": int(sum(v.numel() for k, v in sd.items() if v.is_floating_point())),
        "exported_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch_version": torch.__version__.split("+")[0],
        "sparseconv_version": _version(),
    }
    prov.update(plain(dict(extra or {})))
    return {
        "format": FORMAT,
        "model": str(cfg["model"]["name"]),
        "model_args": model_args,
        "state_dict": sd,
        "data": plain(d),
        "provenance": plain(prov),
    }


def _version() -> str:
    try:
        import sparseconv

        return str(sparseconv.__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def save_pretrained(obj: Mapping[str, Any], path: PathLike) -> str:
    """Writes a pretrained dict atomically (temporary file, fsync, ``os.replace``).

    The dict is checked first: the right ``format``, every entry present, and only tensors and plain
    containers (so that ``weights_only=True`` can read it back).

    Returns:
        ``path``.

    Raises:
        ValueError / TypeError: a malformed dict (nothing is written).
    """
    from sparseconv.io import atomic_write

    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise ValueError(f"obj must be a pretrained dict with format {FORMAT!r} (see pretrained_from_checkpoint)")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"the pretrained dict lacks {missing}")
    clean = _plain(dict(obj), "obj")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(clean, f)
    return path


def check_name(name: str) -> str:
    """A weights name: letters, digits, ``_ . -`` (not starting with a separator); ``.pt`` is dropped."""
    name = str(name)
    if name.endswith(".pt"):
        name = name[:-3]
    if not _NAME.match(name):
        raise ValueError(f"a weights name is letters, digits, '_', '.', '-' (no path), got {name!r}")
    return name
