"""`video.compile: true`: the render step compiled ahead of time (torch.export + AOTInductor) and kept on disk.

On CUDA the stage records the compiled step as a CUDA graph; on a CPU it calls it per full batch.

Why ahead of time: `torch.compile` compiles again in every process, 40–55 s for the 256 renderer on an H100 or
H200 (bench/results/2026-11-26-h100b, -h200), so compiling paid only in runs of tens of thousands of frames and never
in a nightly build of a few dozen clips. Here the step (`graphs.RenderStep`: mapping net → generator → uint8
frames) is exported and compiled by AOTInductor, with the same compiler, once, into a package under
`<checkpoints>/compiled/`; every later run, in any process, loads it in milliseconds. The first choice of package
holds code only: the weights stay the loaded renderer's own tensors, handed to it at load
(`load_constants(user_managed=True)`), so no second copy of them is made or stored (see `VARIANTS` for the other).

A package is made for one batch shape and dtype, one PyTorch build, one GPU model, the renderer's kernel options
and the source of the modules it was compiled from: all of them go into its name (`package_key`), so a change of
any compiles anew and nothing stale is loaded. It is written to a temporary file and renamed into place, so a run
stopped while compiling leaves no half package; a package that fails to load is compiled again. Before a new package
is put in place, a separate Python loads it and runs one batch (`_check_in_child`): loading native code can crash a
process rather than raise, and a run must not die of it. A package that fails the check is not kept. Where the
failure is likely to happen again (a crash, or an error the check reported), a `render-<variant>-<key>.failed` note
beside it says why, later runs do not make that package again (delete the note to retry; a new PyTorch, CUDA driver
or GPU gives a new key, and a package that passes removes the note), and the next variant is tried; where no
variant passes, the step is compiled just in time, for the run only. A time-out or a check killed from outside is
tried again by the next run. Where the checkpoints folder is read-only, the package (or note) goes to a temporary
folder, for that run only.

A package is native code that the run loads and executes, like TorchInductor's own cache in the temporary folder:
only this tool writes packages, under names it derives itself, and only those names are ever loaded; do not copy
packages from elsewhere into `compiled/`.

If exporting or compiling ahead of time fails, the step is compiled just in time by `torch.compile` instead (the
cost of every run again), and if that fails too, the caller renders without compiling (`CompileUnavailable`). On
CUDA the caller asks for that only for a run long enough to pay it back (`JIT_PAYS_BACK_FRAMES`); a shorter one
renders without compiling.

Measured on the project's 2-core CPU (`python bench/bench_compiled.py`: fill-rule weights, 256, bfloat16 autocast,
batch 2): export 3.1 s and compile 35 s into a 3.7 MiB package, load 8 ms; a batch takes 6.1 s against 7.1 s eager,
and its frames differ from float32 by 7.2 levels on average against 8.1 for the eager bfloat16 ones; the check in a
separate process takes 10.6 s more.

On an H100 (PyTorch 2.11+cu130, bench/results/2026-11-26-h100d) the step compiled in 91–102 s (256 × 16 and × 32,
512 × 8, float16), but every package crashed the process that loaded it (SIGSEGV inside PyTorch's package loader).
Not because of AOTInductor's proxy-executor fallback for grid_sampler_3d: with that sampling written as gathers,
so that no fallback was left, the package crashed the same way. With the check in place the run went on by
`torch.compile` (38.6 s). Which of the package's options is the cause is for `bash bench/gpu_check.sh aotiprobe`
(bench/probe_aoti.py) to tell on a GPU; CUDA frame rates of a loaded package are therefore not yet measured.

Hence two ways of making a package (`VARIANTS`), tried in order, each only where the one before failed its check
in a way that will happen again: "lean" (weights handed over at load, a single-threaded runner that a CUDA graph can
record: the first choice, no second copy of the weights) and "defaults" (PyTorch's own defaults: the weights compiled
into the package, which is then named by a digest of them too, and the default runner, called batch by batch since
it cannot be recorded). A machine whose loader crashes on both compiles twice, once, and from then on just in time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from renderer.sadtalker import facerender
from renderer.sadtalker.graphs import GraphUnavailable, RenderStep

logger = logging.getLogger(__name__)

#: Bump when the package's making changes in a way its key does not capture (2: checked in a separate process;
#: 3: variants).
PACKAGE_FORMAT = 3
#: On CUDA, the fewest frames a group must render for compiling just in time to pay back, by render size. Since the
#: renderer's Triton kernels (kernels.py) the uncompiled graph renders 283 frames/s at 256 (batch 16, float16) and
#: 73.6 at 512 on an H200 (bench/results/2026-11-26-h200b); the compiled step rendered 385 and 95.4 there
#: (2026-11-26-h200): it saves about 0.94 ms per frame at 256 and 3.1 ms at 512, against 27 s of `torch.compile`
#: with TorchInductor's cache warm (H100, 2026-11-26-h100e; 55 s cold). With the cache cold it takes twice as many
#: frames; a slower GPU saves more per frame and pays back sooner. (Before the kernels, on H100s: 12,000 and 2,600.)
JIT_PAYS_BACK_FRAMES = {256: 29_000, 512: 8_700}
#: The longest the check of a new package in a separate process may take (loading it and running one batch).
CHECK_SECONDS = 600
#: Modules whose code a package holds (their bytes are part of its key).
SOURCES = ("facerender.py", "graphs.py", "compiled.py", "fold.py")


class CompileUnavailable(GraphUnavailable):
    """Neither ahead-of-time nor just-in-time compiling of the render step worked; render without compiling."""


class PackageCheckFailed(RuntimeError):
    """A new package failed its check in a separate process (`_check_in_child`); `lasting`: likely again."""

    def __init__(self, problem: str, lasting: bool) -> None:
        super().__init__(f"the compiled package failed its check in a separate process: {problem}")
        self.problem, self.lasting = problem, lasting


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of making and loading a package."""

    name: str  # in the package's file name
    weights_inside: bool  # the weights compiled into the package, rather than handed over when it is loaded
    single_threaded: bool  # AOTInductor's single-threaded runner, which a CUDA graph can record

    def describe(self) -> str:
        where = "weights inside" if self.weights_inside else "weights handed over at load"
        return f"{self.name}: {where}, {'single-threaded' if self.single_threaded else 'default'} runner"


#: Tried in this order; the next only where a package of the one before failed its check in a way that will happen
#: again (a crash, or an error the check reported).
VARIANTS = (
    Variant("lean", weights_inside=False, single_threaded=True),
    Variant("defaults", weights_inside=True, single_threaded=False),
)


def package_key(step: RenderStep, example: Sequence[torch.Tensor], variant: Variant = VARIANTS[0]) -> str:
    """Hex digest naming everything a compiled package depends on (see the module docstring); a package with the
    weights inside depends on their values too."""
    device = example[0].device
    gpu, driver = "cpu", None
    if device.type == "cuda":
        gpu = f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
        driver = _driver_version()
    source = hashlib.sha256()
    for name in SOURCES:
        source.update((Path(__file__).parent / name).read_bytes())
    facts = {
        "format": PACKAGE_FORMAT,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": gpu,
        "driver": driver,
        "autocast": str(step.dtype),
        "inputs": [[list(t.shape), list(t.stride()), str(t.dtype)] for t in example],
        "constants": sorted(
            (name, str(t.dtype), list(t.shape), list(t.stride())) for name, t in _constants(step).items()
        ),
        "kernels": {"fused_conv_relu": facerender.FUSED_CONV_RELU, "broadcast_upsample": facerender.BROADCAST_UPSAMPLE},
        "source": source.hexdigest(),
        "variant": dataclasses.asdict(variant),
    }
    if variant.weights_inside:
        facts["weights"] = _weights_digest(step)
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def _weights_digest(step: RenderStep) -> str:
    """sha256 of the step's weights (names, dtypes, shapes and bytes): a package that holds them is theirs only."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_constants(step).items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _device_index(device: torch.device) -> int:
    """The device index AOTInductor's loader takes: the CUDA device's (the current one where unnumbered), −1 for CPU."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _driver_version() -> int | None:
    """The CUDA driver's version (a new driver can change whether a package loads), or None where unknown."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    try:
        return int(get()) if get is not None else None
    except Exception:  # noqa: BLE001 - only part of a package's name
        return None


def compiled_step(
    renderer: facerender.FaceRenderer,
    example: Sequence[torch.Tensor],
    dtype: torch.dtype | None,
    folder: Path | None,
    notes: list[str] | None = None,
    frames: int | None = None,
    jit_min_frames: int = 0,
) -> Callable[..., torch.Tensor]:
    """The render step for batches shaped like `example` (feature, kp_canonical, kp_source, windows), compiled:
    loaded from `folder` when compiled before, else compiled and saved there (None: a temporary folder, for this
    run only); just in time when that fails, unless the run renders fewer than `jit_min_frames` `frames` (None:
    not known), too few for that to pay back. Raises CompileUnavailable when no compiling works or pays. `notes`
    gets a line for the run's report where the step is not the first kind of package (what failed, and what it
    costs)."""
    step = RenderStep(renderer, dtype).eval()
    example = tuple(example)
    folder = _temporary_folder() if folder is None else Path(folder)
    given_up = []  # packages that failed their check on this machine (before, or now)
    problem = ""  # why the last try failed, where it was not a check that will fail again
    for variant in VARIANTS:
        path = folder / f"render-{variant.name}-{package_key(step, example, variant)}.pt2"
        failed = path.with_suffix(".failed")
        if path.is_file():
            try:
                loaded = _load(path, step, example, variant)
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign package: compile it again
                logger.warning("compiled render step %s does not load (%s); compiling it again", path, str(exc))
            else:
                _note_second_choice(notes, given_up, variant)
                return loaded
        elif failed.is_file():  # this machine could not run such a package: do not compile it again
            reason = failed.read_text(errors="replace").strip().splitlines()[:1] or ["no reason recorded"]
            given_up.append(f"{variant.name}: {reason[0]} (delete {failed} to try again)")
            continue
        try:
            made = _compile_ahead(path, step, example, variant)
        except PackageCheckFailed as exc:
            logger.warning("the render step compiled ahead of time (%s) failed its check in a separate process: %s",
                           variant.describe(), exc.problem)  # fmt: skip
            if exc.lasting:
                given_up.append(f"{variant.name}: {exc.problem}")
                continue  # the next variant may load where this one crashed
            problem = exc.problem
        except Exception as exc:  # noqa: BLE001 - export or AOTInductor refused this step: try just in time
            problem = f"{type(exc).__name__}: {exc}"
            logger.warning("compiling the render step ahead of time failed (%s)", problem)
        else:
            _note_second_choice(notes, given_up, variant)
            return made
        break  # what failed would fail the next variant the same way (export, a time-out): no use compiling again
    reason = "; ".join([*given_up, problem] if problem else given_up) or "no kind of package was tried"
    if frames is not None and frames < jit_min_frames:
        raise CompileUnavailable(
            f"no package compiled ahead of time runs on this machine ({reason}), and compiling just in time pays "
            f"back only after about {jit_min_frames:,} frames here, while this run renders {frames:,}"
        )
    logger.warning("no package of the render step compiled ahead of time runs here (%s); compiling it for this run "
                   "only", reason)  # fmt: skip
    started = time.perf_counter()
    jit = _compile_just_in_time(step, example)
    if notes is not None:
        notes.append(
            f"video.compile: no package compiled ahead of time runs on this machine ({reason}); the render step was "
            f"compiled just in time for this run ({time.perf_counter() - started:.0f} s)"
        )
    return jit


def _note_second_choice(notes: list[str] | None, given_up: list[str], variant: Variant) -> None:
    """A line for the report where a package other than the first choice renders (the first failed here)."""
    if notes is not None and given_up:
        notes.append(f"video.compile: rendered with the package of kind \"{variant.describe()}\" (the kind before "
                     f"failed its check on this machine: {'; '.join(given_up)})")  # fmt: skip


def _compile_ahead(
    path: Path, step: RenderStep, example: tuple[torch.Tensor, ...], variant: Variant = VARIANTS[0]
) -> Callable[..., torch.Tensor]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        folder = _temporary_folder()
        logger.warning("cannot write %s (%s); the compiled render step is kept in %s for this run only",
                       path.parent, str(exc), folder)  # fmt: skip
        path, name = folder / path.name, str(folder / f".{path.name}")
    partial = Path(name)  # the package is written here, then renamed to `path`
    started = time.perf_counter()
    try:
        # Traced and compiled as the step alone: outside the caller's inference mode and autocast (the step sets its
        # own), so the package is the same whatever the caller had switched on.
        with torch.inference_mode(False), torch.autocast(example[0].device.type, enabled=False):
            program = torch.export.export(step, example)
            exported = time.perf_counter() - started
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(partial),
                inductor_configs={"aot_inductor.package_constants_in_so": variant.weights_inside},
            )
        compiled_in = time.perf_counter() - started
        failure = _check_in_child(partial, step, example, variant)
        if failure:
            problem, lasting = failure
            logger.info("compiled the render step ahead of time (%s) in %.1f s (export %.1f s); its check failed "
                        "after %.1f s", variant.describe(), compiled_in, exported,
                        time.perf_counter() - started - compiled_in)  # fmt: skip
            if lasting:  # remembered, so later runs do not compile it again (the note says how to retry)
                try:
                    path.with_suffix(".failed").write_text(
                        f"{problem}\n{variant.describe()}\ntorch {torch.__version__}\n"
                    )
                except OSError:
                    pass
            raise PackageCheckFailed(problem, lasting)
        os.replace(partial, path)
        path.with_suffix(".failed").unlink(missing_ok=True)  # an older failure of this key is history now
    finally:
        partial.unlink(missing_ok=True)
    logger.info(
        "compiled the render step ahead of time (%s) in %.1f s (export %.1f s), checked it in %.1f s, into %s; later "
        "runs load it",
        variant.describe(),
        compiled_in,
        exported,
        time.perf_counter() - started - compiled_in,
        path,
    )
    return _load(path, step, example, variant)


def _load(
    path: Path, step: RenderStep, example: tuple[torch.Tensor, ...], variant: Variant = VARIANTS[0]
) -> Callable[..., torch.Tensor]:
    """The package's step. Its `graphable` attribute says whether a CUDA graph may record it: AOTInductor's default
    runner records a CUDA event after each call and queries it before the next, which a recording forbids; the
    single-threaded one does not (only the render loop calls the step, so one thread is all it needs)."""
    started = time.perf_counter()
    device = example[0].device
    index = _device_index(device)
    runner = torch._inductor.aoti_load_package(
        str(path), run_single_threaded=variant.single_threaded, device_index=index
    )
    if not variant.weights_inside:
        constants = _constants(step)
        wanted = runner.get_constant_fqns()
        missing = [name for name in wanted if name not in constants]
        if missing:
            raise ValueError(f"the package wants constants the renderer does not have: {missing[:3]}")
        runner.load_constants({name: constants[name] for name in wanted}, check_full_update=True, user_managed=True)
    logger.info("loaded the compiled render step %s (%s) in %.2f s", path.name, variant.describe(),
                time.perf_counter() - started)  # fmt: skip
    strides = [t.stride() for t in example]

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        # The package was compiled for the example's memory layout: hand it tensors laid out the same way.
        tensors = tuple(
            t if t.stride() == stride else torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)
            for t, stride in zip(tensors, strides, strict=True)
        )
        return runner(*tensors)

    run.graphable = variant.single_threaded  # type: ignore[attr-defined]
    return run


#: Run by `_check_in_child` in a separate Python: load the package, hand it zeros for its constants (where they are
#: handed over at load), run one batch of zeros. Any failure, a crash of the native code included, ends that process only.
_CHECK = """
import json, sys
import torch
spec = json.loads(sys.stdin.read())
device = torch.device(spec["device"])
print("loading the package", flush=True)
runner = torch._inductor.aoti_load_package(spec["package"], run_single_threaded=spec["single_threaded"],
                                           device_index=spec["index"])
if spec["hand_constants"]:
    wanted = runner.get_constant_fqns()
    missing = [name for name in wanted if name not in spec["constants"]]
    if missing:
        sys.exit(f"the package wants constants the renderer does not have: {missing[:3]}")
    constants = {}
    for name in wanted:
        shape, stride, dtype = spec["constants"][name]  # the renderer's own layout (channels-last on CUDA)
        constants[name] = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device).zero_()
    print("handing it its constants", flush=True)
    runner.load_constants(constants, check_full_update=True, user_managed=True)
print("running one batch", flush=True)
inputs = [torch.zeros(shape, dtype=getattr(torch, dtype), device=device).as_strided(shape, stride)
          for shape, stride, dtype in spec["inputs"]]
with torch.inference_mode():
    out = runner(*inputs)
if device.type == "cuda":
    torch.cuda.synchronize(device)
print("ok", tuple(out.shape), flush=True)
"""


#: Signals of native code crashing (rather than of the process being stopped from outside).
_CRASHES = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT")


def _check_in_child(
    package: Path, step: RenderStep, example: tuple[torch.Tensor, ...], variant: Variant = VARIANTS[0]
) -> tuple[str, bool] | None:
    """Load and run a new package once in a separate process; None when that worked, else what went wrong and
    whether it is likely to happen again: a crash of native code, or an error the child reported (a package that
    does not load, a GPU that a second process may not use, not enough memory beside the run) is; a time-out, a
    process killed from outside (SIGKILL, SIGTERM) or a Python that does not start is not, and the next run tries
    again.

    Why: a package is native code, and loading one can crash the whole process rather than raise (a segmentation
    fault in PyTorch 2.11's package loader on an H100, bench/results/2026-11-26-h100d). Checked in a child, such a
    package is never loaded by the run, which compiles just in time instead and keeps its videos."""
    import signal
    import subprocess
    import sys

    device = example[0].device
    index = _device_index(device)
    spec = {
        "package": str(package),
        "device": str(device),
        "index": index,
        "single_threaded": variant.single_threaded,
        "hand_constants": not variant.weights_inside,
        "constants": {
            name: [list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch.")]
            for name, t in _constants(step).items()
        },
        "inputs": [[list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch.")] for t in example],
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the child needs the weights' size again and one batch
    try:
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", _CHECK],
            input=json.dumps(spec),  # on stdin: one argument holds at most 128 KiB (the renderer needs 25 KB)
            capture_output=True, text=True, timeout=CHECK_SECONDS, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"loading and running it took over {CHECK_SECONDS} s", False
    except OSError as exc:
        return f"could not start a Python to check it: {exc}", False
    said = done.stdout.strip().splitlines()
    if done.returncode == 0 and said and said[-1].startswith("ok"):
        return None
    stage = f" while {said[-1]}" if said else ""  # what it was doing: loading, constants, running
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        crashed = name in _CRASHES
        what = f"the process {'crashed' if crashed else 'was ended'} ({name}){stage}"
        # faulthandler's dump: the innermost Python line it was in
        where = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith('File "')]
        return what + (f" ({where[0]})" if where else ""), crashed
    lines = [line for line in done.stderr.strip().splitlines() if line.strip() and not line.startswith(" ")]
    return f"exit status {done.returncode}{stage}" + (f": {lines[-1]}" if lines else ""), True


def _compile_just_in_time(step: RenderStep, example: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
    started = time.perf_counter()
    jit = torch.compile(step, dynamic=False)
    try:
        jit(*example)  # compiles now, so a failure shows here rather than inside a graph recording
    except Exception as exc:
        raise CompileUnavailable(f"torch.compile of the render step failed: {exc}") from exc
    logger.info("compiled the render step for this run in %.1f s", time.perf_counter() - started)
    return jit


def _temporary_folder() -> Path:
    """A folder for this run's package only, removed when the process ends."""
    import atexit
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="sadtalker-compiled-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _constants(step: RenderStep) -> dict[str, torch.Tensor]:
    """The step's parameters and buffers by name, aliases included (the names a package asks for)."""
    named = [*step.named_parameters(remove_duplicate=False), *step.named_buffers(remove_duplicate=False)]
    return {name: tensor for name, tensor in named}
