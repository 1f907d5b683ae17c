"""Planning: a pure function of manifest + cache + last run's state → steps, keys and a reason for each decision."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from batch.errors import ManifestError, Problem, UsageError
from batch.hashing import FileHasher, step_key, text_digest
from batch.locking import Held, lock_folder
from batch.manifest import (
    Character,
    Manifest,
    Script,
    Video,
    gc_paused,
    manifest_identity,
    project_root,
    section_defaults,
    thaw,
)
from batch.stages import ORDER, STAGES, keyed_settings, sadtalker_available, weights_identity
from batch.templates import TemplateError, prompt_template, render, template_variables

logger = logging.getLogger(__name__)

PROJECT_PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
#: What a prompt template may use (manifest vars are for script texts).
PROMPT_CONTEXT_HINT = (
    "a prompt template sees description, engine and character (id, name, description); fix the template, or "
    "choose another with llm.template"
)
WRITE_CONTEXT_HINT = (
    "a script-writing template sees brief, words, engine and passages (each: id, file, where, section, text); fix "
    "the template, or choose another with the script's llm.template"
)


@dataclasses.dataclass(frozen=True)
class StepInput:
    """A step's input: a user file, or a named output of an upstream step."""

    name: str
    path: Path | None = None
    stage: str = ""
    key: str = ""
    filename: str = ""


@dataclasses.dataclass(frozen=True)
class Step:
    stage: str
    key: str
    #: What the key hashes (besides stage name and key format); the plan diffs it against the last run.
    fingerprint: Mapping[str, Any]
    #: Full resolved settings of the stage's section, handed to the stage.
    settings: Mapping[str, Any]
    inputs: tuple[StepInput, ...]
    text: str
    seed: int
    label: str
    target: str


@dataclasses.dataclass(frozen=True)
class Decision:
    stage: str
    key: str
    cached: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "key": self.key, "cached": self.cached, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    video: Video
    output: Path
    renderer: str
    steps: tuple[Step, ...]
    decisions: tuple[Decision, ...]
    #: The MP4 is at `output` (a build with every step cached still publishes it when it is not).
    published: bool = True

    @property
    def stale(self) -> bool:
        return any(not d.cached for d in self.decisions) or not self.published


@dataclasses.dataclass(frozen=True)
class Plan:
    manifest: Manifest
    build_dir: Path
    videos: tuple[VideoPlan, ...]
    #: Ids published before that the manifest no longer has: the build removes their MP4s.
    removed: tuple[str, ...] = ()

    @property
    def stale(self) -> bool:
        return any(v.stale for v in self.videos) or bool(self.removed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest": str(self.manifest.path),
            "build_dir": str(self.build_dir),
            "stale": self.stale,
            "removed": list(self.removed),
            "videos": [
                {
                    "id": v.video.id,
                    "output": str(v.output),
                    "renderer": v.renderer,
                    "stale": v.stale,
                    "published": v.published,
                    "steps": [d.as_dict() for d in v.decisions],
                }
                for v in self.videos
            ],
        }


def state_path(build_dir: Path, manifest: Manifest) -> Path:
    return build_dir / manifest.name / "state.json"


def load_state(path: Path) -> dict[str, Any]:
    """Fingerprints of the last run, per video and stage; unreadable state only costs better reasons."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s (%s)", path, exc)
        return {}


class Planner:
    """Builds the plan. Keeps per-run memos so a thousand videos sharing characters plan quickly."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        build_dir: Path,
        checkpoints: Path,
        hasher: FileHasher,
        is_cached: Any,
        cached_output: Any = None,
        force: Iterable[str] = (),
        damaged: Mapping[str, str] | None = None,
    ) -> None:
        self.manifest = manifest
        self.build_dir = build_dir
        self.checkpoints = checkpoints
        self.hasher = hasher
        self.is_cached = is_cached
        self.cached_output = cached_output  # (stage, key, name) -> Path in the cache, to compare published files
        self.force = set(force)
        self.damaged = damaged if damaged is not None else {}  # key -> why its cache entry is not a hit
        self._weights: dict[tuple, dict[str, str]] = {}
        self._prompts: dict[str, tuple[str, Path]] = {}
        self._files: dict[Path, str] = {}
        self._settings: dict[str, Mapping[str, Mapping[str, Any]]] = {}
        self._weights_by_id: dict[tuple[str, int], tuple[Mapping[str, Any], dict[str, str]]] = {}
        self._video_settings: dict[int, tuple[str, dict[str, Any], Mapping[str, Any]]] = {}
        self._texts: dict[tuple[str, str, str], str] = {}
        self._contexts: dict[str, dict[str, Any]] = {}  # a script's template variables (manifest vars, its own)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _weights_for(self, stage: str, settings: Mapping[str, Any]) -> dict[str, str]:
        # First by the settings object (a character's, shared by its videos; kept here, so its id stays its own),
        # then by value.
        found = self._weights_by_id.get((stage, id(settings)))
        if found is not None and found[0] is settings:
            return found[1]
        memo = (stage, tuple(sorted((k, str(v)) for k, v in settings.items())))
        if memo not in self._weights:
            self._weights[memo] = weights_identity(stage, settings, self.checkpoints, self.hasher)
        self._weights_by_id[(stage, id(settings))] = (settings, self._weights[memo])
        return self._weights[memo]

    def _file_id(self, path: Path) -> str:
        """A user file's digest, looked up once per plan (a portrait shared by a thousand videos)."""
        if path not in self._files:
            self._files[path] = self.hasher.digest(path)
        return self._files[path]

    def _settings_for(self, video: Video) -> Mapping[str, Mapping[str, Any]]:
        """The video's resolved settings; those of a video without its own overrides are its character's, resolved
        once."""
        if video.overrides:
            return self.manifest.settings(video)
        if video.character not in self._settings:
            self._settings[video.character] = self.manifest.settings(video)
        return self._settings[video.character]

    def _renderer(self, section: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The renderer that `video.renderer` picks, and the video settings naming it (once per settings object)."""
        if (found := self._video_settings.get(id(section))) is not None and found[2] is section:
            return found[0], found[1]
        video_settings = dict(section)
        renderer = video_settings["renderer"]
        if renderer == "auto":
            ok = sadtalker_available(self.checkpoints, video_settings["size"], video_settings["preprocess"])
            renderer = "sadtalker" if ok else "puppet"
        video_settings["renderer"] = renderer
        self._video_settings[id(section)] = (renderer, video_settings, section)
        return renderer, video_settings

    def _template(self, name: str) -> tuple[str, Path]:
        if name not in self._prompts:
            self._prompts[name] = prompt_template(name, (self.manifest.root / "prompts", PROJECT_PROMPTS))
        return self._prompts[name]

    def _step(
        self,
        stage: str,
        settings: Mapping[str, Any],
        inputs: tuple[StepInput, ...],
        input_ids: dict[str, str],
        *,
        text: str = "",
        seed: int | None = None,
        label: str,
        target: str,
    ) -> Step:
        keyed = keyed_settings(stage, settings) if STAGES[stage].section else {}
        if seed is not None:
            keyed["seed"] = seed
        fingerprint = {
            "version": STAGES[stage].version,
            "settings": keyed,
            "inputs": input_ids,
            "weights": self._weights_for(stage, settings)
            if stage in ("prompt", "image", "write", "voice", "animate", "enhance")
            else {},
        }
        return Step(stage, step_key(stage, fingerprint), fingerprint, settings, inputs, text, seed or 0, label, target)

    # -- texts ----------------------------------------------------------------------------------------------------
    def prompt_request(self, character: Character, template_name: str, engine: str) -> str:
        """The LLM request for a character's portrait: its prompt template rendered (errors located at the
        character, whose settings chose the template)."""
        try:
            source, path = self._template(template_name)
            context = {"description": character.description, "engine": engine, "character": _char_ctx(character)}
            return render(source, f"prompt template {path.name}", context, hint=PROMPT_CONTEXT_HINT).strip()
        except TemplateError as exc:
            raise TemplateError(f"characters.{character.id}: {exc.message}", exc.hint, character.location) from exc

    def script_text(self, video: Video, check_empty: bool = False) -> str:
        """The script's text rendered for this video (errors located at the script's text). An empty text is a
        problem for `validate` (`check_empty`); a build fails that video alone, at its voice step."""
        m = self.manifest
        script, character = m.scripts[video.script], m.characters[video.character]
        # The same text for every video of a character and script, unless the template names the video.
        memo = (script.id, character.id, video.id if "video" in template_variables(script.text or "") else "")
        field = "text_file" if script.text_file else "text"
        text = self._texts.get(memo)
        if text is None:
            if (names := self._contexts.get(script.id)) is None:
                names = self._contexts[script.id] = {**m.vars, **script.vars}
            context = {**names, "character": _char_ctx(character), "video": {"id": video.id}}
            try:
                text = render(script.text or "", f"scripts.{script.id}.{field}", context)
            except TemplateError as exc:
                raise TemplateError(exc.message, exc.hint, script.text_location or script.location) from exc
            self._texts[memo] = text
        if not text.strip() and check_empty:
            raise TemplateError(
                f"scripts.{script.id}.{field}: the text is empty"
                + (f" for video {video.id}" if (script.text or "").strip() else ""),
                "write what the character says, or give an audio file",
                script.text_location or script.location,
            )
        return text

    def write_settings(self, script: Script) -> dict[str, Any]:
        """A written script's settings: the `llm` section (built-in ← defaults.llm ← the script's `llm`; the prompt
        template only from the script's own), and `words`. The same for every video of the script: written once."""
        llm = {**section_defaults()["llm"], **self.manifest.defaults.get("llm", {}), **script.llm}
        fewshot = llm["engine"] == "local"
        llm["template"] = script.llm.get("template") or f"script_from_sources{'_fewshot' * fewshot}.j2"
        return {**llm, "words": script.words}

    def write_step(self, script: Script) -> Step:
        """The step that writes a script from its sources: keyed on the bytes of each file its globs matched (not
        of other documents), the brief, words, the LLM settings and the prompt template."""
        settings = self.write_settings(script)
        root = self.manifest.root
        names = {p.relative_to(root).as_posix(): p for p in script.sources}
        inputs = [StepInput(f"source:{name}", path=path) for name, path in names.items()]
        ids: dict[str, Any] = {
            "brief": text_digest(script.brief or ""),
            "sources": {name: self.hasher.digest(path) for name, path in names.items()},
        }
        if settings["engine"] != "none":  # the extractive script uses no template
            try:
                source, path = self._template(settings["template"])
            except TemplateError as exc:
                raise TemplateError(f"scripts.{script.id}: {exc.message}", exc.hint, script.location) from exc
            inputs.append(StepInput("template", path=path))
            ids["template"] = text_digest(source)
        return self._step(
            "write",
            settings,
            tuple(inputs),
            ids,
            text=script.brief or "",
            label=f"scripts.{script.id}",
            target="renderer.write:run",
        )

    def write_request(self, script: Script) -> str:
        """The write template rendered with a sample passage, as `validate` checks it (the real passages come at
        run time)."""
        settings = self.write_settings(script)
        if settings["engine"] == "none":
            return ""
        sample = {"id": "p1", "file": "doc.md", "where": "doc.md:1-2", "section": "Section", "text": "A passage."}
        context = {"brief": script.brief, "words": script.words, "engine": settings["engine"], "passages": [sample]}
        try:
            source, path = self._template(settings["template"])
            return render(source, f"prompt template {path.name}", context, hint=WRITE_CONTEXT_HINT)
        except TemplateError as exc:
            location = script.text_location or script.location
            raise TemplateError(f"scripts.{script.id}: {exc.message}", exc.hint, location) from exc

    # -- per video ------------------------------------------------------------------------------------------------
    def steps_for(self, video: Video) -> tuple[str, tuple[Step, ...]]:
        m = self.manifest
        settings = self._settings_for(video)
        character = m.characters[video.character]
        script = m.scripts[video.script]
        steps: list[Step] = []
        clabel, slabel = f"characters.{character.id}", f"scripts.{script.id}"

        # Portrait: a given file, or prompt → image.
        if character.image is not None:
            portrait = StepInput("portrait", path=character.image)
            portrait_id = self._file_id(character.image)
        else:
            llm = dict(settings["llm"])
            request = self.prompt_request(character, _template_name(llm), llm["engine"])
            prompt = self._step(
                "prompt",
                llm,
                (),
                {"request": text_digest(request)},
                text=request,
                seed=None if llm["engine"] == "none" else character.seed,
                label=clabel,
                target="renderer.llm:run",
            )
            image = self._step(
                "image",
                settings["image"],
                (StepInput("prompt", stage="prompt", key=prompt.key, filename="prompt.txt"),),
                {"prompt": prompt.key},
                seed=character.seed,
                label=clabel,
                target="renderer.portrait:run",
            )
            steps += [prompt, image]
            portrait = StepInput("portrait", stage="image", key=image.key, filename="portrait.png")
            portrait_id = image.key

        # Speech: a given audio file (converted), synthesis of a script written from documents, or of the rendered
        # script text.
        if script.brief is not None:
            write = self.write_step(script)
            steps.append(write)
            speech = self._step(
                "voice",
                settings["voice"],
                (StepInput("script", stage="write", key=write.key, filename="script.txt"),),
                {"script": write.key},
                label=slabel,
                target="renderer.voice:run",
            )
        elif script.audio is not None:
            speech = self._step(
                "audio",
                {},
                (StepInput("audio", path=script.audio),),
                {"audio": self._file_id(script.audio)},
                label=slabel,
                target="renderer.voice:run_convert",
            )
        else:
            text = self.script_text(video)
            speech = self._step(
                "voice",
                settings["voice"],
                (),
                {"text": text_digest(text)},
                text=text,
                label=slabel,
                target="renderer.voice:run",
            )
        steps.append(speech)
        audio_in = StepInput("audio", stage=speech.stage, key=speech.key, filename="speech.wav")

        renderer, video_settings = self._renderer(settings["video"])
        anim_inputs = [portrait, audio_in]
        if speech.stage == "voice":
            anim_inputs.append(StepInput("phonemes", stage="voice", key=speech.key, filename="phonemes.json"))
        animate = self._step(
            "animate",
            video_settings,
            tuple(anim_inputs),
            {"portrait": portrait_id, "audio": speech.key},
            seed=character.seed,
            label=f"videos.{video.id}",
            target=f"renderer.{'sadtalker.pipeline' if renderer == 'sadtalker' else 'puppet'}:run",
        )
        steps.append(animate)
        last = animate
        if video_settings["enhancer"] != "none":
            last = self._step(
                "enhance",
                video_settings,
                (StepInput("video", stage="animate", key=animate.key, filename="video.mp4"),),
                {"video": animate.key},
                label=f"videos.{video.id}",
                target="renderer.enhance:run",
            )
            steps.append(last)
        mux = self._step(
            "mux",
            {},
            (StepInput("video", stage=last.stage, key=last.key, filename="video.mp4"), audio_in),
            {"video": last.key, "audio": speech.key},
            label=f"videos.{video.id}",
            target="renderer.encode:run_mux",
        )
        steps.append(mux)
        return renderer, tuple(steps)

    @gc_paused()
    def plan(self, videos: Iterable[Video]) -> Plan:
        state = load_state(state_path(self.build_dir, self.manifest))
        _refuse_other_owner(self.build_dir, self.manifest, "holds the videos of", state)
        previous = state.get("videos", {})
        out: list[VideoPlan] = []
        videos = tuple(videos)
        out_dir = self.build_dir / self.manifest.name
        for video in videos:
            try:
                renderer, steps = self.steps_for(video)
            except TemplateError:  # every template problem of these videos at once, located
                raise ManifestError(template_problems(self.manifest, videos, check_empty=False)) from None
            before = previous.get(video.id, {}) if isinstance(previous, dict) else {}
            forced = forced_keys(steps, self.force)
            decisions = tuple(
                self._decide(s, before.get(s.stage) if isinstance(before, dict) else None, s.key in forced)
                for s in steps
            )
            output = out_dir / f"{video.id}.mp4"
            if output.parent != out_dir:  # ids are checked at load; never write elsewhere
                raise ValueError(f"video id {video.id!r} would leave the build folder")
            out.append(VideoPlan(video, output, renderer, steps, decisions, self._published(output, steps[-1])))
        self.hasher.save()
        known = {v.id for v in self.manifest.videos}
        removed = tuple(sorted(i for i in previous if i not in known)) if isinstance(previous, dict) else ()
        return Plan(self.manifest, self.build_dir, tuple(out), removed)

    def _published(self, output: Path, final: Step) -> bool:
        """Whether `output` holds the final step's file: present, and the size of the cached one (a cheap check; the
        build compares the bytes)."""
        try:
            st = os.lstat(output)
            if not stat.S_ISREG(st.st_mode):  # a link where the output goes is replaced by a copy
                return False
            if self.cached_output is None or not self.is_cached(final.stage, final.key):
                return True  # the build makes it anew anyway
            cached = self.cached_output(final.stage, final.key, STAGES[final.stage].outputs[0])
            return st.st_size == os.stat(cached).st_size
        except OSError:
            return False

    def _decide(self, step: Step, before: Mapping[str, Any] | None, forced: bool) -> Decision:
        if forced:
            why = "forced (--force)" if "all" in self.force or step.stage in self.force else "forced (--force upstream)"
            return Decision(step.stage, step.key, False, why)
        if self.is_cached(step.stage, step.key):
            return Decision(step.stage, step.key, True, "unchanged")
        if step.key in self.damaged:
            return Decision(step.stage, step.key, False, f"cache entry: {self.damaged[step.key]}")
        return Decision(step.stage, step.key, False, explain(before, step))


def lock_output_folder(build_dir: Path, manifest: Manifest, *, wait: bool = True) -> Held | None:
    """Hold build/<name>/ for the length of a build (or of gc), so that its owner is checked, claimed
    (`claim_output_folder`) and kept under one lock: two manifests with the same file name built at the same moment
    never both publish there. A build of the same manifest that holds it is waited for; one of another manifest is
    an error at once (its state.json names it). None when `wait` is False and another process holds the folder."""
    folder = build_dir / manifest.name
    while True:
        made = None
        if not folder.is_dir():
            with contextlib.suppress(FileExistsError):
                folder.mkdir(parents=True)
                made = folder  # removed again if the command stops before writing anything there (a bad --only)
        held = lock_folder(folder, wait=False)
        if held is None:
            _refuse_other_owner(build_dir, manifest, "is being built for")
            if not wait:
                return None
            held = lock_folder(folder, waiting_for=f"another build of {manifest.path.name} into {folder} to finish")
        held.made = made
        try:
            if os.stat(folder).st_ino == os.fstat(held.fd).st_ino:
                break
        except FileNotFoundError:
            pass
        held.made = None
        held.release()  # its holder removed the empty folder while we waited: lock it anew
    try:
        _refuse_other_owner(build_dir, manifest, "holds the videos of")
    except BaseException:
        held.release()
        raise
    return held


def claim_output_folder(build_dir: Path, manifest: Manifest) -> None:
    """Write this manifest's identity into build/<name>/state.json if the folder has no living owner (new, or its
    manifest is gone), so that a build of another same-named manifest starting now is refused at once. Called under
    `lock_output_folder`, once the build is known to go ahead."""
    path = state_path(build_dir, manifest)
    state = load_state(path)
    if owner_state(state, manifest) != "same":
        from batch.cache import write_atomic

        state = {"format": 1, "videos": {}, **state, **ownership(manifest)}
        write_atomic(path, json.dumps(state, indent=1, sort_keys=True).encode())


def ownership(manifest: Manifest) -> dict[str, str]:
    """What state.json records of the manifest that owns the folder."""
    return {"manifest": manifest_identity(manifest), "manifest_path": str(manifest.path.resolve())}


def _refuse_other_owner(build_dir: Path, manifest: Manifest, verb: str, state: Mapping[str, Any] | None = None) -> None:
    state = load_state(state_path(build_dir, manifest)) if state is None else state
    owner = state.get("manifest")
    if isinstance(owner, str) and owner_state(state, manifest) == "other":
        raise UsageError(
            f"{build_dir / manifest.name} {verb} {owner}, and {manifest_identity(manifest)} has the same file name",
            "rename one of them, or build it with its own --build-dir",
        )


def owner_state(state: Mapping[str, Any], manifest: Manifest | None, root: Path | None = None) -> str:
    """Who owns a build/<name>/ folder, from its state.json, seen from `manifest`: "same" (this manifest, also after
    the checkout moved), "other" (another manifest that exists: in this project, or in another project or checkout
    sharing the build folder), or "gone" (its manifest exists nowhere: moved within the repository, or deleted).
    `root`: the project root to read a relative identity from (default: the manifest's)."""
    owner, absolute = state.get("manifest"), state.get("manifest_path")
    here = manifest.path.resolve() if manifest is not None else None
    base = root if root is not None else project_root(manifest.path) if manifest is not None else None
    candidates = [Path(absolute)] if isinstance(absolute, str) else []
    if isinstance(owner, str) and (Path(owner).is_absolute() or base is not None):
        candidates.append(Path(owner) if Path(owner).is_absolute() else base / owner)
    existing = []
    for path in candidates:
        try:
            if path.is_file():
                existing.append(path.resolve())
        except OSError:
            continue
    if here is not None and here in existing:
        return "same"
    return "other" if existing else "gone"


def forced_keys(steps: Iterable[Step], force: Iterable[str]) -> set[str]:
    """The keys that `--force` reruns among a video's steps (in chain order): the forced stages and everything made
    from them, so a rerun stage (a TTS that does not repeat itself exactly) never leaves stale steps after it."""
    force = set(force)
    out: set[str] = set()
    for step in steps:
        if "all" in force or step.stage in force or any(i.key in out for i in step.inputs if i.key):
            out.add(step.key)
    return out


_INPUT_WORDS = {
    "text": "script text changed",
    "request": "character description or prompt template changed",
    "brief": "brief changed",
    "template": "prompt template changed",
    "script": "written script changed",
    "prompt": "prompt changed",
    "portrait": "portrait changed",
    "audio": "audio changed",
    "video": "video changed",
}


def explain(before: Mapping[str, Any] | None, step: Step) -> str:
    """Why a step that is not cached must run: what differs from the last run's fingerprint."""
    if not before or not isinstance(before, Mapping) or "fingerprint" not in before:
        return "new"
    old = before["fingerprint"]
    new = thaw(step.fingerprint)
    if not isinstance(old, Mapping):
        return "new"
    reasons: list[str] = []
    if old.get("version") != new["version"]:
        reasons.append(f"stage version {old.get('version')} → {new['version']}")
    section = STAGES[step.stage].section
    old_s, new_s = old.get("settings", {}), new["settings"]
    changed = sorted(n for n in set(old_s) | set(new_s) if old_s.get(n) != new_s.get(n))
    switched = [n for n in changed if n in ("engine", "renderer")]
    for name in switched or changed:  # after an engine switch, the other differences follow from it
        label = name if name == "seed" or not section else f"{section}.{name}"
        reasons.append(f"{label} {_show(old_s.get(name))} → {_show(new_s.get(name))}")
    old_i, new_i = old.get("inputs", {}), new["inputs"]
    for name in sorted(set(old_i) | set(new_i)):
        if old_i.get(name) != new_i.get(name):
            if name == "sources" and isinstance(old_i.get(name), Mapping):
                reasons += _files_changed(name, old_i[name], new_i[name])
            else:
                reasons.append(_INPUT_WORDS.get(name, f"{name} changed"))
    if old.get("weights") != new["weights"] and not switched:
        reasons.append("weights changed")
    return "; ".join(reasons) if reasons else "output missing"


def _files_changed(name: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """ "sources changed: docs/refunds.md", "sources added: …", "sources removed: …" for a {file: digest} input."""
    out = []
    for what, files in (
        ("changed", [f for f in new if f in old and old[f] != new[f]]),
        ("added", [f for f in new if f not in old]),
        ("removed", [f for f in old if f not in new]),
    ):
        if files:
            out.append(f"{name} {what}: {', '.join(sorted(files))}")
    return out


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "...")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _char_ctx(character: Any) -> dict[str, Any]:
    return {"id": character.id, "name": character.name, "description": character.description}


def _template_name(llm: Mapping[str, Any]) -> str:
    return llm["template"] or ("image_prompt_fewshot.j2" if llm["engine"] == "local" else "image_prompt.j2")


def template_problems(
    manifest: Manifest, videos: Iterable[Video] | None = None, check_empty: bool = True
) -> list[Problem]:
    """The script texts and portrait prompts of `videos` (all by default) rendered as a build would (`dhbatch
    validate`), without hashing or touching build/: the located problems, one per place."""
    planner = Planner(manifest, build_dir=Path(), checkpoints=Path(), hasher=None, is_cached=None)
    problems: list[Problem] = []
    for video in manifest.videos if videos is None else videos:
        character = manifest.characters[video.character]
        settings = manifest.settings(video)
        checks: list[tuple[Any, tuple]] = []
        if character.image is None:
            llm = settings["llm"]
            checks.append((planner.prompt_request, (character, _template_name(llm), llm["engine"])))
        script = manifest.scripts[video.script]
        if script.brief is not None:
            checks.append((planner.write_request, (script,)))
        elif script.audio is None:
            checks.append((planner.script_text, (video, check_empty)))
        for check, args in checks:
            try:
                check(*args)
            except TemplateError as exc:
                loc = exc.location or manifest.scripts[video.script].location
                problem = Problem(loc.file, loc.line, loc.column, "", str(exc))
                if problem not in problems:
                    problems.append(problem)
    return problems


def plan_manifest(
    manifest: Manifest,
    cache: Any,
    *,
    build_dir: Path,
    checkpoints: Path,
    videos: Iterable[Video] | None = None,
    force: Iterable[str] = (),
) -> Plan:
    """Plan `videos` (all by default) of a manifest against a cache (a batch.cache.Cache)."""
    planner = Planner(
        manifest,
        build_dir=build_dir,
        checkpoints=checkpoints,
        hasher=cache.hasher,
        is_cached=cache.is_cached,
        cached_output=cache.output,
        force=force,
        damaged=cache.damaged,
    )
    return planner.plan(manifest.videos if videos is None else videos)


def check_force(force: Iterable[str]) -> None:
    """`--force` takes stage names, or "all"; anything else is a usage error naming the stages."""
    for f in force:
        if f not in (*ORDER, "all"):
            raise UsageError(f"--force {f!r}: not a stage", f"use one of {', '.join(ORDER)}, or --force alone for all")


def select_videos(manifest: Manifest, only: Iterable[str]) -> tuple[Video, ...]:
    """Videos named by --only (all when empty): ids or shell-style patterns (`grace-*`, `*-hello`, `ceo-?`), each
    video once, in the order given (a pattern's matches in manifest order). A pattern that matches no id is a usage
    error listing the known ones."""
    patterns = list(dict.fromkeys(only))
    if not patterns:
        return manifest.videos
    ids = [v.id for v in manifest.videos]
    chosen: dict[str, None] = {}
    unmatched = []
    for pattern in patterns:
        matches = [pattern] if pattern in ids else [i for i in ids if fnmatch.fnmatchcase(i, pattern)]
        if not matches:
            unmatched.append(pattern)
        chosen.update(dict.fromkeys(matches))
    if unmatched:
        raise UsageError(
            f"--only {' '.join(unmatched)}: no video id matches",
            f"known ids: {', '.join(sorted(ids))} (patterns take * ? [...], quoted so the shell leaves them alone)",
        )
    known = {v.id: v for v in manifest.videos}
    return tuple(known[i] for i in chosen)
