"""Stage "write": a script written from the documents a manifest names, each sentence citing its passages.

A script with `brief` + `sources` is written here before the voice stage speaks it (job.text is the brief; the
inputs are the source files, named ``source:<path from the manifest's folder>``, and, for an LLM, the prompt
template). `ScriptWriter.__call__`:

1. read the sources into passages by heading and paragraph, with file and line range (renderer/retrieval.py);
2. rank them for the brief with BM25 and keep the best TOP_K, named p1, p2, … in rank order;
3. write: an LLM (`llm.engine` ollama or local) gets the prompt template rendered with the brief and those
   passages and answers JSON (Ollama's structured output: the sentences and the passage ids each one used); with
   `engine: none` the script is extractive: the best-ranked sentences of the passages, trimmed to `words`;
4. check the answer: it must cite, cite only passages it was given, say something, and stay within twice `words`;
   otherwise the step fails for this script with the answer in the message and kept as ``answer.txt`` (the runner
   moves it to the cache's failed/ folder and the report links it), for inspection;
5. write ``script.txt`` (what the voice stage speaks) and ``citations.json`` (the sentences, the passages each
   cites with file and lines, every retrieved passage, and the raw answer).

The LLM's answer is data: it is written out as text, never rendered as a template, and a passage id is only ever
looked up among the retrieved passages, so nothing in a source or an answer can make this stage read another file
or run anything. The sources are passed to the template as values, never as template source.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from renderer.base import BackendError, BadInputError, ModelPool, RenderError, StepJob, atomic_write_bytes, run_each
from renderer.llm import DEFAULT_OLLAMA_MODEL, LOCAL_DIR, LLMSettings, generate_local, generate_ollama
from renderer.retrieval import Passage, bm25_scores, rank, read_passages, split_sentences

logger = logging.getLogger(__name__)

#: Passages handed to the LLM (or picked from, extractively).
TOP_K = 8
#: A written script may be at most this many times `words` long.
MAX_LENGTH_FACTOR = 2
#: The extractive script uses passages scoring at least this share of the best passage's score.
EXTRACT_FLOOR = 0.4
#: How much of a rejected answer a failure message keeps.
ANSWER_SHOWN = 2000
#: Longest prompt a template may render (a guard, like the manifest templates' bound).
MAX_REQUEST = 200_000
SOURCE_PREFIX = "source:"


@dataclasses.dataclass(frozen=True)
class WriteSettings:
    """The write step's settings: the `llm` section (the prompt stage's spelling) and the target length."""

    llm: LLMSettings
    words: int

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], label: str = "") -> WriteSettings:
        llm = LLMSettings.from_mapping(settings, label)
        words = settings.get("words")
        if isinstance(words, bool) or not isinstance(words, int) or words < 1:
            raise BadInputError(f"{label}: words must be a positive number of words, got {words!r}")
        return cls(llm, words)


@dataclasses.dataclass(frozen=True)
class CitedSentence:
    text: str
    #: Ids of the passages it was written from (keys of WrittenScript.passages).
    passages: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WrittenScript:
    """What the stage wrote: the script, its sentences with their citations, and the passages it was given."""

    text: str
    sentences: tuple[CitedSentence, ...]
    #: The retrieved passages by id (p1 is the best match), with their BM25 scores.
    passages: Mapping[str, tuple[Passage, float]]
    engine: str
    model: str | None
    #: The LLM's raw answer (None for the extractive engine).
    answer: str | None
    warnings: tuple[str, ...] = ()

    def citations(self, brief: str, words: int) -> dict[str, Any]:
        """citations.json: every sentence with the passages it cites, and every passage retrieved."""
        return {
            "format": 1,
            "brief": brief,
            "words": words,
            "engine": self.engine,
            "model": self.model,
            "script": self.text,
            "sentences": [
                {"text": s.text, "passages": list(s.passages), "where": [self.passages[p][0].where for p in s.passages]}
                for s in self.sentences
            ],
            "passages": {pid: {**p.as_dict(), "score": round(score, 4)} for pid, (p, score) in self.passages.items()},
            "answer": self.answer,
        }

    def info(self) -> dict[str, Any]:
        """What the step's record keeps (and `plan -v` and the report show): the script and, per sentence, where its
        passages are."""
        return {
            "engine": self.engine,
            "model": self.model,
            "script": self.text,
            "words": len(self.text.split()),
            "sentences": [
                {
                    "text": s.text,
                    "cites": [{"id": p, **_cite(self.passages[p][0])} for p in s.passages],
                }
                for s in self.sentences
            ],
            "warnings": list(self.warnings),
        }


def _cite(passage: Passage) -> dict[str, str]:
    return {"file": passage.file, "where": passage.where, "anchor": passage.anchor}


def answer_schema(ids: Sequence[str]) -> dict[str, Any]:
    """The JSON schema the LLM's answer must follow (sent as Ollama's `format`): sentences, each with the ids of the
    passages it used, which can only be ids it was given."""
    return {
        "type": "object",
        "properties": {
            "sentences": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "passages": {"type": "array", "items": {"type": "string", "enum": list(ids)}},
                    },
                    "required": ["text", "passages"],
                },
            }
        },
        "required": ["sentences"],
    }


class ScriptWriter:
    """Writes scripts from documents. The language model (for `engine: local`) is loaded once through the pool and
    kept warm for every script of the run; Ollama keeps its own."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    @classmethod
    def from_pretrained(cls, pool: ModelPool) -> ScriptWriter:
        """The writer for a run: the models themselves load on first use, through `pool`."""
        return cls(pool)

    @staticmethod
    def check_inputs(job: StepJob) -> tuple[WriteSettings, dict[str, Path], Path | None]:
        """Settings, the source files by name and the prompt template (None for the extractive engine)."""
        where = job.label or job.key
        settings = WriteSettings.from_mapping(job.settings, where)
        if not job.text.strip():
            raise BadInputError(f"{where}: the brief is empty", "say what the script is to be about in `brief`")
        sources = {n.removeprefix(SOURCE_PREFIX): Path(p) for n, p in job.inputs.items() if n.startswith(SOURCE_PREFIX)}
        if not sources:
            raise BadInputError(f"{where}: no source files", "list the documents to write from in `sources`")
        template = job.inputs.get("template")
        if settings.llm.engine != "none" and template is None:
            raise BadInputError(f"{where}: the write step lacks its prompt template")
        return settings, sources, Path(template) if template is not None else None

    def __call__(self, job: StepJob) -> WrittenScript:
        settings, sources, template = self.check_inputs(job)
        where = job.label or job.key
        brief = " ".join(job.text.split())

        # 1. Passages of every source, in the manifest's order of files.
        passages = [p for name, path in sorted(sources.items()) for p in read_passages(path, name)]
        if not passages:
            raise BadInputError(f"{where}: the sources hold no text ({', '.join(sorted(sources))})")

        # 2. The best passages for the brief.
        ranked = rank(passages, brief, TOP_K)
        if not ranked:
            raise BadInputError(
                f"{where}: no passage of the {len(sources)} source file(s) shares a word with the brief {brief!r}",
                "use the documents' own words in the brief, or add the documents that cover it to `sources`",
            )
        retrieved = {f"p{i}": pair for i, pair in enumerate(ranked, start=1)}
        logger.info("%s: %d passages, best: %s", where, len(passages), ", ".join(p.where for p, _ in ranked[:3]))

        # 3. Write: extractively, or by the LLM from the rendered template.
        if settings.llm.engine == "none":
            sentences = extract(retrieved, brief, settings.words)
            written = WrittenScript(_join(sentences), tuple(sentences), retrieved, "none", None, None)
        else:
            request = render_request(template, brief, settings, retrieved)
            answer, model = self._ask(job, request, settings, list(retrieved))
            # 4. The guard rails: whatever the answer is, it is checked as data; a refused one is kept (answer.txt,
            # in the cache's failed/ folder, linked from the report).
            try:
                sentences, warnings = check_answer(answer, retrieved, settings.words, where)
            except BackendError as exc:
                exc.artifact = job.out_dir / "answer.txt"
                atomic_write_bytes(exc.artifact, answer.encode("utf-8"))
                raise
            engine = settings.llm.engine
            written = WrittenScript(
                _join(sentences), tuple(sentences), retrieved, engine, model, answer, tuple(warnings)
            )

        # 5. The script for the voice stage, and its citations for people.
        atomic_write_bytes(job.out_dir / "script.txt", (written.text + "\n").encode("utf-8"))
        data = written.citations(brief, settings.words)
        atomic_write_bytes(job.out_dir / "citations.json", json.dumps(data, indent=1, ensure_ascii=False).encode())
        logger.info("%s: wrote %d words (%s): %s", where, len(written.text.split()), written.engine, written.text)
        return written

    def _ask(self, job: StepJob, request: str, settings: WriteSettings, ids: list[str]) -> tuple[str, str]:
        llm = settings.llm
        # Room for the longest script allowed, in JSON with citations (~1.5 tokens a word, ~15 per sentence).
        tokens = 3 * MAX_LENGTH_FACTOR * settings.words + 64
        if llm.engine == "ollama":
            model = llm.model or DEFAULT_OLLAMA_MODEL
            schema = answer_schema(ids)
            return generate_ollama(request, model, llm, job.seed, job.label, format=schema, num_predict=tokens), model
        answer = generate_local(dataclasses.replace(job, text=request), llm, self.pool, max_new_tokens=tokens)
        return answer, llm.model or LOCAL_DIR


def run(jobs: Sequence[StepJob], pool: ModelPool) -> list[dict | RenderError]:
    """Write out_dir/script.txt and citations.json for each job; per-job failures come back as RenderError."""
    writer = ScriptWriter.from_pretrained(pool)
    return run_each(jobs, lambda job: writer(job).info())


# --- the request ---------------------------------------------------------------------------------------------------


def render_request(
    template: Path, brief: str, settings: WriteSettings, retrieved: Mapping[str, tuple[Passage, float]]
) -> str:
    """The prompt: the template rendered in Jinja's sandbox, with the brief, the target length and the passages as
    values (a passage's text is data for the template, never template source)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    passages = [
        {"id": pid, "file": p.file, "where": p.where, "section": p.section, "text": p.text}
        for pid, (p, _) in retrieved.items()
    ]
    context = {"brief": brief, "words": settings.words, "engine": settings.llm.engine, "passages": passages}
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, trim_blocks=True)
    try:
        source = template.read_text(encoding="utf-8")
        text = env.from_string(source).render(**context)
    except (OSError, UnicodeDecodeError, jinja2.TemplateError) as exc:
        raise BadInputError(f"prompt template {template.name}: {exc}", "fix the template in prompts/") from exc
    if len(text) > MAX_REQUEST:
        raise BadInputError(f"prompt template {template.name} renders more than {MAX_REQUEST} characters")
    return text.strip()


# --- the answer ----------------------------------------------------------------------------------------------------


def check_answer(
    answer: str, retrieved: Mapping[str, tuple[Passage, float]], words: int, where: str
) -> tuple[list[CitedSentence], list[str]]:
    """The sentences of an LLM's answer, or a BackendError when it is not the JSON asked for, is empty, cites
    nothing, cites a passage it was not given, or is longer than twice `words`. The message keeps the answer."""

    def refuse(what: str, hint: str) -> BackendError:
        shown = answer if len(answer) <= ANSWER_SHOWN else answer[:ANSWER_SHOWN] + "…"
        return BackendError(f"{where}: the LLM's script {what}; its answer was: {shown!r}", hint)

    data = _json_object(answer)
    items = data.get("sentences") if isinstance(data, dict) else _marked_sentences(answer)
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("text"), str) and isinstance(i.get("passages", []), list)
        for i in items
    ):
        raise refuse(
            "is not the JSON asked for ({'sentences': [{'text', 'passages'}]}) nor sentences marked [p1]",
            "use a model that follows JSON schemas (Ollama's structured output), or llm.engine: none",
        )
    sentences = [
        CitedSentence(" ".join(i["text"].split()), tuple(dict.fromkeys(str(p) for p in i.get("passages", []))))
        for i in items
        if i["text"].strip()
    ]
    if not sentences:
        raise refuse("is empty", "check the brief and the model; llm.engine: none writes an extractive script")
    cited = [p for s in sentences for p in s.passages]
    unknown = sorted({p for p in cited if p not in retrieved})
    if unknown:
        raise refuse(
            f"cites passages it was not given: {', '.join(unknown)} (given: {', '.join(retrieved)})",
            "run again with another llm.model or temperature; a script must cite only the passages retrieved for it",
        )
    if not cited:
        raise refuse("cites no passage", "a script must say which passages it was written from; try another model")
    count = sum(len(s.text.split()) for s in sentences)
    if count > MAX_LENGTH_FACTOR * words:
        raise refuse(
            f"has {count} words, more than {MAX_LENGTH_FACTOR} × words ({words})",
            "raise `words`, or use a model that keeps to the length asked for",
        )
    warnings = [f"sentence {n} cites no passage: {s.text!r}" for n, s in enumerate(sentences, 1) if not s.passages]
    return sentences, warnings


#: A citation mark in a plain-text answer: "[p1]", "[p1, p3]".
_MARK = re.compile(r"\s*\[([^\[\]\n]{1,100})\]")


def _marked_sentences(answer: str) -> list[dict[str, Any]] | None:
    """The sentences of a plain-text answer whose citations are marks after the text they support ("Orders ship in
    two days. [p1] Express costs 9 euros. [p2]"): how a base model (`engine: local`), which continues a pattern rather
    than following a JSON schema, answers. None when the answer has no mark."""
    parts = _MARK.split(answer.strip())
    if len(parts) < 2:
        return None
    chunks: list[tuple[str, list[str]]] = []
    text, ids = parts[0], []
    for mark, following in zip(parts[1::2], parts[2::2], strict=True):
        ids += [i.strip() for i in mark.split(",") if i.strip()]
        if following.strip():  # the next text: what these marks cite ends here
            chunks.append((text, ids))
            text, ids = following, []
    chunks.append((text, ids))
    return [{"text": s, "passages": ids} for text, ids in chunks for s in split_sentences(" ".join(text.split()))]


def _json_object(answer: str) -> Any:
    """The JSON object in an answer: the whole answer, or the span from its first '{' to its last '}' (a model that
    wraps it in prose or a code fence)."""
    for text in (answer, answer[answer.find("{") : answer.rfind("}") + 1]):
        try:
            return json.loads(text)
        except ValueError:
            continue
    return None


# --- extractive ----------------------------------------------------------------------------------------------------


def extract(retrieved: Mapping[str, tuple[Passage, float]], brief: str, words: int) -> list[CitedSentence]:
    """The best-ranked sentences of the retrieved passages for the brief, as many as fit in `words` (the best one cut
    at a word when even it is longer), in the order of the passages and of the sentences within them.

    A sentence ranks by its passage's BM25 score plus its own (so a sentence that matches the brief in a good passage
    comes first, and a passage's other sentences follow it); passages scoring under EXTRACT_FLOOR of the best one
    are left out, so a weak match never pads the script."""
    best = max(score for _, score in retrieved.values())
    candidates = [
        (pid, score, sentence)
        for pid, (p, score) in retrieved.items()
        if score >= EXTRACT_FLOOR * best
        for sentence in split_sentences(p.text)
    ]
    own = bm25_scores([s for _, _, s in candidates], brief)
    order = sorted(range(len(candidates)), key=lambda i: (-(candidates[i][1] + own[i]), i))
    chosen: list[int] = []
    used = 0
    for i in order:
        count = len(candidates[i][2].split())
        if used + count <= words:
            chosen.append(i)
            used += count
    if not chosen:  # even the best sentence is too long: its first `words` words
        pid, _, sentence = candidates[order[0]]
        cut = " ".join(sentence.split()[:words]).rstrip(",;:-")
        return [CitedSentence(cut if cut.endswith((".", "!", "?")) else cut + ".", (pid,))]
    return [CitedSentence(candidates[i][2], (candidates[i][0],)) for i in sorted(chosen)]


def _join(sentences: Sequence[CitedSentence]) -> str:
    return re.sub(r"\s+", " ", " ".join(s.text for s in sentences)).strip()


__all__ = ["ScriptWriter", "WriteSettings", "WrittenScript", "answer_schema", "check_answer", "run"]
