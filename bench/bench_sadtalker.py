"""Speed and memory of the native SadTalker renderer (renderer/sadtalker).

Speed: frames per second of the render step (mapping net → driving keypoints → generator → uint8 on the host, the
work `pipeline.run` does per frame) at sizes 256 and 512, batch sizes 1/2/8/32, float32 vs float16 autocast.
Weights follow the golden fill rule when ../shared/sadtalker is there (else PyTorch's default initialisation: the
speed does not depend on the values). One 256 frame is about 1.2 TFLOP, so on a CPU only a small-batch figure is
measured by default (256 and 512, batch 1, float32 and bfloat16).

Memory: peak memory of 30 s vs 5 min of audio, each in a fresh subprocess. On CUDA the whole stage runs
(`pipeline.run` with the astronaut portrait, fill-rule checkpoints in the official layout): peak GPU memory and peak
RSS must not grow with the audio's length, since frames stream to the encoder. On a CPU rendering 7500 frames would
take hours, so the child runs everything that scales with the audio (WAV, mel windows, ExpNet/PoseVAE coefficients,
render preparation) plus a fixed number of rendered frames; render memory per batch does not depend on N.

Speed has two modes on CUDA: "eager", and "graph" (the batch recorded once as a CUDA graph and replayed, as the
stage does for full batches). `--clips N`: N short clips through the whole stage in one warm process vs one process
per clip (the seed's way: every process reloads Python, torch and the models).

    python bench/bench_sadtalker.py                          # what fits the machine
    python bench/bench_sadtalker.py --sizes 256 --batches 1 8 --dtypes float32 float16 --device cuda
    python bench/bench_sadtalker.py --skip-speed --skip-memory --clips 20 --batch-size 16
    bash bench/gpu_check.sh speed clips memory               # on a GPU machine (figures: bench/results/)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scratch import scratch_dir  # noqa: E402

SHARED = REPO.parent / "shared" / "sadtalker"
INVENTORY = {
    "kp_extractor": "facerender_kp_extractor_KPDetector",
    "generator": "facerender_generator_OcclusionAwareSPADEGenerator",
    "mapping70": "facerender_mapping_MappingNet_coeff70_mapping_00229",
}


def _fill():
    """golden/fill.py of the reference folder, or None when it is absent."""
    path = SHARED / "golden" / "fill.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("sadtalker_golden_fill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_renderer(device: str):
    """FaceRenderer (70-input mapping) on fill-rule weights (or default init), fused and placed like the stage."""
    import torch

    from renderer.sadtalker import facerender as fr
    from renderer.sadtalker import weights

    torch.manual_seed(0)
    nets = {
        "kp_extractor": fr.KPDetector(),
        "mapping70": fr.MappingNet(70),
        "generator": fr.OcclusionAwareSPADEGenerator(),
    }
    fill = _fill()
    source = "fill-rule weights" if fill else "default-initialised weights (../shared/sadtalker absent)"
    for name, net in nets.items():
        if fill:
            rows = fill.read_inventory_txt(SHARED / "inventory" / f"{INVENTORY[name]}.txt")
            weights.load_strict(net, fill.fill_state_dict(rows), name)
        else:  # spectral-norm triplets and BatchNorm statistics need sane values to run
            for key, buf in net.named_buffers():
                if key.endswith("weight_u") or key.endswith("weight_v"):
                    buf.normal_()
                elif key.endswith("down.weight"):
                    buf.fill_(1.0 / buf[0].numel())
    renderer = fr.FaceRenderer(nets["kp_extractor"], nets["mapping70"], nets["generator"]).eval()
    fr.fuse_for_inference(renderer)
    return weights.place(renderer, device), source


def source_batch(renderer, image, semantics, batch: int) -> tuple:
    """One portrait's per-video state repeated `batch` times, as a render batch takes it (under the caller's
    autocast): (feature, kp_canonical, kp_source), contiguous."""
    state = renderer.prepare_source(image, semantics)
    return (
        state.feature.expand(batch, -1, -1, -1, -1).contiguous(),
        state.kp_canonical.expand(batch, -1, -1).contiguous(),
        state.kp_source.expand(batch, -1, -1).contiguous(),
    )


def _step(renderer, kp_canonical, kp_source, feature, windows):
    """One forward batch as the stage runs it: driving keypoints, generator, uint8 frames on the host (returned)."""
    from renderer.sadtalker import facerender as fr

    kp_driving = renderer.driving_keypoints(kp_canonical, windows)
    return fr.frames_to_uint8(renderer.render(feature, kp_source, kp_driving).prediction)


def bench_speed(
    device: str,
    sizes: list[int],
    batches: list[int],
    dtypes: list[str],
    min_seconds: float,
    modes: list[str],
    float32_weights: bool = False,
) -> None:
    """modes: "eager" (what the stage runs on a CPU, and for a group shorter than one batch), "graph" (a recorded
    CUDA graph replayed per batch, what the stage runs on CUDA) and "compiled" (the step compiled ahead of time into
    a package, loaded, then recorded: the stage with `video.compile: true`, renderer/sadtalker/compiled.py). Half
    dtypes use a renderer whose weights are stored in that dtype, as the stage's (`weights.cast_for_autocast`), unless `float32_weights` (autocast then casts them on
    every batch, as before)."""
    import copy

    import numpy as np
    import torch

    from renderer.sadtalker import compiled, weights
    from renderer.sadtalker import facerender as fr
    from renderer.sadtalker.graphs import GraphedRender, GraphUnavailable
    from renderer.sadtalker.pipeline import _autocast

    compiled_dir = scratch_dir("bench_compiled_")  # a fresh package cache: compile time counts
    if "compiled" in modes:  # how the step was compiled (ahead of time, or just in time after a failure)
        import logging

        logging.basicConfig(format="  %(name)s: %(message)s")
        logging.getLogger("renderer.sadtalker.compiled").setLevel(logging.INFO)
    base, source = build_renderer(device)
    renderers = {"float32": base}

    def renderer_for(dtype: str):
        if dtype not in renderers:
            renderers[dtype] = weights.cast_for_autocast(copy.deepcopy(base), getattr(torch, dtype))
        return base if float32_weights else renderers[dtype]

    weights_note = "float32 weights, cast by autocast per batch" if float32_weights else "weights in the dtype"
    cuda = device.startswith("cuda")
    print(
        f"renderer on {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), {source}; half: {weights_note}"
    )
    if cuda:
        print(
            f"torch {torch.__version__}; cuDNN TF32 convolutions: {torch.backends.cudnn.allow_tf32} (default), "
            f"cudnn.benchmark: {torch.backends.cudnn.benchmark}"
        )
        from renderer.sadtalker import kernels

        state = "on" if kernels.available() else "off (DHB_TRITON_KERNELS=0 or no Triton)"
        print(f"Triton kernels (renderer/sadtalker/kernels.py): {state}")
    rng = np.random.default_rng(0)
    print(f"{'size':>5} {'batch':>6} {'dtype':>9} {'mode':>6} {'frames/s':>9} {'s/frame':>8} {'peak GPU MiB':>13}")
    for size in sizes:
        image = torch.from_numpy(rng.random((1, 3, size, size), dtype=np.float32)).to(device)
        semantics = torch.from_numpy(rng.normal(size=(1, 70, fr.WINDOW)).astype(np.float32)).to(device)
        for mode in modes if cuda else ["eager"]:
            for dtype in dtypes:
                renderer = renderer_for(dtype)
                for batch in batches:
                    windows = torch.from_numpy(rng.normal(size=(batch, 70, fr.WINDOW)).astype(np.float32)).to(device)
                    label = f"{size:>5} {batch:>6} {dtype:>9} {mode:>6}"
                    try:
                        with torch.inference_mode(), _autocast(device, dtype):
                            feature, kp_c, kp_s = source_batch(renderer, image, semantics, batch)
                            if mode in ("graph", "compiled"):
                                half = None if dtype == "float32" else getattr(torch, dtype)
                                tensors = (feature, kp_c, kp_s, windows)
                                compiled_step = None
                                if mode == "compiled":  # as the stage: ahead of time, into a package, then loaded
                                    started = time.perf_counter()
                                    compiled.compiled_step(renderer, tensors, half, compiled_dir)
                                    took = time.perf_counter() - started
                                    started = time.perf_counter()
                                    compiled_step = compiled.compiled_step(renderer, tensors, half, compiled_dir)
                                    loaded = time.perf_counter() - started
                                try:
                                    graphed = GraphedRender.capture(renderer, *tensors, dtype=half, step=compiled_step)
                                except GraphUnavailable as exc:  # as the stage: the compiled step called per batch
                                    if compiled_step is None:
                                        raise
                                    print(f"{label} the compiled step runs without CUDA graphs: {exc}")

                                    def graphed(*args, run=compiled_step):
                                        return run(*args).cpu().numpy()

                                if mode == "compiled":
                                    eager = renderer.render(feature, kp_s, renderer.driving_keypoints(kp_c, windows))
                                    eager = fr.frames_to_uint8(eager.prediction).astype(np.int16)
                                    diff = np.abs(graphed(*tensors).astype(np.int16) - eager)
                                    print(
                                        f"{label} compiled in {took:.1f} s, loaded again in {loaded:.2f} s; uint8 "
                                        f"frames vs eager: max {diff.max()} levels, mean {diff.mean():.4f}"
                                    )

                                def step(graphed=graphed, args=(feature, kp_c, kp_s, windows)) -> None:
                                    graphed(*args)
                            else:

                                def step(args=(renderer, kp_c, kp_s, feature, windows)) -> None:
                                    _step(*args)

                            if cuda or size == min(sizes):
                                step()  # warm-up (cuDNN algorithm choice, allocator; oneDNN primitives on a CPU)
                            if cuda:
                                torch.cuda.synchronize(device)
                                torch.cuda.reset_peak_memory_stats(device)
                            frames, start = 0, time.perf_counter()
                            while True:
                                step()
                                frames += batch
                                if cuda:
                                    torch.cuda.synchronize(device)
                                elapsed = time.perf_counter() - start
                                if elapsed >= min_seconds or (not cuda and frames >= (2 if size <= 256 else 1)):
                                    break
                            graphed = step = None
                    except torch.cuda.OutOfMemoryError:
                        print(f"{label} {'out of GPU memory':>32}")
                        graphed = step = None
                        torch.cuda.empty_cache()
                        continue
                    except GraphUnavailable as exc:
                        print(f"{label} graph capture failed: {exc}")
                        continue
                    peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:13.0f}" if cuda else f"{'-':>13}"
                    print(f"{label} {frames / elapsed:9.2f} {elapsed / frames:8.3f} {peak}", flush=True)
                    if cuda:
                        gc.collect()  # a recorded graph's private memory pool is freed with the graph
                        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Memory: 30 s vs 5 min, one subprocess each


def write_checkpoints(root: Path) -> None:
    """Fill-rule weights in the official layout (needs ../shared/sadtalker for the key inventory)."""
    import torch
    from safetensors.torch import save_file

    fill = _fill()
    rows = fill.read_inventory_txt(SHARED / "inventory" / "SadTalker_V0.0.2_safetensors_expected_keys.txt")
    tensors = {}
    for prefix in ("kp_extractor.", "generator.", "audio2exp.", "audio2pose.", "face_3drecon."):
        sub = [(k[len(prefix) :], s, d) for k, s, d in rows if k.startswith(prefix)]
        tensors.update({prefix + k: v for k, v in fill.fill_state_dict(sub).items()})
    save_file(tensors, str(root / "SadTalker_V0.0.2_256.safetensors"))
    mapping = fill.fill_state_dict(fill.read_inventory_txt(SHARED / "inventory" / f"{INVENTORY['mapping70']}.txt"))
    torch.save({"mapping": mapping, "epoch": 0}, root / "mapping_00229-model.pth.tar")


def speech_like(seconds: float):
    """Syllable-rate modulated harmonics: enough structure for the audio networks, no TTS needed."""
    import numpy as np

    from renderer.base import SAMPLE_RATE

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700), 1))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    return (0.3 * voice * envelope).astype(np.float32)


def use_landmarks(path: Path | None) -> None:
    """Bench-only: answer face detection from a saved box + 68 landmarks (.npz from `--save-landmarks`).

    For a GPU machine without dlib's 99 MB landmark model; detection is CPU work outside the renderer, and leaving
    it out of the one-process-per-clip arm makes that arm faster, so the warm/cold ratio errs low."""
    if path is None:
        return
    import numpy as np

    from renderer import faces

    with np.load(path) as saved:
        face = faces.Face(tuple(int(v) for v in saved["box"]), float(saved["score"]), saved["landmarks"])
    faces.detect_face = lambda image, source="", pool=None: face


def save_landmarks(path: Path) -> None:
    """Detect the astronaut portrait's face with the project's dlib path and save it for `--landmarks`."""
    import numpy as np
    from skimage import data

    from renderer import faces

    face = faces.detect_face(data.astronaut(), source="skimage astronaut")
    np.savez(path, box=np.asarray(face.box), score=face.score, landmarks=face.landmarks)


def _stage_job(
    work: Path, name: str, seconds: float, device: str, ckpt: Path, seed: int, batch_size: int, compile: bool = False
):
    """One animate job on the astronaut portrait and `seconds` of speech-like audio, as the runner would make it."""
    from PIL import Image
    from skimage import data

    from renderer.base import SAMPLE_RATE, StepJob
    from tests._audio_util import write_wav

    wav = work / f"{name}.wav"
    write_wav(wav, speech_like(seconds), SAMPLE_RATE)
    portrait = work / "portrait.png"
    if not portrait.exists():
        Image.fromarray(data.astronaut()).save(portrait)
    out = work / name
    out.mkdir()
    settings = {
        "size": 256,
        "preprocess": "crop",
        "still": False,
        "expression_scale": 1.0,
        "pose_style": 0,
        "batch_size": batch_size,
        "compile": compile,
        "dtype": "auto",
    }
    inputs = {"portrait": portrait, "audio": wav}
    return StepJob("animate", name, settings, inputs, out, device=device, seed=seed, checkpoints=ckpt)


def child_memory(seconds: float, device: str, ckpt: Path, frames_cap: int, batch_size: int) -> dict:
    """Run in a fresh process: everything that scales with the audio, report peak memory as JSON."""
    import numpy as np
    import torch

    from renderer.base import ModelPool
    from renderer.sadtalker import pipeline

    work = scratch_dir("bench_sadtalker_")
    job = _stage_job(work, "speech", seconds, device, ckpt, 0, batch_size)
    pool = ModelPool()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if frames_cap <= 0:
        result = pipeline.run([job], pool)[0]
        frames = result["frames"] if isinstance(result, dict) else str(result)
    else:  # CPU: the whole front half, the render set-up, then only `frames_cap` frames
        prepare, full = pipeline._prepare_batch, []

        def capped(plans, pool, times=None, gpu=None):  # bench-only: the stage's preparation, frames_cap frames kept
            videos = prepare(plans, pool, times, gpu)
            for video in videos:
                if isinstance(video, pipeline._Video):
                    full.append(len(video.target))
                    video.target = np.asarray(video.target[:frames_cap])
            return videos

        pipeline._prepare_batch = capped
        result = pipeline.run([job], pool)[0]
        assert isinstance(result, dict), result
        frames = f"{result['frames']} of {full[0]} rendered"
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None
    return {
        "seconds": seconds,
        "frames": frames,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": peak_gpu,
        "wall_s": time.perf_counter() - start,
    }


def child_clips(
    first: int,
    count: int,
    seconds: float,
    device: str,
    ckpt: Path,
    batch_size: int,
    compile: bool = False,
    prepare: str | None = None,
) -> dict:
    """Run in a fresh process: `count` clips through the stage with one model pool (seeds first..first+count-1).

    `prepare`: "AHEAD[:BATCH]" overrides pipeline.PREPARE_AHEAD (and PREPARE_BATCH)."""
    import logging

    from renderer.base import ModelPool
    from renderer.encode import probe
    from renderer.sadtalker import pipeline

    if prepare:
        ahead, _, batch = prepare.partition(":")
        pipeline.PREPARE_AHEAD = int(ahead)
        pipeline.PREPARE_BATCH = int(batch or pipeline.PREPARE_BATCH)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the stage's own time split, on stderr
    work = scratch_dir("bench_clips_")
    jobs = [
        _stage_job(work, f"clip{i}", seconds, device, ckpt, seed=i, batch_size=batch_size, compile=compile)
        for i in range(first, first + count)
    ]
    with _GilProbe() as gil:
        results = pipeline.run(jobs, ModelPool())
    print(f"bench: {gil}", file=sys.stderr)
    failed = [str(r) for r in results if not isinstance(r, dict)]
    if failed:
        raise SystemExit(f"clips failed: {failed[:2]}")
    frames = sum(probe(Path(job.out_dir) / pipeline.OUTPUT_NAME).frames for job in jobs)
    return {"clips": count, "frames": frames}


class _GilProbe:
    """A thread that sleeps 5 ms at a time and records how much later it got the GIL back: how long any thread
    that releases the GIL (every torch call does) waits to run Python again while the stage runs."""

    SLEEP_S = 0.005

    def __init__(self) -> None:
        import threading

        self.late: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            time.sleep(self.SLEEP_S)
            self.late.append(time.perf_counter() - start - self.SLEEP_S)

    def __enter__(self) -> _GilProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __str__(self) -> str:
        import numpy as np

        late = np.asarray(self.late) * 1e3
        if late.size == 0:
            return "GIL probe: no samples"
        p50, p90, p99 = np.percentile(late, [50, 90, 99])
        return (
            f"GIL probe: a thread waking from a 5 ms sleep ran again {p50:.2f} ms late (median), {p90:.2f} ms "
            f"(90th percentile), {p99:.2f} ms (99th), {late.size} samples"
        )


def bench_clips(
    device: str,
    count: int,
    seconds: float,
    batch_size: int,
    landmarks: Path | None,
    compile: bool = False,
    cold_clips: int | None = None,
    prepare: list[str] | None = None,
    kernels: list[str] | None = None,
) -> None:
    """`count` clips in one warm process vs one process per clip (each reloading Python, torch and every model).

    `prepare`: warm runs with these "AHEAD[:BATCH]" preparation settings, one after another (default: the
    stage's own). `kernels`: kernel flags (--fused-conv-relu, --broadcast-upsample) for every child, both arms."""
    if _fill() is None:
        print("clips: skipped (needs ../shared/sadtalker for fill-rule checkpoints in the official layout)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(Path(tmp))

        def child(first: int, n: int, variant: str | None = None, compiled: bool = compile) -> tuple[float, dict]:
            cmd = [sys.executable, __file__, "--child-clips", str(first), str(n), "--clip-seconds", str(seconds)]
            cmd += ["--prepare", variant] if variant else []
            cmd += ["--device", device, "--ckpt", tmp, "--batch-size", str(batch_size)]
            cmd += ["--landmarks", str(landmarks)] if landmarks else []
            cmd += ["--compile"] if compiled else []
            cmd += kernels or []
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
            if out.returncode != 0:
                raise SystemExit(f"clip child failed:\n{out.stderr[-3000:]}")
            said = ("sadtalker:", "bench:", "compiled the", "loaded the compiled", "the render step", "no package")
            split = [line for line in out.stderr.splitlines() if line.startswith(said)]
            return wall, {**json.loads(out.stdout.strip().splitlines()[-1]), "split": split}

        print(
            f"{count} clips of {seconds:g} s on {device}, size 256, batch {batch_size}, dtype auto"
            + (", video.compile: true (both arms, the package compiled beforehand)" if compile else "")
        )
        if compile:  # a machine that has compiled before: the package is made once, then every run loads it
            primed, info = child(0, 1)
            print(f"  compiled the render step beforehand (one clip, one process): {primed:.1f} s", flush=True)
            for line in info["split"]:
                print(f"    {line[:400]}")
        warm = {}
        for variant in prepare or [None]:
            warm[variant], info = child(0, count, variant)
            label = f" (prepare ahead:batch {variant})" if variant else ""
            print(f"  one warm process{label}: {warm[variant]:.1f} s for {info['frames']} frames", flush=True)
            for line in info["split"]:
                print(f"    {line}")
        measured = min(count, cold_clips or count)
        scaled = "" if measured == count else f", {measured} of {count} run and their mean scaled to {count}"
        # With compile, the cold arm runs twice: compiled as the warm one (loading the package in every process),
        # and the seed's way, without compiling.
        for compiled in (True, False) if compile else (False,):
            cold = [child(i, 1, compiled=compiled)[0] for i in range(measured)]
            cold_s = sum(cold) * count / measured
            how = (" (compiled, loading the package)" if compiled else " (not compiled)") if compile else ""
            print(f"  one process per clip{how}: {cold_s:.1f} s (per clip {min(cold):.1f}–{max(cold):.1f} s{scaled})")
            for variant, warm_s in warm.items():
                label = f" (prepare {variant})" if variant else ""
                print(f"  warm run{label} {cold_s / warm_s:.1f}× faster than one process per clip{how}")


def bench_memory(device: str, lengths: list[float], batch_size: int, landmarks: Path | None) -> None:
    if _fill() is None:
        print("memory: skipped (needs ../shared/sadtalker for fill-rule checkpoints in the official layout)")
        return
    cap = 0 if device.startswith("cuda") else 2
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(Path(tmp))
        print(
            f"memory on {device}, batch {batch_size}, each length in a fresh process"
            + ("" if cap == 0 else f" (CPU: audio side in full, {cap} frames rendered)")
        )
        for seconds in lengths:
            cmd = [sys.executable, __file__, "--child-memory", str(seconds), "--device", device, "--ckpt", tmp]
            cmd += ["--frames-cap", str(cap), "--batch-size", str(batch_size)]
            cmd += ["--landmarks", str(landmarks)] if landmarks else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"  {seconds:6.0f} s: child failed\n{out.stderr[-2000:]}")
                continue
            info = json.loads(out.stdout.strip().splitlines()[-1])
            gpu = f", peak GPU {info['peak_gpu_mib']:.0f} MiB" if info["peak_gpu_mib"] is not None else ""
            print(
                f"  {seconds:6.0f} s audio: peak RSS {info['peak_rss_mib']:.0f} MiB{gpu}, "
                f"frames {info['frames']}, {info['wall_s']:.1f} s"
            )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["eager", "graph", "compiled"],
        help="CUDA: eager, CUDA-graph replay, compiled (AOTInductor) + graph (default: eager graph)",
    )
    parser.add_argument("--compile", action="store_true", help="clips and memory runs: video.compile: true")
    parser.add_argument(
        "--variants",
        nargs="+",
        help='speed, compiled mode: make packages only these ways (compiled.VARIANTS names); "none" goes straight '
        "to the just-in-time fallback",
    )
    parser.add_argument(
        "--cold-clips",
        type=int,
        help="clips: run only this many one-process-per-clip children "
        "and scale their mean to --clips (states that it did)",
    )
    parser.add_argument(
        "--prepare",
        nargs="+",
        help='clips: warm runs with these preparation settings "AHEAD[:BATCH]" (batches prepared ahead on a thread, '
        "videos per batch), e.g. 0:1 1:1 1:4",
    )
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument(
        "--float32-weights",
        action="store_true",
        help="speed: half dtypes keep float32 weights that autocast casts per batch (the stage before it stored "
        "them in the dtype)",
    )
    parser.add_argument(
        "--fused-conv-relu",
        action="store_true",
        help="CUDA half precision: convolutions followed by a ReLU as one cuDNN call (facerender.FUSED_CONV_RELU)",
    )
    parser.add_argument(
        "--broadcast-upsample",
        action="store_true",
        help="CUDA: nearest upsamplings as one broadcast copy (facerender.BROADCAST_UPSAMPLE)",
    )
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time per configuration on CUDA")
    parser.add_argument("--memory-seconds", type=float, nargs="+", default=[30.0, 300.0])
    parser.add_argument("--batch-size", type=int, default=8, help="video.batch_size for the memory and clip runs")
    parser.add_argument("--clips", type=int, default=0, help="N clips warm vs one process per clip (CUDA: 20)")
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--landmarks", type=Path, help="saved face (--save-landmarks) instead of dlib's detector")
    parser.add_argument("--save-landmarks", type=Path, help="detect the astronaut's face, save it, exit")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--child-memory", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-clips", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--frames-cap", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_landmarks:
        save_landmarks(args.save_landmarks)
        return
    if args.variants:
        from renderer.sadtalker import compiled

        compiled.VARIANTS = tuple(v for v in compiled.VARIANTS if v.name in args.variants)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    from renderer.sadtalker import facerender

    facerender.FUSED_CONV_RELU, facerender.BROADCAST_UPSAMPLE = args.fused_conv_relu, args.broadcast_upsample
    kernels = ["--fused-conv-relu"] * args.fused_conv_relu + ["--broadcast-upsample"] * args.broadcast_upsample
    if kernels and not args.child_clips:
        print("kernels: " + " ".join(kernels))
    if args.child_memory is not None or args.child_clips is not None:
        use_landmarks(args.landmarks)
        if args.child_memory is not None:
            info = child_memory(args.child_memory, device, args.ckpt, args.frames_cap, args.batch_size)
        else:
            prepare = args.prepare[0] if args.prepare else None
            info = child_clips(
                *args.child_clips, args.clip_seconds, device, args.ckpt, args.batch_size, args.compile, prepare
            )
        print(json.dumps(info))
        return
    cuda = device.startswith("cuda")
    if not cuda:
        print("no GPU: CPU small-batch figures only (one 256 frame ≈ 1.2 TFLOP); run on CUDA for the full grid")
    if not args.skip_speed:
        bench_speed(
            device,
            args.sizes or [256, 512],
            args.batches or ([1, 2, 8, 32] if cuda else [1]),
            args.dtypes or (["float32", "float16"] if cuda else ["float32", "bfloat16"]),
            args.min_seconds,
            args.modes or ["eager", "graph"],
            args.float32_weights,
        )
    if not args.skip_memory:
        with contextlib.suppress(KeyboardInterrupt):
            bench_memory(device, args.memory_seconds, args.batch_size, args.landmarks)
    if args.clips:
        bench_clips(
            device,
            args.clips,
            args.clip_seconds,
            args.batch_size,
            args.landmarks,
            args.compile,
            args.cold_clips,
            args.prepare,
            kernels,
        )


if __name__ == "__main__":
    main()
