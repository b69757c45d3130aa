"""Static facts of GPU machine code, read from a cubin without a GPU.

For one kernel of a cubin: registers, stack and local bytes, shared memory, spill stores and
loads (bytes of STL / LDL, as ``ptxas -v`` counts them), the control flow of its SASS (blocks,
loops, the cheapest path from entry to exit), instruction counts by class (MUFU, fp64, BAR,
LDS/STS, global loads and stores by width) and the resident warps per SM its resources allow.

Tools: ``cuobjdump`` (``-res-usage``, ``-sass``), the copy bundled with Triton first (it is
there on every machine that runs the Triton kernels), else the CUDA toolkit's. The parsing only
relies on the stable parts of cuobjdump's output (``/*addr*/ [@P] OPCODE operands ;`` lines,
``Function : name`` headers, ``REG:n STACK:n SHARED:n LOCAL:n``), so it reads the output of the
CUDA 12 and 13 tools alike (Triton 3.6 and 3.8).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path


# ----------------------------------------------------------------------------- architecture limits
@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of one architecture (CUDA programming guide, compute capabilities table;
    the rounding rules are those of the toolkit's cuda_occupancy.h)."""

    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    register_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # the register file is split over the 4 schedulers
    shared_unit: int = 128  # shared memory is allocated per block in units of 128 bytes
    reserved_shared_per_block: int = 1024  # the runtime reserves 1 KB of shared memory per block
    # sm_90 cubins already count that 1 KB in the kernel's shared section (a kernel without
    # shared memory shows SHARED:1024), sm_80 cubins do not
    cubin_shared_includes_reserved: bool = True


ARCH_LIMITS = {
    90: ArchLimits(shared_per_sm=228 * 1024, cubin_shared_includes_reserved=True),
    80: ArchLimits(shared_per_sm=164 * 1024, cubin_shared_includes_reserved=False),
}


def occupancy(arch: int, registers: int, threads: int, shared_static: int, shared_dynamic: int = 0) -> dict:
    """Resident blocks and warps per SM for a launch of ``threads`` threads per block and the
    limit that binds (registers, shared memory, warps or blocks)."""
    lim = ARCH_LIMITS[arch]
    warps_per_block = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / lim.register_unit) * lim.register_unit
    warps_by_regs = (lim.registers_per_sm // lim.sub_partitions // regs_per_warp) * lim.sub_partitions
    reserved = 0 if lim.cubin_shared_includes_reserved else lim.reserved_shared_per_block
    shared = math.ceil((shared_static + reserved + shared_dynamic) / lim.shared_unit) * lim.shared_unit
    limits = {
        "registers": warps_by_regs // warps_per_block,
        "shared memory": lim.shared_per_sm // shared if shared else lim.max_blocks_per_sm,
        "warps": lim.max_warps_per_sm // warps_per_block,
        "blocks": lim.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps_per_block, "limiter": limiter,
            "shared_per_block": shared}


# ----------------------------------------------------------------------------- tools
def tool(name: str) -> str:
    """Path of a CUDA binary tool: Triton's bundled copy, else $CUDA_HOME/bin, else PATH."""
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / name)
    candidates.append(Path("/usr/local/cuda/bin") / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (looked in {', '.join(map(str, candidates))} and PATH)")


def _run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


# ----------------------------------------------------------------------------- names
_BUILTIN_TYPES = {"f": "float", "d": "double", "i": "int", "j": "unsigned int", "b": "bool", "l": "long",
                  "m": "unsigned long", "x": "long long", "y": "unsigned long long", "c": "char",
                  "h": "unsigned char", "s": "short", "t": "unsigned short", "v": "void"}
_ANONYMOUS = "_GLOBAL__N"  # an anonymous namespace's source name starts so (then a per-compilation hash)


def _source_name(text: str, pos: int) -> tuple[str, int] | None:
    """``<length><identifier>`` at ``pos``: (the identifier as c++filt prints it, the position after)."""
    digits = re.match(r"\d+", text[pos:])
    if digits is None:
        return None
    start = pos + len(digits.group())
    name = text[start:start + int(digits.group())]
    if len(name) != int(digits.group()):
        return None
    return ("(anonymous namespace)" if name.startswith(_ANONYMOUS) else name), start + len(name)


def _substitution(text: str, pos: int, subs: list[str]) -> tuple[str, int] | None:
    """``S_`` (the first candidate) or ``S<base 36>_`` (the one after) at ``pos``."""
    ref = re.match(r"S([0-9A-Z]*)_", text[pos:])
    index = 0 if ref is None or not ref.group(1) else int(ref.group(1), 36) + 1
    if ref is None or index >= len(subs):
        return None
    return subs[index], pos + len(ref.group())


def _type(text: str, pos: int, subs: list[str]) -> tuple[str, int] | None:
    """A type of an Itanium-mangled template argument: builtin, class name, nested name
    (``N ... E``) or substitution; class names and nested-name prefixes become candidates for
    later substitutions, as the ABI says."""
    ch = text[pos:pos + 1]
    if ch and ch in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[ch], pos + 1
    if ch == "S":
        return _substitution(text, pos, subs)
    if ch.isdigit():
        parsed = _source_name(text, pos)
        if parsed:
            subs.append(parsed[0])
        return parsed
    if ch != "N":
        return None
    parts, pos = [], pos + 1
    while pos < len(text) and text[pos] != "E":
        if text[pos] == "S" and not parts:
            parsed = _substitution(text, pos, subs)
        else:
            parsed = _source_name(text, pos)
        if parsed is None:
            return None
        parts.append(parsed[0])
        if text[pos] != "S":
            subs.append("::".join(parts))
        pos = parsed[1]
    return "::".join(parts), pos + 1


def _template_args(text: str, pos: int, subs: list[str]) -> tuple[list[str], int] | None:
    """Template arguments of an Itanium-mangled name from ``pos`` (just after the 'I') up to the
    matching 'E': types and literals (``L <type> <value> E``), written as c++filt writes them."""
    args = []
    while pos < len(text) and text[pos] != "E":
        if text[pos] == "L":
            parsed = _type(text, pos + 1, subs)
            if parsed is None or "E" not in text[parsed[1]:]:
                return None
            kind, start = parsed
            end = text.index("E", start)
            value = text[start:end].replace("n", "-", 1)  # 'n': a minus sign
            args.append({"bool": "false" if value == "0" else "true", "int": value}.get(kind, f"({kind}){value}"))
            pos = end + 1
        else:
            parsed = _type(text, pos, subs)
            if parsed is None:
                return None
            args.append(parsed[0])
            pos = parsed[1]
    return args, pos + 1


def readable_name(mangled: str) -> str:
    """``name<arg, ...>`` for a mangled function template (as c++filt writes its name and
    arguments, namespaces left out), else the name as it is (Triton kernels are not mangled)."""
    if not mangled.startswith("_Z"):
        return mangled
    nested = mangled[2:3] == "N"
    pos, parts, subs = 3 if nested else 2, [], []
    while True:
        parsed = _source_name(mangled, pos)
        if parsed is None:
            return mangled
        name, pos = parsed
        parts.append(name)
        subs.append("::".join(parts))
        if mangled[pos:pos + 1] == "I":
            args = _template_args(mangled, pos + 1, subs)
            return f"{name}<{', '.join(args[0])}>" if args else mangled
        if not nested or mangled[pos:pos + 1] == "E":
            return mangled


def stable_name(mangled: str) -> str:
    """A mangled name without its anonymous namespace's per-compilation hash (``49_GLOBAL__N__...``
    becomes ``12_GLOBAL__N_1``): the same kernel's name in any build of the same source."""
    found = re.search(rf"(\d+){_ANONYMOUS}", mangled)
    if found is None:
        return mangled
    end = found.end(1) + int(found.group(1))
    return mangled[:found.start()] + "12_GLOBAL__N_1" + mangled[end:]


# ----------------------------------------------------------------------------- SASS
_LINE = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}
FP64_OPCODES = {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET", "DMMA"}
GLOBAL_LOADS = {"LDG", "LDGSTS", "LD"}  # LD: generic addressing (may be global)
GLOBAL_STORES = {"STG", "ST"}


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with its modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str
    base: str = field(init=False, compare=False)  # the opcode without modifiers, e.g. "LDG"

    def __post_init__(self):
        object.__setattr__(self, "base", self.opcode.split(".", 1)[0])

    @property
    def width(self) -> int:
        """Bytes per thread of a memory access (4 when the opcode names no size)."""
        sizes = [_WIDTH[m] for m in self.opcode.split(".")[1:] if m in _WIDTH]
        return sizes[-1] if sizes else 4

    @property
    def conditional(self) -> bool:
        return self.predicate not in ("", "@PT")

    @property
    def target(self) -> int | None:
        """Target address of BRA / JMP / CALL (None for other instructions or register targets)."""
        if self.base not in ("BRA", "JMP", "CALL"):
            return None
        found = re.findall(r"0x([0-9a-fA-F]+)", self.operands)
        return int(found[-1], 16) if found else None


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """``cuobjdump -sass`` output -> {function name: instructions in address order}."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        match = _LINE.search(line)
        if match is None or current is None:
            continue
        body = match.group(2).strip()
        predicate = ""
        if body.startswith("@"):
            predicate, body = body.split(None, 1)
        opcode, _, operands = body.partition(" ")
        current.append(Instruction(int(match.group(1), 16), predicate, opcode, operands.strip()))
    return functions


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {function name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if header:
            current = header.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return usage


def parse_ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` output (one architecture) -> {mangled name: {"registers", "stack",
    "spill_stores", "spill_loads"}} of every entry function: ptxas's own count, beside the
    STL / LDL bytes read from the SASS."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = kernels.setdefault(entry.group(1), {})
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if current is not None and frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
        used = re.search(r"Used (\d+) registers", line)
        if current is not None and used:
            current["registers"] = int(used.group(1))
    return kernels


# ----------------------------------------------------------------------------- control flow
@dataclass
class Loop:
    """A natural loop: its header block, the blocks of its body and the loops nested in it."""

    header: int
    blocks: frozenset
    instructions: list  # every instruction of the body (nested loops included), address order
    children: list = field(default_factory=list)

    @property
    def head(self) -> int:
        return self.instructions[0].address if self.instructions else 0

    def __len__(self) -> int:
        return len(self.instructions)


class ControlFlow:
    """Basic blocks, natural loops (back edges found with dominators, so loops whose latch nvcc
    placed out of line are whole) and path costs of one function's SASS. Calls are not followed:
    out-of-line slow paths (division, sqrt) are on no counted path; code after the last EXIT
    (unreachable) is on none either. Nor is the target of a ``BRA.DIV``: the fallback nvcc emits
    for a warp-synchronous operation (``__shfl_xor_sync``) reached by a divergent warp, which the
    kernels modelled here never take (their warps reach every shuffle converged, all 32 lanes)."""

    def __init__(self, instructions: list[Instruction]):
        self.instructions = instructions
        self.index = {ins.address: i for i, ins in enumerate(instructions)}
        # Subroutines (slow paths) follow the kernel's last EXIT; a CALL.REL.NOINC to an address
        # before it is a jump (sm_80 code leaves loops that way: "@P1 CALL.REL.NOINC <after the loop>")
        last_exit = max((ins.address for ins in instructions if ins.base == "EXIT"), default=-1)
        self.jumps = {i: ins.target for i, ins in enumerate(instructions) if ins.target is not None
                      and ins.target in self.index and (ins.base != "CALL" or ins.target < last_exit)
                      and not _divergence_fallback(ins)}
        leaders = {0} if instructions else set()
        for i, ins in enumerate(instructions):
            if i in self.jumps:
                leaders.add(self.index[self.jumps[i]])
            if (ins.base in ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET") or i in self.jumps) and i + 1 < len(instructions):
                leaders.add(i + 1)
        self.starts = sorted(leaders)  # instruction index where each block starts
        self.block_of = {}
        for b in range(len(self.starts)):
            for i in self.block_range(b):
                self.block_of[i] = b
        self.succ = [self._successors(b) for b in range(len(self.starts))]
        self.order = self._reverse_postorder()
        self.preds: dict[int, list[int]] = {b: [] for b in self.order}
        for b in self.order:
            for s in self.succ[b]:
                self.preds[s].append(b)
        self.idom = self._dominators()
        self.back_edges = {(b, s) for b in self.order for s in self.succ[b] if self._dominates(s, b)}

    def block_range(self, b: int) -> range:
        end = self.starts[b + 1] if b + 1 < len(self.starts) else len(self.instructions)
        return range(self.starts[b], end)

    def block_size(self, b: int, weight=None) -> float:
        if weight is None:
            return len(self.block_range(b))
        return sum(weight(self.instructions[i]) for i in self.block_range(b))

    def _successors(self, b: int) -> list[int]:
        i = self.block_range(b)[-1]
        last = self.instructions[i]
        nxt = [b + 1] if b + 1 < len(self.starts) else []
        if last.base in ("EXIT", "RET", "BRX", "JMX"):  # (an indirect branch: its targets are not followed)
            return nxt if last.conditional else []
        if i in self.jumps:
            return [self.block_of[self.index[self.jumps[i]]]] + (nxt if last.conditional else [])
        if _divergence_fallback(last):  # never taken: on to the converged warp's path
            return nxt
        if last.base in ("BRA", "JMP"):  # to an address outside the function
            return nxt if last.conditional else []
        return nxt

    def _reverse_postorder(self) -> list[int]:
        if not self.starts:
            return []
        seen, post, stack = {0}, [], [(0, iter(self.succ[0]))]
        while stack:
            b, it = stack[-1]
            for s in it:
                if s not in seen:
                    seen.add(s)
                    stack.append((s, iter(self.succ[s])))
                    break
            else:
                post.append(b)
                stack.pop()
        return post[::-1]

    def _dominators(self) -> dict[int, int]:
        """Immediate dominators of the blocks reachable from the entry (Cooper, Harvey, Kennedy)."""
        rank = {b: i for i, b in enumerate(self.order)}
        idom = {self.order[0]: self.order[0]} if self.order else {}

        def meet(a, b):
            while a != b:
                while rank[a] > rank[b]:
                    a = idom[a]
                while rank[b] > rank[a]:
                    b = idom[b]
            return a

        changed = True
        while changed:
            changed = False
            for b in self.order[1:]:
                done = [p for p in self.preds[b] if p in idom]
                new = done[0]
                for p in done[1:]:
                    new = meet(p, new)
                if idom.get(b) != new:
                    idom[b], changed = new, True
        return idom

    def _dominates(self, a: int, b: int) -> bool:
        while True:
            if a == b:
                return True
            up = self.idom.get(b, b)
            if up == b:
                return False
            b = up

    @cached_property
    def loops(self) -> list[Loop]:
        """Outermost natural loops, each with its nested loops, in address order."""
        bodies: dict[int, set] = {}
        for tail, head in self.back_edges:
            body = bodies.setdefault(head, {head})
            todo = [tail]
            while todo:
                b = todo.pop()
                if b not in body:
                    body.add(b)
                    todo += self.preds[b]
        loops = [Loop(h, frozenset(body), [self.instructions[i] for b in sorted(body) for i in self.block_range(b)])
                 for h, body in bodies.items()]
        loops.sort(key=lambda lp: -len(lp.blocks))
        roots: list[Loop] = []
        for i, lp in enumerate(loops):
            parents = [q for q in loops[:i] if lp.blocks < q.blocks]
            (min(parents, key=lambda q: len(q.blocks)).children if parents else roots).append(lp)
        for lp in [*loops]:
            lp.children.sort(key=lambda q: q.head)
        return sorted(roots, key=lambda lp: lp.head)

    def main_loop(self) -> Loop | None:
        """The outermost loop with the most instructions (the persistent / grid-stride loop)."""
        return max(self.loops, key=len, default=None)

    def loop_instructions(self, loop: Loop, trips=lambda inner: 1.0, weight=None) -> float:
        """Instructions (or, with ``weight``, weighted instructions) one iteration of ``loop``
        issues: every instruction of the body counted (both arms of a branch: an upper bound
        where the body branches), each nested loop ``trips(inner)`` times."""
        weight = weight or (lambda ins: 1)
        inner = {ins for c in loop.children for ins in c.instructions}
        own = sum(weight(ins) for ins in loop.instructions if ins not in inner)
        return own + sum(trips(c) * self.loop_instructions(c, trips, weight) for c in loop.children)

    def loop_instructions_min(self, loop: Loop, trips=lambda inner: 1.0) -> float:
        """Like ``loop_instructions`` with only the cheapest path through each body counted (a
        lower bound where the body branches; equal to it for a branch-free body)."""
        inner = {ins for c in loop.children for ins in c.instructions}
        own = self.shortest_path(weight=lambda ins: 0 if ins in inner else 1, within=loop)
        return own + sum(trips(c) * self.loop_instructions_min(c, trips) for c in loop.children)

    def shortest_path(self, weight=None, within: Loop | None = None) -> float:
        """Fewest (weighted) instructions on a path through the code with the back edges dropped
        (each loop body at most once, or skipped where a guard allows): from the entry to an
        EXIT, or with ``within``, from the loop's header to a block that branches back to it."""
        return self._path(weight, within, min)

    def longest_path(self, weight=None, within: Loop | None = None) -> float:
        """Like ``shortest_path``, the most (weighted) instructions instead: the costlier arm of
        every branch (an upper bound on a pass through code that runs once, such as a kernel's
        partial last tile)."""
        return self._path(weight, within, max)

    def _path(self, weight, within: Loop | None, pick) -> float:
        blocks = within.blocks if within is not None else set(self.order)
        start = within.header if within is not None else (self.order[0] if self.order else None)
        if start is None:
            return 0.0
        ends = ({t for t, h in self.back_edges if h == within.header} if within is not None
                else {b for b in self.order if not self.succ[b]
                      or self.instructions[self.block_range(b)[-1]].base == "EXIT"})
        worst = math.inf if pick is min else -math.inf
        cost = {start: self.block_size(start, weight)}
        best = worst
        for b in self.order:  # a topological order once the back edges are dropped
            if b not in cost:
                continue
            if b in ends:
                best = pick(best, cost[b])
            for s in self.succ[b]:
                if s in blocks and (b, s) not in self.back_edges:
                    c = cost[b] + self.block_size(s, weight)
                    if pick(c, cost.get(s, worst)) == c:
                        cost[s] = c
        return best


def _divergence_fallback(ins: Instruction) -> bool:
    """``BRA.DIV mask, target``: to ``target`` when the warp is divergent (see ControlFlow)."""
    return ins.opcode.startswith("BRA.DIV")


# ----------------------------------------------------------------------------- instruction mix
def is_fp64(ins: Instruction) -> bool:
    return ins.base in FP64_OPCODES or (ins.base in ("F2F", "I2F", "F2I") and ".F64" in ins.opcode)


# Instruction classes counted per row and per kernel.
CLASSES = {
    "mufu": lambda ins: ins.base == "MUFU",
    "fp64": is_fp64,
    "bar": lambda ins: ins.base == "BAR",
    "lds": lambda ins: ins.base in ("LDS", "LDSM"),
    "sts": lambda ins: ins.base == "STS",
    "shfl": lambda ins: ins.base == "SHFL",
    "calls": lambda ins: ins.base == "CALL",
    "global_loads": lambda ins: ins.base in GLOBAL_LOADS,
    "global_stores": lambda ins: ins.base in GLOBAL_STORES,
}


def instruction_mix(instructions: list[Instruction]) -> dict:
    """Counts by class (CLASSES), MUFU by function, global loads and stores by opcode (the width
    is in the opcode: LDG.E.U16 = 2 bytes, LDG.E.128 = 16) and the widest of each."""
    mix = {name: sum(1 for ins in instructions if test(ins)) for name, test in CLASSES.items()}
    mix.update(
        instructions=len(instructions),
        mufu_by_function=dict(Counter(ins.opcode for ins in instructions if ins.base == "MUFU")),
        load_opcodes=dict(Counter(ins.opcode for ins in instructions if ins.base in GLOBAL_LOADS)),
        store_opcodes=dict(Counter(ins.opcode for ins in instructions if ins.base in GLOBAL_STORES)),
        max_global_load_bytes=max((ins.width for ins in instructions if ins.base in GLOBAL_LOADS), default=0),
        max_global_store_bytes=max((ins.width for ins in instructions if ins.base in GLOBAL_STORES), default=0),
    )
    return mix


# ----------------------------------------------------------------------------- one kernel
@dataclass
class KernelCode:
    """One kernel of a cubin: its resources and its SASS."""

    name: str
    arch: int
    usage: dict[str, int]
    instructions: list[Instruction]

    @cached_property
    def flow(self) -> ControlFlow:
        return ControlFlow(self.instructions)

    @property
    def registers(self) -> int:
        return self.usage.get("REG", 0)

    @property
    def spill_store_bytes(self) -> int:
        return sum(ins.width for ins in self.instructions if ins.base == "STL")

    @property
    def spill_load_bytes(self) -> int:
        return sum(ins.width for ins in self.instructions if ins.base == "LDL")

    def occupancy(self, threads: int, shared_dynamic: int = 0) -> dict:
        return occupancy(self.arch, self.registers, threads, self.usage.get("SHARED", 0), shared_dynamic)

    def summary(self) -> dict:
        return {
            "function": self.name,
            "name": readable_name(self.name),
            "registers": self.registers,
            "stack_bytes": self.usage.get("STACK", 0),
            "local_bytes": self.usage.get("LOCAL", 0),
            "shared_static_bytes": self.usage.get("SHARED", 0),
            "spill_store_bytes": self.spill_store_bytes,
            "spill_load_bytes": self.spill_load_bytes,
            "spill_bytes": self.spill_store_bytes + self.spill_load_bytes,
        }


def arch_of(cubin_sass_header: str) -> int | None:
    match = re.search(r"code for sm_(\d+)", cubin_sass_header)
    return int(match.group(1)) if match else None


def read_cubin(path: str | os.PathLike) -> dict[str, KernelCode]:
    """Every kernel of a cubin, by (mangled) function name."""
    cuobjdump = tool("cuobjdump")
    sass_text = _run([cuobjdump, "-sass", str(path)])
    usage = parse_resource_usage(_run([cuobjdump, "-res-usage", str(path)]))
    arch = arch_of(sass_text)
    if arch is None:
        raise RuntimeError(f"{path}: cuobjdump -sass names no sm_ architecture")
    functions = parse_sass(sass_text)
    missing = sorted(set(functions) ^ set(usage))
    if missing:
        raise RuntimeError(f"{path}: -sass and -res-usage disagree on the functions {missing[:3]}")
    return {name: KernelCode(name, arch, usage[name], functions[name]) for name in functions}
