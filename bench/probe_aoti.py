"""Which AOTInductor packages load and run on this machine: a small CUDA model compiled ahead of time in several
ways, each package then loaded and run once in its own Python (a crash ends only that process).

Why: on an H100 (PyTorch 2.11+cu130) the SadTalker render step compiled for `video.compile` crashed the process
that loaded it with a segmentation fault, also with grid_sampler_3d written as gathers (no proxy-executor fallback);
bench/results/2026-11-26-h100d. The variants below tell a generic failure of CUDA packages on a machine from one of
the options the stage uses (constants left out of the shared library and handed over at load, a single-threaded
runner, a grid_sampler_3d fallback). At the first crash it also shows what the package's shared library links (ldd),
whether opening that library alone crashes, and a native backtrace (gdb, or the GPU image's cuda-gdb).

    python bench/probe_aoti.py              # on a CUDA machine with g++ (gpu_check.sh part aotiprobe)
    python bench/probe_aoti.py cpu          # the same on the CPU (a smoke test of the probe itself)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch import scratch_dir  # noqa: E402

_RUN = """
import json, sys
import torch
spec = json.loads(sys.argv[1])
print("loading", flush=True)
device = spec["device"]
runner = torch._inductor.aoti_load_package(spec["package"], run_single_threaded=spec["single"],
                                           device_index=0 if device == "cuda" else -1)
if spec["hand_constants"]:
    print("constants", flush=True)
    names = runner.get_constant_fqns()
    runner.load_constants({n: torch.ones(spec["shapes"][n], device=device) for n in names},
                          check_full_update=True, user_managed=True)
print("running", flush=True)
x = torch.ones(2, 4, 8, 16, 16, device=device)
grid = torch.zeros(2, 8, 16, 16, 3, device=device)
out = runner(x, grid)
if device == "cuda":
    torch.cuda.synchronize()
print("ok", tuple(out.shape), flush=True)
"""


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Small(nn.Module):
        def __init__(self, sample: bool) -> None:
            super().__init__()
            self.sample = sample
            self.conv3 = nn.Conv3d(4, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(32, 8, 3, padding=1)

        def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv3(x))
            if self.sample:
                y = F.grid_sample(y, grid, align_corners=False)
            return self.conv2(y.flatten(1, 2))

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or: probe_aoti.py cpu)")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}", flush=True)
    folder = scratch_dir("probe_aoti_")
    example = (torch.ones(2, 4, 8, 16, 16, device=device), torch.zeros(2, 8, 16, 16, 3, device=device))
    embed = {"aot_inductor.embed_kernel_binary": True}
    variants = [  # name, grid_sample in the model, constants in the .so, single-threaded runner, more configs
        ('plain (the stage\'s second variant, "defaults")', False, True, False, {}),
        ("plain single-threaded", False, True, True, {}),
        ("constants handed at load", False, False, False, {}),
        ('constants handed at load, single-threaded (the stage\'s first variant, "lean")', False, False, True, {}),
        ("the same, kernels embedded in the .so", False, False, True, embed),
        ("plain, kernels embedded in the .so", False, True, False, embed),
        ("grid_sample 3-D (proxy executor)", True, True, False, {}),
        ("grid_sample 3-D, constants handed, single-threaded", True, False, True, {}),
    ]
    packages: dict[tuple[bool, bool, bool], Path] = {}
    inspected = False  # the first crash is looked into
    for name, sample, in_so, single, configs in variants:
        model = Small(sample).to(device).eval()
        key = (sample, in_so, bool(configs))
        if key not in packages:
            started = time.perf_counter()
            path = folder / f"small-{int(sample)}{int(in_so)}{int(bool(configs))}.pt2"
            with torch.inference_mode(False):
                torch._inductor.aoti_compile_and_package(
                    torch.export.export(model, example),
                    package_path=str(path),
                    inductor_configs={"aot_inductor.package_constants_in_so": in_so, **configs},
                )
            packages[key] = path
            print(f"  compiled {path.name} in {time.perf_counter() - started:.1f} s", flush=True)
        spec = {
            "package": str(packages[key]),
            "device": device,
            "single": single,
            "hand_constants": not in_so,
            "shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
        }
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", _RUN, json.dumps(spec)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        said = done.stdout.strip().splitlines()
        if done.returncode == 0 and said and said[-1].startswith("ok"):
            result = "ok"
        else:
            where = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith('File "')]
            last = said[-1] if said else "starting"
            result = f"FAILED (exit {done.returncode}) while {last}" + (f" at {where[0]}" if where else "")
            if done.returncode > 0:
                result += ": " + (done.stderr.strip().splitlines() or [""])[-1][:300]
        print(f"{name:78s} {result}", flush=True)
        if done.returncode < 0 and not inspected:  # the first crash: what the shared library needs, and where
            inspected = True
            _inspect_library(packages[key])
            debugger = shutil.which("gdb") or shutil.which("cuda-gdb")  # the GPU image has cuda-gdb, not gdb
            if debugger is None:
                print("    (neither gdb nor cuda-gdb here for a native backtrace)")
                continue
            traced = subprocess.run(
                [debugger, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 30", "--args",
                 sys.executable, "-c", _RUN, json.dumps(spec)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            frames = [line for line in traced.stdout.splitlines() if line.startswith("#")]
            print(f"    native backtrace ({Path(debugger).name}):",
                  *(f"    {line[:220]}" for line in frames or ["(none)", *traced.stderr.splitlines()[-5:]]), sep="\n")  # fmt: skip


_DLOPEN = """
import ctypes, sys
import torch
print("dlopen", flush=True)
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
print("ok", flush=True)
"""


def _inspect_library(package: Path) -> None:
    """After a crash: the package's shared library, the libraries it resolves (ldd) and whether opening it alone,
    in a fresh Python that has imported torch, crashes too (loading vs building the runner)."""
    import zipfile

    folder = scratch_dir("probe_aoti_so_")
    with zipfile.ZipFile(package) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        print(f"    shared libraries in the package: {names}")
        for name in names:
            so = Path(archive.extract(name, folder))
            if shutil.which("ldd"):
                linked = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=False).stdout
                wanted = ("not found", "cuda", "torch", "c10", "stdc++", "libgomp")
                for line in linked.splitlines():
                    if any(w in line for w in wanted):
                        print(f"      ldd: {line.strip()[:200]}")
            opened = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-c", _DLOPEN, str(so)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            said = opened.stdout.strip().splitlines()
            ok = opened.returncode == 0 and said[-1:] == ["ok"]
            tail = "" if ok else (opened.stderr.strip().splitlines() or [""])[-1][:200]
            print(f"      opened alone (ctypes, after import torch): {'ok' if ok else f'exit {opened.returncode}'} "
                  f"{tail}")  # fmt: skip


if __name__ == "__main__":
    main()
