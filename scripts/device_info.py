"""The device and versions of a GPU check, as JSON: python3 scripts/device_info.py OUT.json

nvidia-smi's name, driver and memory when it answers; torch's view of the device (name,
compute capability as 10 * major + minor) and the versions of python, torch, triton and CUDA.
Whatever cannot be read is null, with the reason under "errors"."""
import json
import platform
import subprocess
import sys

from stdlib_atomic import atomic


def nvidia_smi() -> dict:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True)
    name, driver, memory = (part.strip() for part in out.stdout.splitlines()[0].split(","))
    return {"smi_name": name, "driver": driver, "memory": memory}


def torch_side() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "name": None, "arch": None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info.update(name=torch.cuda.get_device_name(0), arch=10 * major + minor,
                    multiprocessors=torch.cuda.get_device_properties(0).multi_processor_count)
    return info


def main(path: str) -> int:
    info = {"python": platform.python_version(), "errors": {}}
    for part, probe in (("nvidia-smi", nvidia_smi), ("torch", torch_side)):
        try:
            info.update(probe())
        except Exception as err:  # noqa: BLE001 - a missing tool is a fact to report
            info["errors"][part] = f"{type(err).__name__}: {err}"
    info["name"] = info.get("name") or info.get("smi_name")
    atomic.write_text(path, json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0 if info.get("arch") else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 scripts/device_info.py OUT.json")
    raise SystemExit(main(sys.argv[1]))
