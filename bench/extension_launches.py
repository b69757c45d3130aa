"""What the CUDA extension launches, asked of its own C++ without a GPU.

``bench/extension_launches.cpp`` is built two ways and cached by the hash of its sources and
commands (in the folder the caller names; the kernel model's is under ``TRITON_CACHE_DIR``):

- ``header_program``: the host compiler and ``csrc/nla_loss.h`` alone (about a second): the launch
  plan ``cuda_launch_plan(B, C, dtype)`` and the tile layouts;
- ``launch_program``: linked with nvcc's host object of ``csrc/nla_loss_cuda.cu`` (PTX only, no
  ptxas: about 15 s on 2 cores): the extension's own launchers run against a stand-in CUDA
  runtime that records each launch, so ``launches`` returns the kernel instantiations (mangled
  names as nvcc registered them), grids, blocks and dynamic shared memory of one eager fwd + bwd
  call exactly as the extension's code picks them.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from nla_fast import atomic, native_build

SOURCE = Path(__file__).resolve().parent / "extension_launches.cpp"
CONSISTENCIES = ("none", "official", "jsd")
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _host_compiler() -> str:
    return os.environ.get("CXX", "c++")


def _nvcc_host_object_command(output: str) -> list[str]:
    """The extension's own nvcc command, device code as PTX only: the host object is what matters."""
    command = native_build.nvcc_compile_command(output, "90")
    gencode = command.index("-gencode") + 1
    command[gencode] = "arch=compute_90,code=compute_90"
    return command


def _link_command(output: str, host_object: str | None) -> list[str]:
    csrc = native_build.source_dir()
    if host_object is None:
        return [_host_compiler(), "-std=c++17", "-O1", f"-I{csrc}", str(SOURCE), "-o", output]
    return [_host_compiler(), "-std=c++17", "-O1", "-DNLA_RECORD_LAUNCHES", f"-I{csrc}", str(SOURCE), host_object,
            "-o", output]


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{command[0]} not found ({what})") from err
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command[:3])} ...):\n{done.stderr[-3000:]}")


def _digest(commands: list[list[str]], sources: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(commands).encode())
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def header_program(cache: Path) -> Path:
    """The plan / layout program (csrc/nla_loss.h and the host compiler only), built once per hash."""
    sources = [native_build.source_dir() / "nla_loss.h", SOURCE]
    program = cache / f"extension_plan-{_digest([_link_command('OUT', None)], sources)}"
    if not program.is_file():
        with atomic.target(program) as tmp:
            _run(_link_command(str(tmp), None), f"building {SOURCE.name} with {sources[0]}")
    return program


def launch_program(cache: Path) -> Path:
    """The launch recorder (the extension's host code, launches recorded), built once per hash."""
    csrc = native_build.source_dir()
    sources = [csrc / "nla_loss.h", csrc / "nla_loss_cuda.cu", SOURCE]
    commands = [_nvcc_host_object_command("OUT"), _link_command("OUT", "HOST_OBJECT")]
    program = cache / f"extension_launches-{_digest(commands, sources)}"
    if not program.is_file():
        with tempfile.TemporaryDirectory() as tmp_dir, atomic.target(program) as tmp:
            host_object = str(Path(tmp_dir) / "nla_loss_cuda.o")
            _run(_nvcc_host_object_command(host_object), f"nvcc (host object) of {csrc / 'nla_loss_cuda.cu'}")
            _run(_link_command(str(tmp), host_object), f"linking {SOURCE.name} with the extension's host code")
    return program


def ask(program: Path, queries: list[str]) -> list[dict]:
    """One JSON answer per query line (see extension_launches.cpp for the queries)."""
    done = subprocess.run([str(program)], input="".join(q + "\n" for q in queries), capture_output=True, text=True,
                          check=True)
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    for query, answer in zip(queries, answers):
        if answer.get("error"):
            raise ValueError(f"{program.name}: {answer['error']}: {query!r}")
    if len(answers) != len(queries):
        raise RuntimeError(f"{program.name} answered {len(answers)} of {len(queries)} queries")
    return answers


def launches(cache: Path, batch: int, classes: int, dtype: str, consistency: str = "official", grad: bool = True,
             weights: bool = False) -> dict:
    """{"plan": cuda_launch_plan's fields, "launches": [{function (mangled), grid, block,
    shared_dynamic}, ...]} of one eager call: nla_loss_fwd, then (with gradients) the first
    backward's in-place scale. ``consistency`` "none": the weights-only op naw_weight."""
    if dtype not in DTYPES or consistency not in CONSISTENCIES:
        raise ValueError(f"launches: dtype {dtype!r} (one of {DTYPES}), consistency {consistency!r} "
                         f"(one of {CONSISTENCIES})")
    query = f"launches {batch} {classes} {dtype} {consistency} {int(grad)} {int(weights)}"
    return ask(launch_program(cache), [query])[0]

