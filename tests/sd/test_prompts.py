"""Prompt sets: the built-in animal list and the .txt / .json / .jsonl prompt files, with their errors."""

from __future__ import annotations

import json

import pytest

from sqdf.errors import ConfigError
from sqdf.sd.prompts import PROMPT_SETS, load_prompts


def test_animals_are_the_45_ddpo_animals():
    animals = load_prompts("animals")
    assert len(animals) == 45 and len(set(animals)) == 45
    assert animals[:3] == ["cat", "dog", "horse"] and animals[-1] == "kangaroo"
    assert {"hedgehog", "llama", "goose", "beetle"} <= set(animals)
    assert all(a.isalpha() and a.islower() for a in animals)
    assert "animals" in PROMPT_SETS
    animals.append("x")  # a copy: the built-in set is not mutated
    assert len(load_prompts("animals")) == 45


def test_txt_skips_blank_and_comment_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\na cat\n\n   \n  a dog on a bike  \n#skip\n")
    assert load_prompts(str(f)) == ["a cat", "a dog on a bike"]


@pytest.mark.parametrize("data, expected", [
    (["a", "b"], ["a", "b"]),
    ([{"prompt": "a"}, {"prompt": "b", "id": 3}], ["a", "b"]),
    ({"photo": ["p1", "p2"], "anime": ["a1"]}, ["p1", "p2", "a1"]),  # key order, not sorted
])
def test_json_layouts(tmp_path, data, expected):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(data))
    assert load_prompts(str(f)) == expected


def test_jsonl_objects_and_strings(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "x": 1}\n\n"a dog"\n')
    assert load_prompts(str(f)) == ["a cat", "a dog"]


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown prompt set 'animalz'.*animals.*\.txt.*\.json.*\.jsonl"):
        load_prompts("animalz")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(str(empty))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.json"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="prompt"):
        load_prompts(str(tmp_path / "bad.json"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"\.jsonl"):
        load_prompts(str(tmp_path / "p.csv"))
