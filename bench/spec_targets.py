"""SPEC section 4's performance targets, judged from the benchmarks' JSON.

One definition serves the benchmarks (their JSON's ``targets``) and ``bench/summary.py`` (the
table ``make gpu-check`` prints last). No torch import: the summary and the GPU-check driver
use it where torch is missing or broken.

Each target becomes one :class:`Judged` row: what is measured, the bar, the value (None: not
measured in these results), pass/fail, and beside it the kernel-only time (the same call
replayed in a CUDA graph: what the device spends, so host and device costs are told apart)
and the static kernel model's prediction (``bench/kernel_model.py``'s ``kernel_model.json``).

Kernel-model rows read here: ``backend``, ``kernel`` ("total" is the whole fwd+bwd call; its
``warps_per_sm`` and ``instructions_per_row`` are those of the call's main kernel), ``shape``
[B, C], ``dtype``, ``arch`` (90, 80), ``registers``, ``spill_bytes``, ``warps_per_sm``,
``instructions_per_row``, ``predicted_us``, ``predicted_pct_copy_bw`` (percent).
"""
from __future__ import annotations

from dataclasses import dataclass

FAST_BACKENDS = ("triton", "extension")
SMALL = (32, 7, "float32")
# (B, C, dtype) -> bar on the fraction of the measured copy bandwidth (SPEC 4)
BANDWIDTH_BARS = (
    ((2**20, 7, "bfloat16"), 0.70, 0.85),
    ((2**20, 7, "float32"), 0.50, None),
    ((4096, 1000, "bfloat16"), 0.50, None),
)
SINGLE_PROGRAM_ELEMENTS = 4096  # B * next_pow2(C) above this runs the persistent (large-batch) grid
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "float": "float32", "half": "float16"}


@dataclass(frozen=True)
class Bar:
    op: str  # ">=", "<=" or "<"
    threshold: float
    moonshot: float | None = None

    def met(self, value: float) -> bool:
        return {">=": value >= self.threshold, "<=": value <= self.threshold, "<": value < self.threshold}[self.op]

    def text(self, unit: str) -> str:
        out = f"{self.op} {format_value(self.threshold, unit)}"
        return out + (f" (moonshot {format_value(self.moonshot, unit)})" if self.moonshot is not None else "")


@dataclass
class Judged:
    section: str  # "loss", "host", "train", "static"
    what: str
    bar: Bar
    unit: str  # "x", "%" (value is a fraction), "min", "instr", "B", "warps"
    value: float | None
    kernel_only_us: float | None = None
    predicted: str | None = None  # None: the kernel model gives no prediction for it
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "pass" if self.bar.met(self.value) else "FAIL"

    def label(self) -> str:
        return f"{self.what} ({self.bar.text(self.unit)})"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "min":
        return f"{value:.2f} min"
    return f"{value:g} {unit}"


def shape_text(batch: int, classes: int) -> str:
    return f"{'2^20' if batch == 2**20 else batch}x{classes}"


def dtype_name(dtype) -> str:
    text = str(dtype).replace("torch.", "")
    return DTYPE_NAMES.get(text, text)


# -- lookups ---------------------------------------------------------------------------------------
def find_row(rows, batch, classes, dtype, backend, mode="fwd+bwd"):
    for row in rows:
        if (row["batch"], row["classes"], row["dtype"], row["backend"], row["mode"]) == (
                batch, classes, dtype, backend, mode):
            return row
    return None


def model_rows(model) -> list[dict]:
    """The kernel model's rows: ``model`` is its JSON (a dict with ``rows``, or a bare list) or None."""
    if model is None:
        return []
    return list(model.get("rows", []) if isinstance(model, dict) else model)


def model_row(rows, backend, batch, classes, dtype, arch, kernel="total"):
    for row in rows:
        if (row.get("backend") == backend and row.get("kernel") == kernel and list(row.get("shape", [])) ==
                [batch, classes] and dtype_name(row.get("dtype")) == dtype and row.get("arch") == arch):
            return row
    return None


def predicted_us(rows, backend, batch, classes, dtype, arch) -> str | None:
    row = model_row(rows, backend, batch, classes, dtype, arch)
    return f"{row['predicted_us']:.1f} us" if row and row.get("predicted_us") is not None else None


def predicted_fraction(rows, backend, batch, classes, dtype, arch) -> float | None:
    row = model_row(rows, backend, batch, classes, dtype, arch)
    return row["predicted_pct_copy_bw"] / 100 if row and row.get("predicted_pct_copy_bw") is not None else None


def _ratio(slow, fast) -> float | None:
    return slow["median_ms"] / fast["median_ms"] if slow and fast else None


def _us(row) -> float | None:
    return row["median_ms"] * 1e3 if row else None


# -- targets ---------------------------------------------------------------------------------------
def loss_targets(loss: dict | None, model=None, arch: int = 90) -> list[Judged]:
    """The GPU loss targets: eager (32, 7) speedups, and the fraction of copy bandwidth of the
    kernel-only (graph replay) call at the three large shapes; both fast backends."""
    rows = loss["rows"] if loss else []
    predictions = model_rows(model)
    reference_style = find_row(rows, *SMALL, "reference-style")
    compiled = find_row(rows, *SMALL, "reference+compile")
    out = []
    for fast in FAST_BACKENDS:
        eager, graph = find_row(rows, *SMALL, fast), find_row(rows, *SMALL, f"{fast} graph")
        prediction = predicted_us(predictions, fast, *SMALL, arch)
        for baseline, name, bar in ((reference_style, "reference-style", Bar(">=", 50, 100)),
                                    (compiled, "compiled reference", Bar(">=", 3))):
            out.append(Judged("loss", f"{fast}: 32x7 fp32 fwd+bwd eager, x {name}", bar, "x",
                              _ratio(baseline, eager), _us(graph), prediction))
    for (batch, classes, dtype), bar, moonshot in BANDWIDTH_BARS:
        for fast in FAST_BACKENDS:
            graph = find_row(rows, batch, classes, dtype, f"{fast} graph")
            eager = find_row(rows, batch, classes, dtype, fast)
            judged_row = graph or eager
            fraction = predicted_fraction(predictions, fast, batch, classes, dtype, arch)
            out.append(Judged(
                "loss", f"{fast}: {shape_text(batch, classes)} {dtype} fwd+bwd, fraction of copy bandwidth",
                Bar(">=", bar, moonshot), "%", judged_row["fraction_of_copy_bw"] if judged_row else None, _us(graph),
                format_value(fraction, "%") if fraction is not None else None,
                "" if graph or not eager else "eager call: no graph-replay row"))
    return out


def cpu_threads_ratio(rows) -> tuple[float | None, str]:
    """(extension / two F.cross_entropy, mode) at (4096, 1000) on the CPU with every core: the
    worst over the modes measured (rows whose mode names the CPU and not one thread)."""
    worst, worst_mode = None, ""
    for row in rows:
        mode = row["mode"]
        if (row["batch"], row["classes"], row["backend"]) != (4096, 1000, "extension") or "CPU" not in mode \
                or "1 thread" in mode:
            continue
        baseline = next((r for r in rows if r["mode"] == mode and r["backend"] == "two F.cross_entropy"
                         and (r["batch"], r["classes"]) == (4096, 1000)), None)
        ratio = _ratio(row, baseline)  # extension time over cross-entropy time
        if ratio is not None and (worst is None or ratio > worst):
            worst, worst_mode = ratio, mode
    return worst, worst_mode


def host_targets(loss: dict | None) -> list[Judged]:
    """SPEC 4's CPU proxies: the host cost of the fused call, and the CPU extension on every core."""
    bar = (loss or {}).get("host_bar") or {}
    rows = loss["rows"] if loss else []
    threads, mode = cpu_threads_ratio(rows)
    return [
        Judged("host", "extension: host time / two F.cross_entropy, 32x7 fwd+bwd, CPU 1 thread", Bar("<=", 1.0),
               "x", bar.get("ratio")),
        Judged("host", "triton (launcher stubbed): host / two F.cross_entropy, 32x7, CPU 1 thread",
               Bar("<=", 1.0), "x", bar.get("triton_ratio"),
               note="" if bar.get("triton_ratio") is not None else "no benchmark row for it in these results"),
        Judged("host", "extension, CPU every core: time / two F.cross_entropy, 4096x1000", Bar("<=", 1.0), "x",
               threads, note=mode),
    ]


def rung_speeds(rows) -> dict[int, float]:
    """samples/s of each rung: its first row (rung 0: the 4-worker DataLoader)."""
    return {r["rung"]: r["samples_per_s"] for r in reversed(rows)}


def train_targets(train: dict | None) -> list[Judged]:
    """The trainer's default (rung 7: compiled, captured) against rungs 6, 8 and 0, and the
    60-epoch RAF-DB-shaped projection, compile time included."""
    rows = train["rows"] if train else []
    speed = rung_speeds(rows)
    rung7 = next((r for r in rows if r["rung"] == 7), None)
    note = ""
    if rung7 is not None and not rung7.get("compiled", True):
        note = f"rung 7 ran uncompiled: {rung7.get('note', 'fallback')}"

    def over(rung):
        return speed[7] / speed[rung] if 7 in speed and rung in speed else None

    epoch = ((train or {}).get("epochs") or {}).get("rung7")
    return [
        Judged("train", "trainer default (rung 7) / bare captured step (rung 6)", Bar(">=", 1.15, 1.3), "x", over(6),
               note=note),
        Judged("train", "trainer default (rung 7) / compiled bare captured step (rung 8)", Bar(">=", 0.90), "x",
               over(8), note=note),
        Judged("train", "trainer default (rung 7) / reference-style loop (rung 0)", Bar(">=", 6), "x", over(0),
               note=note),
        Judged("train", "60 RAF-DB-shaped epochs, compile included (rung 7)", Bar("<", 2.5), "min",
               epoch["projected_60_epochs_min"] if epoch else None, note=note),
    ]


def _large_batch(row) -> bool:
    batch, classes = row["shape"]
    return batch * (1 << max(0, classes - 1).bit_length()) > SINGLE_PROGRAM_ELEMENTS


def static_targets(model, arch: int = 90) -> list[Judged]:
    """The kernel model's own targets (SPEC 4, sm_90 machine code, no GPU)."""
    rows = model_rows(model)
    totals = [r for r in rows if r.get("kernel") == "total" and r.get("arch") == arch and r.get("shape")]
    out = []
    for fast in FAST_BACKENDS:
        fraction = predicted_fraction(rows, fast, 2**20, 7, "bfloat16", arch)
        out.append(Judged("static", f"{fast}: 2^20x7 bf16 predicted fraction of copy bandwidth (sm_{arch})",
                          Bar(">=", 0.70), "%", fraction))
    large_c7 = [r for r in totals if r["shape"][1] == 7 and _large_batch(r) and r.get("instructions_per_row") is not None]
    worst = max(large_c7, key=lambda r: r["instructions_per_row"], default=None)
    out.append(Judged("static", "warp-instructions per row at C=7, large batch, worst", Bar("<=", 13), "instr",
                      worst["instructions_per_row"] if worst else None,
                      note=f"{worst['backend']} {dtype_name(worst['dtype'])}" if worst else ""))
    spilling = [r for r in rows if r.get("spill_bytes") is not None]
    worst = max(spilling, key=lambda r: r["spill_bytes"], default=None)
    out.append(Judged("static", "spill bytes, any config or instantiation, worst", Bar("<=", 0), "B",
                      worst["spill_bytes"] if worst else None,
                      note=f"{worst.get('backend')} {worst.get('kernel')}" if worst and worst["spill_bytes"] else ""))
    occupancy = [r for r in totals if _large_batch(r) and r.get("warps_per_sm") is not None]
    worst = min(occupancy, key=lambda r: r["warps_per_sm"], default=None)
    out.append(Judged("static", "resident warps per SM, large-batch configs, fewest", Bar(">=", 32), "warps",
                      worst["warps_per_sm"] if worst else None,
                      note=f"{worst['backend']} {shape_text(*worst['shape'])} {dtype_name(worst['dtype'])}"
                      if worst else ""))
    return out


def all_targets(loss=None, train=None, model=None, arch: int = 90) -> list[Judged]:
    """Every SPEC 4 target, in the order of the spec."""
    return loss_targets(loss, model, arch) + host_targets(loss) + train_targets(train) + static_targets(model, arch)


def as_dict(judged: list[Judged]) -> dict:
    """{label: value} of the measured ones (what a benchmark's JSON records under ``targets``)."""
    return {j.label(): j.value for j in judged if j.value is not None}
