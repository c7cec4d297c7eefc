"""The shipped models: files, checksums, shapes, and what they were shipped to do."""

import shutil

import pytest
import torch

from sqdf.digits import store
from sqdf.digits.consistency import ConsistencyModel, ddim_ode_step
from sqdf.digits.data import load_digits_split
from sqdf.digits.unet import NULL_CLASS, ClassifierFreeGuidance, DigitUNet
from sqdf.errors import CheckpointError


@pytest.mark.parametrize("name", sorted(store.SHIPPED))
def test_shipped_file_matches_its_checksum_and_is_small(name):
    path = store.shipped_path(name)
    assert store.sha256_of(path) == store.shipped_sums()[path.name]
    assert path.stat().st_size < 3 * 2**20  # a few MB at most


def test_shipped_models_have_the_documented_shapes():
    unet, meta = store.load_shipped("unet")
    clf, _ = store.load_shipped("classifier")
    cm, cm_meta = store.load_shipped("consistency")
    assert meta["schedule"] == "cosine" and meta["num_train_steps"] == 1000
    assert cm_meta["guidance_scale"] > 0
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, NULL_CLASS])
    with torch.no_grad():
        assert unet(x, t, c).shape == (4, 1, 8, 8)
        assert clf(x).shape == (4, 10) and clf.features(x).shape == (4, clf.feature_dim)
        assert cm(x, t, c).shape == (4, 1, 8, 8)


def test_shipped_classifier_recognizes_held_out_digits():
    clf, _ = store.load_shipped("classifier")
    _, held = load_digits_split()
    with torch.no_grad():
        acc = (clf(held.images).argmax(1) == held.labels).float().mean()
    assert float(acc) > 0.95


def test_corrupt_or_missing_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        store.load_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        store.load_model(bad)
    # a shipped file whose bytes changed fails its checksum
    fake_dir = tmp_path / "weights"
    shutil.copytree(store.WEIGHTS_DIR, fake_dir)
    data = bytearray((fake_dir / store.SHIPPED["classifier"]).read_bytes())
    data[-1] ^= 0xFF
    (fake_dir / store.SHIPPED["classifier"]).write_bytes(bytes(data))
    monkeypatch.setattr(store, "WEIGHTS_DIR", fake_dir)
    with pytest.raises(CheckpointError, match="SHA-256"):
        store.shipped_path("classifier")
    with pytest.raises(CheckpointError, match="holds a 'unet' model"):
        store.load_model(store.WEIGHTS_DIR / store.SHIPPED["unet"], kind="classifier")


def test_save_and_load_round_trip(tmp_path):
    model = DigitUNet(channels=(8, 16), emb_dim=16)
    store.save_model(model, tmp_path / "m.safetensors", "unet", schedule="cosine")
    back, meta = store.load_model(tmp_path / "m.safetensors", "unet")
    assert meta["schedule"] == "cosine"
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_classifier_free_guidance_combines_the_two_branches():
    torch.manual_seed(0)
    net = DigitUNet(channels=(8, 16), emb_dim=16)
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond_out, uncond_out = net(x, t, c), net(x, t, None)
        assert torch.allclose(ClassifierFreeGuidance(net, 2.5)(x, t, c), uncond_out + 2.5 * (cond_out - uncond_out),
                              atol=1e-5)
        assert torch.allclose(ClassifierFreeGuidance(net, 1.0)(x, t, c), cond_out)
        assert torch.allclose(ClassifierFreeGuidance(net, 3.0)(x, t, None), uncond_out)
    with pytest.raises(ValueError, match="digit labels"):
        net(x, t, torch.tensor([0, 1, 11]))


def test_consistency_parameterization_boundary_and_tweedie_start():
    torch.manual_seed(0)
    net = DigitUNet(channels=(8, 16), emb_dim=16)
    cm = ConsistencyModel(net)
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([4, 7])
    with torch.no_grad():
        assert torch.equal(cm(x, torch.tensor([0, 0]), c), x)  # f(x, 0) = x
        t = torch.tensor([300, 800])
        a = cm.alphas_cumprod[t].clamp(min=cm.abar_floor).view(-1, 1, 1, 1)
        assert torch.allclose(cm(x, t, c), (x - (1 - a).sqrt() * net(x, t, c)) / a.sqrt(), atol=1e-5)


def test_ddim_ode_step_is_exact_for_a_point_mass():
    """Data = one point x*: eps(x_t) = (x_t - sqrt(a_t) x*) / sqrt(1 - a_t) exactly, and the ODE keeps x0 = x*."""
    x_star = torch.randn(1, 1, 8, 8)
    a_t, a_s = torch.tensor(0.3), torch.tensor(0.8)
    noise = torch.randn(1, 1, 8, 8)
    x_t = a_t.sqrt() * x_star + (1 - a_t).sqrt() * noise
    eps = (x_t - a_t.sqrt() * x_star) / (1 - a_t).sqrt()
    assert torch.allclose(ddim_ode_step(eps, x_t, a_t, a_s), a_s.sqrt() * x_star + (1 - a_s).sqrt() * noise,
                          atol=1e-6)
