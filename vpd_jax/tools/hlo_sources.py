"""Where a compiled XLA kernel comes from: fusion/instruction name -> JAX op name and Python source line.

A profiler trace names GPU kernels after the HLO instructions they run (``input_transpose_fusion_29`` is the
instruction ``input_transpose_fusion.29``), which says little about which line of the model made them. The
optimized HLO text of the compiled step (``compiled.as_text()``) carries, for each instruction, the JAX op name
(``jit(step)/.../transpose``, with the Flax module path) and a stack frame (file, line, function).
``hlo_sources`` joins the two so that a kernel table can print, next to each kernel, the model code behind it.

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
    """``{kernel name: "op_name @ file:line (function)"}`` for every instruction of the HLO ``text``.

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


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ENTRY_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_REFS = re.compile(r"%([\w.\-]+)")


def _array_bytes(type_text: str) -> int:
    nbytes = 0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        nbytes += _DTYPE_BYTES.get(dtype, 4) * n
    return nbytes


def _entry_lines(text: str):
    """``(name, type text, opcode, operand names, line)`` of each entry instruction."""
    start = text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation in this HLO text")
    for line in text[start:].splitlines()[1:]:
        m = _ENTRY_INSTR.match(line)
        if not m:
            continue
        operands = line[m.end():]
        depth, end = 1, 0  # the operand list ends at the parenthesis that closes ``opcode(``
        for end, ch in enumerate(operands):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        yield m.group(1), m.group(2), m.group(3), _REFS.findall(operands[:end]), line


def entry_outputs(text: str, match: str = "") -> list[tuple[str, str, int]]:
    """``(instruction, opcode, output bytes)`` of the entry computation's instructions whose name matches the
    regular expression ``match``: what each kernel of the step writes (tuples summed)."""
    return [(name, opcode, _array_bytes(type_text)) for name, type_text, opcode, _, _ in _entry_lines(text)
            if re.search(match, name)]


# Kernel kinds of ``entry_traffic``; the last group of kinds is limited by memory bandwidth, not arithmetic.
COMPUTE_KINDS = ("conv", "gemm", "attention")
_OPCODES_WITHOUT_KERNEL = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all",
                           "partition-id", "replica-id")


def _kind(name: str, opcode: str, line: str) -> str:
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', line)
        target = target.group(1) if target else ""
        if "conv" in target:
            return "conv"
        if "fmha" in target or "attention" in target:
            return "attention"
        if "matmul" in target or "gemm" in target:
            return "gemm"
        return "custom-call"
    if opcode == "fusion":
        if "kind=kCustom" in line:  # Triton: a GEMM, or XLA's normalisation/softmax kernels
            return "gemm" if "gemm" in line[: line.find("metadata=")] or "gemm" in name else "norm (triton)"
        for key, kind in (("transpose", "transpose"), ("reduce", "reduce"), ("concatenate", "concat/slice"),
                          ("slice", "concat/slice")):
            if key in name:
                return kind
        return "elementwise"
    if opcode in ("copy", "copy-start"):
        return "copy"
    return opcode


def entry_traffic(text: str) -> list[tuple[str, str, int, int]]:
    """``(instruction, kind, bytes read, bytes written)`` of every kernel of the entry computation.

    A kernel reads its operands whole and writes its outputs (tuples summed); instructions that launch nothing
    (parameters, tuples, bitcasts, constants) are left out. ``kind`` is ``conv``/``gemm``/``attention`` for
    cuDNN/cuBLAS/Triton-GEMM work and otherwise says what the memory-bound kernel does (``transpose``,
    ``reduce``, ``elementwise``, ``copy``, ...). Bytes are an upper bound for kernels that read only part of
    an operand (slices), and do not count re-reads within a kernel: a traffic proxy, not a timing."""
    sizes: dict[str, int] = {}
    rows = []
    for name, type_text, opcode, refs, line in _entry_lines(text):
        written = _array_bytes(type_text)
        sizes[name] = written
        if opcode in _OPCODES_WITHOUT_KERNEL:
            continue
        rows.append((name, _kind(name, opcode, line), sum(sizes.get(r, 0) for r in refs), written))
    return rows


def traffic_summary(text: str) -> tuple[int, int]:
    """``(kernels, memory-bound bytes)`` of a compiled step: the two figures of the device-free speed proxy."""
    rows = entry_traffic(text)
    return len(rows), sum(read + written for _, kind, read, written in rows if kind not in COMPUTE_KINDS)


def traffic_by_module(text: str) -> list[tuple[str, int, int]]:
    """Memory-bound kernels grouped by what they serve: ``(group, kernels, bytes read + written)``, largest first.

    A kernel that reads optimizer state (operands named after ``opt_state``) is the optimizer update; the others
    are grouped by pass (``forward``, or ``backward`` for JAX's ``transpose(jvp(...))``) and the first module of
    their op name below the model (``unet``, ``vae``, ``head``, ...)."""
    where = hlo_sources(text)
    traffic = {name: (kind, read + written) for name, kind, read, written in entry_traffic(text)}
    groups: dict[str, list[int]] = {}
    for name, _, _, refs, _ in _entry_lines(text):
        if name not in traffic or traffic[name][0] in COMPUTE_KINDS:
            continue
        op = where.get(kernel_name(name), "").split(" @ ")[0]
        if any("inner_state" in r or "opt_state" in r for r in refs) or "optax" in op:
            group = "optimizer update"
        else:
            parts = op.split("/")
            model = next((i for i, p in enumerate(parts) if p.startswith(("jvp(", "transpose(jvp("))), None)
            if model is None or model + 1 >= len(parts):
                group = "other"
            else:
                top = parts[model + 1].split(".")[0]
                group = ("backward " if parts[model].startswith("transpose(") else "forward ") + top
        g = groups.setdefault(group, [0, 0])
        g[0] += 1
        g[1] += traffic[name][1]
    return sorted(((k, n, b) for k, (n, b) in groups.items()), key=lambda r: -r[2])


def conv_flops(text: str) -> dict[str, float]:
    """FLOPs of the cuDNN convolution custom-calls of the entry computation, by call target.

    Each call is one of a convolution's three products (forward, input gradient, filter gradient), all
    ``2 * |output| * |filter| / output features`` of the forward convolution (NHWC output, ``->b01f``)."""
    shapes: dict[str, list[int]] = {}
    flops: dict[str, float] = {}
    for name, type_text, opcode, refs, line in _entry_lines(text):
        arrays = _ARRAY.findall(type_text)
        if arrays:
            shapes[name] = [int(d) for d in arrays[0][1].split(",") if d]
        target = re.search(r'custom_call_target="([^"]*)"', line) if opcode == "custom-call" else None
        if not target or "conv" not in target.group(1):
            continue
        t = target.group(1)
        a, b, res = shapes.get(refs[0]), shapes.get(refs[1]), shapes[name]
        if "BackwardInput" in t:
            y, w = a, b
        elif "BackwardFilter" in t:
            y, w = b, res
        else:
            y, w = res, b
        labels = re.search(r"->(\w+)", line)
        features = y[labels.group(1).index("f")] if labels and "f" in labels.group(1) else y[-1]
        n = 2.0
        for d in (*y, *w):
            n *= d
        flops[t] = flops.get(t, 0.0) + n / features
    return flops


def traffic_table(rows, bandwidth: float = 3.35e12) -> str:
    """Kernels, GiB read/written and milliseconds at ``bandwidth`` bytes/s per kind, memory-bound total last."""
    agg: dict[str, list[int]] = {}
    for _, kind, read, written in rows:
        a = agg.setdefault(kind, [0, 0, 0])
        a[0] += 1
        a[1] += read
        a[2] += written
    at = f"ms at {bandwidth / 1e12:g} TB/s"
    lines = [f"{'kind':<15} {'kernels':>7} {'read GiB':>9} {'write GiB':>9} {at:>14}"]
    for kind, (n, r, w) in sorted(agg.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        lines.append(f"{kind:<15} {n:>7d} {r / 2**30:>9.2f} {w / 2**30:>9.2f} {(r + w) / bandwidth * 1e3:>14.1f}")
    mem = [v for k, v in agg.items() if k not in COMPUTE_KINDS]
    n, rw = sum(v[0] for v in mem), sum(v[1] + v[2] for v in mem)
    lines.append(f"{'memory-bound':<15} {n:>7d} {rw / 2**30:>19.2f} {rw / bandwidth * 1e3:>14.1f}"
                 "  (all kinds but conv, gemm, attention; read + write GiB)")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import collections

    p = argparse.ArgumentParser(description="Output bytes of an optimized HLO's kernels, grouped by source "
                                            "(e.g. the transposes of a train step), or (--traffic) the bytes "
                                            "every kernel moves, by kind.")
    p.add_argument("hlo", help="optimized HLO text (compiled.as_text(), or memory_aot.py/bench_train_step --hlo*)")
    p.add_argument("--match", default="", help="regular expression on instruction names, e.g. transpose")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--traffic", action="store_true",
                   help="instead: every kernel's bytes read and written, by kind (a memory-traffic proxy)")
    p.add_argument("--bandwidth_tbs", type=float, default=3.35, help="for --traffic: memory TB/s (H100 SXM: 3.35)")
    a = p.parse_args(argv)
    with open(a.hlo) as f:
        text = f.read()
    if a.traffic:
        print(traffic_table(entry_traffic(text), a.bandwidth_tbs * 1e12))
        print("\nmemory-bound traffic by what it serves (kernels, GiB read + written):")
        for group, n, nbytes in traffic_by_module(text)[: a.top]:
            print(f"  {group:<34} {n:>6d} {nbytes / 2**30:>8.2f}")
        flops = conv_flops(text)
        if flops:
            print("\nconvolutions: " + ", ".join(f"{k.split('$')[-1]} {v / 1e12:.2f}" for k, v in flops.items())
                  + f"; total {sum(flops.values()) / 1e12:.2f} TFLOP per step")
        return 0
    where = hlo_sources(text)
    rows = entry_outputs(text, a.match)
    print(f"{len(rows)} entry instructions match {a.match!r}; they write {sum(r[2] for r in rows) / 2**30:.2f} GiB")
    groups = collections.defaultdict(lambda: [0, 0])
    for name, _, nbytes in rows:
        # One group per layer kind: block indices (down_blocks_2, resnets_1, ...) folded to _N.
        key = re.sub(r"_\d+\b", "_N", where.get(kernel_name(name), "(no metadata)"))
        groups[key][0] += nbytes
        groups[key][1] += 1
    for key, (nbytes, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"{nbytes / 2**20:10.1f} MiB  x{n:<4d} {key[-220:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
