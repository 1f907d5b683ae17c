"""Command line: `dhbatch plan|build|gc|validate`. The only place that prints and exits."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch import __version__, fleet
from batch.cache import Cache, sweep_stale_tmp
from batch.errors import DHBatchError, DiskFullError, ManifestError, UsageError, disk_full_path
from batch.locking import holding
from batch.manifest import Manifest, display_path, load_manifest, project_root
from batch.plan import (
    Plan,
    load_state,
    lock_output_folder,
    owner_state,
    plan_manifest,
    select_videos,
    template_problems,
)
from batch.shard import parse_shard, shard_videos
from batch.stages import ORDER

if TYPE_CHECKING:
    from batch.run import RunResult

logger = logging.getLogger("batch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_IO = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dhbatch", description="Turn YAML manifests into talking-head videos, rebuilding only what changed."
    )
    p.add_argument("--version", action="version", version=f"dhbatch {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, many: bool = False) -> None:
        # -v/-q also after the command (SUPPRESS: when absent there, the value given before the command stands).
        sp.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0, help=argparse.SUPPRESS)
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if many:
            sp.add_argument("manifests", nargs="+", type=Path, metavar="MANIFEST")
        else:
            sp.add_argument("manifest", type=Path, metavar="MANIFEST")
        sp.add_argument(
            "--build-dir",
            type=Path,
            help="outputs and cache (default: build/ beside the project's checkpoints/ or .git)",
        )
        sp.add_argument("--checkpoints", type=Path, help="weights folder (default: checkpoints/ in the project root)")

    def selection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--only", nargs="+", default=[], metavar="ID", help="only these video ids")
        sp.add_argument(
            "--force",
            nargs="?",
            const="all",
            action="append",
            default=[],
            metavar="STAGE",
            help=f"rebuild even if cached: every step, or one stage ({', '.join(ORDER)})",
        )
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("--shard", type=_shard_arg, metavar="I/N", help="only shard I of N (CI job matrices)")

    sp = sub.add_parser("plan", help="show what a build would do and why (exit 0: up to date, 1: something to build)")
    common(sp)
    selection(sp)
    sp.add_argument(
        "--verify", action="store_true", help="read every cached output and check its sha256 (a damaged one is rebuilt)"
    )

    sp = sub.add_parser("build", help="build the videos whose inputs changed")
    common(sp)
    selection(sp)
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps (default auto)")
    sp.add_argument("--jobs", "-j", type=int, default=1, help="parallel CPU steps (voice, puppet, mux)")
    sp.add_argument("--fail-fast", action="store_true", help="stop at the first failing video")

    sp = sub.add_parser("gc", help="remove cache entries that none of the given manifests reaches")
    common(sp, many=True)
    sp.add_argument("--yes", action="store_true", help="delete (without it, only show)")

    sp = sub.add_parser("validate", help="check a manifest and exit")
    common(sp)
    fleet.add_parsers(sub, common)
    return p


def _shard_arg(text: str) -> Any:
    try:
        return parse_shard(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _untangle(argv: list[str]) -> list[str]:
    """Keep the optional values of --force and --only from swallowing the manifest: `--force m.yaml` means
    `--force all m.yaml`, and a manifest file after `--only` ids is taken as the manifest."""
    out: list[str] = []
    manifests: list[str] = []
    in_only = False
    for i, token in enumerate(argv):
        if token.startswith("-"):
            in_only = token == "--only"
            out.append(token)
            if token == "--force" and i + 1 < len(argv) and argv[i + 1].endswith((".yaml", ".yml")):
                out.append("all")
            continue
        if in_only and token.endswith((".yaml", ".yml")) and Path(token).is_file():
            manifests.append(token)
            continue
        out.append(token)
    if manifests:  # the manifest goes right after the command
        at = next((i + 1 for i, t in enumerate(out) if t in ("plan", "build", "gc", "validate")), len(out))
        out[at:at] = manifests
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_untangle(sys.argv[1:] if argv is None else list(argv)))
    args.verbose += args.verbose_after  # -v before and after the command add up
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        commands = {"plan": cmd_plan, "build": cmd_build, "gc": cmd_gc, "validate": cmd_validate, **fleet.COMMANDS}
        return commands[args.command](args)
    except ManifestError as exc:
        print(
            f"error: invalid manifest ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except DHBatchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing partial was kept; run the same command again to resume", file=sys.stderr)
        return _exit_status["signal"]
    except OSError as exc:  # a full disk, a read-only build folder: say which file, not a traceback
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        logger.debug("details", exc_info=True)
        return EXIT_IO


#: Exit status after an interruption: 130 for Ctrl-C (SIGINT), 143 for a kill (SIGTERM), as shells report them.
_exit_status = {"signal": 130}


def _terminate(signum: int, frame: Any) -> None:
    _exit_status["signal"] = 128 + signum
    raise KeyboardInterrupt


def _setup(args: argparse.Namespace, manifest_path: Path) -> tuple[Manifest, Path, Path, Cache]:
    manifest = load_manifest(manifest_path)
    root = project_root(manifest_path)
    build_dir = (args.build_dir or root / "build").resolve()
    checkpoints = (args.checkpoints or root / "checkpoints").resolve()
    return manifest, build_dir, checkpoints, Cache(build_dir / "cache", deep=getattr(args, "verify", False))


def _plan(
    args: argparse.Namespace, setup: tuple[Manifest, Path, Path, Cache] | None = None
) -> tuple[Plan, Cache, Path]:
    for f in args.force:
        if f not in (*ORDER, "all"):
            raise UsageError(f"--force {f!r}: not a stage", f"use one of {', '.join(ORDER)}, or --force alone for all")
    manifest, build_dir, checkpoints, cache = setup or _setup(args, args.manifest)
    videos = shard_videos(manifest, select_videos(manifest, args.only), args.shard)
    plan = plan_manifest(manifest, cache, build_dir=build_dir, checkpoints=checkpoints, videos=videos, force=args.force)
    return plan, cache, checkpoints


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    if problems := template_problems(manifest):
        raise ManifestError(problems)
    print(
        f"{display_path(manifest.path)}: ok — {len(manifest.characters)} characters, {len(manifest.scripts)} scripts, {len(manifest.videos)} videos"
    )
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    plan, _, _ = _plan(args)
    if args.json:
        print(json.dumps({**plan.as_dict(), **({"shard": str(args.shard)} if args.shard else {})}, indent=2))
    else:
        print_plan(plan)
    return EXIT_FAILED if plan.stale else EXIT_OK


def print_plan(plan: Plan) -> None:
    runs = len({d.key for v in plan.videos for d in v.decisions if not d.cached})  # a shared step runs once
    for v in plan.videos:
        mark = "stale" if v.stale else "up to date"
        print(f"{v.video.id} ({v.renderer}): {mark}")
        for d in v.decisions:
            print(f"  {d.stage:<8} {'cached' if d.cached else 'run':<6} {d.key[:12]}  {d.reason}")
        if not v.published and not any(not d.cached for d in v.decisions):
            print(f"  publish  {display_path(v.output)} is missing or differs: the build copies it from the cache")
    for vid in plan.removed:
        print(f"{vid}: no longer in the manifest: the build removes {vid}.mp4")
    unpublished = sum(not v.published for v in plan.videos)
    totals = [f"{len(plan.videos)} videos", f"{runs} steps to run" if runs else "all cached"]
    if unpublished:
        totals.append(f"{unpublished} to publish")
    if plan.removed:
        totals.append(f"{len(plan.removed)} to remove")
    print(", ".join(totals))


def cmd_build(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise UsageError(f"--device {args.device!r} is not a device", "use auto, cpu, cuda, cuda:N or mps")
    manifest, build_dir, checkpoints, cache = _setup(args, args.manifest)
    with holding(lock_output_folder(build_dir, manifest)):  # ownership is checked, and kept, under the lock
        out_dir = build_dir / manifest.name
        for folder in (out_dir, out_dir / "thumbs"):
            sweep_stale_tmp(folder)  # what killed runs left half-written (the cache sweeps its own)
        plan, cache, checkpoints = _plan(args, (manifest, build_dir, checkpoints, cache))
        return _build(args, plan, cache, checkpoints)


def _build(args: argparse.Namespace, plan: Plan, cache: Cache, checkpoints: Path) -> int:
    from batch.report import prune_removed, write_report, write_state
    from batch.run import Runner

    if not args.quiet and not args.json:
        for v in plan.videos:
            for d in v.decisions:
                if not d.cached:
                    logger.info("%s: %s will run (%s)", v.video.id, d.stage, d.reason)
    runner = Runner(
        plan,
        cache,
        checkpoints=checkpoints,
        device=args.device,
        fail_fast=args.fail_fast,
        jobs=args.jobs,
        force=args.force,
        progress=not args.quiet and not args.json,
    )
    report = plan.build_dir / plan.manifest.name / "report.json"
    try:
        result = runner.run()
    finally:
        _unless_disk_full("state.json", write_state, plan, cache.is_cached, args.shard)
        cache.hasher.save()
    # A build with nothing new writes nothing (a read-only build folder works); else the report, if it fits.
    if plan.stale or result.failed or args.shard or not report.is_file():
        report = _unless_disk_full("the report", write_report, plan, result, args.shard) or report
    removed = prune_removed(plan)
    if args.json:
        print(json.dumps({**result.as_dict(), "removed": removed}, indent=2))
    elif not args.quiet:
        print_build(result, report)
        if removed:
            print(f"removed the videos no longer in the manifest: {', '.join(removed)}")
    if result.disk_full:
        full = result.disk_full
        raise DiskFullError(
            f"no space left on device: cannot write {full['path']}; this build needs about "
            f"{_size(full['needed_bytes'])} more ({_size(full['free_bytes'])} free there now)",
            "free some space (`dhbatch gc --yes` removes cache entries no manifest uses) and run the same command "
            "again: it resumes, what was built is kept",
        )
    return EXIT_FAILED if result.failed else EXIT_OK


def _unless_disk_full(what: str, write: Any, *args: Any) -> Any:
    """`write(*args)`, or None when the disk is full (said, and left to the build's own disk-full error)."""
    try:
        return write(*args)
    except OSError as exc:
        if disk_full_path(exc) is None:
            raise
        logger.error("no space left on device: %s was not written", what)
        return None


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def print_build(result: RunResult, report: Path) -> None:
    """One line per video, each stage warning under its video, and the totals."""
    for v in result.videos:
        ran = [s.stage for s in v.steps if s.status == "ran"]
        detail = f"ran {', '.join(ran)}" if ran else "all steps cached"
        if v.status in ("failed", "skipped"):
            print(f"{v.status.upper():<7} {v.id}: {v.error}")
        else:
            print(f"{v.status:<7} {v.id}: {display_path(Path(v.output))} ({detail}, renderer {v.renderer})")
        for stage, text in v.warnings:
            print(f"  warning: {stage}: {text}")
    ok = sum(v.status in ("built", "cached") for v in result.videos)
    warned = sum(len(v.warnings) for v in result.videos)
    note = f" ({warned} warning{'s' * (warned != 1)})" if warned else ""
    print(
        f"{ok}/{len(result.videos)} videos ready in {result.seconds:.1f}s{note} — report: "
        f"{display_path(report.with_suffix('.html'))}"
    )


def _state_keys(state: dict[str, Any], cache: Cache) -> set[str]:
    """The cache keys a build/<name>/state.json records, of the entries still in the cache."""
    videos = state.get("videos", {})
    return {
        entry["key"]
        for steps in (videos.values() if isinstance(videos, dict) else ())
        if isinstance(steps, dict)
        for stage, entry in steps.items()
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and cache.entry(stage, entry["key"]).is_dir()
    }


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove the cache entries that none of the given manifests reaches. Entries that other manifests sharing the
    build folder last built (their build/<name>/state.json) are kept unless those manifests are given too or no
    longer exist; a running build keeps gc --yes from starting."""
    setups = [_setup(args, path) for path in args.manifests]
    caches = {cache.root: cache for *_, cache in setups}
    with contextlib.ExitStack() as stack:
        if args.yes:  # held from the listing to the deletion: no build may start or finish in between
            for cache in caches.values():
                if not stack.enter_context(cache.in_use(exclusive=True)):
                    raise UsageError(
                        f"a build is using the cache {display_path(cache.root)}", "run gc again when it has finished"
                    )
            for manifest, build_dir, _, _ in setups:  # and the output folders, whose owners are checked under it
                held = lock_output_folder(build_dir, manifest, wait=False, claim=False)
                if held is None:
                    raise UsageError(
                        f"a build is writing {display_path(build_dir / manifest.name)}",
                        "run gc again when it has finished",
                    )
                stack.callback(held.release)
        reachable: set[str] = set()
        given: set[Path] = set()
        for manifest, build_dir, checkpoints, cache in setups:
            plan = plan_manifest(manifest, cache, build_dir=build_dir, checkpoints=checkpoints)
            reachable |= {s.key for v in plan.videos for s in v.steps}
            given.add(build_dir / manifest.name)
        root = project_root(args.manifests[0])
        others: list[str] = []
        for cache in caches.values():
            for state_file in sorted(cache.root.parent.glob("*/state.json")):
                if state_file.parent in given:
                    continue
                state = load_state(state_file)
                owner = state.get("manifest")
                keys = _state_keys(state, cache) - reachable  # still in the cache, and not reached otherwise
                if not keys:
                    continue
                if isinstance(owner, str) and owner_state(state, None, root) == "gone":
                    others.append(f"collecting {len(keys)} entries last built for {owner}, which no longer exists")
                    continue
                others.append(
                    f"kept {len(keys)} entries last built for {display_path(state_file)} (another manifest): give "
                    f"that manifest too, or delete {display_path(state_file.parent)}/, to collect them"
                )
                reachable |= keys
        doomed = [
            (stage, key, folder)
            for cache in caches.values()
            for stage, key, folder in cache.entries()
            if key not in reachable
        ]
        size = sum(f.stat().st_size for _, _, folder in doomed for f in folder.rglob("*") if f.is_file())
        for stage, key, _ in doomed:
            print(f"{'remove' if args.yes else 'would remove'} {stage} {key[:12]}")
        if args.yes:
            for _, _, folder in doomed:
                shutil.rmtree(folder, ignore_errors=True)
            for cache in caches.values():
                cache.sweep_tmp()
    for line in others:
        print(line)
    verb = "removed" if args.yes else "unreachable"
    print(
        f"{len(doomed)} cache entries {verb} ({size / 1e6:.1f} MB)"
        + ("" if args.yes or not doomed else "; run again with --yes to delete")
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
