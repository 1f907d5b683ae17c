"""SadTalker checkpoints: find them, read them without unpickling code, load them strictly (SPEC §2).

Two layouts exist:

* **current** — `SadTalker_V0.0.2_<size>.safetensors`, the flat state dict of five networks under the prefixes
  `kp_extractor.`, `generator.`, `audio2exp.`, `audio2pose.`, `face_3drecon.`; plus the mapping net, always a torch
  pickle (`mapping_00229-model.pth.tar` for crop/extcrop/resize, `mapping_00109-model.pth.tar` for full/extfull,
  entry `"mapping"`);
* **legacy** — `epoch_20.pth["net_recon"]`, `auido2exp_00300-model.pth["model"]` (sic),
  `auido2pose_00140-model.pth["model"]`, `facevid2vid_00189-model.pth.tar["kp_detector" | "generator"]`. Used only
  when the safetensors file is absent and every legacy file is there. It has no 512 renderer: at size 512 the
  256-trained renderer runs on 512 inputs, as upstream does (a warning says so).

Safetensors files are read lazily, one prefix at a time. Pickles are read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers. A pickle that needs more is refused with
`UntrustedCheckpointError`; the user may convert it once, explicitly, after deciding to trust it:

    python -m renderer.sadtalker.weights convert --trust checkpoints/mapping_00229-model.pth.tar

which writes `mapping_00229-model.safetensors` next to it (every tensor of the pickle, keys `<entry>.<key>`). A
converted sibling is preferred over the pickle from then on, so the pickle is never unpickled again.

`load_face_renderer` builds the three renderer networks, loads them strictly, folds BatchNorms into the
convolutions before them and spectral norms into plain weights (`facerender.fuse_for_inference`; checked against
the golden files), moves them to the device and, on CUDA, to channels-last memory format.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renderer.base import MissingWeightsError
from renderer.checkpoints import sadtalker_files

if TYPE_CHECKING:
    import torch

    from renderer.sadtalker.facerender import FaceRenderer

logger = logging.getLogger(__name__)

#: Children of the safetensors wrapper module (SPEC §2.2), i.e. the key prefixes without the dot.
NETWORKS = ("kp_extractor", "generator", "audio2exp", "audio2pose", "face_3drecon")
#: Mapping net files by number of input coefficients (SPEC §2.1); the pickle entry is "mapping".
MAPPING_FILES = {70: "mapping_00229-model.pth.tar", 73: "mapping_00109-model.pth.tar"}
MAPPING_ENTRY = "mapping"
#: Legacy set (SPEC §2.3): network → (file, top-level entry).
LEGACY_FILES = {
    "face_3drecon": ("epoch_20.pth", "net_recon"),
    "audio2exp": ("auido2exp_00300-model.pth", "model"),
    "audio2pose": ("auido2pose_00140-model.pth", "model"),
    "kp_extractor": ("facevid2vid_00189-model.pth.tar", "kp_detector"),
    "generator": ("facevid2vid_00189-model.pth.tar", "generator"),
}
_CHECKPOINT_HINT = "run `make checkpoints` (or copy the files into the checkpoints folder)"


class UntrustedCheckpointError(MissingWeightsError):
    """A pickle holds more than tensors, so `weights_only` loading refuses it; nothing was unpickled."""


def safetensors_name(size: int) -> str:
    """File name of the current layout for render size 256 or 512."""
    return f"SadTalker_V0.0.2_{size}.safetensors"


def converted_name(pickle_name: str) -> str:
    """Name of the safetensors file that `convert --trust` writes for a pickle (suffixes .pth/.tar dropped)."""
    name = pickle_name
    for suffix in (".tar", ".pth", ".pt", ".ckpt"):
        name = name.removesuffix(suffix)
    return name + ".safetensors"


def _usable(path: Path) -> Path | None:
    """The file to read for `path`: its converted safetensors sibling if present, else itself if present."""
    converted = path.with_name(converted_name(path.name))
    if converted.is_file():
        return converted
    return path if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class CheckpointSet:
    """Where each SadTalker network of one size/preprocess combination comes from."""

    root: Path
    size: int
    preprocess: str
    legacy: bool

    @property
    def mapping_file(self) -> Path:
        from renderer.sadtalker.facerender import mapping_channels

        return self.root / MAPPING_FILES[mapping_channels(self.preprocess)]

    def files(self) -> list[Path]:
        """Every file this set reads (pickles named as such even where a converted sibling is used)."""
        if self.legacy:
            names = sorted({name for name, _ in LEGACY_FILES.values()})
            return [self.root / n for n in names] + [self.mapping_file]
        return [self.root / safetensors_name(self.size), self.mapping_file]

    def state_dict(self, network: str) -> dict[str, torch.Tensor]:
        """Per-network state dict (prefix stripped) for one of `NETWORKS` or "mapping", as float32 CPU tensors."""
        if network == "mapping":
            return read_pickle_entry(self.mapping_file, MAPPING_ENTRY)
        if network not in NETWORKS:
            raise ValueError(f"unknown SadTalker network {network!r}; expected one of {NETWORKS} or 'mapping'")
        if self.legacy:
            name, entry = LEGACY_FILES[network]
            return read_pickle_entry(self.root / name, entry)
        return read_safetensors_prefix(self.root / safetensors_name(self.size), network + ".")


def checkpoint_set(root: Path, size: int = 256, preprocess: str = "crop") -> CheckpointSet:
    """Pick the layout for `root` (current if its safetensors file exists, else a complete legacy set).

    Raises MissingWeightsError naming the missing files (of the current layout, the one `make checkpoints` fetches).
    """
    root = Path(root)
    wanted = sadtalker_files(size, preprocess)
    absent = [name for name in wanted if _usable(root / name) is None]
    current = CheckpointSet(root, size, preprocess, legacy=False)
    if not absent:
        return current
    legacy = CheckpointSet(root, size, preprocess, legacy=True)
    mapping_ok = _usable(current.mapping_file) is not None
    legacy_ok = all(_usable(root / name) is not None for name, _ in LEGACY_FILES.values())
    if mapping_ok and legacy_ok:
        if size != 256:
            logger.warning(
                "%s is missing: using the legacy checkpoints, whose renderer was trained at 256, for size %d",
                safetensors_name(size),
                size,
            )
        else:
            logger.info("%s is missing: using the legacy checkpoint set", safetensors_name(size))
        return legacy
    raise MissingWeightsError(
        f"SadTalker weights missing in {root}: {', '.join(absent)}", f"{_CHECKPOINT_HINT}; needed: {', '.join(wanted)}"
    )


def read_safetensors_prefix(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose key starts with `prefix`, prefix stripped, as float32 (ints kept).

    Only the selected tensors are read, so loading the renderer does not pull the audio networks into memory.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = _as_float32(fh.get_tensor(key))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MissingWeightsError(
            f"cannot read {path}: {exc}", f"the file looks damaged or truncated: delete it and {_CHECKPOINT_HINT}"
        ) from exc
    if not out:
        raise MissingWeightsError(
            f"{path} holds no tensors under '{prefix}'", f"it is not a SadTalker V0.0.2 file: {_CHECKPOINT_HINT}"
        )
    return out


def read_pickle_entry(path: Path, entry: str) -> dict[str, torch.Tensor]:
    """The state dict stored under `entry` of a torch pickle, read with `weights_only=True`.

    A converted sibling (`converted_name`) is read instead when it exists. A pickle that needs more than
    weights-only loading raises UntrustedCheckpointError with the one-time conversion command.
    """
    path = Path(path)
    usable = _usable(path)
    if usable is None:
        raise MissingWeightsError(f"SadTalker weights file {path} is missing", _CHECKPOINT_HINT)
    if usable.suffix == ".safetensors":
        return read_safetensors_prefix(usable, entry + ".")
    data = _torch_load(usable)
    if not isinstance(data, Mapping) or entry not in data:
        keys = list(data)[:8] if isinstance(data, Mapping) else type(data).__name__
        raise MissingWeightsError(
            f"{path} has no entry '{entry}' (found {keys})",
            f"it is not the expected SadTalker file: {_CHECKPOINT_HINT}",
        )
    state = data[entry]
    if not isinstance(state, Mapping):
        raise MissingWeightsError(f"{path}['{entry}'] is not a state dict", _CHECKPOINT_HINT)
    return {str(k): _as_float32(v) for k, v in state.items()}


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` (memory-mapped when the file allows it); never unpickles code."""
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "not weights-only")
        raise UntrustedCheckpointError(
            f"{path} holds Python objects besides tensors, so it was not unpickled ({reason.split(' was not')[0]})",
            f"if you trust this file, convert it once with `python -m renderer.sadtalker.weights convert --trust "
            f"{path}`; it writes {converted_name(path.name)} next to it, which is used from then on",
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise MissingWeightsError(
            f"cannot read {path}: {exc}", f"the file looks damaged or truncated: delete it and {_CHECKPOINT_HINT}"
        ) from exc


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """`load_state_dict(strict=True)`, except that missing BatchNorm `num_batches_tracked` are tolerated
    (legacy pickles lack them, SPEC §2.2); a mismatch raises MissingWeightsError naming `where`."""
    import torch

    state = dict(state_dict)
    for key, buf in module.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(buf)
    try:
        # assign=True adopts the loaded tensors instead of copying them: no second copy of 600 MB at load time.
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        own = set(module.state_dict())
        missing = sorted(own - set(state))
        unexpected = sorted(set(state) - own)
        detail = f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        if not missing and not unexpected:
            detail = str(exc).splitlines()[-1].strip()
        raise MissingWeightsError(
            f"{where} does not match {type(module).__name__}: {detail}",
            f"it is not a SadTalker V0.0.2 checkpoint: {_CHECKPOINT_HINT}",
        ) from exc


def place(module: torch.nn.Module, device: str, channels_last: bool | None = None) -> torch.nn.Module:
    """Move a module to `device`; convolution weights go channels-last (2-D) / channels-last-3d (3-D) on CUDA
    (`channels_last` None) or when asked. Activations then follow the weights' layout, which cuDNN's tensor-core
    kernels use natively."""
    import torch

    module = module.to(device)
    if channels_last or (channels_last is None and torch.device(device).type == "cuda"):
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() in (4, 5):
                fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
                weight.data = weight.data.contiguous(memory_format=fmt)
    return module


def cast_for_autocast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the weights and biases of `module`'s convolutions and linear layers in `dtype` (in place).

    Under autocast to `dtype` these layers cast their float32 weights on every call; a recorded CUDA graph must
    run autocast with its weight cache off, so every replay would cast all of them again (about 153 M values per
    batch for the renderer). Autocast rounds them to the same values either way, so outputs are unchanged (bit for
    bit: tests/test_sadtalker_render.py), and these weights take half the memory. The project's own layers name
    such tensors in `AUTOCAST_TENSORS`; everything else keeps float32, since some parameters feed float32
    arithmetic on purpose."""
    from torch import nn

    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
    for sub in module.modules():
        names = ("weight", "bias") if isinstance(sub, layers) else getattr(sub, "AUTOCAST_TENSORS", ())
        for name in names:
            tensor = getattr(sub, name, None)
            if tensor is not None:
                tensor.data = tensor.data.to(dtype)
    return module


def load_face_renderer(
    root: Path, size: int = 256, preprocess: str = "crop", device: str = "cpu", fuse: bool = True
) -> FaceRenderer:
    """KPDetector + MappingNet (70 or 73 inputs by `preprocess`) + generator, strictly loaded, fused, in eval."""
    from renderer.sadtalker import facerender as fr

    ckpt = checkpoint_set(root, size, preprocess)
    kp_detector = fr.KPDetector()
    load_strict(kp_detector, ckpt.state_dict("kp_extractor"), _where(ckpt, "kp_extractor"))
    mapping = fr.MappingNet(fr.mapping_channels(preprocess))
    load_strict(mapping, ckpt.state_dict("mapping"), f"{ckpt.mapping_file}['{MAPPING_ENTRY}']")
    generator = fr.OcclusionAwareSPADEGenerator()
    load_strict(generator, ckpt.state_dict("generator"), _where(ckpt, "generator"))
    renderer = fr.FaceRenderer(kp_detector, mapping, generator).eval()
    if fuse:
        fr.fuse_for_inference(renderer)
    renderer.requires_grad_(False)
    return place(renderer, device)


def _where(ckpt: CheckpointSet, network: str) -> str:
    if ckpt.legacy:
        name, entry = LEGACY_FILES[network]
        return f"{ckpt.root / name}['{entry}']"
    return f"{ckpt.root / safetensors_name(ckpt.size)} ({network}.*)"


# ----------------------------------------------------------------------------------------------------------------
# One-time, explicit conversion of a trusted pickle


def _flatten(prefix: str, value: Any, out: dict[str, torch.Tensor]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().cpu().contiguous()
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)


def convert_trusted(path: Path, trust: bool = False) -> Path:
    """Unpickle `path` fully (only with trust=True) and write its tensors to a safetensors sibling.

    Every tensor reachable through nested dicts is kept under its dotted path (`mapping.first.0.weight`); other
    objects (epoch numbers, optimizer settings) are dropped. Returns the written file.
    """
    import torch
    from safetensors.torch import save_file

    if not trust:
        raise PermissionError(f"refusing to unpickle {path} without an explicit trust decision (pass trust=True)")
    path = Path(path)
    data = torch.load(path, map_location="cpu", weights_only=False)  # the caller vouched for this file
    tensors: dict[str, torch.Tensor] = {}
    _flatten("", data, tensors)
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    # safetensors refuses tensors that share memory; clone the few that do.
    seen: set[tuple[int, int]] = set()
    for key, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen:
            tensors[key] = t.clone()
        seen.add(ident)
    out = path.with_name(converted_name(path.name))
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"converted_from": path.name})
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m renderer.sadtalker.weights convert --trust FILE...` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m renderer.sadtalker.weights")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert trusted torch pickles to safetensors, once")
    conv.add_argument("files", nargs="+", type=Path)
    conv.add_argument(
        "--trust", action="store_true", help="I trust these files: unpickling them may run code they contain"
    )
    args = parser.parse_args(argv)
    if not args.trust:
        print("refusing to unpickle without --trust (unpickling can run code from the file)", file=sys.stderr)
        return 2
    for path in _existing(args.files):
        print(f"{path} -> {convert_trusted(path, trust=True)}")
    return 0


def _existing(paths: Iterable[Path]) -> list[Path]:
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"no such file: {path}")
        out.append(Path(path))
    return out


if __name__ == "__main__":
    sys.exit(main())
