"""benchmarks/sd_speed.py on the tiny sd15 pipeline (CPU), and the full-size random SD1.5 / aesthetic configs.

The full-size random models (about 3.3 GB on disk) are never written here: their configs are checked instead, and
the writer itself runs on scaled-down copies of the same configs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():
    spec = importlib.util.spec_from_file_location("sd_speed", os.path.join(ROOT, "benchmarks", "sd_speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] in ("sqdf", "ddpo", "alignprop") and cells[1] in ("on", "off"):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_sd_speed_tiny_table_has_every_method_and_setting(tmp_path, one_thread, capsys):
    sd_speed = _load_script()
    out = tmp_path / "tmp.md"
    code = sd_speed.main(["--tiny", "--steps", "2", "--iters", "1", "--warmup", "0", "--batch", "2",
                          "--cache", str(tmp_path / "cache"), "--out", str(out)])
    text = out.read_text()
    assert text.startswith("## Stable Diffusion 1.5 training speed")
    assert "Command: `python benchmarks/sd_speed.py --tiny --steps 2" in text
    assert "torch " + torch.__version__ in text and "diffusers " in text and "CPU only" in text
    assert "fell back to 'no'" in text  # bf16 requested, CPU run
    for method in ("sqdf", "ddpo", "alignprop"):
        assert f"- **{method}**:" in text  # what one iteration is
    rows = _table_rows(text)
    assert set(rows) == {(m, c) for m in ("sqdf", "ddpo", "alignprop") for c in ("off", "on")}
    for (method, ckpt), cells in rows.items():
        assert cells[5] == "n/a" and cells[6] == "n/a"  # no GPU memory on CPU
        seconds = float(cells[2])
        assert math.isfinite(seconds) and seconds > 0, (method, ckpt, cells)
        lo, hi = (float(v) for v in cells[3].split("-"))
        assert 0 < lo <= seconds <= hi
        if method != "alignprop":
            assert 0 < float(cells[4]) <= seconds  # the rollout is part of the iteration
    assert code == 0


def test_sd15_configs_have_sd15_sizes():
    from sqdf.sd.random_models import aesthetic_configs, sd15_configs

    cfg = sd15_configs()
    unet, vae, text, sched = cfg["unet"], cfg["vae"], cfg["text_encoder"], cfg["scheduler"]
    assert list(unet["block_out_channels"]) == [320, 640, 1280, 1280]
    assert unet["cross_attention_dim"] == 768 and unet["attention_head_dim"] == 8
    assert unet["layers_per_block"] == 2 and unet["sample_size"] == 64 and unet["in_channels"] == 4
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert list(vae["block_out_channels"]) == [128, 256, 512, 512]
    assert vae["latent_channels"] == 4 and vae["sample_size"] == 512 and vae["scaling_factor"] == 0.18215
    assert text["hidden_size"] == 768 and text["num_hidden_layers"] == 12 and text["num_attention_heads"] == 12
    assert text["intermediate_size"] == 3072 and text["max_position_embeddings"] == 77
    assert text["vocab_size"] == 49408 and text["hidden_act"] == "quick_gelu"
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert sched["steps_offset"] == 1
    vision = aesthetic_configs()["vision"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (1024, 24, 16)
    assert (vision["patch_size"], vision["image_size"], vision["projection_dim"]) == (14, 224, 768)
    assert aesthetic_configs()["mlp_dim"] == 768
    cfg["unet"]["block_out_channels"][0] = 1  # a copy: the module's configs stay as they are
    assert sd15_configs()["unet"]["block_out_channels"][0] == 320


def _small_sd15_configs():
    from sqdf.sd.random_models import sd15_configs

    cfg = sd15_configs()
    cfg["unet"].update(block_out_channels=[32, 32, 64, 64], norm_num_groups=8, sample_size=8,
                       cross_attention_dim=32, attention_head_dim=4)
    cfg["vae"].update(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1, sample_size=64)
    cfg["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               projection_dim=32)
    return cfg


def test_random_writers_produce_loadable_cached_folders(tmp_path, one_thread):
    """The writers on scaled-down configs: the folders load through the task's own loaders, are written once,
    and refuse a different seed at the same path."""
    from sqdf.sd.pipelines import load_pipeline
    from sqdf.sd.random_models import DONE, write_random_aesthetic, write_random_sd15_pipeline
    from sqdf.sd.rewards.aesthetic import load_aesthetic

    path = str(tmp_path / "sd15")
    assert write_random_sd15_pipeline(path, dtype=torch.float16, configs=_small_sd15_configs()) == path
    assert json.load(open(os.path.join(path, DONE)))["dtype"] == "float16"
    assert not any(name.startswith("sd15.tmp") for name in os.listdir(tmp_path))  # renamed into place
    stamp = os.path.getmtime(os.path.join(path, DONE))
    write_random_sd15_pipeline(path, dtype=torch.float16, configs=_small_sd15_configs())
    assert os.path.getmtime(os.path.join(path, DONE)) == stamp  # cached: not written again
    with pytest.raises(ValueError, match="already holds"):
        write_random_sd15_pipeline(path, seed=1, dtype=torch.float16, configs=_small_sd15_configs())
    pipe, kind = load_pipeline(path, "sd15", torch.float32)
    assert kind == "sd15" and list(pipe.unet.config.block_out_channels) == [32, 32, 64, 64]
    assert pipe.tokenizer.model_max_length == 77 and pipe.scheduler.config.steps_offset == 1
    emb, _ = pipe.encode_prompt(["a cat"], "cpu", 1, True)
    assert emb.shape == (1, 77, 32)

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "patch_size": 8, "image_size": 32, "projection_dim": 16}
    apath = write_random_aesthetic(str(tmp_path / "aesthetic"), vision_config=vision)
    reward = load_aesthetic(apath)
    scores = reward(torch.rand(2, 3, 32, 32), ["a", "b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
