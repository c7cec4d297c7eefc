"""Prompt sets for text-to-image fine-tuning: built-in names and prompt files.

``load_prompts(spec)`` takes a built-in name (``PROMPT_SETS``: ``animals`` = the 45 common animals of DDPO's
``simple_animals`` set, also used by AlignProp and PRDP) or a path to a prompt file:

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.json``: a list of strings, a list of objects with a ``"prompt"`` key, or an object mapping style names to such
  lists (HPDv2 benchmark layout, e.g. ``{"anime": [...], "photo": [...]}``), flattened in key order;
* ``.jsonl``: one object with a ``"prompt"`` key, or one JSON string, per line.

Prompts are stripped of surrounding whitespace; empty ones are skipped.
"""

from __future__ import annotations

import json
import os

from ..errors import ConfigError

ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)

PROMPT_SETS: dict[str, tuple[str, ...]] = {"animals": ANIMALS, "simple_animals": ANIMALS}
FILE_TYPES = (".txt", ".json", ".jsonl")


def _from_item(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    raise ConfigError(f"{where}: each prompt must be a string or an object with a string \"prompt\" key, "
                      f"got {str(item)[:80]!r}")


def _read_json(path: str, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"prompt file {path!r} is not valid JSON: {e}") from None
    if isinstance(data, list):
        return [_from_item(x, path) for x in data]
    if isinstance(data, dict):
        out = []
        for key, items in data.items():
            if not isinstance(items, list):
                raise ConfigError(f"prompt file {path!r}: style {key!r} must map to a list of prompts, "
                                  f"got {type(items).__name__}")
            out += [_from_item(x, f"{path} [{key}]") for x in items]
        return out
    raise ConfigError(f"prompt file {path!r}: expected a JSON list of prompts or an object mapping style names to "
                      f"lists, got {type(data).__name__}")


def _read_jsonl(path: str, text: str) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompt file {path!r}, line {i}: not valid JSON: {e}") from None
        out.append(_from_item(item, f"{path}, line {i}"))
    return out


def load_prompts(spec: str) -> list[str]:
    """Prompts of a built-in set (``PROMPT_SETS``) or a ``.txt`` / ``.json`` / ``.jsonl`` file -> list[str]."""
    if spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec])
    path = os.path.expanduser(str(spec))
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_TYPES:
        raise ConfigError(f"unknown prompt set {spec!r}: give one of the built-in sets {sorted(PROMPT_SETS)} or a "
                          f"path to a prompt file ending in {', '.join(FILE_TYPES)}")
    if not os.path.isfile(path):
        raise ConfigError(f"prompt file {path!r} does not exist (or is not a file)")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if ext == ".txt":
        prompts = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
    elif ext == ".json":
        prompts = _read_json(path, text)
    else:
        prompts = _read_jsonl(path, text)
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path!r} holds no prompts")
    return prompts
