"""Preference files: the tensors, Pick-a-Pic and HPDv2 layouts load as they are; bad files name file and field."""

from __future__ import annotations

import io
import json

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.preferences import PreferencePairs, load_pairs, write_pairs


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _png(value: int, size=(4, 4), mode="L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_tensor_pairs_round_trip(tmp_path, ext):
    g = torch.Generator().manual_seed(0)
    pairs = PreferencePairs(torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g),
                            torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0]), cond=torch.arange(5.0)[:, None])
    path = write_pairs(pairs, str(tmp_path / f"pairs{ext}"))
    back = load_pairs(path, (2,))
    torch.testing.assert_close(back.a, pairs.a)
    torch.testing.assert_close(back.b, pairs.b)
    torch.testing.assert_close(back.labels, pairs.labels)
    torch.testing.assert_close(back.cond, pairs.cond)
    w, lo, c = back.winners_first()  # ties dropped, winner first
    assert w.shape == (4, 2)
    torch.testing.assert_close(w[1], pairs.b[1])
    torch.testing.assert_close(lo[1], pairs.a[1])
    torch.testing.assert_close(c[:, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]))


def test_pickapic_layout_with_image_bytes_in_parquet(tmp_path):
    from datasets import Dataset

    rows = {"caption": ["a cat", "a dog"], "jpg_0": [_png(255), _png(0)], "jpg_1": [_png(0), _png(128)],
            "label_0": [1.0, 0.5]}
    path = str(tmp_path / "pickapic.parquet")
    Dataset.from_dict(rows).to_parquet(path)
    pairs = load_pairs(path, (1, 2, 2))
    assert pairs.a.shape == (2, 1, 2, 2) and pairs.captions == ["a cat", "a dog"]
    torch.testing.assert_close(pairs.a[0], torch.ones(1, 2, 2))  # 255 -> 1
    torch.testing.assert_close(pairs.b[0], -torch.ones(1, 2, 2))  # 0 -> -1
    torch.testing.assert_close(pairs.labels, torch.tensor([1.0, 0.5]))


def test_hpdv2_layout_with_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    for name, value in (("x.png", 0), ("y.png", 255)):
        (tmp_path / "img" / name).write_bytes(_png(value, (3, 3), "RGB"))
    path = _jsonl(tmp_path / "hpd.jsonl", [
        {"prompt": "a tree", "image_path": ["img/x.png", "img/y.png"], "human_preference": [0, 1]},
        {"prompt": "a house", "image_path": ["img/y.png", "img/x.png"], "human_preference": [1, 0]},
    ])
    pairs = load_pairs(path)
    assert pairs.a.shape == (2, 3, 3, 3) and pairs.labels.tolist() == [0.0, 1.0]
    torch.testing.assert_close(pairs.a[0], -torch.ones(3, 3, 3))
    assert pairs.captions == ["a tree", "a house"]


@pytest.mark.parametrize("rows,match", [
    ([{"a": [0.0, 1.0], "b": [1.0, 0.0]}], "columns .*match no layout"),
    ([{"a": [0.0, 1.0], "b": [1.0, 0.0], "label": 2.0}], "'label' = 2.0 in row 0.*0, 0.5 or 1"),
    ([{"a": [0.0, 1.0, 2.0], "b": [1.0, 0.0, 2.0], "label": 1.0}], "field 'a' holds samples of shape \\(3,\\)"),
    ([{"a": [0.0, 1.0], "b": [1.0], "label": 1.0}, {"a": [0.0, 1.0], "b": [1.0, 0.0], "label": 1.0}], "'b'"),
])
def test_bad_files_name_the_file_and_the_field(tmp_path, rows, match):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=match) as info:
        load_pairs(path, (2,))
    assert "bad.jsonl" in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_pairs(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "pairs.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ConfigError, match="unknown extension '.csv'"):
        load_pairs(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ConfigError, match="broken.jsonl"):
        load_pairs(str(broken))
    picks = _jsonl(tmp_path / "p.jsonl", [{"caption": "c", "jpg_0": "nope.png", "jpg_1": "nope.png", "label_0": 1}])
    with pytest.raises(ConfigError, match="'jpg_0' is not a readable image"):
        load_pairs(picks)


def test_scores_round_trip_and_errors(tmp_path):
    from sqdf.preferences.data import PointwiseScores, load_scores, write_scores

    s = PointwiseScores(torch.randn(5, 2), torch.randn(5), torch.arange(5))
    for name in ("s.jsonl", "s.parquet"):
        back = load_scores(write_scores(s, str(tmp_path / name)), (2,))
        torch.testing.assert_close(back.x, s.x)
        torch.testing.assert_close(back.scores, s.scores)
        assert back.cond.tolist() == list(range(5))
    with pytest.raises(ConfigError, match="shape"):
        load_scores(str(tmp_path / "s.jsonl"), (3,))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": [0.0, 1.0]}\n')
    with pytest.raises(ConfigError, match="missing: score"):
        load_scores(str(bad))
    bad.write_text('{"x": [0.0, 1.0], "score": NaN}\n')
    with pytest.raises(ConfigError):
        load_scores(str(bad))
    with pytest.raises(ConfigError, match="not finite"):
        PointwiseScores(torch.zeros(1, 2), torch.tensor([float("inf")]))
