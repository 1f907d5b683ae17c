"""Stage "animate" with `video.renderer: sadtalker`: portrait + speech.wav → silent out_dir/video.mp4.

Per job (SPEC §1.2), in numbered steps:

1. check the settings and inputs; find the checkpoints (MissingWeightsError names the files);
2. detect the face (dlib, `renderer.faces`) and cut the S×S render source (`preprocess.crop_face`);
3. 3DMM coefficients of the source (`recon`), mel windows of the speech (`audio`) and the driving coefficients
   (`audio2coeff.predict_coeffs_batch`: expression, blinks, head pose; every random draw from `job.seed`); steps
   2–3 run for a few jobs at a time, so each network makes one pass over all of them (`_prepare_batch`);
4. render: the frames of all jobs that use the same renderer weights share forward batches of
   `video.batch_size` frames; each batch goes straight to its videos' encoders, so memory stays flat however long
   the audio is (only the N×70 coefficients are kept per job);
5. per frame: uint8 (round half to even), aspect restore to S × trunc(S·h/w) (rounded up to even for yuv420p),
   or in `preprocess: full` and `extfull` a Poisson paste back into the portrait (`paste.PasteBack`).

Models come from the pool once per run: the renderer (KPDetector + MappingNet + generator) per (size, 70|73
inputs), the 3DMM regressor and the two audio networks per size (their BatchNorms folded into the convolutions).

Precision (`video.dtype`): "float32", "float16", "bfloat16" or "auto" (float16 on CUDA, float32 elsewhere; float16
asked for on a CPU runs float32 with a warning, CPU half convolutions being emulated). Half precision runs the
convolutions under `torch.autocast`, their weights stored in its dtype at load (`weights.cast_for_autocast`: the
values autocast would make on every batch, so the frames are the same); keypoint maths, grids, warps, softmaxes
and the uint8 conversion stay float32, and instance-norm statistics accumulate in float32. Measured max error vs float32
(golden generator input, S = 256, fill-rule weights, CPU bfloat16 autocast): prediction max |Δ| = 0.24,
mean |Δ| = 0.021 (uint8: max 60 levels, mean 5.2).
The SPADE decoder alone in bfloat16 gives 0.097 max / 0.010 mean; the random fill weights amplify small changes
strongly (float32 thread-count noise of 1e-7 already moves the output by 6e-5), so trained weights should fare
better — unmeasured here. On a CPU with AVX512-BF16 (this project's test machine) bfloat16 is also faster:
3.6 s vs 6.7 s per 256 frame. float16 autocast on CUDA (H100, same input and weights, against CUDA float32 with
TF32 off): max |Δ| = 0.029, mean |Δ| = 0.0030 (tests/test_sadtalker_render.py, RUN_GPU=1), and 1.3× the float32
frame rate (bench/results/). On CUDA the elementwise work between the convolutions (bias adds, activations, SPADE's
normalisation and modulation) runs through Triton kernels (kernels.py) that compute in float32 and round once:
float16 vs float32 with them max 0.027, mean 0.0030 (H200, golden input); 287 vs 206 frames/s without them at 256
and 75 vs 54 at 512 (batch 16, graphs, bench/results/2026-11-26-h200b).

`video.compile: true` renders with the render step compiled by TorchInductor (compiled.py): ahead of time, once per
machine, into a package in `<checkpoints>/compiled/` that later runs load in milliseconds (just in time by
`torch.compile`, every run, where that fails); on CUDA the compiled step is what the graph records, on a CPU it is
called per full batch (1.16× the eager bfloat16 speed on this project's 2-core machine, bench/bench_compiled.py).
With `torch.compile` the step took 40–55 s to compile and then ran at about 1.8× the frame rate; compiled float16
differed from float32 by 1.5 of 255 levels on average (eager float16: 0.8). Measured on an H200:
bench/results/2026-11-26-h200/. On an H100 with PyTorch 2.11 the ahead-of-time package compiled (91–102 s) but
crashed the process loading it; a new package is therefore checked in a separate process first, and there the run
fell back to `torch.compile` (38.6 s): bench/results/2026-11-26-h100d/. The second kind of package crashed there
too (bench/results/2026-11-26-h100e/); the fallback then renders 1.70× the graph's frame rate (320 vs 188 frames/s
at 256, batch 16, float16) after 27 s (TorchInductor cache warm) to 55 s (cold) of compiling. Since then the
uncompiled path runs the elementwise work through Triton kernels (kernels.py: 283 vs 207 frames/s without them at
256, 73.6 vs 53.7 at 512, batch 16, float16, H200, bench/results/2026-11-26-h200b), so compiling pays back only
after about 29,000 frames at 256 (8,700 at 512): a shorter group on CUDA renders without compiling
(`_Graphs.jit_min_frames`, its frames read from the WAV headers by `_group_frames`), and its videos' report says why.

On CUDA the work overlaps in four places: a thread prepares (steps 2–3) the next batch of videos while the current
ones render (`_Preparer`, on its own CUDA stream; it holds a lock that graph recording also takes, since recording
forbids GPU calls from other threads); batches replay a recorded CUDA graph (`graphs.py`, bit-identical to the eager
pass; a short last batch uses its first rows, a group shorter than one batch runs eagerly); the render loop queues
batch k+1 before it waits for batch k's frames (`_launch`, `_hand_on`), so the GPU does not idle while the host
gathers the next batch's inputs or starts a video; and encoder threads paste or resize and encode batch k while the
GPU renders batch k+1 (`_Emitter`: up to four threads, each video pinned to one so its frames stay in order; at most
two batches wait per thread, so memory stays flat). Step 1 of every job runs first, to group the jobs by renderer.
A batch that runs out of GPU memory is rendered in halves, and the rest of its group in pieces that fit
(`_render_rows`); only a single frame that does not fit fails its videos.

Deliberate differences from upstream: landmarks come from dlib (see `preprocess`); frames of one video are
rendered in frame order, several videos per batch (upstream: `bs` rows of consecutive frame blocks; frames are
independent, so only float noise differs); the paste-back uses the rendered frames, not H.264-decoded ones; odd
output heights are rounded up to even (upstream's ffmpeg enlarges to a multiple of 16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from renderer.base import (
    SAMPLE_RATE,
    BackendError,
    BadInputError,
    MissingWeightsError,
    ModelPool,
    RenderError,
    StepJob,
    as_render_error,
)
from renderer.checkpoints import SADTALKER_PREPROCESS, SADTALKER_SIZES

if TYPE_CHECKING:
    from renderer.encode import VideoWriter
    from renderer.sadtalker.facerender import FaceRenderer, SourceState
    from renderer.sadtalker.paste import PasteBack
    from renderer.sadtalker.preprocess import CropInfo
    from renderer.sadtalker.transfer import HostCopy
    from renderer.sadtalker.weights import CheckpointSet

logger = logging.getLogger(__name__)

#: File the stage writes in out_dir.
OUTPUT_NAME = "video.mp4"
SIZES = SADTALKER_SIZES
PREPROCESS = SADTALKER_PREPROCESS
#: The modes whose frames are pasted back into the whole portrait (SPEC §8.3).
PASTE_BACK = ("full", "extfull")
DTYPES = ("auto", "float32", "float16", "bfloat16")
NUM_POSE_STYLES = 46


@dataclasses.dataclass(frozen=True)
class SadTalkerSettings:
    """The `video` settings this renderer reads, validated."""

    size: int = 256
    preprocess: str = "crop"
    still: bool = False
    expression_scale: float = 1.0
    pose_style: int = 0
    batch_size: int = 8
    dtype: str = "auto"
    compile: bool = False

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], label: str = "") -> SadTalkerSettings:
        """Validate the resolved `video` section; every problem is reported at once in one BadInputError."""
        defaults = cls()
        get = {f.name: settings.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
        problems = []
        if get["size"] not in SIZES or isinstance(get["size"], bool):
            problems.append(f"size must be 256 or 512, got {get['size']!r}")
        if get["preprocess"] not in PREPROCESS:
            problems.append(f"preprocess must be one of {', '.join(PREPROCESS)}, got {get['preprocess']!r}")
        if not isinstance(get["still"], bool):
            problems.append(f"still must be true or false, got {get['still']!r}")
        scale = get["expression_scale"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not np.isfinite(scale):
            problems.append(f"expression_scale must be a number, got {scale!r}")
        style = get["pose_style"]
        if isinstance(style, bool) or not isinstance(style, int) or not 0 <= style < NUM_POSE_STYLES:
            problems.append(f"pose_style must be an integer in 0..{NUM_POSE_STYLES - 1}, got {style!r}")
        batch = get["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            problems.append(f"batch_size must be a positive integer, got {batch!r}")
        if get["dtype"] not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {get['dtype']!r}")
        if not isinstance(get["compile"], bool):
            problems.append(f"compile must be true or false, got {get['compile']!r}")
        if problems:
            where = f"{label}: " if label else ""
            raise BadInputError(
                f"{where}invalid video settings: " + "; ".join(problems), "fix the manifest's video section"
            )
        return cls(
            size=int(get["size"]),
            preprocess=str(get["preprocess"]),
            still=bool(get["still"]),
            expression_scale=float(scale),
            pose_style=int(style),
            batch_size=int(batch),
            dtype=str(get["dtype"]),
            compile=bool(get["compile"]),
        )


def resolve_dtype(name: str, device: str) -> str:
    """ "auto" → float16 on CUDA, float32 elsewhere; explicit names are kept."""
    if name != "auto":
        return name
    return "float16" if device.startswith("cuda") else "float32"


def output_size(size: int, crop_size: tuple[int, int]) -> tuple[int, int]:
    """Frame size after the aspect restore (SPEC §8.1): width S, height trunc(S·h/w) rounded up to even."""
    width, height = crop_size
    out_h = int(size * height / width) if width > 0 else size
    return size, max(2, out_h + out_h % 2)


#: Videos are prepared (faces, 3DMM, audio networks) in batches of up to this many videos of one group: the
#: networks run once per batch, not once per video. On an H100, 20 clips took 19.3 s with batches of 4 and 20.2 s
#: with batches of 8 (bench/results/2026-11-26-h100c); memory holds up to PREPARE_AHEAD + 2 batches.
PREPARE_BATCH = 4
#: On CUDA a thread prepares up to this many batches ahead of the renderer, so that work overlaps the frames of the
#: videos before; elsewhere each batch is prepared just before its first frame (on a CPU the two would only compete
#: for the same cores).
PREPARE_AHEAD = 1
#: CUDA priority of the preparation thread's stream (0: PyTorch's default; -1 is higher). On an H100, 20 clips
#: measured 21.5 s at -1 and 21.1 s at 0 (bench/results/2026-11-26-h100b): no gain from the higher priority.
PREPARE_STREAM_PRIORITY = 0


@dataclasses.dataclass
class _Plan:
    """One job after step 1: checked settings, inputs and found weights; enough to group it with the jobs it shares
    a renderer with."""

    index: int
    job: StepJob
    settings: SadTalkerSettings
    ckpt: CheckpointSet
    portrait: Path
    audio: Path
    warnings: list[str]

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs with equal groups share renderer weights, device and dtype, so their frames share batches."""
        from renderer.sadtalker.facerender import mapping_channels

        size, preprocess = self.settings.size, self.settings.preprocess
        return (size, mapping_channels(preprocess), str(self.ckpt.root), self.job.device, self.settings.dtype)


@dataclasses.dataclass
class _Video:
    """One job between preparation and its last frame."""

    plan: _Plan
    #: Mapping-net inputs per frame (N, 70|73) and the source's (70|73,) coefficients.
    target: np.ndarray
    source_coeff: np.ndarray
    source_crop: np.ndarray
    crop_info: CropInfo
    frame_size: tuple[int, int]
    paste: PasteBack | None
    state: SourceState | None = None
    writer: VideoWriter | None = None
    written: int = 0
    error: RenderError | None = None
    #: What this run did differently from the settings (a batch split for memory, compiling that failed): shown
    #: for the run that rendered the video, not kept with the cached result (`info["run_notes"]`).
    run_notes: list[str] = dataclasses.field(default_factory=list)
    #: Told (on the encoding thread) as soon as the video's last frame is written and its file closed.
    finished: Callable[[_Video], None] | None = None

    @property
    def num_frames(self) -> int:
        return len(self.target)


def run(
    jobs: Sequence[StepJob], pool: ModelPool, done: Callable[[int, Any], None] | None = None
) -> list[dict | RenderError]:
    """Stage entry (renderer/base.py contract): one info dict or RenderError per job, in order. `done`: told of each
    video as soon as its file is closed (its batch-mates render on), and of those that failed while rendering when
    their group ends: the runner commits each at once."""
    failed: dict[int, RenderError] = {}
    groups: dict[tuple[Any, ...], list[_Plan]] = {}
    for index, job in enumerate(jobs):
        try:
            plan = _plan(index, job)
        except RenderError as exc:
            failed[index] = _labelled(exc, job)
            continue
        groups.setdefault(plan.group, []).append(plan)
    plans = [plan for group in groups.values() for plan in group]
    ahead = _lookahead(plans)
    videos: list[_Video] = []
    started = time.perf_counter()
    preparer = _Preparer(plans, pool, ahead, PREPARE_BATCH)
    try:
        for group in groups.values():
            rendered = _render_group(group, preparer, pool, done)
            videos += rendered
            for video in rendered if done is not None else ():  # told already if it succeeded
                if video.error is not None:
                    done(video.plan.index, _labelled(video.error, video.plan.job))
    finally:
        preparer.close()
    failed.update(preparer.failed)
    logger.info(
        "sadtalker: %d videos prepared in %.1f s (%s) in batches of up to %d, %s, the renderer waited %.1f s for "
        "them; %d frames rendered and encoded, %.1f s in all",
        len(plans),
        preparer.busy_s,
        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in preparer.times.items()) or "none",
        PREPARE_BATCH,
        f"on a thread up to {ahead} batch{'es' if ahead > 1 else ''} ahead" if ahead else "each before its first frame",
        preparer.waited_s,
        sum(video.written for video in videos),
        time.perf_counter() - started,
    )
    rendered = {v.plan.index: _labelled(v.error, v.plan.job) if v.error else _info(v) for v in videos}
    return [failed[i] if i in failed else rendered[i] for i in range(len(jobs))]


def _lookahead(plans: Sequence[_Plan]) -> int:
    return PREPARE_AHEAD if any(plan.job.device.startswith("cuda") for plan in plans) else 0


# ----------------------------------------------------------------------------------------------------------------
# Steps 1–3: per-job preparation (CPU work and the small networks)


def _plan(index: int, job: StepJob) -> _Plan:
    """Step 1: settings, inputs and weights of one job: all that decides which renderer it needs (no models)."""
    from renderer.sadtalker import weights

    settings = SadTalkerSettings.from_mapping(job.settings, job.label)
    settings = dataclasses.replace(settings, dtype=resolve_dtype(settings.dtype, job.device))
    portrait, audio = _input(job, "portrait"), _input(job, "audio")
    ckpt = weights.checkpoint_set(Path(job.checkpoints), settings.size, settings.preprocess)
    warnings = []
    if settings.dtype == "float16" and not job.device.startswith("cuda"):
        # CPU float16 convolutions are emulated (tens of times slower than float32): not worth a user's hour.
        settings = dataclasses.replace(settings, dtype="float32")
        warnings.append(f"dtype float16 is not supported efficiently on {job.device}; rendered in float32")
    if ckpt.legacy:
        warnings.append(
            "legacy SadTalker checkpoints in use" + (" (256-trained renderer)" if settings.size != 256 else "")
        )
    return _Plan(index, job, settings, ckpt, portrait, audio, warnings)


def _prepare_batch(
    plans: Sequence[_Plan],
    pool: ModelPool,
    times: dict[str, float] | None = None,
    gpu: contextlib.AbstractContextManager | None = None,
) -> list[_Video | RenderError]:
    """Steps 2–3 of several planned jobs of one group (`_Plan.group`: the same weights and device), in order: a
    `_Video` per job, or the RenderError that failed it. Thread-safe (see `_Preparer`).

    Faces, crops and mel windows are made per job on the CPU; the 3DMM and audio networks then run once over all
    the batch's jobs (a few forward passes in all rather than a few per video: on a GPU each pass costs launches and
    a wait for its result). A job's coefficients do not depend on its companions beyond float noise, and each draws
    its randomness from its own seed. `times`: seconds spent on the face (load, detect, crop, output geometry), the
    3DMM and the audio side are added to it. `gpu` is held while the networks load and run, and only then (`_Preparer`:
    no CUDA graph may be recorded meanwhile; the CPU work of faces and audio need not keep one waiting)."""
    import torch

    from renderer.sadtalker import audio2coeff, facerender, recon

    times = {} if times is None else times
    gpu = contextlib.nullcontext() if gpu is None else gpu
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock
        clock = now

    out: list[_Video | RenderError | None] = [None] * len(plans)

    def each(step: Callable[[_Plan], Any]) -> dict[int, Any]:
        """`step` on every job still alive; a RenderError fails that job only."""
        done = {}
        for i, plan in enumerate(plans):
            if out[i] is None:
                try:
                    done[i] = step(plan)
                except RenderError as exc:
                    out[i] = exc
        return done

    # 2. Face and render source.
    crops = each(lambda plan: _face(plan, pool))
    lap("face")

    # 3. Coefficients: source 3DMM, mel windows, driving coefficients.
    def network(name: str, build: Callable[[Any], Any], jobs: Sequence[int]) -> Any:
        """A network of the batch's weights, or None when it failed to load (and with it each of `jobs`)."""
        if not jobs:
            return None
        try:
            return _pooled(pool, plans[0].ckpt, name, plans[0].job.device, build)
        except RenderError as exc:
            for i in jobs:
                out[i] = _copy(exc)
            return None

    source_coeffs: dict[int, np.ndarray] = {}
    with gpu:
        recon_net = network("face_3drecon", recon.ReconNet.from_state_dict, list(crops))
        if recon_net is not None:
            results = recon.coeffs_from_crops(
                recon_net,
                [crop.crop for _, crop in crops.values()],
                [crop.landmarks_in_crop for _, crop in crops.values()],
            )
            source_coeffs = {i: coeff for i, (coeff, _) in zip(crops, results, strict=True)}
    lap("3DMM")
    windows = each(_mel_windows)
    requests = [
        audio2coeff.CoeffRequest(
            windows[i],
            source_coeffs[i],
            torch.Generator().manual_seed(int(plans[i].job.seed)),
            pose_style=plans[i].settings.pose_style,
            still=plans[i].settings.still,
            expression_scale=plans[i].settings.expression_scale,
        )
        for i in windows
    ]
    with gpu:
        exp_net = network("audio2exp", audio2coeff.ExpNet.from_state_dict, list(windows))
        moving = [i for i in windows if not plans[i].settings.still]
        pose_net = network("audio2pose", audio2coeff.PoseVAE.from_state_dict, moving)
        live = [(i, request) for i, request in zip(windows, requests, strict=True) if out[i] is None]
        coeffs = audio2coeff.predict_coeffs_batch(exp_net, pose_net, [request for _, request in live])
    coeffs = dict(zip([i for i, _ in live], coeffs, strict=True))
    lap("audio")

    # Output geometry, and the videos.
    for i, plan in enumerate(plans):
        if out[i] is not None:
            continue
        image, crop = crops[i]
        settings = plan.settings
        try:
            paste, frame_size = _geometry(plan, image, crop)
        except RenderError as exc:
            out[i] = exc
            continue
        # predict_coeffs_batch already scaled the expression and froze the pose: the render preparation must not
        # scale again.
        target = facerender.target_coefficients(coeffs[i], source_coeffs[i], settings.preprocess, 1.0, settings.still)
        out[i] = _Video(
            plan=plan,
            target=target,
            source_coeff=np.asarray(source_coeffs[i], dtype=np.float32).reshape(-1),
            source_crop=crop.crop,
            crop_info=crop.crop_info,
            frame_size=frame_size,
            paste=paste,
        )
    lap("face")
    return out


def _face(plan: _Plan, pool: ModelPool) -> tuple[np.ndarray, Any]:
    """Step 2 of one job: the portrait, its face (dlib) and the S×S render source (`preprocess.CropResult`)."""
    from renderer import faces
    from renderer.sadtalker import preprocess

    portrait_path = plan.portrait
    image = faces.load_image(portrait_path)
    face = faces.detect_face(image, source=str(portrait_path), pool=pool)
    if face.warning and face.warning not in plan.warnings:
        plan.warnings.append(face.warning)
    try:
        crop = preprocess.crop_face(image, face.landmarks, plan.settings.preprocess, plan.settings.size)
    except ValueError as exc:
        raise BadInputError(
            f"cannot crop the face in {portrait_path}: {exc}", "use a portrait with the whole face inside"
        ) from exc
    return image, crop


def _mel_windows(plan: _Plan) -> np.ndarray:
    """The speech's mel window per video frame (N, 1, 80, 16)."""
    from renderer.sadtalker import audio

    audio_path = plan.audio
    wav = audio.load_wav_16k(audio_path)
    windows = audio.mel_windows(wav)
    if len(windows) == 0:
        raise BadInputError(
            f"the speech is {len(wav) / SAMPLE_RATE * 1000:.0f} ms long, shorter than one video frame (40 ms)",
            "give the script more text, or a longer recording",
        )
    return windows


def _geometry(plan: _Plan, image: np.ndarray, crop: Any) -> tuple[PasteBack | None, tuple[int, int]]:
    """The paste-back (`preprocess: full` or `extfull`) and the output frame size of one job."""
    from renderer.sadtalker.paste import PasteBack

    if plan.settings.preprocess not in PASTE_BACK:
        return None, output_size(plan.settings.size, crop.crop_info.size)
    portrait_path = plan.portrait
    height, width = image.shape[:2]
    even = image[: height - height % 2, : width - width % 2]
    if even.shape[0] < 2 or even.shape[1] < 2:
        raise BadInputError(f"portrait {portrait_path} is too small ({width}×{height})", "give a larger portrait")
    try:
        paste = PasteBack(even, crop.crop_info.paste_box)
    except ValueError as exc:
        raise BadInputError(f"cannot paste the face back into {portrait_path}: {exc}", "use preprocess: crop") from exc
    return paste, (even.shape[1], even.shape[0])


def _input(job: StepJob, name: str) -> Path:
    path = job.inputs.get(name)
    if path is None:
        raise BadInputError(f"sadtalker needs input '{name}' (got {sorted(job.inputs)})", "this is a runner bug")
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"input '{name}' {path} does not exist", "rebuild the step that makes it")
    return path


def _pooled(pool: ModelPool, ckpt: CheckpointSet, network: str, device: str, build: Callable[[Any], Any]) -> Any:
    """A coefficient network from the pool (float32: they are small), loaded strictly on first use, its
    BatchNorms folded into the convolutions (`fold.py`)."""

    def load() -> Any:
        from renderer.sadtalker.fold import fold_batchnorms

        try:
            net = build(ckpt.state_dict(network))
        except KeyError as exc:
            raise MissingWeightsError(
                f"{ckpt.files()[0]} ({network}) does not match the network: {exc}",
                "it is not a SadTalker V0.0.2 checkpoint: run `make checkpoints`",
            ) from exc
        return fold_batchnorms(net).to(device)

    model_id = f"sadtalker/{network}/{ckpt.size}/{'legacy' if ckpt.legacy else 'v002'}@{ckpt.root}"
    return pool.get(model_id, device, "float32", load)


# ----------------------------------------------------------------------------------------------------------------
# Step 4–5: batched rendering, streamed to the encoders


def _render_group(
    plans: list[_Plan], preparer: _Preparer, pool: ModelPool, done: Callable[[int, Any], None] | None = None
) -> list[_Video]:
    """Render every frame of the group's videos in shared forward batches, streaming each frame out.

    The videos come from `preparer` in the order of `plans` (all of one group); the prepared ones are returned,
    each with its outcome (`written`, `error`)."""
    import torch

    from renderer.sadtalker import weights
    from renderer.sadtalker.compiled import JIT_PAYS_BACK_FRAMES

    first = plans[0]
    size, channels, *_ = first.group
    device, dtype = first.job.device, first.settings.dtype
    model_id = f"sadtalker/render/{size}/{channels}/{'legacy' if first.ckpt.legacy else 'v002'}@{first.ckpt.root}"
    videos: list[_Video] = []

    def load() -> FaceRenderer:
        renderer = weights.load_face_renderer(first.ckpt.root, size, first.settings.preprocess, device)
        # Half precision: weights stored in the autocast dtype, as autocast would cast them on every batch (the
        # pool keys renderers by dtype: a run mixing dtypes holds one per dtype).
        return renderer if dtype == "float32" else weights.cast_for_autocast(renderer, getattr(torch, dtype))

    try:
        renderer = pool.get(model_id, device, dtype, load)
    except RenderError as exc:
        for _ in plans:  # keep the preparer in step with the groups
            if (video := preparer.next()) is not None:
                video.error = _copy(exc)
                videos.append(video)
        return videos
    batch_size = min(plan.settings.batch_size for plan in plans)
    compile = any(plan.settings.compile for plan in plans)
    device_type = torch.device(device).type
    jit_min_frames = JIT_PAYS_BACK_FRAMES.get(size, 0) if compile and device_type == "cuda" else 0
    graphs = _Graphs(
        batch_size,
        getattr(torch, dtype) if dtype != "float32" else None,
        device_type,
        compile=compile,
        compiled_dir=first.ckpt.root / "compiled",
        frames=_group_frames(plans) if jit_min_frames else None,  # only where it decides anything
        jit_min_frames=jit_min_frames,
        lock=preparer.gpu,
    )
    emitter = _Emitter()
    batch: list[tuple[_Video, int]] = []
    in_flight: _InFlight | None = None  # the batch the GPU is rendering: handed on once the next one is queued
    started = time.perf_counter()
    try:
        with torch.inference_mode(), _autocast(device, dtype):
            finished = None if done is None else lambda video: done(video.plan.index, _info(video))
            for video, frame in _frames(len(plans), preparer, renderer, videos, finished):
                batch.append((video, frame))
                if len(batch) == batch_size:
                    in_flight = _hand_on(in_flight, _launch(renderer, batch, graphs), emitter)
                    batch = []
            if batch:
                in_flight = _hand_on(in_flight, _launch(renderer, batch, graphs), emitter)
            _hand_on(in_flight, None, emitter)
    finally:
        try:
            emitter.close()
        finally:
            graphs.graph = None  # the recorded graph's memory pool goes with it
            for video in videos:
                _finish(video)
            logger.info(
                "sadtalker: render loop %.1f s; %d encoder threads busy %.1f s in all; the renderer waited %.1f s "
                "for them",
                time.perf_counter() - started,
                emitter.workers,
                emitter.busy_s,
                emitter.waited_s,
            )
    return videos


def _group_frames(plans: list[_Plan]) -> int | None:
    """The frames a group will render, from its WAV headers (None where one cannot be read: the step that loads
    it reports that)."""
    from scipy.io import wavfile

    from renderer.sadtalker.audio import SAMPLE_RATE, num_frames

    total = 0
    for plan in plans:
        try:
            rate, data = wavfile.read(plan.audio, mmap=True)
        except (OSError, ValueError):
            return None
        total += num_frames(len(data) * SAMPLE_RATE // rate)
    return total


class _Preparer:
    """Prepares the planned videos in order (steps 2–3) in batches of up to `batch` videos of one group
    (`_prepare_batch`: its networks run once per batch), `ahead` of the renderer on a thread, or on demand.

    With `ahead` > 0 a thread prepares up to `ahead` batches beyond the one being rendered, so faces, 3DMM and audio
    networks of the next videos run while the GPU renders the current ones; memory stays bounded by `ahead` + 2
    batches of prepared videos. The small networks then run on the GPU next to the render loop, on the thread's own
    stream (its host copies wait for its own work only), but never while a CUDA graph is recorded: recording
    forbids other threads' GPU calls, so the thread runs the networks holding `gpu`, and `_Graphs` takes it to
    record. Prepared videos hold host arrays only, so no tensor crosses the streams.

    Measured on an H100 (20 clips of 4 s, render batch 16, bench/results/2026-11-26-h100c): 19.3 s for the run
    with the thread and batches of 4, against 22.3 s preparing one video at a time on demand. The thread only pays
    because every copy goes through `transfer.py`; with plain copies one clip took 16 s to prepare beside the
    render loop instead of 88 ms. The renderer still waits about 1 s for the first batch, whose first calls load
    CUDA kernels and set up cuDNN.

    A job's failure (RenderError) lands in `failed`; a bug in the thread is re-raised by `next`. `busy_s` is the
    time spent preparing (`times`: by part), `waited_s` the time the renderer waited for it.
    """

    def __init__(self, plans: Sequence[_Plan], pool: ModelPool, ahead: int = 0, batch: int = 1) -> None:
        import collections
        import queue
        import threading

        self.gpu = threading.Lock()
        self.failed: dict[int, RenderError] = {}
        self.busy_s = self.waited_s = 0.0
        self.times: dict[str, float] = {}  # busy_s by part (`_prepare_batch`)
        self._batches = _batches(plans, batch)
        self._pool = pool
        self._next = 0
        self._ready: collections.deque[_Video | None] = collections.deque()
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._streams: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        if ahead > 0 and self._batches:
            self._queue = queue.Queue(maxsize=ahead)
            self._thread = threading.Thread(target=self._work, name="sadtalker-prepare", daemon=True)
            self._thread.start()

    def next(self) -> _Video | None:
        """The next plan's prepared video, or None when its preparation failed (see `failed`)."""
        if not self._ready:
            if self._queue is None:
                batch = self._batches[self._next]
                self._next += 1
                self._ready.extend(self._prepare(batch))
            else:
                started = time.perf_counter()
                item = self._queue.get()
                self.waited_s += time.perf_counter() - started
                if isinstance(item, BaseException):
                    raise item
                self._ready.extend(item)
        return self._ready.popleft()

    def close(self) -> None:
        """Stop preparing (the batch in progress is finished first) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _prepare(self, batch: list[_Plan]) -> list[_Video | None]:
        import torch

        started = time.perf_counter()
        device_type = torch.device(batch[0].job.device).type
        try:
            # float32 networks, also when prepared on demand inside the render loop's autocast (CPU, MPS): the
            # same coefficients as on the CUDA preparation thread, which has no autocast.
            with self._stream(batch[0].job.device), torch.autocast(device_type, enabled=False):
                results = _prepare_batch(batch, self._pool, self.times, self.gpu)
        finally:
            self.busy_s += time.perf_counter() - started
        videos: list[_Video | None] = []
        for plan, result in zip(batch, results, strict=True):
            if isinstance(result, RenderError):
                self.failed[plan.index] = _labelled(result, plan.job)
                result = None
            videos.append(result)
        return videos

    def _stream(self, device: str) -> contextlib.AbstractContextManager:
        """On the thread, its own CUDA stream: its copies to the host then wait for its own small networks only,
        not for the render batches queued on the default stream (which the two would otherwise share)."""
        if self._thread is None or not device.startswith("cuda"):
            return contextlib.nullcontext()
        import torch

        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device, priority=PREPARE_STREAM_PRIORITY)
        return torch.cuda.stream(self._streams[device])

    def _work(self) -> None:
        import queue

        for batch in self._batches:
            if self._stop.is_set():
                return
            try:
                item: list[_Video | None] | BaseException = self._prepare(batch)
            except BaseException as exc:  # noqa: BLE001 - a bug: handed to the renderer's thread by next()
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return


def _batches(plans: Sequence[_Plan], size: int) -> list[list[_Plan]]:
    """`plans` in order, cut into runs of at most `size` plans of one group each."""
    batches: list[list[_Plan]] = []
    for plan in plans:
        if batches and len(batches[-1]) < size and batches[-1][0].group == plan.group:
            batches[-1].append(plan)
        else:
            batches.append([plan])
    return batches


class _Emitter:
    """Hands rendered frames to their videos (paste or resize, then encode) on worker threads, in order.

    While the workers encode batch k on the CPU, the caller renders batch k+1 on the GPU (it waits for the GPU
    without holding the GIL, and PyAV encodes without it, so the workers also run in parallel with each other).
    Each video is pinned to one worker, so its frames stay in order; several videos in a batch are encoded at
    once. At most `DEPTH` batches wait per worker, so memory stays flat. A bug in a worker is re-raised by
    `close`; the worker keeps draining so the caller never blocks on a full queue. `busy_s` (summed over workers)
    and `waited_s` (the caller blocked on full queues) say whether encoding or rendering bounds a run.
    """

    DEPTH = 2

    def __init__(self, workers: int | None = None) -> None:
        import os
        import queue
        import threading

        count = workers or min(4, max(1, (os.cpu_count() or 2) // 2))
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=self.DEPTH) for _ in range(count)]
        self._owner: dict[int, int] = {}
        self._errors: list[BaseException] = []
        self._busy = [0.0] * count
        self.waited_s = 0.0
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"sadtalker-encode-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def busy_s(self) -> float:
        return sum(self._busy)

    def put(self, live: list[tuple[_Video, int]], frames: np.ndarray) -> None:
        parts: dict[int, list[tuple[_Video, np.ndarray]]] = {}
        for (video, _), frame in zip(live, frames, strict=True):
            worker = self._owner.setdefault(id(video), len(self._owner) % len(self._queues))
            parts.setdefault(worker, []).append((video, frame))
        started = time.perf_counter()
        for worker, items in parts.items():
            self._queues[worker].put(items)
        self.waited_s += time.perf_counter() - started

    def _work(self, index: int) -> None:
        failed = False
        while (items := self._queues[index].get()) is not None:
            if failed:
                continue
            started = time.perf_counter()
            try:
                for video, frame in items:
                    _emit(video, frame)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by close()
                self._errors.append(exc)
                failed = True
            self._busy[index] += time.perf_counter() - started

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]


def _frames(
    count: int,
    preparer: _Preparer,
    renderer: FaceRenderer,
    videos: list[_Video],
    finished: Callable[[_Video], None] | None = None,
) -> Iterator[tuple[_Video, int]]:
    """(video, frame index) in render order for the preparer's next `count` videos, each appended to `videos` (and
    given `finished`); a video's per-video state is made just before its first frame."""
    for _ in range(count):
        video = preparer.next()
        if video is None:
            continue
        video.finished = finished
        videos.append(video)
        try:
            _start(video, renderer)
        except RenderError as exc:
            video.error = exc
            continue
        for frame in range(video.num_frames):
            yield video, frame


def _start(video: _Video, renderer: FaceRenderer) -> None:
    import torch

    from renderer.encode import VideoWriter
    from renderer.sadtalker import facerender
    from renderer.sadtalker.transfer import to_device

    device = next(renderer.parameters()).device
    source = to_device(facerender.image_to_tensor(video.source_crop), device)
    semantics = torch.from_numpy(facerender.source_window(video.source_coeff, video.plan.settings.preprocess))[None]
    video.state = renderer.prepare_source(source, to_device(semantics, device))
    width, height = video.frame_size
    video.writer = VideoWriter(Path(video.plan.job.out_dir) / OUTPUT_NAME, width, height)


@dataclasses.dataclass
class _Graphs:
    """A group's recorded render batch (CUDA, renderer/sadtalker/graphs.py): recorded at the first full batch
    and replayed for every later one, bit-identical to the eager pass, and on the first rows for a short last batch
    (so no batch runs eagerly once a graph exists: an eager pass of a new batch size would set up its own cuDNN
    plans); a group shorter than one batch, and failures, run eagerly.
    With `compile` the recorded step is the compiled one (compiled.py, its packages kept in `compiled_dir`); on a
    CPU, with `compile`, full batches call the compiled step (`_Direct`) and the rest run eagerly."""

    batch_size: int
    dtype: Any  # torch dtype of the autocast, None for float32
    device_type: str
    compile: bool = False  # video.compile
    compiled_dir: Path | None = None  # None: a temporary folder, for this run only
    #: The frames the group renders (None: not known), and the fewest for which compiling just in time pays back
    #: where no package compiled ahead of time runs (compiled.JIT_PAYS_BACK_FRAMES; 0 on a CPU, where it always did).
    frames: int | None = None
    jit_min_frames: int = 0
    #: Held while recording: no other thread may use the GPU then (`_Preparer.gpu`).
    lock: contextlib.AbstractContextManager = dataclasses.field(default_factory=contextlib.nullcontext)
    graph: Any = None
    failed: bool = False
    #: Set when a pass ran out of GPU memory: the most rows rendered at once from then on (`_render_rows`).
    max_rows: int | None = None
    #: What happened to the group's rendering (compiling that failed, a step given up); see `run_notes`.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_notes(self) -> list[str]:
        """What the videos rendered from now on report (`_Video.run_notes`): `notes`, and a batch split for memory."""
        if self.max_rows is None:
            return self.notes
        return [
            *self.notes,
            f"video.batch_size {self.batch_size} ran out of GPU memory: frames were rendered {self.max_rows} at a "
            "time (a smaller video.batch_size skips the failed attempt)",
        ]

    def launch(self, renderer: FaceRenderer, *tensors: Any) -> HostCopy | None:
        """The batch queued through the graph (its uint8 frames on their way to the host), or None when it must run
        eagerly."""
        import torch

        from renderer.sadtalker.graphs import GraphUnavailable

        rows = tensors[0].shape[0]
        if (self.device_type != "cuda" and not self.compile) or self.failed or rows > self.batch_size:
            return None
        if self.graph is None:
            if rows < self.batch_size:  # a group shorter than one batch: one eager pass beats recording
                return None
            try:
                with self.lock:
                    self.graph = self._capture(renderer, *tensors)
            except GraphUnavailable as exc:
                logger.warning("%s; rendering without CUDA graphs", str(exc))
            if self.graph is None:
                self.failed = True
                return None
        if not self.graph.matches(*tensors):
            return None
        try:
            return self.graph.launch(*tensors)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            # The compiled step reports any failure as a plain RuntimeError, running out of memory included (the
            # AOTInductor runner does not keep the error's type): give it up and run eagerly, where running out of
            # memory is recognised and the batch gets split (`_render_rows`).
            what = "compiled render step" if self.compile else "recorded render batch"
            logger.warning("the %s failed (%s); rendering without it", what, str(exc))
            self.notes.append(f"the {what} failed ({str(exc).splitlines()[0][:200]}); rendered without it")
            self.graph, self.failed = None, True
            if self.device_type == "cuda":
                torch.cuda.empty_cache()
            return None

    def _capture(self, renderer: FaceRenderer, *tensors: Any) -> Any:
        """The recorded graph, or the compiled step to call per batch (on a CPU, or where recording it failed), or
        None: nothing but the eager pass (a CPU run whose step did not compile)."""
        from renderer.sadtalker.graphs import GraphedRender, GraphUnavailable

        step = None
        if self.compile:
            from renderer.sadtalker import compiled

            try:
                step = compiled.compiled_step(
                    renderer, tensors, self.dtype, self.compiled_dir, self.notes, self.frames, self.jit_min_frames
                )
            except compiled.CompileUnavailable as exc:
                logger.warning("%s; rendering without compiling", str(exc))
                self.notes.append(f"video.compile: {exc}; rendered without compiling")
        if self.device_type != "cuda":
            return None if step is None else _Direct(step, tuple(t.shape for t in tensors))
        if step is not None and not getattr(step, "graphable", True):  # a package whose runner cannot be recorded
            logger.info("the compiled render step runs batch by batch, without CUDA graphs (its runner cannot be "
                        "recorded)")  # fmt: skip
            return _Direct(step, tuple(t.shape for t in tensors), pad=True)
        try:
            return GraphedRender.capture(renderer, *tensors, dtype=self.dtype, step=step)
        except GraphUnavailable as exc:
            if step is None:
                raise
            logger.warning("%s; running the compiled render step without CUDA graphs", str(exc))
            return _Direct(step, tuple(t.shape for t in tensors), pad=True)


@dataclasses.dataclass
class _Direct:
    """The compiled render step called batch by batch: on a CPU, or on CUDA where it cannot be recorded as a graph.
    On CUDA a short batch is padded to the full rows (as a graph replay does: each row is computed on its own), so
    that no eager pass of a new batch size sets up cuDNN plans of its own; on a CPU it runs eagerly, which is
    cheaper than computing the padding rows."""

    step: Callable[..., Any]
    shapes: tuple[Any, ...]
    pad: bool = False

    def matches(self, *tensors: Any) -> bool:
        got = tuple(t.shape for t in tensors)
        if got == self.shapes:
            return True
        rows = got[0][0]
        return self.pad and all(g[0] == rows <= s[0] and g[1:] == s[1:] for g, s in zip(got, self.shapes, strict=True))

    def launch(self, *tensors: Any) -> HostCopy:
        import torch

        from renderer.sadtalker.transfer import HostCopy

        rows, full = tensors[0].shape[0], self.shapes[0][0]
        if rows < full:  # repeat the last row into the rest
            tensors = tuple(torch.cat([t, t[-1:].expand(full - rows, *t.shape[1:])]) for t in tensors)
        return HostCopy(self.step(*tensors)[:rows])


@dataclasses.dataclass
class _InFlight:
    """A launched batch: its rows' (video, frame) and its uint8 frames on their way to the host."""

    live: list[tuple[_Video, int]]
    frames: HostCopy | _Joined


def _launch(renderer: FaceRenderer, batch: list[tuple[_Video, int]], graphs: _Graphs) -> _InFlight | None:
    """Queue one forward pass over frames of possibly several videos, without waiting for it (CUDA: the caller
    assembles and queues the next batch while the GPU renders this one; on a CPU the pass runs here)."""
    import torch

    from renderer.sadtalker import facerender
    from renderer.sadtalker.transfer import to_device

    device = next(renderer.parameters()).device
    live = [(v, f) for v, f in batch if v.error is None]
    if not live:
        return None
    windows = np.concatenate([facerender.target_windows(v.target, [f]) for v, f in live])
    windows = to_device(torch.from_numpy(windows), device)
    feature = torch.cat([v.state.feature for v, _ in live])
    kp_canonical = torch.cat([v.state.kp_canonical for v, _ in live])
    kp_source = torch.cat([v.state.kp_source for v, _ in live])
    try:
        frames = _render_rows(renderer, graphs, feature, kp_canonical, kp_source, windows)
        if notes := graphs.run_notes:
            for video, _ in live:
                video.run_notes.extend(note for note in notes if note not in video.run_notes)
    except torch.cuda.OutOfMemoryError as exc:
        logger.warning("out of GPU memory: %s", str(exc))
        for video, _ in live:
            video.error = BackendError(
                f"out of GPU memory rendering a single frame at size {video.plan.settings.size}",
                "use video.dtype: float16, video.size: 256, or a GPU with more free memory",
            )
        return None
    return _InFlight(live, frames)


def _render_rows(renderer: FaceRenderer, graphs: _Graphs, *tensors: Any) -> HostCopy | _Joined:
    """The frames of these rows, queued: through the recorded graph, or eagerly. Where a pass runs out of GPU memory
    the rows are rendered in halves, and every later batch of the group in pieces of at most that size
    (`_Graphs.max_rows`): frames do not depend on their batch companions. Raises OutOfMemoryError only for a single
    row."""
    import torch

    from renderer.sadtalker.graphs import RenderStep
    from renderer.sadtalker.transfer import HostCopy

    rows = tensors[0].shape[0]
    if graphs.max_rows is not None and rows > graphs.max_rows:
        step = graphs.max_rows
        return _Joined(
            [_render_rows(renderer, graphs, *(t[i : i + step] for t in tensors)) for i in range(0, rows, step)]
        )
    try:
        frames = graphs.launch(renderer, *tensors)
        return frames if frames is not None else HostCopy(RenderStep(renderer, graphs.dtype)(*tensors))
    except torch.cuda.OutOfMemoryError:
        if rows == 1:
            raise
    torch.cuda.empty_cache()  # the failed pass's blocks, for the smaller ones
    graphs.max_rows = rows // 2
    logger.warning("out of GPU memory rendering %d frames at once; rendering at most %d at a time", rows, rows // 2)
    return _render_rows(renderer, graphs, *tensors)


@dataclasses.dataclass
class _Joined:
    """The frames of a batch rendered in pieces (`_render_rows`), in order; `result()` as HostCopy's."""

    parts: list[Any]  # HostCopy | _Joined

    def result(self) -> Any:
        import torch

        return torch.cat([part.result() for part in self.parts])


def _hand_on(done: _InFlight | None, launched: _InFlight | None, emitter: _Emitter) -> _InFlight | None:
    """Wait for the earlier batch `done` and hand its frames to the encoders (the GPU meanwhile renders the batch
    just `launched`, queued behind it); returns `launched`, the batch now in flight."""
    if done is not None:
        emitter.put(done.live, done.frames.result().numpy())
    return launched


def _emit(video: _Video, frame: np.ndarray) -> None:
    from renderer.sadtalker.preprocess import resize_bilinear

    if video.error is not None or video.writer is None:
        return
    try:
        if video.paste is not None:
            frame = video.paste(frame)
        elif frame.shape[1::-1] != video.frame_size:
            frame = resize_bilinear(frame, video.frame_size)
        video.writer.write(frame)
    except OSError as exc:
        video.error = BackendError(f"cannot write {video.writer.path}: {exc}", "check free disk space")
        video.writer.abort()
        return
    except Exception as exc:  # noqa: BLE001 - an encoder refusal, a bug: this video fails, not the others
        logger.warning("a video failed while its frames were encoded", exc_info=True)
        video.error = as_render_error(exc)
        video.writer.abort()
        return
    video.written += 1
    if video.written == video.num_frames:
        _finish(video)
        if video.error is None and video.finished is not None:
            video.finished(video)


def _finish(video: _Video) -> None:
    """Close the writer of a video with all its frames, drop it otherwise (an error, or the loop left early:
    Ctrl-C, a failure), and release the per-video tensors."""
    writer, video.writer, video.state = video.writer, None, None
    if writer is None:
        return
    if video.error is not None or video.written < video.num_frames:
        writer.abort()
        return
    try:
        writer.close()
    except OSError as exc:
        video.error = BackendError(f"cannot write {writer.path}: {exc}", "check free disk space")
    except Exception as exc:  # noqa: BLE001 - as in _emit: this video only
        video.error = as_render_error(exc)


def _autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def _info(video: _Video) -> dict:
    settings = video.plan.settings
    return {
        "renderer": "sadtalker",
        "frames": video.written,
        "size": list(video.frame_size),
        "render_size": settings.size,
        "preprocess": settings.preprocess,
        "still": settings.still,
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "checkpoints": "legacy" if video.plan.ckpt.legacy else "v0.0.2",
        "warnings": list(video.plan.warnings),
        "run_notes": list(video.run_notes),
    }


def _copy(exc: RenderError) -> RenderError:
    """A fresh error of the same type per job (each gets its own label), keeping the cause."""
    copy = type(exc)(exc.message, exc.hint)
    copy.__cause__ = exc.__cause__
    return copy


def _labelled(exc: RenderError, job: StepJob) -> RenderError:
    if job.label and job.label not in exc.message:
        exc.message = f"{job.label}: {exc.message}"
        exc.args = (exc.message,)
    return exc
