"""Speed and memory of the puppet animator (renderer/puppet/). Goals on a 2-core CPU machine: the whole offline
path (voice + animate + mux, `bench/bench_pipeline.py`) ≤ 0.1 s of CPU per second of video at 256 px and ≤ 0.3 at
512 px, of which this stage is most; and flat memory (frames stream into the encoder: a 10-minute clip needs no more
memory than a 1-minute one).

Speed: about 10 s of Piper speech (synthetic speech-like audio if Piper is missing), the astronaut portrait,
preprocess crop. Reported per second of video: wall time and CPU time of the whole stage after one untimed run
(dlib loaded, libraries imported; face detection, rig set-up, drawing, H.264 encoding), then drawing alone and
encoding alone, with the stage's thread and encoder settings.
Memory: each clip length runs in a fresh subprocess that reports its peak RSS and tracemalloc peak (its "run s"
is slowed several times by tracemalloc itself).
x264: with --x264, CPU per frame, file size and Y PSNR of several x264 settings on the frames drawn.

    python bench/bench_puppet.py                    # speed at 256 and 512, memory 1 min vs 10 min
    python bench/bench_puppet.py --memory-minutes 0.5 2 --sizes 256
    python bench/bench_puppet.py --memory-minutes --x264   # speed and the x264 settings, no memory runs
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from renderer.base import FPS, SAMPLE_RATE, ModelPool  # noqa: E402
from renderer.puppet import pipeline as puppet  # noqa: E402
from tests._puppet_util import PORTRAITS, animate_job, babble, speak, write_wav  # noqa: E402

GOALS = {256: 0.1, 512: 0.3}
TEXT = (
    "Good morning, everyone. I am the chief executive of a small company, and today I will tell you about our "
    "plans for the coming year: two new offices, a better product, and more time for the people who build it."
)


def speech_audio(folder: Path, pool: ModelPool) -> tuple[Path, Path | None, str]:
    try:
        wav, phonemes = speak(TEXT, folder / "speech", pool)
        return wav, phonemes, "Piper speech"
    except Exception as exc:  # noqa: BLE001 - the benchmark falls back to synthetic audio whatever went wrong
        print(f"(Piper unavailable: {exc}; using synthetic speech-like audio)")
        return write_wav(folder / "babble.wav", babble(10.0)), None, "synthetic audio"


#: x264 settings compared by --x264 (preset, x264-params), the puppet's own among them.
X264_CHOICES = [
    ("medium", ""),
    ("veryfast", ""),
    ("veryfast", "me=dia:subme=1"),
    ("veryfast", "me=dia:subme=1:partitions=i8x8,i4x4"),
    ("superfast", ""),
    ("ultrafast", ""),
]


def bench_x264(frames: list, folder: Path, size: int) -> None:
    """CPU per frame (one thread), file size and Y PSNR against the drawn frames for each of X264_CHOICES."""
    import cv2

    from renderer.encode import VideoWriter, read_frames

    planes = [cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420) for frame in frames]
    print(f"x264 at {size} px, crf 18, one thread, {len(frames)} frames:")
    print("preset     x264-params                              CPU ms/frame    KB  Y PSNR dB")
    for preset, params in X264_CHOICES:
        path = folder / f"x264-{size}-{preset}.mp4"
        cpu = time.process_time()
        with VideoWriter(path, size, size, preset=preset, threads=1, x264_params=params) as writer:
            for plane in planes:
                writer.write_i420(plane)
        cpu = (time.process_time() - cpu) * 1000 / len(frames)
        luma = [cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420)[:size] for f in read_frames(path)]
        mse = np.mean([np.mean((a.astype(np.float64) - p[:size]) ** 2) for a, p in zip(luma, planes, strict=True)])
        print(
            f"{preset:10s} {params:40s} {cpu:12.2f} {path.stat().st_size // 1024:5d} {10 * np.log10(255**2 / mse):10.2f}"
        )


def bench_speed(sizes: list[int], x264: bool = False) -> None:
    import cv2

    from renderer.encode import VideoWriter
    from renderer.faces import detect_face, load_image
    from renderer.puppet.motion import make_tracks, read_audio_features
    from renderer.puppet.rig import FaceRig, Pose

    pool = ModelPool()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wav, phonemes, kind = speech_audio(folder, pool)
        portrait = PORTRAITS / "astronaut.jpg"
        image = load_image(portrait)
        face = detect_face(image, str(portrait), pool)  # loads dlib into the pool: not part of the timing
        # One untimed run: the first also imports SciPy's Delaunay and the encoder (0.3 s: a cost per process).
        puppet.run([animate_job(folder / "warm-up", wav, portrait=portrait, phonemes=phonemes, size=sizes[0])], pool)
        features = read_audio_features(wav)
        seconds = features.frames / FPS
        print(f"audio: {kind}, {features.samples / SAMPLE_RATE:.2f} s, {features.frames} frames")
        print("size  stage wall s/s  stage cpu s/s  draw s/s  encode s/s  goal")
        for size in sizes:
            job = animate_job(folder / f"out{size}", wav, portrait=portrait, phonemes=phonemes, size=size)
            wall, cpu = time.perf_counter(), time.process_time()
            (result,) = puppet.run([job], pool)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if not isinstance(result, dict):
                raise SystemExit(f"animate failed: {result}")
            # The two halves on their own: drawing frames, and encoding the same frames.
            framing = puppet.frame_face(image, face.landmarks, size, "crop")
            rig = FaceRig(framing.image, framing.landmarks)
            tracks = make_tracks(features, [], seed=1)
            frames = []
            settings = {
                "preset": puppet.ENCODER_PRESET,
                "threads": puppet.THREADS,
                "x264_params": puppet.ENCODER_PARAMS,
            }
            with puppet._opencv_threads(puppet.THREADS):  # as the stage runs
                draw = time.perf_counter()
                for i in range(features.frames):
                    pose = Pose(tracks.mouth_open[i], tracks.mouth_width[i], tracks.blink[i], tracks.yaw[i],
                                tracks.pitch[i], tracks.roll[i])  # fmt: skip
                    frame, _ = rig.render(pose)
                    if i < 250:
                        frames.append(frame)
                draw = time.perf_counter() - draw
                encode = time.perf_counter()
                with VideoWriter(folder / f"enc{size}.mp4", size, size, **settings) as writer:
                    for frame in frames:
                        writer.write_i420(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420))
                encode = (time.perf_counter() - encode) * features.frames / len(frames)
            if x264:
                bench_x264(frames, folder, size)
            goal = GOALS.get(size)
            verdict = "" if goal is None else f"CPU ≤ {goal:.1f} {'ok' if cpu / seconds <= goal else 'MISSED'}"
            print(
                f"{size:4d}  {wall / seconds:13.3f}  {cpu / seconds:13.3f}  {draw / seconds:8.3f}  "
                f"{encode / seconds:10.3f}  {verdict}"
            )


def write_long_wav(path: Path, seconds: float) -> Path:
    """Synthetic speech-like audio written in 10 s blocks (so making it costs no memory either)."""
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        done = 0.0
        while done < seconds:
            block = babble(min(10.0, seconds - done), seed=int(done))
            out.writeframes((block * 32767).astype("<i2").tobytes())
            done += 10.0
    return path


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    VmHWM from /proc on Linux: getrusage's ru_maxrss survives exec, so a child started by a big parent would
    report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(wav: Path, minutes: float, size: int) -> None:
    """Run in a subprocess: animate the WAV and print peak memory as JSON."""
    import tracemalloc

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tracemalloc.start()
        start = time.perf_counter()
        (result,) = puppet.run([animate_job(folder / "out", wav, size=size)], ModelPool())
        elapsed = time.perf_counter() - start
        _, traced_peak = tracemalloc.get_traced_memory()
        if not isinstance(result, dict):
            raise SystemExit(f"animate failed: {result}")
        rss_peak = peak_rss()
        print(
            json.dumps(
                {
                    "minutes": minutes,
                    "frames": result["frames"],
                    "seconds": round(elapsed, 1),
                    "rss_peak_mb": round(rss_peak / 2**20, 1),
                    "traced_peak_mb": round(traced_peak / 2**20, 1),
                }
            )
        )


def bench_memory(lengths: list[float], size: int) -> None:
    print(f"memory at {size} px (each length in a fresh process; synthetic audio):")
    print("minutes  frames  run s   peak RSS MB  tracemalloc peak MB")
    for minutes in lengths:
        with tempfile.TemporaryDirectory() as tmp:
            wav = write_long_wav(Path(tmp) / "long.wav", minutes * 60.0)
            command = [sys.executable, __file__, "--memory-child", str(wav), "--minutes", str(minutes)]
            out = subprocess.run([*command, "--sizes", str(size)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{row['minutes']:7.1f}  {row['frames']:6d}  {row['seconds']:5.0f}  {row['rss_peak_mb']:11.1f}  "
            f"{row['traced_peak_mb']:19.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--memory-minutes", type=float, nargs="*", default=[1.0, 10.0])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--x264", action="store_true", help="also compare x264 settings on the drawn frames")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--minutes", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.minutes, args.sizes[0])
        return
    if not args.skip_speed:
        bench_speed(args.sizes, args.x264)
    if args.memory_minutes:
        bench_memory(args.memory_minutes, args.sizes[0])


if __name__ == "__main__":
    main()
