"""What a compiled XLA program costs per device: memory, FLOPs, collectives, and a roofline.

Everything here reads a `jax.stages.Compiled` (or its HLO text) and runs nothing, so it works
for programs compiled for TPUs this host does not have (`muse_jax.tpu`, `muse_jax.aot`).

- Memory is the compiler's own buffer assignment (`memory_analysis()`): arguments + outputs −
  donated (aliased) + temporaries is what one device must hold at the step's peak.
- FLOPs and bytes accessed are XLA's cost analysis of the partitioned (per-device) program.
- Collectives are read from the optimised HLO: every all-reduce / all-gather / reduce-scatter /
  all-to-all / collective-permute, counted as often as it runs (a loop body's collectives times
  the loop's known trip count), with the bytes one device sends in a ring over its group.
- The roofline is an estimate, not a measurement: the slowest of FLOPs at the chip's peak, HBM
  bytes at its bandwidth, and collective bytes at its ICI bandwidth, with no overlap credit lost
  and none assumed between them beyond taking the maximum.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%[^\s=]+ = (?P<type>.*?) (?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+) ")
_CALLEES = re.compile(
    r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%([^\s,)}]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(type_text: str) -> list[float]:
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype.startswith("f8"):
            size = 1
        elif dtype in _BYTES:
            size = _BYTES[dtype]
        else:
            continue
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _group_size(line: str, num_devices: int) -> int:
    """Participants per group from an instruction's replica_groups (any of HLO's formats)."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return max(1, len([x for x in m.group(1).split(",") if x]))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes.get(n, 1)) for n in names) or 1
    m = re.search(r"source_target_pairs=\{", line)
    if m:
        return 2
    return num_devices


def _ring_bytes(op: str, result_bytes: float, n: int) -> float:
    """Bytes one device sends for a collective whose per-device result is `result_bytes`."""
    if n <= 1:
        return 0.0
    if op == "all-reduce":
        return 2.0 * result_bytes * (n - 1) / n
    if op == "reduce-scatter":
        return result_bytes * (n - 1)
    if op in ("all-gather", "all-to-all"):
        return result_bytes * (n - 1) / n
    return result_bytes  # collective-permute


@dataclasses.dataclass
class Collective:
    count: int = 0  # Executions per program run.
    result_bytes: float = 0.0  # Sum of the per-device results over those executions.
    sent_bytes: float = 0.0  # Ring estimate of what one device sends.


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+) = (?P<rest>.*)$")
_OPCODE = re.compile(r" (?P<op>[a-z][a-z0-9\-]*)\(")
# Instructions that move no HBM bytes of their own (views, plumbing, control flow whose bodies
# are counted themselves, and the second halves of async pairs).
_NO_TRAFFIC = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
}


@dataclasses.dataclass
class _Instruction:
    name: str
    type_text: str
    op: str
    operands: list[str]
    line: str


def _split_instruction(line: str) -> _Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    rest = m.group("rest")
    op = _OPCODE.search(rest)
    if not op:
        return None
    # Operands: the %names inside the opcode's parentheses.
    i, depth = op.end(), 1
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    operands = re.findall(r"%([^\s,()]+)", rest[op.end() : i])
    return _Instruction(m.group("name"), rest[: op.start()], op.group("op"), operands, line)


@dataclasses.dataclass
class Program:
    """An optimised HLO module, parsed enough to count what runs how often."""

    computations: dict[str, list[_Instruction]]
    entry: str
    runs: dict[str, int]  # Executions of each computation per run of the program.
    control: set[str]  # Computations whose instructions are scheduled ops (not fused bodies).
    types: dict[str, str]  # Instruction name -> its result type text.
    trips: dict[str, int]  # Loop body -> the trip count of the loop that runs it.


def _trip_count(line: str, condition: list[_Instruction]) -> int:
    """A while loop's trip count: XLA's own annotation, else the bound its condition compares
    the counter against (loops from lax.scan / fori_loop count 0, 1, ... < bound)."""
    trip = _TRIP.search(line)
    if trip:
        return int(trip.group(1))
    bounds = [
        int(c)
        for ins in condition
        if ins.op == "constant" and ins.type_text.strip().startswith("s32[]")
        for c in re.findall(r"constant\((-?\d+)\)", ins.line)
    ]
    return max(bounds) if bounds and max(bounds) > 0 else 1


def parse(hlo_text: str) -> Program:
    computations: dict[str, list[_Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t", "}")) and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group("name")
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.startswith("  "):
            ins = _split_instruction(line)
            if ins is not None:
                computations[current].append(ins)
    types = {ins.name: ins.type_text for body in computations.values() for ins in body}
    # Call edges (callee, times per caller run, is the callee control flow?).
    graph: dict[str, list[tuple[str, int, bool]]] = {}
    trips_of: dict[str, int] = {}
    for name, body in computations.items():
        edges = []
        for ins in body:
            if ins.op == "while":
                cond = re.search(r"condition=%([^\s,]+)", ins.line)
                loop = re.search(r"body=%([^\s,]+)", ins.line)
                trips = _trip_count(ins.line, computations.get(cond.group(1), []) if cond else [])
                if loop:
                    edges.append((loop.group(1), trips, True))
                    trips_of[loop.group(1)] = trips
                if cond:
                    edges.append((cond.group(1), trips + 1, True))
                continue
            for callee in _CALLEES.findall(ins.line):
                edges.append((callee, 1, ins.op in ("call", "conditional")))
            for group in _BRANCHES.findall(ins.line):
                edges += [(c.strip().lstrip("%"), 1, True) for c in group.split(",") if c.strip()]
        graph[name] = edges
    runs: dict[str, int] = collections.defaultdict(int)
    control = {entry} if entry else set()
    if entry:
        # Calls form a DAG: visit every caller before its callees (Kahn's order).
        reachable = _reachable({k: [(c, t) for c, t, _ in v] for k, v in graph.items()}, entry)
        indegree = collections.Counter(
            callee for name in reachable for callee, _, _ in graph.get(name, [])
        )
        runs[entry] = 1
        queue = [entry]
        while queue:
            name = queue.pop()
            for callee, trips, is_control in graph.get(name, []):
                runs[callee] += runs[name] * trips
                if is_control and name in control:
                    control.add(callee)
                indegree[callee] -= 1
                if indegree[callee] == 0:
                    queue.append(callee)
    return Program(computations, entry, dict(runs), control, types, trips_of)


def _stacked_bytes(type_text: str, trips: int) -> float:
    """Bytes of the arrays in `type_text` an iteration of a `trips`-long loop touches: an array
    whose leading dimension is the trip count is a scanned stack (layers' weights, their
    gradients, saved activations) of which each iteration reads or updates one slice."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        size = 1 if dtype.startswith("f8") else _BYTES.get(dtype)
        if size is None:
            continue
        shape = [int(d) for d in dims.split(",") if d]
        n = size * math.prod(shape)
        total += n / trips if trips > 1 and shape and shape[0] == trips else n
    return total


def hbm_bytes(program: Program, count_loops: bool = True) -> float:
    """Bytes every scheduled op reads and writes: the operands and results of each fusion,
    matmul, copy and collective of the entry and of loop bodies, each loop body counted as
    often as it runs (`count_loops`) or once (as XLA's cost analysis counts). A slice of a
    scanned stack counts as the slice (see `_stacked_bytes`)."""
    total = 0.0
    for name in program.control:
        runs = program.runs.get(name, 0) if count_loops else 1
        trips = program.trips.get(name, 1)
        for ins in program.computations.get(name, []):
            if ins.op in _NO_TRAFFIC or ins.op.endswith("-done"):
                continue
            moved = _stacked_bytes(ins.type_text, trips)
            moved += sum(_stacked_bytes(program.types.get(o, ""), trips) for o in ins.operands)
            total += runs * moved
    return total


def collectives(hlo: str | Program, num_devices: int) -> dict[str, Collective]:
    """{kind: Collective} over one run of the program, loop trip counts included."""
    program = parse(hlo) if isinstance(hlo, str) else hlo
    out: dict[str, Collective] = {}
    for name, body in program.computations.items():
        runs = program.runs.get(name, 0)
        for ins in body:
            m = _OP.match(ins.line)
            if not m or not runs:
                continue
            sizes = _array_bytes(m.group("type"))
            if not sizes:
                continue
            # An async start's type is (operands..., results..., [context]): its largest array
            # is the result for every kind here (gathers grow, the rest keep their size).
            result = max(sizes) if m.group("start") else sum(sizes)
            op, n = m.group("op"), _group_size(ins.line, num_devices)
            c = out.setdefault(op, Collective())
            c.count += runs
            c.result_bytes += runs * result
            c.sent_bytes += runs * _ring_bytes(op, result, n)
    return out


def _reachable(graph: dict[str, list[tuple[str, int]]], entry: str) -> set[str]:
    seen, stack = set(), [entry]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack += [c for c, _ in graph.get(name, [])]
    return seen


@dataclasses.dataclass
class Memory:
    """Per-device bytes from the compiler's buffer assignment."""

    arguments: int
    outputs: int
    aliased: int  # Outputs that reuse donated arguments' buffers.
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def memory(compiled: Any) -> Memory:
    m = compiled.memory_analysis()
    return Memory(
        arguments=int(m.argument_size_in_bytes),
        outputs=int(m.output_size_in_bytes),
        aliased=int(m.alias_size_in_bytes),
        temporaries=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
    )


def cost(compiled: Any) -> dict[str, float]:
    """XLA's per-device cost analysis: 'flops', 'bytes accessed', 'transcendentals'."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, list | tuple) else c
    keys = ("flops", "bytes accessed", "transcendentals")
    return {k: float(c.get(k, float("nan"))) for k in keys} if c else dict.fromkeys(keys, math.nan)


@dataclasses.dataclass
class Roofline:
    compute_s: float
    memory_s: float
    collective_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s, self.collective_s)

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute_s, "HBM": self.memory_s, "ICI": self.collective_s}
        return max(parts, key=parts.get)


def roofline(
    flops: float,
    bytes_accessed: float,
    sent_bytes: float,
    peak_flops: float,
    hbm_bandwidth: float,
    ici_bandwidth: float,
) -> Roofline:
    """Lower-bound seconds per run of one device's program (see module docstring)."""
    return Roofline(
        compute_s=flops / peak_flops,
        memory_s=bytes_accessed / hbm_bandwidth,
        collective_s=sent_bytes / ici_bandwidth,
    )


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    """The jaxprs an equation calls (pjit, remat, custom_vjp, cond branches, loop bodies)."""
    from jax.extend import core as jcore

    out = []
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jcore.ClosedJaxpr):
                out.append(v.jaxpr)
            elif isinstance(v, jcore.Jaxpr):
                out.append(v)
    return out


def jaxpr_flops(jaxpr: Any, count_loops: bool = True) -> float:
    """Matmul and convolution FLOPs of a (closed) jaxpr, for all devices together.

    `count_loops`: a scan body counts `length` times (as it runs); False counts it once, as
    XLA's cost analysis does. Their ratio is the factor `muse_jax.aot` scales the compiler's
    per-device figures by. A `while_loop` of unknown trip count counts once either way; a
    `cond` counts its costliest branch.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_features = rhs[dn.rhs_spec[0]]
            batch_groups = eqn.params.get("batch_group_count", 1)
            total += 2.0 * math.prod(out) * math.prod(rhs) / out_features / batch_groups
        subs = _sub_jaxprs(eqn.params)
        if not subs:
            continue
        costs = [jaxpr_flops(s, count_loops) for s in subs]
        if name == "cond":
            total += max(costs)
        elif name == "scan" and count_loops:
            total += eqn.params["length"] * sum(costs)
        else:
            total += sum(costs)
    return total
