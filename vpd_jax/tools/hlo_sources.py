"""Where a compiled XLA kernel comes from: fusion/instruction name -> JAX op name and Python source line.

A profiler trace names GPU kernels after the HLO instructions they run (``input_transpose_fusion_29`` is the
instruction ``input_transpose_fusion.29``), which says little about which line of the model made them. The
optimized HLO text of the compiled step (``compiled.as_text()``) carries, for each instruction, the JAX op name
(``jit(step)/.../transpose``, with the Flax module path) and a stack frame (file, line, function). ``hlo_sources`` joins the two so that a
kernel table can print, next to each kernel, the model code behind it.

    text = jax.jit(step).lower(*args).compile().as_text()
    where = hlo_sources(text)           # {"input_transpose_fusion_29": "jit(step)/.../transpose @ vae.py:88 (...)"}
    where.get(kernel_name_from_trace)

Both metadata styles of XLA's HLO text are read: ``stack_frame_id=N`` with the module's ``FileLocations`` /
``StackFrames`` tables (jax >= 0.5), and inline ``source_file=... source_line=...``.
"""

from __future__ import annotations

import os
import re

_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*$")
_COMP_HEAD = re.compile(r"^%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ENTRY_HEAD = re.compile(r"^ENTRY\s+%?([\w.\-]+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SRC_FILE = re.compile(r'source_file="([^"]*)"')
_SRC_LINE = re.compile(r"source_line=(\d+)")
_FIELDS = re.compile(r"(\w+)=(\d+)")


def kernel_name(instruction: str) -> str:
    """The name a GPU profile gives the kernel of HLO ``instruction``: dots and dashes become underscores."""
    return re.sub(r"[.\-]", "_", instruction)


def _tables(lines: list[str]) -> tuple[dict, dict, dict, dict]:
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in lines:
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if not s:
            continue
        m = _TABLE_ROW.match(s)
        if section is None or not m:  # the tables end where the computations begin
            section = None
            continue
        key, rest = int(m.group(1)), m.group(2)
        if section in ("FileNames", "FunctionNames"):
            (files if section == "FileNames" else funcs)[key] = rest.strip('"')
        else:
            fields = {k: int(v) for k, v in _FIELDS.findall(rest)}
            (locs if section == "FileLocations" else frames)[key] = fields
    return files, funcs, locs, frames


def _where(meta: str, tables) -> str:
    """``op_name @ file:line (function)`` (the innermost user frame) from one instruction's metadata text."""
    files, funcs, locs, frames = tables
    op = _OP_NAME.search(meta)
    out = op.group(1) if op else ""
    place = None
    fm = _FRAME.search(meta)
    if fm and int(fm.group(1)) in frames:
        loc = locs.get(frames[int(fm.group(1))].get("file_location_id", -1), {})
        if loc:
            f = os.path.basename(files.get(loc.get("file_name_id"), "?"))
            place = f"{f}:{loc.get('line', '?')} ({funcs.get(loc.get('function_name_id'), '?')})"
    else:
        sf, sl = _SRC_FILE.search(meta), _SRC_LINE.search(meta)
        if sf:
            place = f"{os.path.basename(sf.group(1))}:{sl.group(1) if sl else '?'}"
    return f"{out} @ {place}" if place else out


def hlo_sources(text: str) -> dict[str, str]:
    """``{kernel name: "op_name @ file:line (function) < caller"}`` for every instruction of the HLO ``text``.

    A fusion is described by its fused computation's ROOT (or else its first instruction with metadata), so
    ``input_transpose_fusion_29`` maps to the transpose it was built around rather than to an empty string.
    """
    lines = text.splitlines()
    tables = _tables(lines)
    comp_meta: dict[str, str] = {}  # computation -> the metadata that describes it best
    instrs: list[tuple[str, str]] = []  # (instruction name, full line) of every computation
    current, first = None, None
    for line in lines:
        head = _COMP_HEAD.match(line.strip()) or _ENTRY_HEAD.match(line.strip())
        if head:
            current, first = head.group(1), None
            continue
        if line.strip() == "}":
            if current is not None and current not in comp_meta and first is not None:
                comp_meta[current] = first
            current = None
            continue
        m = _INSTR.match(line)
        if current is None or not m or "metadata=" not in line and "calls=" not in line:
            continue
        instrs.append((m.group(1), line))
        if "op_name=" in line:
            if line.lstrip().startswith("ROOT"):
                comp_meta[current] = line
            elif first is None:
                first = line
    out = {}
    for name, line in instrs:
        calls = _CALLS.search(line)
        meta = comp_meta.get(calls.group(1)) if calls else None
        if meta is None and "op_name=" in line:
            meta = line
        if meta is not None:
            out[kernel_name(name)] = _where(meta, tables)
    return out
