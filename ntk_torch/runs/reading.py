"""Reading a run directory defensively: bounded JSON, checked records, checked kernel files.

Nothing here raises on damage it can describe: each reader returns what is readable and
a list of problems, one line each, naming the file (and line) and what is wrong:

* ``metrics.jsonl``: missing or empty; a line that is not JSON, not an object, longer
  than :data:`MAX_LINE_BYTES`, nested deeper than :data:`MAX_DEPTH`, or without an
  integer ``step`` in ``[0, 2**53)`` is skipped; a step that repeats an earlier one or
  goes back is kept and reported (two runs may have been written into one directory); an
  integer too large for a float64 is read as missing (None) and reported.
* ``kernels/step_*.npy``: a file whose ``.npy`` header cannot be read, that holds Python
  objects or a non-numeric array, or whose size does not match its header (truncated, or
  bytes after the array) is skipped; a readable one whose shape is no probe kernel's
  (``(N, N)``, ``(N, N, O)``, ``(N, N, O, O)``, N the run's probe size when known) is
  kept and reported.

Only ``meta.json`` is required: :func:`read_meta` raises ``ValueError`` when it is not an
ntk_torch run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import records
from .files import FORECAST_FILE, FORMAT, FORMAT_VERSION, KERNEL_FILE, KERNELS_DIR, META_FILE

MAX_LINE_BYTES = 16 * 2**20
"""The longest record line read (16 MiB; the tracker's lines are a few kB)."""
MAX_META_BYTES = 64 * 2**20
MAX_DEPTH = 64
"""The deepest nesting of lists and objects read (the tracker's records nest 2 deep)."""
MAX_STEP = 2**53
"""Steps are below 2**53, so that they are exact as float64 (figures' axes) and int64."""
_FLOAT_LIMIT = 2**1023  # integers at least this large do not all convert to float64


def parse_json(data: bytes, limit: int) -> Any:
    """``json.loads`` bounded in size and depth; any failure is a ``ValueError``."""
    if len(data) > limit:
        raise ValueError(f"{len(data)} bytes, more than the {limit} read")
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise ValueError(f"not valid JSON: {error}") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists/dicts in ``value`` nest deeper than ``limit`` (iteratively)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def read_json_object(file: Path, kind: str) -> Dict[str, Any]:
    """The JSON object in ``file`` (bounded as :func:`parse_json`) whose ``"format"`` is
    ``kind``; a ``ValueError`` naming the file when it is unreadable or not ours."""
    try:
        value = parse_json(file.read_bytes(), MAX_META_BYTES)
    except ValueError as error:
        raise ValueError(f"{file} is unreadable: {error}") from None
    if not isinstance(value, dict) or value.get("format") != kind:
        raise ValueError(f"{file} was not written by ntk_torch (no \"format\": \"{kind}\")")
    return value


def read_meta(path: Path) -> Dict[str, Any]:
    """The parsed ``meta.json`` of a run, after checking it is one ntk_torch reads.

    Raises:
        ValueError: it is not valid JSON (or absurdly large or deep), or was not written by
            ntk_torch, or by a newer format version.
    """
    file = path / META_FILE
    header = read_json_object(file, FORMAT)
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{file} has format version {version!r}; this ntk_torch reads up to {FORMAT_VERSION}"
        )
    return header


def header_fields(header: Dict[str, Any], known_policies: Tuple[str, ...]) -> Tuple[Dict[str, Any], List[str]]:
    """``meta``, ``keep_kernels``, ``status`` and ``reason`` of a parsed ``meta.json``,
    each of its type (else replaced and reported)."""
    problems = []
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        problems.append(f"{META_FILE}: \"meta\" is a {type(meta).__name__}, not an object; read as empty")
        meta = {}
    fields: Dict[str, Any] = {"meta": meta}
    for name, valid in (("keep_kernels", known_policies), ("status", None), ("reason", None)):
        value = header.get(name)
        if value is not None and not (isinstance(value, str) and (valid is None or value in valid)):
            problems.append(f"{META_FILE}: unknown {name} {_short(value)}; read as none")
            value = None
        fields[name] = value
    return fields, problems


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- records


def _parse_record(line: bytes) -> Tuple[Dict[str, Any], List[str]]:
    """A record and the names of its fields read as missing; ``ValueError`` if unreadable."""
    record = parse_json(line, MAX_LINE_BYTES)
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not a record")
    step = record.get(records.STEP)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"no integer 'step' (got {_short(step)})")
    if not 0 <= step < MAX_STEP:
        raise ValueError(f"step {_short(step)} is outside [0, 2**53)")
    return record, _replace_huge_integers(record)


def _replace_huge_integers(record: Dict[str, Any]) -> List[str]:
    """Set integers too large for a float64 to None in place; their dotted names."""
    replaced = []
    pending: List[Tuple[Any, str]] = [(record, "")]
    while pending:
        node, prefix = pending.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            name = f"{prefix}{key}"
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _FLOAT_LIMIT:
                node[key] = None
                replaced.append(name)
            elif isinstance(value, (dict, list)):
                pending.append((value, name + "."))
    return sorted(replaced)


def read_records(file: Path) -> Tuple[List[Dict[str, Any]], List[str], List[str]]:
    """``(records, skipped, suspicious)`` of ``metrics.jsonl``: the readable records in
    file order, a description of each skipped line, and of each kept oddity."""
    if not file.is_file():
        return [], [], [f"{file.name} is missing: no measurement was recorded"]
    lines = file.read_bytes().split(b"\n")
    cut_short = len(lines) - 1 if lines[-1] else None  # index of an unterminated last line
    loaded: List[Dict[str, Any]] = []
    skipped: List[str] = []
    suspicious: List[str] = []
    seen: Dict[int, int] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record, replaced = _parse_record(line)
        except ValueError as error:
            why = "incomplete last line, probably cut by a crash" if index == cut_short else str(error)
            skipped.append(f"line {index + 1} ({why})")
            continue
        step = record[records.STEP]
        if replaced:
            suspicious.append(f"{file.name} line {index + 1}: {', '.join(replaced)} too large for float64; read as missing")
        if step in seen:
            suspicious.append(f"{file.name} line {index + 1}: step {step} again (first at line {seen[step]})")
        elif loaded and step < loaded[-1][records.STEP]:
            suspicious.append(
                f"{file.name} line {index + 1}: step {step} after step {loaded[-1][records.STEP]} "
                "(steps go back: two runs may have been written here)"
            )
        seen.setdefault(step, index + 1)
        loaded.append(record)
    if not loaded and not skipped:
        suspicious.append(f"{file.name} is empty: no measurement was recorded")
    return loaded, skipped, suspicious


# --------------------------------------------------------------------------- kernel files


def _npy_header(file: Path) -> Tuple[Tuple[int, ...], np.dtype]:
    """The shape and dtype in a ``.npy`` file's header, after checking the file's size
    matches them; ``ValueError`` when it does not or the header is unreadable."""
    fmt = np.lib.format
    with open(file, "rb") as stream:
        try:
            version = fmt.read_magic(stream)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(stream)
        except (ValueError, OSError, EOFError, SyntaxError) as error:
            raise ValueError(f"no readable .npy header ({error})") from None
        offset = stream.tell()
    if dtype.hasobject or dtype.kind not in "fiub":
        raise ValueError(f"holds {dtype} values, not numbers")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = file.stat().st_size
    if size < expected:
        raise ValueError(f"truncated: {size} of {expected} bytes")
    if size > expected:
        raise ValueError(f"{size - expected} bytes after the array")
    return tuple(shape), dtype


def _shape_problem(shape: Tuple[int, ...], probe_size: Optional[int]) -> Optional[str]:
    """Why ``shape`` is no probe kernel's, or None."""
    if len(shape) not in (2, 3, 4) or shape[0] != shape[1] or (len(shape) == 4 and shape[2] != shape[3]):
        return f"shape {shape} is no probe kernel's ((N, N), (N, N, O) or (N, N, O, O))"
    if probe_size is not None and shape[0] != probe_size:
        return f"shape {shape} does not match the probe size {probe_size}"
    return None


def kernel_files(path: Path, probe_size: Optional[int]) -> Tuple[List[int], List[str], List[str]]:
    """``(steps, skipped, suspicious)``: the sorted steps with a readable kernel file, and a
    description of each unreadable file and each readable one of an unexpected shape."""
    directory = path / KERNELS_DIR
    if not directory.is_dir():
        return [], [], []
    steps, skipped, suspicious = [], [], []
    for entry in sorted(directory.iterdir()):
        match = KERNEL_FILE.fullmatch(entry.name)
        if not match or not entry.is_file():
            continue
        where = f"{KERNELS_DIR}/{entry.name}"
        if int(match.group(1)) >= MAX_STEP:
            skipped.append(f"{where} skipped: its step is outside [0, 2**53)")
            continue
        try:
            shape, _ = _npy_header(entry)
        except (ValueError, OSError) as error:
            skipped.append(f"{where} skipped: {error}")
            continue
        problem = _shape_problem(shape, probe_size)
        if problem is not None:
            suspicious.append(f"{where}: {problem}")
        steps.append(int(match.group(1)))
    return sorted(steps), skipped, suspicious


# --------------------------------------------------------------------------- the dense forecast


def read_forecast(path: Path) -> Tuple[Optional[Tuple[np.ndarray, Dict[str, np.ndarray]]], Optional[str]]:
    """``((steps, columns), problem)`` of a run's ``forecast.json``: int64 steps ``(S,)``
    and float64 columns ``(S,)`` (NaN where a value is missing), or None and why (None
    when there is no file: a run without a forecast)."""
    file = path / FORECAST_FILE
    if not file.is_file():
        return None, None
    try:
        content = parse_json(file.read_bytes(), MAX_META_BYTES)
        if not isinstance(content, dict) or not isinstance(content.get("fields"), dict):
            raise ValueError("not an object with steps and fields")
        steps = np.asarray(content["steps"], dtype=np.int64)
        columns = {
            str(name): np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
            for name, values in content["fields"].items()
        }
        if steps.ndim != 1 or any(c.shape != steps.shape for c in columns.values()):
            raise ValueError("the steps and fields do not line up")
    except (ValueError, KeyError, TypeError, OverflowError) as error:
        return None, f"{file.name} is unreadable ({error}); the forecast at the measurements is used"
    return (steps, columns), None
