"""YAML experiment configs: ``_base_`` inheritance, ``--set`` overrides, validation against a schema.

A config is a YAML file loaded into plain nested dicts. A file may name one or more base files
(paths relative to itself)::

    # configs/centerpoint_synth.yaml
    _base_: second_synth.yaml          # or a list: [a.yaml, b.yaml] (later ones win)
    model: {name: centerpoint}
    train: {lr: 0.003}

The bases are merged first, in order, then the file itself on top: dicts merge key by key
(recursively), every other value (numbers, strings, lists) is replaced. Command-line overrides
(:func:`parse_overrides`) come last: ``("train.lr", "0.003")`` sets ``cfg["train"]["lr"] = 0.003``,
the value read as a YAML scalar or list (``"[0.2, 0.2, 0.2]"``, ``"true"``, ``"null"``).

The result is checked against a *schema* (the defaults: a nested dict of default values) by
:func:`load_config`: an unknown top-level section or key is an error naming the key and the file it
came from, :data:`REQUIRED` marks keys that must be given, values must have the default's type
(an int is accepted for a float), :class:`FreeForm` marks sub-dicts with arbitrary keys (model
arguments). Missing keys are filled with the defaults.

Example:
    >>> schema = {"model": {"name": REQUIRED, "args": FreeForm()}, "train": {"lr": 0.001, "epochs": 10}}
    >>> cfg = load_config("configs/exp.yaml", overrides=[("train.lr", "0.003")], schema=schema)
    >>> cfg["train"]["lr"], cfg["train"]["epochs"]
    (0.003, 10)
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["REQUIRED", "FreeForm", "ConfigError", "load_config", "load_yaml_tree", "merge_configs",
           "parse_overrides", "apply_overrides", "validate_config", "dump_config", "get_key"]


class _Required:
    """Marks a schema key without a default (it must be given)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __deepcopy__(self, memo):
        return self


#: Schema value of a key that has no default.
REQUIRED = _Required()


class FreeForm(dict):
    """A schema sub-dict whose keys are free (e.g. model constructor arguments); its items are the
    defaults, replaced as a whole when the config gives the key. ``None`` is also accepted."""


class ConfigError(ValueError):
    """A malformed config: unknown or missing key, wrong type, bad ``_base_`` or override."""


_BASE_KEY = "_base_"
_OVERRIDE_SOURCE = "--set"


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML ships with most environments
        raise ImportError("sparseconv.engine configs need PyYAML: pip install pyyaml") from None
    return yaml


@functools.lru_cache(maxsize=None)
def _loader():
    """A ``yaml.SafeLoader`` that also reads ``1e-3`` / ``3E+2`` as floats (YAML 1.2; PyYAML's 1.1
    rules need a dot, ``1.0e-3``, and would read ``1e-3`` as a string)."""
    import re

    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def _safe_load(stream):
    return _yaml().load(stream, Loader=_loader())


def _record_origins(tree: Any, source: str, prefix: str, origins: Dict[str, str]) -> None:
    if isinstance(tree, Mapping):
        origins[prefix] = origins.get(prefix, source) if prefix else source
        for k, v in tree.items():
            _record_origins(v, source, f"{prefix}.{k}" if prefix else str(k), origins)
    else:
        origins[prefix] = source


def merge_configs(base: Mapping, update: Mapping) -> Dict[str, Any]:
    """Deep merge: a new dict with ``update`` on top of ``base`` (dicts merge, other values replace).

    Example:
        >>> merge_configs({"a": {"x": 1, "y": 2}, "b": [1]}, {"a": {"y": 3}, "b": [2]})
        {'a': {'x': 1, 'y': 3}, 'b': [2]}
    """
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_configs(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_tree(path: str, _stack: Tuple[str, ...] = ()) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Reads a YAML config with its ``_base_`` files merged in (no validation).

    Returns:
        ``(config, origins)``: the merged dict and, for every dotted key, the file that set it last.

    Raises:
        FileNotFoundError: the file (or a base) does not exist (the including file is named).
        ConfigError: the file is not a YAML mapping, ``_base_`` is not a path or list of paths, or
            the bases form a cycle.
    """
    yaml = _yaml()
    path = os.path.abspath(os.fspath(path))
    if path in _stack:
        raise ConfigError(f"_base_ cycle: {' -> '.join(_stack + (path,))}")
    if not os.path.isfile(path):
        where = f" (the _base_ of {_stack[-1]})" if _stack else ""
        raise FileNotFoundError(2, f"no such config file: {path}{where}", path)
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = _safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping (key: value), got {type(data).__name__}")
    bases = data.pop(_BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: {_BASE_KEY} must be a file name or a list of file names, got {bases!r}")
    merged: Dict[str, Any] = {}
    origins: Dict[str, str] = {}
    for b in bases:
        sub, sub_origins = load_yaml_tree(os.path.join(os.path.dirname(path), b), _stack + (path,))
        merged = merge_configs(merged, sub)
        origins.update(sub_origins)
    merged = merge_configs(merged, data)
    _record_origins(data, path, "", origins)
    origins.pop("", None)
    return merged, origins


def parse_overrides(pairs: Optional[Iterable[Sequence[str]]]) -> List[Tuple[str, Any]]:
    """``[(dotted_key, text), ...]`` (argparse ``--set KEY VALUE``) as ``[(key, value)]``, each value
    parsed as YAML (``"0.003"`` -> 0.003, ``"[1, 2]"`` -> [1, 2], ``"true"``, ``"null"``; a bare word
    stays a string). ``"KEY=VALUE"`` single strings are accepted too.

    Raises:
        ConfigError: an empty key or a value that is not valid YAML.
    """
    yaml = _yaml()
    out = []
    for item in pairs or ():
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected KEY VALUE or KEY=VALUE")
            item = item.split("=", 1)
        if len(item) != 2:
            raise ConfigError(f"override {item!r}: expected KEY VALUE")
        key, text = str(item[0]).strip(), item[1]
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override key {key!r} is not a dotted key such as train.lr")
        if isinstance(text, str):
            try:
                value = _safe_load(text) if text.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {e}") from None
        else:
            value = text
        out.append((key, value))
    return out


def apply_overrides(cfg: Mapping, overrides: Iterable[Tuple[str, Any]],
                    origins: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """A copy of ``cfg`` with each ``(dotted_key, value)`` set (intermediate dicts are created).

    Raises:
        ConfigError: a key goes through a value that is not a dict (``train.lr.x``).
    """
    out = copy.deepcopy(dict(cfg))
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is {nxt!r}, not a section")
            node = nxt
        node[parts[-1]] = copy.deepcopy(value)
        if origins is not None:
            _record_origins(value, _OVERRIDE_SOURCE, key, origins)
    return out


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _check_value(key: str, value: Any, default: Any, where: str) -> Any:
    """The value converted to the schema's type (int -> float, tuple -> list), or a ConfigError."""
    if default is None or default is REQUIRED:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok:
            value = list(value)
    else:
        ok = True
    if not ok and value is not None:
        raise ConfigError(f"config key {key} must be {_type_name(default)} (like the default {default!r}), "
                          f"got {value!r} (set in {where})")
    return value


def validate_config(cfg: Mapping, schema: Mapping, origins: Optional[Mapping[str, str]] = None,
                    source: str = "<config>") -> Dict[str, Any]:
    """Checks ``cfg`` against ``schema`` and fills in the defaults (a new dict).

    Args:
        cfg: the merged config.
        schema: nested dict of defaults; :data:`REQUIRED` for keys without one; :class:`FreeForm`
            for sub-dicts with arbitrary keys; a ``None`` default accepts any value.
        origins: dotted key -> the file (or ``--set``) that set it, for the messages.
        source: the config file, named in messages about missing keys.

    Raises:
        ConfigError: an unknown key (named with its file and the known keys), a missing required
            key (named with the file), or a value of the wrong type.
    """
    origins = origins or {}

    def walk(node: Mapping, sch: Mapping, prefix: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in sch:
                what = "top-level section" if not prefix else "key"
                known = ", ".join(str(s) for s in sch)
                raise ConfigError(f"unknown config {what} {key!r} (set in {origins.get(key, source)}); "
                                  f"known {'sections' if not prefix else 'keys of ' + prefix}: {known}")
            d = sch[k]
            where = origins.get(key, source)
            if isinstance(d, FreeForm):
                if v is not None and not isinstance(v, Mapping):
                    raise ConfigError(f"config key {key} must be a mapping or null, got {v!r} (set in {where})")
                out[k] = copy.deepcopy(dict(v)) if v is not None else None
            elif isinstance(d, Mapping):
                if v is None:
                    v = {}
                if not isinstance(v, Mapping):
                    raise ConfigError(f"config key {key} must be a mapping (section), got {v!r} (set in {where})")
                out[k] = walk(v, d, key)
            else:
                out[k] = _check_value(key, copy.deepcopy(v), d, where)
        for k, d in sch.items():
            if k in out:
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            if d is REQUIRED:
                raise ConfigError(f"missing required config key {key!r} in {source} (and its _base_ files); "
                                  f"add it to the file or pass --set {key} VALUE")
            if isinstance(d, FreeForm):
                out[k] = copy.deepcopy(dict(d))
            elif isinstance(d, Mapping):
                out[k] = walk({}, d, key)
            else:
                out[k] = copy.deepcopy(list(d) if isinstance(d, tuple) else d)
        return out

    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(cfg).__name__}")
    return walk(cfg, schema, "")


def load_config(path: str, overrides: Optional[Iterable] = None, schema: Optional[Mapping] = None) -> Dict[str, Any]:
    """Loads a YAML config with its bases, applies overrides and validates it.

    Args:
        path: the YAML file.
        overrides: ``[(dotted_key, value_or_text), ...]`` or ``"key=value"`` strings; text values
            are parsed as YAML (see :func:`parse_overrides`).
        schema: defaults and allowed keys (see :func:`validate_config`); None: no validation.

    Returns:
        A plain nested dict.

    Raises:
        FileNotFoundError: no such file or base file.
        ConfigError: see :func:`load_yaml_tree`, :func:`parse_overrides`, :func:`validate_config`.

    Example:
        >>> cfg = load_config("configs/second_synth.yaml", [("train.epochs", "2")], schema=DET_SCHEMA)
    """
    cfg, origins = load_yaml_tree(path)
    cfg = apply_overrides(cfg, parse_overrides(overrides), origins)
    if schema is None:
        return cfg
    return validate_config(cfg, schema, origins, source=os.path.abspath(os.fspath(path)))


def get_key(cfg: Mapping, key: str, default: Any = None) -> Any:
    """``cfg`` at a dotted ``key`` (``"train.lr"``), or ``default`` when a part is missing."""
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def dump_config(cfg: Mapping, path: str) -> None:
    """Writes a config (as returned by :func:`load_config`) to a YAML file, atomically."""
    from sparseconv.io import atomic_write

    yaml = _yaml()
    with atomic_write(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False, default_flow_style=None)


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
