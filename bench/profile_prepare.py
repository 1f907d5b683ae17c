"""Where the SadTalker stage's preparation time goes (steps 2–3: faces, 3DMM, audio networks), on one device.

Prints, with fill-rule checkpoints in the official layout (needs ../shared/sadtalker) and the astronaut portrait:

* load time of each network (the 3DMM regressor, ExpNet, PoseVAE, the renderer);
* `pipeline._prepare_batch` of 1, 4 and 8 clips of 4 s: first call (new input shapes) and again (same shapes);
* 1 and 8 clips while another thread replays render batches on the GPU, as during a run (CUDA only), on a stream
  of their own: with the stage's copies through pinned buffers (`transfer.py`), then with plain pageable copies;
* first call vs repeat of ExpNet for new frame counts (does each new input shape cost extra set-up?).

    python bench/profile_prepare.py --device cuda --landmarks .gpu/astronaut_face.npz
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sadtalker as bench  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, step) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--landmarks", type=Path, help="saved face (bench_sadtalker.py --save-landmarks)")
    parser.add_argument("--render-batch", type=int, default=16)
    parser.add_argument("--skip-alone", action="store_true", help="only the runs beside the render loop")
    args = parser.parse_args()
    import torch

    from renderer.base import ModelPool
    from renderer.sadtalker import audio2coeff, pipeline, recon, weights

    if bench._fill() is None:
        raise SystemExit("needs ../shared/sadtalker for the fill-rule checkpoints")
    bench.use_landmarks(args.landmarks)
    device = args.device
    work = bench.scratch_dir("profile_prepare_")
    ckpt_root = work / "ckpt"
    ckpt_root.mkdir()
    bench.write_checkpoints(ckpt_root)
    jobs = [bench._stage_job(work, f"clip{i}", 4.0, device, ckpt_root, seed=i, batch_size=16) for i in range(24)]
    plans = [pipeline._plan(i, job) for i, job in enumerate(jobs)]
    ckpt = plans[0].ckpt
    pool = ModelPool()

    print(f"preparation on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'})")
    for name, build in (
        ("face_3drecon", recon.ReconNet.from_state_dict),
        ("audio2exp", audio2coeff.ExpNet.from_state_dict),
        ("audio2pose", audio2coeff.PoseVAE.from_state_dict),
    ):
        seconds = _timed(device, lambda: pipeline._pooled(pool, ckpt, name, device, build))  # noqa: B023
        print(f"  load {name}: {seconds:.2f} s")
    renderer = None

    def load_renderer() -> None:
        nonlocal renderer
        renderer = weights.load_face_renderer(ckpt.root, 256, "crop", device)

    print(f"  load renderer: {_timed(device, load_renderer):.2f} s")

    def prepare(count: int, offset: int) -> str:
        times: dict[str, float] = {}
        seconds = _timed(device, lambda: pipeline._prepare_batch(plans[offset : offset + count], pool, times))
        parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in times.items())
        return f"{seconds * 1e3:.0f} ms ({parts})"

    for count in () if args.skip_alone else (1, 4, 8):
        print(f"  prepare {count} clips: first {prepare(count, 0)}; again {prepare(count, 8)}", flush=True)

    if device.startswith("cuda"):
        from renderer.sadtalker import facerender

        batch = args.render_batch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            video = pipeline._prepare_batch(plans[:1], pool)[0]
            pipeline._start(video, renderer)
            state = video.state
            feature = state.feature.expand(batch, *state.feature.shape[1:]).contiguous()
            kp_c = state.kp_canonical.expand(batch, -1, -1).contiguous()
            kp_s = state.kp_source.expand(batch, -1, -1).contiguous()
            windows = torch.from_numpy(facerender.target_windows(video.target, list(range(batch)))).to(device)
            graphs = pipeline._Graphs(batch, torch.float16, "cuda")
            graphs.launch(renderer, feature, kp_c, kp_s, windows).result()

        def beside(label: str, counts: tuple[int, ...]) -> None:
            stop = threading.Event()
            rendered = [0]

            def render_loop() -> None:
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    while not stop.is_set():
                        graphs.launch(renderer, feature, kp_c, kp_s, windows).result()
                        rendered[0] += batch

            thread = threading.Thread(target=render_loop, daemon=True)
            thread.start()
            time.sleep(0.5)
            start, frames = time.perf_counter(), rendered[0]
            for count in counts:
                with torch.cuda.stream(torch.cuda.Stream()):
                    first, again = prepare(count, 0), prepare(count, 8)
                print(f"  beside the render loop, {label}, prepare {count} clips: {first}; again {again}", flush=True)
            fps = (rendered[0] - frames) / (time.perf_counter() - start)
            stop.set()
            thread.join()
            print(f"  the render loop meanwhile: {fps:.0f} frames/s", flush=True)

        beside("copies through pinned buffers (transfer.py)", (1, 8))
        # The same with the plain pageable copies the stage used before (tensor.cpu(), tensor.to(device)).
        from renderer.sadtalker import graphs as graphs_module
        from renderer.sadtalker import transfer

        plain_host = lambda tensor: tensor.detach().cpu()  # noqa: E731
        plain_device = lambda tensor, device, dtype=None: tensor.to(device, dtype)  # noqa: E731

        class PlainCopy:  # transfer.HostCopy's interface, copying at once through pageable memory
            def __init__(self, tensor: torch.Tensor) -> None:
                self._host = plain_host(tensor)

            def result(self) -> torch.Tensor:
                return self._host

        graphs_module.HostCopy = PlainCopy
        for module in (audio2coeff, recon):
            if hasattr(module, "to_host"):
                module.to_host = plain_host
            if hasattr(module, "to_device"):
                module.to_device = plain_device
        assert transfer.to_host is not plain_host
        beside("plain pageable copies", (1,))

    if args.skip_alone:
        return
    exp_net = pipeline._pooled(pool, ckpt, "audio2exp", device, audio2coeff.ExpNet.from_state_dict)
    ref = torch.zeros(64).numpy()
    for frames in (100, 101, 102, 400, 401):
        mel = torch.randn(frames, 1, 80, 16).numpy()
        blink = torch.zeros(frames, 1).numpy()
        first = _timed(device, lambda: audio2coeff.predict_expression(exp_net, mel, ref, blink))  # noqa: B023
        again = _timed(device, lambda: audio2coeff.predict_expression(exp_net, mel, ref, blink))  # noqa: B023
        print(f"  ExpNet over {frames} frames: first {first * 1e3:.1f} ms, again {again * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
