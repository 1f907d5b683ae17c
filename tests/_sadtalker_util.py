"""Shared helpers for the SadTalker golden tests: where the reference material is, filled weights, golden files.

The reference folder (`../shared/sadtalker` next to the repository: SPEC, inventories, golden files computed by
upstream SadTalker with deterministic random weights) is optional; tests that need it skip with a reason.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

#: Root of the SadTalker reference material (SPEC.md, inventory/, data/, golden/).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "sadtalker"
GOLDEN = SHARED / "golden" / "public"
DATA = SHARED / "data"

#: Golden network name → inventory file (per-network key names, checkpoint prefixes stripped).
INVENTORIES = {
    "recon": "face_3drecon_ResNet50_ReconNetWrapper",
    "audio2exp": "audio2exp_SimpleWrapperV2",
    "audio2pose": "audio2pose_Audio2Pose",
    "mapping70": "facerender_mapping_MappingNet_coeff70_mapping_00229",
    "mapping73": "facerender_mapping_MappingNet_coeff73_mapping_00109",
    "kp_detector": "facerender_kp_extractor_KPDetector",
    "generator": "facerender_generator_OcclusionAwareSPADEGenerator",
}


def require_shared() -> Path:
    """Skip the calling test when the reference folder is absent (e.g. a plain checkout of the repository)."""
    if not (SHARED / "golden" / "fill.py").is_file():
        pytest.skip(f"SadTalker reference material not found at {SHARED}")
    return SHARED


@functools.lru_cache(maxsize=1)
def fill_module() -> ModuleType:
    """Import golden/fill.py (the deterministic weight fill rule) from the reference folder."""
    require_shared()
    spec = importlib.util.spec_from_file_location("sadtalker_golden_fill", SHARED / "golden" / "fill.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=8)
def filled_weights(net: str) -> Mapping[str, Any]:
    """The filled state dict of golden network `net` (per-network key names), as upstream loaded it.

    Cached and shared between tests: copy a tensor before changing it in place.
    """
    fill = fill_module()
    rows = fill.read_inventory_txt(SHARED / "inventory" / f"{INVENTORIES[net]}.txt")
    return fill.fill_state_dict(rows)


def fill_checksum(net: str) -> str:
    """The published sha256 of the filled state dict of `net` (golden/fill_checksums.json)."""
    require_shared()
    return json.loads((SHARED / "golden" / "fill_checksums.json").read_text())[net]["sha256"]


def load_golden(name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and sidecar of golden file `name` (e.g. "net_recon"); skips when the file is absent."""
    require_shared()
    path = GOLDEN / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"golden file {path} not found")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    sidecar = json.loads(path.with_suffix(".json").read_text())
    return arrays, sidecar


def golden_inputs(arrays: Mapping[str, np.ndarray], sidecar: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays whose role is "input" in the sidecar."""
    return {k: arrays[k] for k, meta in sidecar["arrays"].items() if meta["role"] == "input"}


def to_numpy(value: Any) -> np.ndarray:
    """Tensor or array-like → numpy (detached, on the CPU)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def compare(got: Any, want: np.ndarray, tol: Mapping[str, Any]) -> tuple[bool, str]:
    """Compare one array with the sidecar tolerance, the way golden/check_golden.py does; returns (ok, summary)."""
    got = to_numpy(got)
    if got.shape != want.shape:
        return False, f"shape {got.shape} != golden {want.shape}"
    if want.dtype == np.uint8 or "max_abs_u8" in tol:
        diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
        worst, frac = int(diff.max(initial=0)), float((diff > 0).mean()) if diff.size else 0.0
        ok = worst <= tol.get("max_abs_u8", 0) and frac <= tol.get("max_frac_differing", 0.0)
        return ok, f"max|d|={worst}, differing={frac:.2e}"
    if want.dtype.kind in "iub":
        ok = np.array_equal(got.astype(want.dtype), want)
        return ok, "exact" if ok else f"integer mismatch: got {got.tolist()} want {want.tolist()}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    atol, rtol = tol.get("atol", 1e-5), tol.get("rtol", 1e-5)
    nan_ok = np.array_equal(np.isnan(g), np.isnan(w))
    err = np.abs(np.nan_to_num(g) - np.nan_to_num(w))
    viol = err - (atol + rtol * np.abs(np.nan_to_num(w)))
    if "outlier_frac" in tol:
        frac = float((viol > 0).mean()) if viol.size else 0.0
        ok = nan_ok and frac <= tol["outlier_frac"] and bool((err <= tol["outlier_atol"]).all())
    else:
        ok = nan_ok and bool((viol <= 0).all())
    return ok, f"max|d|={err.max(initial=0):.3g} (atol {atol:g}, rtol {rtol:g}){'' if nan_ok else ', NaN pattern'}"


def assert_matches(name: str, outputs: Mapping[str, Any], arrays: Mapping[str, np.ndarray], sidecar: Any) -> None:
    """Assert every returned array matches its golden counterpart within the sidecar tolerance (all reported)."""
    tolerances = sidecar.get("tolerance", {})
    failures = []
    for key, got in outputs.items():
        ok, summary = compare(got, arrays[key], tolerances.get(key, {}))
        if not ok:
            failures.append(f"{name}.{key}: {summary}")
    assert not failures, "golden mismatch:\n" + "\n".join(failures)


def random_spade_block(fin: int, fout: int, std: float = 0.3):
    """A SPADE residual block (learned shortcut where fin ≠ fout) with random weights and spectral-norm vectors,
    unfused (the checkpoint's layout)."""
    from renderer.sadtalker import facerender as fr

    block = fr.SPADEResnetBlock(fin, fout)
    for p in block.parameters():
        p.data.normal_(0, std)
    for sub in block.modules():
        if isinstance(sub, fr.SNConv2d):
            sub.weight_u.data.normal_()
            sub.weight_v.data.normal_()
    return block
