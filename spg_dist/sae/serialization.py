"""safetensors with one JSON metadata entry: the only on-disk/in-table format of SAE weights and state.

Why safetensors: no pickle (loading a model from a shared store must not execute code), zero-copy reads, and
the same bytes work as a file (checkpoints) or a ``large_binary`` cell (``sae_models.weights``). Everything
that is not a tensor travels as one JSON document under the metadata key ``"spg_dist"``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
from safetensors import safe_open
from torch import Tensor

META_KEY = "spg_dist"


def _prepare(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors (safetensors refuses views sharing storage and device tensors)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def pack(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> bytes:
    """Tensors + JSON-able metadata -> safetensors bytes."""
    return safetensors.torch.save(_prepare(tensors), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def _meta_from_header(header: Mapping[str, Any] | None) -> dict[str, Any]:
    raw = (header or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def unpack(data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """safetensors bytes -> (tensors on CPU, metadata dict); the header is parsed directly (its 8-byte length
    prefix and JSON), because ``safetensors.torch.load`` returns tensors only."""
    if len(data) < 8:
        raise ValueError("not a safetensors buffer (shorter than its 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    return safetensors.torch.load(bytes(data)), _meta_from_header(header.get("__metadata__"))


def save_file(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write atomically (temp file in the same folder, then rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(_prepare(tensors), tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_file(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_file` -> (tensors on ``device``, metadata dict)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = _meta_from_header(f.metadata())
        tensors = {name: f.get_tensor(name).to(device) for name in f.keys()}
    return tensors, meta


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (same reason as :func:`save_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
