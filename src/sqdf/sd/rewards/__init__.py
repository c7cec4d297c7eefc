"""The image reward zoo: a registry of named rewards and weighted sums of them.

``load_reward(spec, weights)`` builds a reward from a spec such as ``"aesthetic"``, ``"aesthetic+0.1*hpsv2"`` or
``"1.0*aesthetic - 0.5*jpeg_compressibility"`` (grammar in ``SPEC_GRAMMAR``). ``weights`` points at local model
files: a plain ``PATH`` when exactly one term needs weights, else ``"name=PATH,name2=PATH"``. The JPEG rewards need
none. Every reward maps images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts to ``[B]`` float32 (see ``base``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ...errors import ConfigError, MissingWeightsError
from .base import ImageReward, clip_preprocess, require_path


def _aesthetic(path, device=None, dtype=None):
    from .aesthetic import load_aesthetic

    return load_aesthetic(path, device, dtype)


def _hpsv2(path, device=None, dtype=None):
    from .hps import load_hpsv2

    return load_hpsv2(path, device=device, dtype=dtype)


def _imagereward(path, device=None, dtype=None):
    from .imagereward import load_imagereward

    return load_imagereward(path, device=device, dtype=dtype)


def _pickscore(path, device=None, dtype=None):
    from .clip_score import load_pickscore

    return load_pickscore(path, device, dtype)


def _clip(path, device=None, dtype=None):
    from .clip_score import load_clip_score

    return load_clip_score(path, device, dtype)


def _jpeg_compressibility(path=None, device=None, dtype=None):
    from .jpeg import jpeg_compressibility

    return jpeg_compressibility()


def _jpeg_incompressibility(path=None, device=None, dtype=None):
    from .jpeg import jpeg_incompressibility

    return jpeg_incompressibility()


# name -> loader(path | None, device, dtype) -> ImageReward
REWARDS: dict[str, Callable[..., ImageReward]] = {
    "aesthetic": _aesthetic, "hpsv2": _hpsv2, "imagereward": _imagereward, "pickscore": _pickscore, "clip": _clip,
    "jpeg_compressibility": _jpeg_compressibility, "jpeg_incompressibility": _jpeg_incompressibility,
}
NO_WEIGHTS = frozenset({"jpeg_compressibility", "jpeg_incompressibility"})
SPEC_GRAMMAR = ("SPEC := TERM (('+' | '-') TERM)*;  TERM := [NUMBER '*'] NAME;  e.g. 'aesthetic', "
                "'aesthetic+0.1*hpsv2', '1.0*aesthetic - 0.5*jpeg_compressibility'")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TERM = re.compile(rf"(?:((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?({_NAME})")
_SPLIT = re.compile(r"(?<![\d.][eE])([+-])")  # a sign, but not one inside a number's exponent
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """``"1.0*aesthetic - 0.5*jpeg_compressibility"`` -> ``[(1.0, 'aesthetic'), (-0.5, 'jpeg_compressibility')]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty reward spec {spec!r}; grammar: {SPEC_GRAMMAR}")
    parts = _SPLIT.split(spec.strip())
    chunks = [("+", parts[0])] + list(zip(parts[1::2], parts[2::2], strict=True))
    if not chunks[0][1].strip() and len(chunks) > 1:  # a leading sign
        chunks = [(chunks[1][0], chunks[1][1])] + chunks[2:]
    terms: list[tuple[float, str]] = []
    for sign, raw in chunks:
        m = _TERM.fullmatch(raw.strip())
        if m is None:
            raise ConfigError(f"bad term {raw.strip()!r} in reward spec {spec!r}; grammar: {SPEC_GRAMMAR}; "
                              f"names: {sorted(REWARDS)}")
        name = m.group(2)
        if name not in REWARDS:
            raise ConfigError(f"unknown reward {name!r} in reward spec {spec!r}; known rewards: {sorted(REWARDS)}")
        if any(name == n for _, n in terms):
            raise ConfigError(f"reward {name!r} appears twice in reward spec {spec!r}; give it once with the "
                              f"summed weight")
        weight = float(m.group(1)) if m.group(1) else 1.0
        terms.append((-weight if sign == "-" else weight, name))
    return terms


def parse_reward_weights(weights: str | None, names: list[str]) -> dict[str, str | None]:
    """Map each reward name in ``names`` to its weights path (None where not given) from ``weights``:
    ``"name=PATH,name2=PATH"``, or a plain PATH when exactly one of ``names`` needs weights."""
    out: dict[str, str | None] = {n: None for n in names}
    if weights is None or not str(weights).strip():
        return out
    weights = str(weights).strip()
    need = [n for n in names if n not in NO_WEIGHTS]
    items = [s.strip() for s in weights.split(",")]
    pairs = [re.fullmatch(rf"({_NAME})\s*=\s*(.*)", s) for s in items]
    if any(m is not None and m.group(1) in REWARDS for m in pairs):
        for item, m in zip(items, pairs, strict=True):
            if m is None or m.group(1) not in REWARDS or not m.group(2).strip():
                raise ConfigError(f"bad reward weights entry {item!r} in {weights!r}; expected "
                                  f"'name=PATH,name2=PATH' with names from {sorted(REWARDS)}")
            name = m.group(1)
            if name not in out:
                raise ConfigError(f"reward weights given for {name!r}, which is not a term of the reward "
                                  f"({', '.join(names)})")
            if name in NO_WEIGHTS:
                raise ConfigError(f"reward {name!r} needs no weights; drop '{item}' from {weights!r}")
            if out[name] is not None:
                raise ConfigError(f"reward weights for {name!r} given twice in {weights!r}")
            out[name] = m.group(2).strip()
        return out
    if len(need) != 1:
        what = "none of them needs weights" if not need else f"{need} all need weights"
        raise ConfigError(f"a plain reward weights path {weights!r} is ambiguous for rewards {names}: {what}; "
                          f"use 'name=PATH,name2=PATH'")
    out[need[0]] = weights
    return out


class WeightedSum(ImageReward):
    """``sum_i w_i * reward_i(images, prompts)`` -> [B] float32. Differentiable iff every term with w_i != 0 is;
    ``last_terms`` holds each term's (unweighted, detached) [B] values from the last call, for logging."""

    def __init__(self, terms: list[tuple[float, str, ImageReward]]):
        super().__init__()
        if not terms:
            raise ConfigError("a weighted sum of rewards needs at least one term")
        self.terms = nn.ModuleDict({name: reward for _, name, reward in terms})
        self.weights = {name: float(w) for w, name, _ in terms}
        self.differentiable = all(r.differentiable for w, _, r in terms if w != 0)
        self.name = "+".join(f"{w:g}*{n}" for w, n, _ in terms).replace("+-", "-")
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        terms = {}
        for name, reward in self.terms.items():
            w = self.weights[name]
            with torch.set_grad_enabled(torch.is_grad_enabled() and w != 0):
                value = reward(images, prompts).float().to(images.device)
            terms[name] = value.detach()
            if w != 0:
                total = total + w * value
        self.last_terms = terms
        return total


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ConfigError(f"unknown reward dtype {dtype!r}; use one of {sorted(_DTYPES)}")


def load_reward(spec: str, weights: str | None = None, device=None, dtype=None) -> ImageReward:
    """Build the reward ``spec`` (one name from ``REWARDS`` or a weighted sum, see ``SPEC_GRAMMAR``) with model
    files from ``weights``; a bare name gives that reward itself, anything else a ``WeightedSum``."""
    terms = parse_reward_spec(spec)
    paths = parse_reward_weights(weights, [n for _, n in terms])
    dtype = _as_dtype(dtype)
    built = []
    for w, n in terms:
        try:
            built.append((w, n, REWARDS[n](paths[n], device=device, dtype=dtype)))
        except MissingWeightsError as e:
            if len(terms) == 1 or paths[n] is not None:
                raise
            raise MissingWeightsError(f"reward term {n!r} of {spec!r}: {e}; for a sum, pass the weights of each "
                                      f"term as 'name=PATH,name2=PATH'") from None
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][2]
    return WeightedSum(built)


__all__ = [
    "NO_WEIGHTS",
    "REWARDS",
    "SPEC_GRAMMAR",
    "ImageReward",
    "WeightedSum",
    "clip_preprocess",
    "load_reward",
    "parse_reward_spec",
    "parse_reward_weights",
    "require_path",
]
