"""Command line: `dhbatch plan|build|gc|validate`. The only place that prints and exits."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from batch import __version__, fleet
from batch.cache import Cache, sweep_stale_tmp
from batch.errors import DHBatchError, DiskFullError, ManifestError, UsageError, disk_full_path
from batch.jsonout import COMMANDS, document, error_document
from batch.locking import holding
from batch.manifest import Manifest, display_path, load_manifest, project_root
from batch.plan import (
    Plan,
    VideoPlan,
    check_force,
    claim_output_folder,
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
    from batch.checks import Finding
    from batch.run import RunResult

logger = logging.getLogger("batch")

#: Exit codes, the same for every command (README's table "Exit codes"): 0 up to date / built, 1 something to build
#: (plan) or some videos failed (build), 2 bad manifest or command line, 3 a file could not be read or written;
#: 130 / 143 interrupted (Ctrl-C / a kill). New states take the next free numbers below 128.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_IO = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes raise a UsageError, so that they reach the user like every other error (and as JSON
    with --json) instead of argparse's own exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
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
        sp.add_argument("--json", action="store_true", help="machine-readable output (README: Using it in CI)")

    def selection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--only", nargs="+", default=[], metavar="ID", help="only these video ids or patterns ('grace-*')"
        )
        sp.add_argument(
            "--force",
            nargs="?",
            const="all",
            action="append",
            default=[],
            metavar="STAGE",
            help=f"rebuild even if cached: every step, or one stage ({', '.join(ORDER)})",
        )
        sp.add_argument("--shard", type=_shard_arg, metavar="I/N", help="only shard I of N (CI job matrices)")

    sp = sub.add_parser("plan", help="show what a build would do and why (exit 0: up to date, 1: something to build)")
    common(sp)
    selection(sp)
    sp.add_argument(
        "--verify", action="store_true", help="read every cached output and check its sha256 (a damaged one is rebuilt)"
    )
    fleet.add_remote_options(sp, build=False)

    sp = sub.add_parser("build", help="build the videos whose inputs changed")
    common(sp)
    selection(sp)
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps (default auto)")
    sp.add_argument(
        "--jobs",
        "-j",
        type=int,
        help="parallel CPU steps (voice, puppet, mux; default 1); with --cluster, CPU workers (default: its CPUs)",
    )
    sp.add_argument("--fail-fast", action="store_true", help="stop at the first failing video")
    sp.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run on Ray: ray (a local Ray for this run), auto (the one `ray start` runs, or RAY_ADDRESS), ray://HOST:PORT",
    )
    sp.add_argument("--gpu-resource", default="GPU", metavar="NAME", help="the Ray resource that marks a GPU")
    fleet.add_remote_options(sp)
    sp.add_argument("--events", type=Path, metavar="FILE", help="append progress events to FILE as JSON lines")

    sp = sub.add_parser("gc", help="remove cache entries that none of the given manifests reaches")
    common(sp, many=True)
    sp.add_argument("--yes", action="store_true", help="delete (without it, only show)")
    fleet.add_gc_options(sp)

    sp = sub.add_parser("validate", help="check a manifest and exit")
    common(sp)
    fleet.add_parsers(sub, common, _shard_arg)

    from batch.starter import add_parser as add_init
    from batch.web.command import add_parser as add_serve  # light: FastAPI loads only when `serve` runs

    add_init(sub)

    add_serve(sub)
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
        at = next((i + 1 for i, t in enumerate(out) if t in COMMANDS), len(out))
        out[at:at] = manifests
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _untangle(sys.argv[1:] if argv is None else list(argv))
    command = next((t for t in argv if t in COMMANDS), None)
    as_json = "--json" in argv  # known before parsing, so that even a command-line mistake answers in JSON
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = _parser().parse_args(argv)
        args.verbose += args.verbose_after  # -v before and after the command add up
        _configure_logging(args.verbose, args.quiet)
        commands = {"plan": cmd_plan, "build": cmd_build, "gc": cmd_gc, "validate": cmd_validate, **fleet.COMMANDS}
        commands["serve"] = cmd_serve
        commands["init"] = cmd_init
        return commands[args.command](args)
    except (DHBatchError, KeyboardInterrupt, OSError) as exc:
        code = _report_error(exc)
        if as_json:
            print(json.dumps(error_document(command, code, exc), indent=2))
        return code


def _report_error(exc: BaseException) -> int:
    """Say on stderr what stopped the command (and what to do); the exit code."""
    if isinstance(exc, ManifestError):
        n = len(exc.problems)
        print(f"error: invalid manifest ({n} problem{'s' * (n != 1)}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
    elif isinstance(exc, DHBatchError):
        print(f"error: {exc.message}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print("interrupted: nothing partial was kept; run the same command again to resume", file=sys.stderr)
        return _exit_status["signal"]
    else:  # OSError: a full disk, a read-only build folder: say which file, not a traceback
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        logger.debug("details", exc_info=True)
        return EXIT_IO
    if exc.hint:
        print(f"  hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Errors only with -q, warnings by default; -v (info) and -vv (debug) lines carry a UTC timestamp and the
    process id, so that the logs of builds sharing a cache can be told apart and lined up."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    if verbose and not quiet:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(process)d %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(levelname)s: %(message)s")
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])


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
    check_force(args.force)
    manifest, build_dir, checkpoints, cache = setup or _setup(args, args.manifest)
    videos = shard_videos(manifest, select_videos(manifest, args.only), args.shard)
    plan = plan_manifest(manifest, cache, build_dir=build_dir, checkpoints=checkpoints, videos=videos, force=args.force)
    return plan, cache, checkpoints


def cmd_validate(args: argparse.Namespace) -> int:
    manifest, build_dir, checkpoints, cache = _setup(args, args.manifest)
    if problems := template_problems(manifest):
        raise ManifestError(problems)
    plan = plan_manifest(manifest, cache, build_dir=build_dir, checkpoints=checkpoints)
    findings = _preflight(plan, cache, checkpoints, measure=True)
    errors = sum(f.severity == "error" for f in findings)
    code = EXIT_USAGE if errors else EXIT_OK
    counts = {"characters": len(manifest.characters), "scripts": len(manifest.scripts), "videos": len(manifest.videos)}
    if args.json:
        problems = [f.as_dict() for f in findings]
        print(
            json.dumps(
                document("validate", code, manifest=str(manifest.path), counts=counts, problems=problems), indent=2
            )
        )
        return code
    print_findings(findings)
    if errors:
        print(
            f"{display_path(manifest.path)}: {errors} problem{'s' * (errors != 1)} would fail the build",
            file=sys.stderr,
        )
    else:
        print(f"{display_path(manifest.path)}: ok — " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return code


def _preflight(plan: Plan, cache: Cache, checkpoints: Path, measure: bool) -> list[Finding]:
    """The checks before rendering (batch/checks.py); `plan` reads the portrait and recording checks `validate`
    cached, and says how many it left to `validate`."""
    from batch.checks import preflight

    findings, unchecked = preflight(plan, checkpoints, cache.root, cache.hasher, measure=measure)
    cache.hasher.save()
    if unchecked:
        logger.warning("%d portrait or recording file(s) not checked yet: `dhbatch validate` checks them", unchecked)
    return findings


def print_findings(findings: list[Finding]) -> None:
    """What the checks before rendering found (batch/checks.py), on stderr, errors and warnings alike."""
    for f in findings:
        print(f"{f.severity}: {f.problem}", file=sys.stderr)
        if f.hint:
            print(f"  hint: {f.hint}", file=sys.stderr)


def cmd_plan(args: argparse.Namespace) -> int:
    plan, cache, checkpoints = _plan(args)
    plan = fleet.with_remote(plan, fleet.open_remote(args, project_root(args.manifest), reading=True))
    findings = _preflight(plan, cache, checkpoints, measure=False)
    code = EXIT_FAILED if plan.stale else EXIT_OK
    if args.json:
        from batch.written import plan_scripts

        shard = {"shard": str(args.shard)} if args.shard else {}
        problems = [f.as_dict() for f in findings]
        fields = plan.as_dict()
        scripts = plan_scripts(plan, cache.record)
        for video in fields["videos"]:
            if video["id"] in scripts:
                video["script"] = scripts[video["id"]]
        print(json.dumps(document("plan", code, **fields, **shard, problems=problems), indent=2))
    else:
        from batch.written import plan_script_lines

        scripts = plan_script_lines(plan, cache.record) if args.verbose else None
        print_plan(plan, steps=args.verbose > 0, scripts=scripts)
        print_findings(findings)
    return code


def print_plan(plan: Plan, steps: bool = False, scripts: dict[str, list[str]] | None = None) -> None:
    """A stale video with each step's decision and reason; an up-to-date one in one line (every step with `steps`);
    `scripts` (plan -v): lines showing each video's written script."""
    runs = len({d.key for v in plan.videos for d in v.decisions if not d.cached})  # a shared step runs once
    for v in plan.videos:
        mark = "stale" if v.stale else "up to date"
        print(f"{v.video.id} ({v.renderer}): {mark}")
        if not v.stale and not steps:
            continue
        for d in v.decisions:
            print(f"  {d.stage:<8} {'cached' if d.cached else 'run':<6} {d.key[:12]}  {d.reason}")
        for line in (scripts or {}).get(v.video.id, []):
            print(line)
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
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise UsageError(f"--device {args.device!r} is not a device", "use auto, cpu, cuda, cuda:N or mps")
    manifest, build_dir, checkpoints, cache = _setup(args, args.manifest)
    remote = fleet.open_remote(args, project_root(args.manifest))  # --remote-required fails before anything is made
    with holding(lock_output_folder(build_dir, manifest)):  # ownership is checked, and kept, under the lock
        out_dir = build_dir / manifest.name
        for folder in (out_dir, out_dir / "thumbs"):
            sweep_stale_tmp(folder)  # what killed runs left half-written (the cache sweeps its own)
        plan, cache, checkpoints = _plan(args, (manifest, build_dir, checkpoints, cache))
        claim_output_folder(build_dir, manifest)
        return _build(args, plan, cache, checkpoints, remote)


def _build(args: argparse.Namespace, plan: Plan, cache: Cache, checkpoints: Path, remote: Any) -> int:
    from batch.report import prune_removed, retire_outdated, write_report, write_state
    from batch.run import EventFile, Runner

    for v in plan.videos:
        for d in v.decisions:
            if not d.cached:
                logger.info("%s: %s will run (%s)", v.video.id, d.stage, d.reason)
    executor = None
    if args.cluster:
        from batch.executors.ray import RayExecutor

        executor = RayExecutor(
            args.cluster,
            scratch=cache.tmp,
            device=args.device,
            gpu_resource=args.gpu_resource,
            cpu_workers=args.jobs,
        )
    runner = Runner(
        plan,
        cache,
        checkpoints=checkpoints,
        device=args.device,
        fail_fast=args.fail_fast,
        jobs=args.jobs or 1,
        force=args.force,
        progress=not args.quiet,
        remote=remote,
        events=EventFile(args.events) if args.events else None,
        executor=executor,
    )
    report = plan.build_dir / plan.manifest.name / "report.json"
    try:
        result = runner.run()
    finally:
        if runner.events is not None:
            runner.events.close()
        _unless_disk_full("state.json", write_state, plan, cache.is_cached, args.shard)
        cache.hasher.save()
    retired = retire_outdated((*plan.videos, *_left_out(plan, cache, checkpoints)), cache, result)
    # A build with nothing new writes nothing (a read-only build folder works); else the report, if it fits.
    if plan.stale or result.failed or retired or args.shard or not report.is_file():
        report = _unless_disk_full("the report", write_report, plan, result, args.shard, retired) or report
    removed = prune_removed(plan)
    full = _disk_full_error(result)
    code = full.exit_code if full else EXIT_FAILED if result.failed else EXIT_OK
    fleet_json = fleet.build_fields(args.shard, remote)
    if args.json:
        print(
            json.dumps(
                document("build", code, **result.as_dict(), removed=removed, report=str(report), **fleet_json),
                indent=2,
            )
        )
    elif not args.quiet:
        print_build(result, report)
        if removed:
            print(f"removed the videos no longer in the manifest: {', '.join(removed)}")
        if remote:
            print(f"remote cache {remote.url}: {remote.hits} steps downloaded, {remote.uploaded} uploaded")
    if full is not None:
        if args.json:  # the document above already says so (disk_full, exit_code)
            return _report_error(full)
        raise full
    fleet.check_required(remote)
    return code


def _disk_full_error(result: RunResult) -> DiskFullError | None:
    if not result.disk_full:
        return None
    full = result.disk_full
    return DiskFullError(
        f"no space left on device: cannot write {full['path']}; this build needs about "
        f"{_size(full['needed_bytes'])} more ({_size(full['free_bytes'])} free there now)",
        "free some space (`dhbatch gc --yes` removes cache entries no manifest uses) and run the same command "
        "again: it resumes, what was built is kept",
    )


def _left_out(plan: Plan, cache: Cache, checkpoints: Path) -> tuple[VideoPlan, ...]:
    """The plans of the videos that a `--only` or `--shard` build left out, so that their MP4s are retired too when
    they changed since they were built; none when they cannot be planned (a warning says why)."""
    chosen = {v.video.id for v in plan.videos}
    out_dir = plan.build_dir / plan.manifest.name
    # Only those with an MP4 here (nothing to retire otherwise): a shard's fresh CI folder plans no other shard's.
    rest = [v for v in plan.manifest.videos if v.id not in chosen and os.path.lexists(out_dir / f"{v.id}.mp4")]
    if not rest:
        return ()
    try:
        return plan_manifest(
            plan.manifest, cache, build_dir=plan.build_dir, checkpoints=checkpoints, videos=rest
        ).videos
    except ManifestError as exc:
        logger.warning("cannot tell whether the other videos' MP4s are current (%s): build them to check", exc)
        return ()


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
            if v.last_good:
                print(f"  an earlier build's MP4 is kept in {display_path(Path(v.last_good))}")
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


def cmd_init(args: argparse.Namespace) -> int:
    from batch.starter import write_starter

    written = write_starter(args.dir, args.portrait)
    print(f"wrote {', '.join(display_path(p) for p in written)}")
    print(f"next: dhbatch build {display_path(written[0])}   (offline: Piper voice, puppet animator)")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from batch.web.command import prepare

    server = prepare(args)
    print(f"dhbatch studio: {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    server.run()
    return EXIT_OK


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


def _forget_collected(cache: Cache) -> None:
    """After gc deleted entries: the hash memo's lines for files that are gone, and check results measured by an
    older version of a check (`batch.checks`; they are never read again)."""
    from batch.checks import CHECK_VERSIONS

    dropped = cache.hasher.forget_missing(cache.root)
    cache.hasher.save()
    current = {f"{kind}-v{version}" for kind, version in CHECK_VERSIONS.items()}
    old = [p for p in (cache.root / "checks").glob("*-v*") if p.is_dir() and p.name not in current]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    logger.info("gc: %d hash memo entries for deleted files, %d outdated check folders removed", dropped, len(old))


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove the cache entries that none of the given manifests reaches. Entries that other manifests sharing the
    build folder last built (their build/<name>/state.json) are kept unless those manifests are given too or no
    longer exist; a running build keeps gc --yes from starting. With --remote, the remote cache is pruned instead."""
    if args.remote:
        return fleet.cmd_gc_remote(args)
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
                held = lock_output_folder(build_dir, manifest, wait=False)
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
        others: list[dict[str, Any]] = []  # what other manifests in the build folders last built
        for cache in caches.values():
            for state_file in sorted(cache.root.parent.glob("*/state.json")):
                if state_file.parent in given:
                    continue
                state = load_state(state_file)
                owner = state.get("manifest")
                keys = _state_keys(state, cache) - reachable  # still in the cache, and not reached otherwise
                if not keys:
                    continue
                gone = isinstance(owner, str) and owner_state(state, None, root) == "gone"
                others.append({"state": str(state_file), "manifest": owner, "entries": len(keys), "kept": not gone})
                if not gone:
                    reachable |= keys
        # Entries no manifest reaches; what failed steps left, once their step is out of reach or has succeeded.
        doomed = [
            (stage, key, folder, failed)
            for cache in caches.values()
            for failed in (False, True)
            for stage, key, folder in cache.entries(failed)
            if key not in reachable or (failed and cache.is_cached(stage, key))
        ]
        sizes = [sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for *_, folder, _ in doomed]
        if args.yes:
            for *_, folder, _ in doomed:
                shutil.rmtree(folder, ignore_errors=True)
            for cache in caches.values():
                cache.sweep_tmp()
                _forget_collected(cache)
    if args.json:
        entries = [
            {"stage": stage, "key": key, "failed": failed, "bytes": n}
            for (stage, key, _, failed), n in zip(doomed, sizes, strict=True)
        ]
        print(
            json.dumps(
                document("gc", EXIT_OK, deleted=args.yes, entries=entries, bytes=sum(sizes), others=others), indent=2
            )
        )
        return EXIT_OK
    for stage, key, _, failed in doomed:
        print(f"{'remove' if args.yes else 'would remove'} {stage} {key[:12]}{' (what the failed step made)' * failed}")
    for other in others:
        if other["kept"]:
            print(
                f"kept {other['entries']} entries last built for {display_path(Path(other['state']))} (another "
                f"manifest): give that manifest too, or delete {display_path(Path(other['state']).parent)}/, to "
                "collect them"
            )
        else:
            print(f"collecting {other['entries']} entries last built for {other['manifest']}, which no longer exists")
    verb = "removed" if args.yes else "unreachable"
    print(
        f"{len(doomed)} cache entries {verb} ({sum(sizes) / 1e6:.1f} MB)"
        + ("" if args.yes or not doomed else "; run again with --yes to delete")
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
