"""One data model for pairwise preferences, read from and written to jsonl or parquet through ``datasets``.

``PreferencePairs`` holds N pairs: samples ``a`` and ``b`` [N, *shape], ``labels`` [N] = the observed P(a beats b)
in {0, 0.5, 1} (0.5: a tie), optional conditions ``cond`` [N, ...] and captions. Three file layouts load as they
are (the layout is told by the columns):

- tensors: ``a``, ``b`` (nested lists of numbers, one sample each), ``label`` and optionally ``cond``;
- Pick-a-Pic v2: ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, or paths relative to the file), ``label_0``
  (1: jpg_0 preferred, 0.5: tie);
- HPDv2 (train split): ``prompt``, ``image_path`` (two paths), ``human_preference`` (two numbers, the preferred
  image's is 1).

Images become [C, H, W] tensors in [-1, 1] (C and H, W from ``sample_shape`` when given: grayscale for C = 1).

Pointwise scores (``PointwiseScores``, for DRO offline: one score per sample, no pairs) use columns ``x``,
``score`` and optionally ``cond`` (``load_scores`` / ``write_scores``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

LABELS = (0.0, 0.5, 1.0)
LAYOUTS = {
    "tensors": ("a", "b", "label"),
    "pickapic": ("caption", "jpg_0", "jpg_1", "label_0"),
    "hpdv2": ("prompt", "image_path", "human_preference"),
}


@dataclass
class PreferencePairs:
    """N preference pairs: a, b [N, *shape]; labels [N] (1: a won, 0: b won, 0.5: tie); cond [N, ...] or None."""

    a: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor
    cond: torch.Tensor | None = None
    captions: list[str] | None = None

    def __post_init__(self):
        n = self.a.shape[0]
        if self.b.shape != self.a.shape:
            raise ConfigError(f"preference pairs: a has shape {tuple(self.a.shape)} but b {tuple(self.b.shape)}; "
                              "both samples of a pair must have the same shape")
        if self.labels.shape != (n,):
            raise ConfigError(f"preference pairs: labels of shape {tuple(self.labels.shape)} for {n} pairs")
        bad = ~(torch.isclose(self.labels[:, None].double(), torch.tensor(LABELS, dtype=torch.float64)).any(1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ConfigError(f"preference pairs: label {float(self.labels[i])} of pair {i} must be one of 0, 0.5, 1 "
                              "(1: a won, 0: b won, 0.5: tie)")
        if self.cond is not None and self.cond.shape[0] != n:
            raise ConfigError(f"preference pairs: {self.cond.shape[0]} conditions for {n} pairs")

    def __len__(self) -> int:
        return self.a.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[1:])

    def winners_first(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(winner [M, *shape], loser [M, *shape], cond [M, ...] or None) of the M decided pairs (ties dropped)."""
        keep = self.labels != 0.5
        a_won = (self.labels[keep] == 1.0).view(-1, *([1] * (self.a.ndim - 1)))
        a, b = self.a[keep], self.b[keep]
        cond = None if self.cond is None else self.cond[keep]
        return torch.where(a_won, a, b), torch.where(a_won, b, a), cond


def _read_table(path: str):
    """The file as a ``datasets.Dataset`` (jsonl/json or parquet, told by the extension)."""
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise ConfigError(f"preference file {path!r} does not exist; write one with sqdf.preferences.write_pairs "
                          "or point method.data at a jsonl or parquet file")
    ext = os.path.splitext(path)[1].lower()
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if ext not in kinds:
        raise ConfigError(f"preference file {path!r}: unknown extension {ext!r}; use .jsonl or .parquet")
    try:
        return load_dataset(kinds[ext], data_files=path, split="train", keep_in_memory=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a malformed file
        raise ConfigError(f"preference file {path!r} could not be read as {kinds[ext]}: {e}") from e


def _layout(path: str, columns: list[str]) -> str:
    for name, needed in LAYOUTS.items():
        if all(c in columns for c in needed):
            return name
    wanted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in LAYOUTS.items())
    raise ConfigError(f"preference file {path!r} has columns {columns}, which match no layout ({wanted})")


def _tensor_column(path: str, rows, field: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    try:
        t = torch.tensor(rows, dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"preference file {path!r}: field {field!r} must hold numbers of one shape per row ({e})")
    if shape is not None and tuple(t.shape[1:]) != tuple(shape):
        raise ConfigError(f"preference file {path!r}: field {field!r} holds samples of shape {tuple(t.shape[1:])}, "
                          f"but the task's samples have shape {tuple(shape)}")
    return t


def _image(path: str, field: str, value, base_dir: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    from PIL import Image

    try:
        if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        else:
            img = Image.open(value if os.path.isabs(value) else os.path.join(base_dir, value))
        channels = shape[0] if shape is not None else 3
        img = img.convert("L" if channels == 1 else "RGB")
        if shape is not None:
            img = img.resize((shape[2], shape[1]), Image.BILINEAR)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"preference file {path!r}: field {field!r} is not a readable image ({e})") from e
    data = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # [H, W] or [H, W, C]
    return (data[None] if data.ndim == 2 else data.permute(2, 0, 1)) / 127.5 - 1


def _labels(path: str, field: str, values) -> torch.Tensor:
    try:
        labels = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"preference file {path!r}: field {field!r} must hold numbers ({e})") from e
    bad = [i for i, v in enumerate(labels.tolist()) if v not in LABELS]
    if bad:
        raise ConfigError(f"preference file {path!r}: field {field!r} = {labels[bad[0]].item()} in row {bad[0]}; "
                          "labels must be 0, 0.5 or 1 (1: the first sample won, 0.5: a tie)")
    return labels


def load_pairs(path: str, sample_shape: tuple[int, ...] | None = None) -> PreferencePairs:
    """Read preference pairs from ``path`` (jsonl or parquet, any layout above). ``sample_shape``: the task's
    sample shape, checked for tensors and used to size images."""
    table = _read_table(path)
    if len(table) == 0:
        raise ConfigError(f"preference file {path!r} holds no rows")
    layout = _layout(path, table.column_names)
    base = os.path.dirname(os.path.abspath(path))
    if layout == "tensors":
        a = _tensor_column(path, table["a"], "a", sample_shape)
        b = _tensor_column(path, table["b"], "b", tuple(a.shape[1:]))
        cond = _tensor_column(path, table["cond"], "cond", None) if "cond" in table.column_names else None
        return PreferencePairs(a, b, _labels(path, "label", table["label"]), cond)
    if layout == "pickapic":
        a = torch.stack([_image(path, "jpg_0", v, base, sample_shape) for v in table["jpg_0"]])
        b = torch.stack([_image(path, "jpg_1", v, base, tuple(a.shape[1:])) for v in table["jpg_1"]])
        return PreferencePairs(a, b, _labels(path, "label_0", table["label_0"]), captions=list(table["caption"]))
    pairs, prefs = table["image_path"], table["human_preference"]
    for i, (p, h) in enumerate(zip(pairs, prefs)):
        if len(p) != 2 or len(h) != 2:
            raise ConfigError(f"preference file {path!r}: row {i} has {len(p)} image_path and {len(h)} "
                              "human_preference entries; the HPDv2 train layout has two of each")
    a = torch.stack([_image(path, "image_path", p[0], base, sample_shape) for p in pairs])
    b = torch.stack([_image(path, "image_path", p[1], base, tuple(a.shape[1:])) for p in pairs])
    first = [1.0 if h[0] > h[1] else 0.0 if h[0] < h[1] else 0.5 for h in prefs]
    return PreferencePairs(a, b, _labels(path, "human_preference", first), captions=list(table["prompt"]))


def write_pairs(pairs: PreferencePairs, path: str) -> str:
    """Write ``pairs`` in the tensors layout to ``path`` (.jsonl or .parquet, through ``datasets``); returns path.
    Written to a temporary name first and moved into place, so a kill never leaves half a file."""
    columns = {"a": pairs.a.tolist(), "b": pairs.b.tolist(), "label": pairs.labels.tolist()}
    if pairs.cond is not None:
        columns["cond"] = pairs.cond.tolist()
    return _write_table(columns, path, "preference file")


def _write_table(columns: dict, path: str, what: str) -> str:
    from datasets import Dataset

    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".parquet"):
        raise ConfigError(f"{what} {path!r}: use a .jsonl or .parquet name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{ext}"
    table = Dataset.from_dict(columns)
    if ext == ".jsonl":
        table.to_json(tmp, lines=True)
    else:
        table.to_parquet(tmp)
    os.replace(tmp, path)
    return path


@dataclass
class PointwiseScores:
    """N scored samples: x [N, *shape], scores [N] (finite), cond [N, ...] or None."""

    x: torch.Tensor
    scores: torch.Tensor
    cond: torch.Tensor | None = None

    def __post_init__(self):
        n = self.x.shape[0]
        if self.scores.shape != (n,):
            raise ConfigError(f"pointwise scores: scores of shape {tuple(self.scores.shape)} for {n} samples")
        if not bool(torch.isfinite(self.scores).all()):
            i = int((~torch.isfinite(self.scores)).nonzero()[0])
            raise ConfigError(f"pointwise scores: score {float(self.scores[i])} of sample {i} is not finite")
        if self.cond is not None and self.cond.shape[0] != n:
            raise ConfigError(f"pointwise scores: {self.cond.shape[0]} conditions for {n} samples")

    def __len__(self) -> int:
        return self.x.shape[0]


def load_scores(path: str, sample_shape: tuple[int, ...] | None = None) -> PointwiseScores:
    """Read scored samples from ``path`` (jsonl or parquet with columns x, score and optionally cond)."""
    table = _read_table(path)
    if len(table) == 0:
        raise ConfigError(f"score file {path!r} holds no rows")
    missing = [c for c in ("x", "score") if c not in table.column_names]
    if missing:
        raise ConfigError(f"score file {path!r} has columns {table.column_names}; it needs x and score "
                          f"(missing: {', '.join(missing)}), and optionally cond")
    x = _tensor_column(path, table["x"], "x", sample_shape)
    try:
        scores = torch.tensor([float(v) for v in table["score"]], dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"score file {path!r}: field 'score' must hold numbers ({e})") from e
    if not bool(torch.isfinite(scores).all()):
        i = int((~torch.isfinite(scores)).nonzero()[0])
        raise ConfigError(f"score file {path!r}: field 'score' = {float(scores[i])} in row {i} is not finite")
    cond = _tensor_column(path, table["cond"], "cond", None) if "cond" in table.column_names else None
    return PointwiseScores(x, scores, cond)


def write_scores(scores: PointwiseScores, path: str) -> str:
    """Write ``scores`` (columns x, score, cond) to a .jsonl or .parquet file, atomically; returns path."""
    columns = {"x": scores.x.tolist(), "score": scores.scores.tolist()}
    if scores.cond is not None:
        columns["cond"] = scores.cond.tolist()
    return _write_table(columns, path, "score file")
