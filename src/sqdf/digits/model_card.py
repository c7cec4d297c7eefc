"""Measure the shipped digits models and write weights/MODEL_CARD.md and weights/SHA256SUMS.

Also the estimator study: how close the consistency model's one-step x0 is to where the reference sampler ends,
against Tweedie's x0, at every step of the sampler (``estimator_closeness``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..diffusion.policy import DiffusionPolicy
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from .consistency import ddim_ode_step
from .data import load_digits_split
from .metrics import frechet_distance, mean_pairwise_distance
from .store import load_model, sha256_of
from .unet import ClassifierFreeGuidance


def reference_policy(unet, guidance: float, steps: int = 20, eta: float = 1.0) -> DiffusionPolicy:
    ref = ClassifierFreeGuidance(unet, guidance).eval()
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", num_train_steps=1000), steps, eta, clip_sample=1.0)
    return DiffusionPolicy(ref, schedule, (1, 8, 8), reference=ref)


@torch.no_grad()
def class_quality(samples: torch.Tensor, labels: torch.Tensor, classifier, held_out) -> dict:
    """Accuracy (classifier agrees with the label), Frechet distance per class averaged, diversity per class."""
    feats = classifier.features(samples).double()
    pred = classifier.head(feats.float()).argmax(1)
    fds, divs = [], []
    for c in range(10):
        m = labels == c
        fds.append(frechet_distance(feats[m], classifier.features(held_out.of_class(c)).double()))
        divs.append(mean_pairwise_distance(feats[m]))
    return {"accuracy": float((pred == labels).float().mean()), "frechet": sum(fds) / 10,
            "diversity": sum(divs) / 10}


@torch.no_grad()
def ode_endpoint(unet, guidance: float, x: torch.Tensor, t: int, cond, steps: int = 50) -> torch.Tensor:
    """Solve the guided probability-flow ODE from x at timestep t to 0 with `steps` DDIM (eta 0) steps."""
    model = ClassifierFreeGuidance(unet, guidance)
    abar = NoiseSchedule(ScheduleConfig(kind="cosine", num_train_steps=1000), 1).alphas_cumprod.float()
    grid = torch.linspace(t, 0, steps + 1).round().long()
    for a, b in zip(grid[:-1], grid[1:]):
        eps = model(x, a.expand(x.shape[0]), cond)
        x = ddim_ode_step(eps, x, abar[a], abar[b], clip=1.0)
    return x


@torch.no_grad()
def estimator_closeness(unet, consistency, classifier, guidance: float = 1.0, n: int = 256, steps: int = 20,
                        target_digit: int = 3, seed: int = 0) -> list[dict]:
    """Per sampler step k, over n unconditional chains of the reference sampler (eta 1): per-pixel RMS distance of
    Tweedie's and the consistency model's x0 estimates at state x_k to (a) the chain's own final sample and (b) the
    end of the probability-flow ODE from x_k (50 DDIM steps); and, for the default reward r = log p(target | x),
    the mean |r(x0_hat) - r(final)| and the correlation of r(x0_hat) with r(final) across chains."""
    policy = reference_policy(unet, guidance, steps)
    g = torch.Generator().manual_seed(seed)
    traj = policy.sample(n, None, g, which="reference", with_reference=False)
    final = traj.samples

    def reward(x):
        return torch.log_softmax(classifier(x), 1)[:, target_digit]

    def rms(a, b):
        return float(((a - b) ** 2).mean().sqrt())

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    r_final = reward(final)
    rows = []
    for k in range(1, steps):
        x = traj.states[:, k]
        t = policy.schedule.timesteps[k]
        _, tweedie = policy.predict(x, k, None, which="reference")
        cm = consistency(x, torch.full((n,), t), None)
        ode = ode_endpoint(unet, guidance, x, t, None)
        r_tw, r_cm = reward(tweedie), reward(cm)
        rows.append({"step": k, "timestep": t, "tweedie_to_final": rms(tweedie, final), "cm_to_final": rms(cm, final),
                     "tweedie_to_ode": rms(tweedie, ode), "cm_to_ode": rms(cm, ode),
                     "tweedie_reward_error": float((r_tw - r_final).abs().mean()),
                     "cm_reward_error": float((r_cm - r_final).abs().mean()),
                     "tweedie_reward_corr": corr(r_tw, r_final), "cm_reward_corr": corr(r_cm, r_final)})
    return rows


def _table(rows: list[dict], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r[k]) for k in keys) + " |\n" for r in rows)


@torch.no_grad()
def write_model_card(weights_dir: str, per_class: int = 100, docs_dir: str = "docs") -> str:
    from .pictures import save_class_grid

    torch.manual_seed(0)
    wd = Path(weights_dir)
    unet, _ = load_model(wd / "digits_unet.safetensors", "unet")
    classifier, _ = load_model(wd / "digits_classifier.safetensors", "classifier")
    consistency, cm_meta = load_model(wd / "digits_consistency.safetensors", "consistency")
    train, held = load_digits_split()
    logs = {name: json.loads((wd / f"{name}_train.json").read_text())
            for name in ("classifier", "unet", "consistency") if (wd / f"{name}_train.json").exists()}
    clf_acc = float((classifier(held.images).argmax(1) == held.labels).float().mean())
    data_floor = class_quality(train.images, train.labels, classifier, held)
    labels = torch.arange(10).repeat_interleave(per_class)
    base_rows = []
    g = torch.Generator().manual_seed(1)
    for w in (1.0, 2.0, 3.0):
        samples = reference_policy(unet, w).sample(labels.shape[0], labels, g, which="reference",
                                                   with_reference=False).samples
        base_rows.append({"sampler": f"20-step DDPM (eta 1), guidance {w:g}", **class_quality(samples, labels,
                                                                                               classifier, held)})
        if w == cm_meta.get("guidance_scale", 2.0):
            os.makedirs(docs_dir, exist_ok=True)
            save_class_grid(samples, labels, os.path.join(docs_dir, "digits_base_samples.png"),
                            title=f"shipped digits UNet, guidance {w:g}, 20 steps", row_name="class")
    noise = torch.randn(labels.shape[0], 1, 8, 8, generator=g)
    one_step = consistency(noise, torch.full((labels.shape[0],), 999), labels)
    base_rows.append({"sampler": f"consistency model, 1 step (guidance {cm_meta.get('guidance_scale')})",
                      **class_quality(one_step, labels, classifier, held)})
    uncond = reference_policy(unet, 1.0).sample(1000, None, g, which="reference", with_reference=False).samples
    hist = torch.bincount(classifier(uncond).argmax(1), minlength=10).tolist()
    closeness = estimator_closeness(unet, consistency, classifier, cm_meta.get("guidance_scale", 1.0))
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in
                (("unet", unet), ("classifier", classifier), ("consistency", consistency))}

    text = f"""# Model card: the shipped digits models

Trained by `scripts/train_digits.py` (stages `classifier`, `unet`, `consistency`, then `card` wrote this file) on
scikit-learn's 8x8 digits, values 0..16 mapped to [-1, 1]; the fixed stratified split of `sqdf.digits.data`
(seed 0): {train.labels.shape[0]} training and {held.labels.shape[0]} held-out images. Every metric below is on the
held-out split, in the classifier's {classifier.feature_dim}-dimensional penultimate features; Frechet distance
is per class (100 samples vs the ~45 held-out digits of the class), averaged over the 10 classes.

| file | what | parameters | training | seconds (2 CPU cores) | final loss |
|---|---|---|---|---|---|
| digits_classifier.safetensors | CNN classifier (rewards, features) | {n_params['classifier']:,} | {json.dumps(logs.get('classifier', {}).get('settings', {}))} | {logs.get('classifier', {}).get('seconds')} | {logs.get('classifier', {}).get('final_loss', float('nan')):.4f} |
| digits_unet.safetensors | class-conditional UNet, eps-prediction, cosine schedule N=1000, label dropout 0.1 (classifier-free guidance) | {n_params['unet']:,} | {json.dumps(logs.get('unet', {}).get('settings', {}))} | {logs.get('unet', {}).get('seconds')} | {logs.get('unet', {}).get('final_loss', float('nan')):.4f} |
| digits_consistency.safetensors | consistency model distilled from the UNet's guided probability-flow ODE | {n_params['consistency']:,} | {json.dumps(logs.get('consistency', {}).get('settings', {}))} | {logs.get('consistency', {}).get('seconds')} | {logs.get('consistency', {}).get('final_loss', float('nan')):.4f} |

Classifier accuracy on the held-out digits: **{clf_acc:.3f}**.

## Sample quality (1,000 samples, 100 per class)

Real training digits against the held-out ones (the floor of these metrics): accuracy {data_floor['accuracy']:.3f},
Frechet {data_floor['frechet']:.3f}, diversity {data_floor['diversity']:.3f}.

{_table(base_rows, ['sampler', 'accuracy', 'frechet', 'diversity'])}
Unconditional sampling (guidance 1, null label), classes seen by the classifier in 1,000 samples: {hist}.

![base samples](../../../../docs/digits_base_samples.png)

## Consistency model vs Tweedie: how close is the one-step x0 to where the sampler ends?

256 unconditional chains of the reference sampler of `sqdf train digits` (20 steps, eta 1, x0 clipped to
[-1, 1]). At each state x_k: per-pixel RMS distance of each estimate to the chain's own final sample and to the
end of the probability-flow ODE from x_k (50 DDIM steps); for the default reward r = log p(3 | x), the mean
absolute error of r(x0_hat) against r(final sample) and their correlation across chains.

{_table(closeness, ['step', 'timestep', 'tweedie_to_final', 'cm_to_final', 'tweedie_to_ode', 'cm_to_ode', 'tweedie_reward_error', 'cm_reward_error', 'tweedie_reward_corr', 'cm_reward_corr'])}
"""
    (wd / "MODEL_CARD.md").write_text(text)
    sums = "".join(f"{sha256_of(wd / name)}  {name}\n" for name in
                   ("digits_classifier.safetensors", "digits_consistency.safetensors", "digits_unet.safetensors"))
    (wd / "SHA256SUMS").write_text(sums)
    (wd / "estimator_closeness.json").write_text(json.dumps(closeness, indent=1))
    print(text)
    return text
