"""What the file-by-file commands (``sparseconv voxelize``, ``sparseconv segment``) share.

* flags: :func:`add_command_parser` (``inputs``, ``-o``, the command's own flags, then ``--recursive``,
  ``--overwrite``, ``--quiet``, ``--json``);
* inputs: :func:`expand_inputs` (files, folders, glob patterns), :func:`output_stem`,
  :func:`plan_outputs` (one set of output paths per input, collisions refused);
* failures: :class:`UsageError` (exit status 2), :func:`error_reason` (a bad file's one-line reason);
* interruption: :func:`sigterm_as_interrupt` (SIGTERM unwinds like Ctrl-C, so that atomic writes
  remove their temporary files), :func:`report_interrupted` (exit status 130);
* the summary: :func:`file_summary` (files, done, skipped, failed), :func:`print_file_lines`,
  :func:`finish` (the summary as JSON or text; exit status 1 when a file failed).

Example:
    >>> p = add_command_parser(sub, "voxelize", "voxelize files", "Reads each file ...", EPILOG,
    ...                        "output already exists",
    ...                        lambda p: p.add_argument("--workers", type=int, default=1))
    >>> plan = plan_outputs(["scans/"], False, "out", [".npz"], "voxelize")   # [(input, [output]), ...]
    >>> with sigterm_as_interrupt():
    ...     results = [process(f, outs) for f, outs in plan]
    >>> finish({**file_summary(results), ...}, as_json=False, print_summary=print)
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import sys
import textwrap
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = ["add_command_parser", "UsageError", "point_cloud_extension", "output_stem", "expand_inputs",
           "plan_outputs", "check_output_folder", "error_reason", "interrupt", "sigterm_as_interrupt", "report_interrupted", "file_summary",
           "print_file_lines", "finish"]

_GLOB_CHARS = set("*?[")


class UsageError(Exception):
    """Bad arguments or inputs: the command exits with status 2."""


# ----------------------------------------------------------------------------- flags
def add_command_parser(sub, name: str, help: str, description: str, epilog: str, exists: str,
                       add_own: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """The sub-command ``name`` of a file-by-file command, with its flags in help order: ``inputs``
    (``INPUT`` files, folders or glob patterns), ``-o/--output OUTDIR``, the command's own flags
    (``add_own(parser)``), then ``--recursive``, ``--overwrite`` (help ``redo files whose <exists>``,
    e.g. ``"output already exists"``), ``--quiet`` and ``--json``.

    Args:
        sub: the sub-parsers of ``sparseconv``.
        help: the one-line help in ``sparseconv --help``.
        description: a paragraph, wrapped at 88 columns.
        epilog: the examples, kept as written.
    """
    p = sub.add_parser(name, help=help, description=textwrap.fill(description, 88), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="point-cloud files, folders (their supported files) or glob patterns (quoted or not)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if missing)")
    add_own(p)
    p.add_argument("--recursive", action="store_true", help="also look for point-cloud files in sub-folders")
    p.add_argument("--overwrite", action="store_true", help=f"redo files whose {exists}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


# ----------------------------------------------------------------------------- inputs
def point_cloud_extension(path: str) -> Optional[str]:
    """The :data:`sparseconv.io.SUPPORTED_FORMATS` extension of ``path`` (longest match), or None."""
    from ..io import SUPPORTED_FORMATS

    name = os.path.basename(path).lower()
    for ext in sorted(SUPPORTED_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def output_stem(path: str) -> str:
    """File name without its point-cloud extension: ``a/000000.bin`` -> ``000000``, ``x.pcd.bin`` -> ``x``."""
    name = os.path.basename(path)
    ext = point_cloud_extension(name)
    return name[: -len(ext)] if ext and len(name) > len(ext) else os.path.splitext(name)[0] or name


def _folder_files(folder: str, recursive: bool) -> List[str]:
    found = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)]
    else:
        found = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    return [f for f in found if _is_point_cloud_file(f)]


def _is_point_cloud_file(path: str) -> bool:
    """A supported point-cloud file, not hidden (e.g. a temporary file) and not a voxel file."""
    from .info import is_voxel_file

    return (os.path.isfile(path) and point_cloud_extension(path) is not None
            and not os.path.basename(path).startswith(".") and not is_voxel_file(path))


def _supported() -> List[str]:
    from ..io import SUPPORTED_FORMATS

    return list(SUPPORTED_FORMATS)


def expand_inputs(inputs: Sequence[str], recursive: bool = False) -> Tuple[List[str], List[str]]:
    """Files named by ``inputs``: files as given, folders' supported point-cloud files, glob matches.

    Returns ``(files, problems)``: the files in order without duplicates, and a message for each
    input that names nothing.
    """
    files, problems, seen = [], [], set()

    def add(path):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        if os.path.isdir(item):
            found = _folder_files(item, recursive)
            if not found:
                problems.append(f"{item}: the folder holds no point-cloud file "
                                f"({'' if recursive else 'not searched recursively; '}"
                                f"supported: {', '.join(_supported())})")
            for f in found:
                add(f)
        elif os.path.exists(item):
            add(item)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=recursive))
            found = []
            for m in matches:
                if os.path.isdir(m):
                    found += _folder_files(m, recursive)
                elif _is_point_cloud_file(m):
                    found.append(m)
            if not found:
                problems.append(f"{item}: no point-cloud file matches this pattern")
            for f in found:
                add(f)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def plan_outputs(inputs: Sequence[str], recursive: bool, outdir: str, suffixes: Sequence[str],
                 verb: str) -> List[Tuple[str, List[str]]]:
    """``[(input, [OUTDIR/<stem><suffix> for each suffix])]`` for the files of :func:`expand_inputs`.

    Raises:
        UsageError: an input that names nothing, no input file at all, two inputs with the same output
            (the message asks to ``verb`` them into different folders), or an input that would be
            overwritten by its own output.
    """
    files, problems = expand_inputs(inputs, recursive)
    if problems:
        raise UsageError("; ".join(problems))
    if not files:
        raise UsageError("no input file found")
    plan, by_output = [], {}
    for f in files:
        stem = os.path.join(outdir, output_stem(f))
        outputs = [stem + s for s in suffixes]
        for out in outputs:
            key = os.path.realpath(out)
            if key in by_output:
                raise UsageError(f"{by_output[key]} and {f} would both be written to {out}; {verb} them into "
                                 f"different folders")
            if key == os.path.realpath(f):
                raise UsageError(f"{f} is in OUTDIR and would be overwritten by its own output; choose another -o")
            by_output[key] = f
        plan.append((f, outputs))
    return plan


def check_output_folder(path: str) -> None:
    """Raises :class:`UsageError` when ``path`` exists and is not a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"-o {path}: exists and is not a folder")


# ----------------------------------------------------------------------------- failures and interruption
def error_reason(path: str, e: BaseException) -> str:
    """One line saying why ``path`` failed, naming the file once (the exception type unless it is a
    ValueError or an OSError)."""
    text = str(e) if not isinstance(e, KeyError) else (e.args[0] if e.args else repr(e))
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: {e.strerror or 'no such file'}"
    if not text:
        text = type(e).__name__
    elif not isinstance(e, (ValueError, OSError)):
        text = f"{type(e).__name__}: {text}"
    return text if path in text else f"{path}: {text}"


def interrupt(signum, frame):
    """SIGTERM as Ctrl-C: unwinds, so that atomic writes remove their temporary files."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt (:func:`interrupt`); the previous handler is
    restored afterwards. Off the main thread (where handlers cannot be set) it does nothing."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if on_main_thread else None
    try:
        yield
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def report_interrupted(prog: str) -> int:
    """Says on stderr that ``prog`` was interrupted with only complete outputs written; returns 130."""
    print(f"{prog}: interrupted; the outputs written so far are complete, no partial file is left", file=sys.stderr)
    return 130


# ----------------------------------------------------------------------------- the summary
def file_summary(results: Sequence[Dict]) -> Dict:
    """``{"files", "done", "skipped_exists", "failed"}`` of per-file results (``status`` ``"done"``,
    ``"exists"`` or ``"error"`` with a ``reason``)."""
    return {
        "files": len(results),
        "done": sum(r["status"] == "done" for r in results),
        "skipped_exists": [r["input"] for r in results if r["status"] == "exists"],
        "failed": [{"file": r["input"], "reason": r["reason"]} for r in results if r["status"] == "error"],
    }


def print_file_lines(s: Dict, exists: str) -> None:
    """The ``files`` line of a summary and one line per skipped file (``exists``: why, e.g. ``output exists``)."""
    print(f"files      {s['files']}: {s['done']} done, {len(s['skipped_exists'])} skipped ({exists}), "
          f"{len(s['failed'])} skipped (error)")
    for f in s["skipped_exists"]:
        print(f"  skipped: exists   {f}")
    for f in s["failed"]:
        print(f"  skipped: error    {f['reason']}")


def finish(summary: Dict, as_json: bool, print_summary: Callable[[Dict], None]) -> int:
    """Prints the summary (one JSON object, or ``print_summary``); returns 1 when a file failed, else 0."""
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 1 if summary["failed"] else 0
