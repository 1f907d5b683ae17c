#!/usr/bin/env bash
# Every GPU check and benchmark of the project, as one prepared script for a lent GPU machine (CI has none).
#
#   bash bench/gpu_check.sh prepare      on the development machine (needs .venv and ../shared): fills .whl/, .gpu/
#   bash bench/gpu_check.sh PART...      on the GPU machine, PART: setup pytest speed compiled sd clips memory cudnn
#                                        big profile prepstage halfweights kernels cudnnrelu clipscompiled sdcompile
#                                        rendermemory aotiprobe jit jitgraph (default: setup pytest speed compiled sd clips
#                                        memory cudnn profile, in this order: about 12 minutes on an H100, so
#                                        through the device tool run it as two calls, e.g. "setup pytest speed
#                                        compiled" then "setup sd clips memory cudnn profile")
#
# The GPU machine has PyTorch with CUDA but not this project's other packages and no network: wheels for
# diffusers, PyAV, soxr and importlib_metadata travel in .whl/, and .gpu/ holds what the tests and benches read from
# outside the repository (a copy of ../shared/sadtalker's inventories, fill rule and the generator golden file, and
# the astronaut's face from `bench_sadtalker.py --save-landmarks`, since dlib's 99 MB landmark model does not
# travel). Both folders are git-ignored (.git/info/exclude). Each part has its own time limit and writes its log to
# $OUT/<part>.log. Results of a run: bench/results/. Through the device tool: carry [".whl", ".gpu"].
set -u

if [ "${1:-}" = prepare ]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
    for wheel in diffusers==0.42.1 av==18.1.0 soxr==1.1.0 importlib_metadata; do
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    ref=../shared/sadtalker
    mkdir -p .gpu/shared/sadtalker/golden/public
    cp -r "$ref/inventory" "$ref/data" .gpu/shared/sadtalker/
    cp "$ref/golden/fill.py" "$ref/golden/fill_checksums.json" .gpu/shared/sadtalker/golden/
    cp "$ref"/golden/public/net_generator.* .gpu/shared/sadtalker/golden/public/
    .venv/bin/python bench/bench_sadtalker.py --save-landmarks .gpu/astronaut_face.npz
    du -sh .whl .gpu
    exit 0
fi
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LANDMARKS=.gpu/astronaut_face.npz
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(setup pytest speed compiled sd clips memory cudnn profile)

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $(date +%T) $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    echo "=== $(date +%T) $name exit ${PIPESTATUS[0]}"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared

for p in "${parts[@]}"; do
    case $p in
    setup)
        # g++ builds AOTInductor's wrapper (video.compile); without it the stage compiles just in time instead
        part setup 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
if command -v g++ >/dev/null; then g++ --version | head -1; else echo "no g++: AOTInductor packages cannot be built"; fi
command -v gdb || command -v cuda-gdb || echo "neither gdb nor cuda-gdb: aotiprobe prints no native backtrace"
command -v nvcc >/dev/null && nvcc --version | tail -2 | head -1
python3 -c "
import torch, diffusers, transformers, av, soxr
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version())
print(\"diffusers\", diffusers.__version__, \"transformers\", transformers.__version__, \"av\", av.__version__)
print(torch.cuda.get_device_name(0))
try:
    import triton; print(\"triton\", triton.__version__)
except ImportError:
    print(\"no triton: torch.compile unavailable\")"' ;;
    pytest)
        # PYTEST_K: only the GPU tests it selects (pytest -k)
        part pytest "${PYTEST_LIMIT:-300}" env RUN_GPU=1 python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider -m gpu \
            -k "${PYTEST_K:-gpu}" tests/test_sadtalker_render.py ;;
    speed)
        part speed 200 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.0 ;;
    compiled)  # video.compile: true (compiled.py: AOTInductor package, loaded, recorded as a CUDA graph); each
        # shape compiles once (about a minute), then the bench loads the package again and times that too
        part compiled 150 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.5 \
            --modes compiled --dtypes float16 --sizes 256 --batches 32
        part compiled 120 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.5 \
            --modes compiled --dtypes float16 --sizes 512 --batches 8 ;;
    sd)
        # channels-last + fused QKV measured slower on an H100 (bench/results/2026-11-26-h100): not repeated.
        part sd 80 python3 bench/bench_sd.py --batch-sizes 8 16 --repeats 2
        part sd 60 python3 bench/bench_sd.py --batch-sizes 16 --repeats 2 --cudnn-benchmark
        part sd 60 python3 bench/bench_sd.py --stage --batch-sizes 16 --repeats 2 ;;
    sdcompile)
        part sdcompile 240 python3 bench/bench_sd.py --compile --batch-sizes 8 16 --repeats 2 ;;
    clips)  # the one-process-per-clip arm runs $COLD_CLIPS (5) of the 20 clips (each ~10 s) and scales their mean;
        # one warm run per preparation setting in $PREPARE ("AHEAD:BATCH" ...)
        part clips 300 python3 bench/bench_sadtalker.py --device cuda --skip-speed --skip-memory --clips 20 \
            --cold-clips "${COLD_CLIPS:-5}" --batch-size 16 --landmarks "$LANDMARKS" --prepare ${PREPARE:-0:1 1:4 1:8} ;;
    clipscompiled)  # the same with video.compile: true, the package compiled once beforehand; the cold arm runs
        # compiled (loading the package) and not compiled (the seed's way)
        part clipscompiled "${CLIPS_LIMIT:-450}" python3 bench/bench_sadtalker.py --device cuda --skip-speed --skip-memory --clips 20 \
            --cold-clips "${COLD_CLIPS:-3}" --batch-size 16 --landmarks "$LANDMARKS" --compile --prepare 1:4 ;;
    memory)
        part memory 150 python3 bench/bench_sadtalker.py --device cuda --skip-speed --batch-size 16 \
            --landmarks "$LANDMARKS" ;;
    big)  # 512 × 32 as a CUDA graph alone (on an 80 GB H100 recording runs out of memory and the stage stays eager)
        part big 90 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.0 --sizes 512 \
            --batches 32 --dtypes float16 --modes graph ;;
    halfweights)  # float16 graphs with the weights stored in float16 (the stage) vs float32 cast per batch (before)
        for flag in "" --float32-weights; do
            part halfweights 60 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.0 \
                --sizes 256 --batches 1 8 16 --dtypes float16 --modes graph $flag
        done ;;
    kernels)  # the Triton kernels (renderer/sadtalker/kernels.py, on by default) against the same renderer without
        # them (DHB_TRITON_KERNELS=0), graphs, float16; then the profile with them
        for on in 1 0; do
            part kernels 100 env DHB_TRITON_KERNELS=$on python3 bench/bench_sadtalker.py --device cuda --skip-memory \
                --min-seconds 1.0 --sizes 256 512 --batches 8 16 --dtypes float16 --modes graph
        done
        part kernels 60 python3 bench/profile_sadtalker.py --size 256 --batch 16 --dtype float16 --by-module 3 \
            --shapes 25 ;;
    cudnnrelu)  # the cuDNN fused convolution + ReLU and broadcast upsampling options, still off by default
        for flags in "" --broadcast-upsample --fused-conv-relu; do
            part cudnnrelu 60 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.0 \
                --sizes 256 --batches 16 --dtypes float16 --modes graph $flags
        done ;;
    prepstage)  # where the preparation's time goes (loads, batches, beside a render loop, new shapes)
        part prepstage 120 python3 bench/profile_prepare.py --device cuda --landmarks "$LANDMARKS" ${PREPSTAGE_ARGS:-} ;;
    jitgraph)  # the just-in-time fallback's frame rate against the CUDA graph's, in one process (no package tried)
        part jitgraph 150 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.5 \
            --modes graph compiled --variants none --dtypes float16 --sizes 256 --batches 16 ;;
    jit)  # the fallback where no package loads: torch.compile with TorchInductor's cache empty, then warm
        part jit 200 python3 bench/bench_compiled.py --jit --device cuda --dtype float16 --batch 16 ;;
    aotiprobe)  # which AOTInductor packages load and run here (a small model, eight variants, each in its own process; at the first crash the library's ldd, opening it alone, and a gdb or cuda-gdb backtrace)
        part aotiprobe "${AOTI_LIMIT:-240}" python3 bench/probe_aoti.py ;;
    rendermemory)  # peak allocated during one render batch, float16, each setting in a fresh process
        part rendermemory 120 python3 bench/bench_render_memory.py --device cuda --sizes 256 512 --batches 1 8 ;;
    profile)
        part profile 60 python3 bench/profile_sadtalker.py --size 256 --batch 16 --dtype float16 --by-module 4 ;;
    cudnn)
        part cudnn 90 python3 bench/bench_sadtalker.py --device cuda --skip-memory --min-seconds 1.5 \
            --cudnn-benchmark --batches 8 32 --dtypes float16 ;;
    *) echo "unknown part $p" ;;
    esac
done
