"""Read FLOPs, collective traffic and HBM traffic off a compiled XLA program's text, loops included.

``compiled.cost_analysis()`` on XLA:TPU counts one trip through a ``while`` loop (our round is a
``lax.map`` over chunks around a ``lax.scan`` over steps), so its ``flops`` come out at a
fraction of the real count and its ``optimal_seconds`` is not usable. This module walks the
optimized HLO text (``compiled.as_text()``) instead: every computation, every instruction's
result shape, and the call graph (fusions, while bodies, conditionals, async wrappers), each
``while`` multiplied by its trip count (``known_trip_count`` in the backend config, else the
``compare(i, constant(N)), direction=LT`` of its condition). The numbers are per device
(per chip): the program is the SPMD-partitioned one.

Counted:

* ``flops``: ``2 * prod(result) * contracted size`` of every ``convolution`` and ``dot`` (XLA:TPU
  writes matmuls as convolutions with ``dim_labels``); elementwise work is not counted (it is
  small next to the matmuls of a transformer and is what the analytic formula leaves out too).
* ``collectives``: count and result bytes of every ``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``all-to-all``, ``collective-permute`` (async ``*-done`` / ``async-start``
  forms included once).
* ``hbm_bytes``: operand + result bytes of every top-level instruction (outside fusions) that
  touches memory; an upper-bound style estimate of HBM traffic, since operands in VMEM
  (``S(1)`` layouts) are skipped but repeated reads of one buffer are each counted.

A ``conditional`` counts its most expensive branch (an upper bound when branches differ).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SKIP_BYTES = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start", "copy-done",
               "while", "conditional", "call", "after-all", "partition-id", "replica-id", "iota",
               "all-reduce-start", "all-gather-start", "collective-permute-start", "async-start", "async-done",
               "async-update", "opt-barrier"}


@dataclass
class Shape:
    """Arrays of one HLO value (a tuple has several): ``(dtype, dims, in_vmem)``."""

    arrays: list

    @property
    def bytes(self) -> float:
        return sum(_DTYPE_BYTES.get(d, 4) * _prod(dims) for d, dims, _ in self.arrays)

    @property
    def hbm_bytes(self) -> float:
        return sum(_DTYPE_BYTES.get(d, 4) * _prod(dims) for d, dims, vmem in self.arrays if not vmem)


@dataclass
class Instr:
    name: str
    op: str
    shape: Shape
    operands: list
    attrs: str
    args: str = ""


@dataclass
class Computation:
    name: str
    instrs: list = field(default_factory=list)


@dataclass
class HloCounts:
    """Per-device totals of one compiled program, loop trip counts included."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict = field(default_factory=dict)   # op -> {"count": n, "bytes": b}
    unknown_trip_counts: int = 0
    conditionals: int = 0

    @property
    def collective_bytes(self) -> float:
        return float(sum(v["bytes"] for v in self.collectives.values()))

    def add(self, other: HloCounts, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.hbm_bytes += times * other.hbm_bytes
        for k, v in other.collectives.items():
            mine = self.collectives.setdefault(k, {"count": 0.0, "bytes": 0.0})
            mine["count"] += times * v["count"]
            mine["bytes"] += times * v["bytes"]
        self.unknown_trip_counts += other.unknown_trip_counts
        self.conditionals += other.conditionals


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def parse_shape(text: str) -> Shape:
    """The arrays of a printed HLO shape (``bf16[4,8]{1,0:T(8,128)}`` or a tuple of them)."""
    arrays = []
    for m in _ARRAY.finditer(text):
        dtype = m.group(1)
        if dtype not in _DTYPE_BYTES:
            continue
        dims = [int(x) for x in m.group(2).split(",") if x]
        layout = m.group(3) or ""
        arrays.append((dtype, dims, "S(1)" in layout))
    return Shape(arrays)


def _split_top(s: str) -> tuple[str, str]:
    """Split ``"<shape> <op>(<operands>), attrs"`` into ``(shape text, rest)`` at top-level space."""
    depth = 0
    for i, ch in enumerate(s):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == " " and depth == 0:
            return s[:i], s[i + 1:]
    return s, ""


def _matching(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(s)


def parse_module(text: str) -> tuple[dict, str | None]:
    """``({name: Computation}, entry name)`` of an HLO module's text."""
    comps: dict[str, Computation] = {}
    entry = None
    cur = None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line.strip())
            if m and line.rstrip().endswith("{"):
                cur = Computation(m.group(2))
                comps[cur.name] = cur
                if m.group(1):
                    entry = cur.name
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.group(2), m.group(3)
        shape_text, rest = _split_top(rest)
        p = rest.find("(")
        if p < 0:
            continue
        op = rest[:p].strip()
        close = _matching(rest, p)
        operands = re.findall(r"%([\w.\-]+)", rest[p + 1:close])
        cur.instrs.append(Instr(name, op, parse_shape(shape_text), operands, rest[close + 1:], rest[p + 1:close]))
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(key + r"=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _trip_count(instr: Instr, comps: dict) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(_attr(instr.attrs, "condition") or "")
    if cond is None:
        return None
    consts = {}
    for ins in cond.instrs:
        if ins.op == "constant" and re.fullmatch(r"-?\d+", ins.args.strip()):
            consts[ins.name] = int(ins.args)
    for ins in cond.instrs:
        if ins.op == "compare" and "direction=LT" in ins.attrs:
            for o in ins.operands:
                if o in consts:
                    return consts[o]
    return None


def _window(attrs: str) -> dict:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out = {}
    if m:
        for part in m.group(1).split():
            k, _, v = part.partition("=")
            out[k] = v.split("x")
    return out


def _valid_taps(n: int, w: int, o: int, stride: int, lo: int, ld: int, rd: int) -> int:
    """``(output position, window tap)`` pairs of one spatial dimension that land on a real input
    element (not padding, not a dilation hole)."""
    if o * w > 4_000_000:
        return o * w
    extent = (n - 1) * ld + 1
    taps = 0
    for out in range(o):
        for tap in range(w):
            pos = out * stride + tap * rd - lo
            if 0 <= pos < extent and pos % ld == 0:
                taps += 1
    return taps


def _conv_flops(ins: Instr, shapes: dict) -> float:
    """Multiply-adds x 2 of a ``dot`` or ``convolution``. XLA:TPU writes batched matmuls as
    convolutions whose batch dimensions are windowed spatial dimensions (strided, padded or
    dilated so that each output meets one input): only window taps that land on a real input
    element are counted."""
    out = ins.shape.arrays[0][1] if ins.shape.arrays else []
    if len(ins.operands) < 2 or any(o not in shapes or not shapes[o].arrays for o in ins.operands[:2]):
        return 0.0
    lhs, rhs = shapes[ins.operands[0]].arrays[0][1], shapes[ins.operands[1]].arrays[0][1]
    if ins.op == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        k = _prod(lhs[int(i)] for i in dims.group(1).split(",") if i) if dims else 1
        return 2.0 * _prod(out) * k
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.attrs)
    if labels is None:
        return 2.0 * _prod(out)
    l_lab, r_lab, o_lab = labels.groups()
    win = _window(ins.attrs)
    i_size = rhs[r_lab.index("i")]
    non_spatial = out[o_lab.index("b")] * out[o_lab.index("f")]
    taps = 1
    n_sp = sum(ch.isdigit() for ch in r_lab)
    for d in range(n_sp):
        ch = str(d)
        w = rhs[r_lab.index(ch)]
        n = lhs[l_lab.index(ch)]
        o = out[o_lab.index(ch)]

        def get(key, default, d=d):
            v = win.get(key)
            return v[d] if v and d < len(v) else default

        lo = int(get("pad", "0_0").split("_")[0])
        taps *= _valid_taps(n, w, o, int(get("stride", 1)), lo, int(get("lhs_dilate", 1)), int(get("rhs_dilate", 1)))
    return 2.0 * non_spatial * i_size * taps


def count(text: str) -> HloCounts:
    """Per-device :class:`HloCounts` of an optimized HLO module's text, loops unrolled by count."""
    comps, entry = parse_module(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    shapes_of = {name: {i.name: i.shape for i in c.instrs} for name, c in comps.items()}
    memo: dict[tuple[str, bool], HloCounts] = {}

    def visit(name: str, inside_fusion: bool) -> HloCounts:
        key = (name, inside_fusion)
        if key in memo:
            return memo[key]
        out = HloCounts()
        memo[key] = out
        comp = comps.get(name)
        if comp is None:
            return out
        shapes = shapes_of[name]
        for ins in comp.instrs:
            op = ins.op
            if op in ("convolution", "dot"):
                out.flops += _conv_flops(ins, shapes)
            base = op[:-5] if op.endswith("-done") else op
            if base in COLLECTIVES and not op.endswith("-start"):
                c = out.collectives.setdefault(base, {"count": 0.0, "bytes": 0.0})
                c["count"] += 1
                c["bytes"] += ins.shape.bytes
            if not inside_fusion and op not in _SKIP_BYTES and not op.endswith("-done"):
                operand_bytes = sum(shapes[o].hbm_bytes for o in ins.operands if o in shapes)
                if op == "dynamic-update-slice" and len(ins.operands) > 1 and ins.operands[1] in shapes:
                    operand_bytes = 2 * shapes[ins.operands[1]].hbm_bytes          # in place: read + write the update
                    out.hbm_bytes += operand_bytes
                else:
                    out.hbm_bytes += operand_bytes + ins.shape.hbm_bytes
            if op == "fusion":
                sub = _attr(ins.attrs, "calls")
                if sub:
                    inner = visit(sub, True)
                    out.add(HloCounts(inner.flops, 0.0, inner.collectives, inner.unknown_trip_counts,
                                      inner.conditionals))
            elif op == "while":
                n = _trip_count(ins, comps)
                body = visit(_attr(ins.attrs, "body") or "", inside_fusion)
                if n is None:
                    out.unknown_trip_counts += 1
                    n = 1
                out.add(body, n)
            elif op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                names = re.findall(r"%?([\w.\-]+)", m.group(1)) if m else [
                    x for x in (_attr(ins.attrs, "true_computation"), _attr(ins.attrs, "false_computation")) if x]
                branches = [visit(b, inside_fusion) for b in names]
                if branches:
                    out.add(max(branches, key=lambda b: (b.flops, b.hbm_bytes)))
                    out.conditionals += 1
            elif op in ("call", "async-start", "custom-call"):
                sub = _attr(ins.attrs, "calls") or _attr(ins.attrs, "to_apply")
                if sub and op != "custom-call":
                    out.add(visit(sub, inside_fusion))
        return out

    return visit(entry, False)


def collectives_by_op(text: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    """Where a compiled program moves bytes between chips: ``(kind, source op, result shape) ->
    (static occurrences, bytes)``, grouped by the JAX op that produced each collective (the
    ``op_name`` metadata with digits replaced by ``#``, its last 110 characters). Sizes are per
    static occurrence, NOT multiplied by loop trips: this says where; :func:`count` says how much."""
    comps, _ = parse_module(text)
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for comp in comps.values():
        for ins in comp.instrs:
            kind = ins.op[:-5] if ins.op.endswith("-done") else ins.op
            if kind not in COLLECTIVES or ins.op.endswith("-start"):
                continue
            m = re.search(r'op_name="([^"]*)"', ins.attrs)
            key = (kind, re.sub(r"\d+", "#", m.group(1))[-110:] if m else "?",
                   str(ins.shape.arrays[0][1]) if ins.shape.arrays else "")
            n, b = out.get(key, (0, 0))
            out[key] = (n + 1, b + ins.shape.bytes)
    return out
