"""Save and load the digits models as safetensors files whose metadata holds the architecture.

Shipped files live in ``sqdf/digits/weights/`` with their SHA-256 sums in ``SHA256SUMS``; loading a shipped file
checks its sum, so a truncated or edited file fails loudly instead of producing wrong rewards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED = {"unet": "digits_unet.safetensors", "classifier": "digits_classifier.safetensors",
           "consistency": "digits_consistency.safetensors"}


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_sums() -> dict[str, str]:
    """{file name: sha256} from weights/SHA256SUMS."""
    path = WEIGHTS_DIR / "SHA256SUMS"
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    return sums


def save_model(model: nn.Module, path: str | os.PathLike, kind: str, **info) -> None:
    """Write model's state dict (float32) with {'kind', 'arch', **info} as JSON metadata, atomically."""
    from safetensors.torch import save_file

    meta = {"kind": kind, "arch": json.dumps(model.arch()), **{k: json.dumps(v) for k, v in info.items()}}
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata with JSON values decoded) of a file written by ``save_model``."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"model file {str(path)!r} does not exist; train it with scripts/train_digits.py "
                              "or reinstall sqdf to restore the shipped weights")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"model file {str(path)!r} is not a readable safetensors file ({exc})") from exc
    if "kind" not in meta or "arch" not in meta:
        raise CheckpointError(f"model file {str(path)!r} lacks the 'kind'/'arch' metadata written by save_model")
    decoded = {k: (v if k == "kind" else json.loads(v)) for k, v in meta.items()}
    return state, decoded


def shipped_path(name: str, verify: bool = True) -> Path:
    """Path of a shipped model ('unet', 'classifier' or 'consistency'), its checksum verified."""
    if name not in SHIPPED:
        raise CheckpointError(f"no shipped digits model {name!r}; one of {sorted(SHIPPED)}")
    path = WEIGHTS_DIR / SHIPPED[name]
    if not path.exists():
        raise CheckpointError(f"the shipped model file {str(path)!r} is missing; reinstall sqdf or run "
                              "scripts/train_digits.py to rebuild it")
    if verify:
        expected = shipped_sums().get(path.name)
        if expected is not None and sha256_of(path) != expected:
            raise CheckpointError(f"{str(path)!r} does not match its SHA-256 in weights/SHA256SUMS; the file is "
                                  "corrupt or was changed: reinstall sqdf or retrain it with scripts/train_digits.py")
    return path


def build_model(kind: str, arch: dict) -> nn.Module:
    from .classifier import DigitClassifier
    from .consistency import ConsistencyModel
    from .unet import DigitUNet

    if kind == "unet":
        return DigitUNet(channels=tuple(arch["channels"]), emb_dim=arch["emb_dim"],
                         num_train_steps=arch["num_train_steps"], prediction_type=arch["prediction_type"])
    if kind == "classifier":
        return DigitClassifier(**arch)
    if kind == "consistency":
        return ConsistencyModel(build_model("unet", arch["net"]), num_train_steps=arch["num_train_steps"],
                                schedule=arch["schedule"], abar_floor=arch.get("abar_floor", 0.01))
    raise CheckpointError(f"unknown model kind {kind!r} in the file's metadata")


def load_model(path: str | os.PathLike, kind: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode with frozen-ready weights, metadata) from a file written by ``save_model``."""
    state, meta = read_model_file(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{str(path)!r} holds a {meta['kind']!r} model, not a {kind!r} model")
    model = build_model(meta["kind"], meta["arch"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(path)!r} does not fit its declared architecture: {exc}") from exc
    return model.eval(), meta


def load_shipped(name: str) -> tuple[nn.Module, dict]:
    """A shipped model and its metadata (checksum verified)."""
    return load_model(shipped_path(name), kind=name)
