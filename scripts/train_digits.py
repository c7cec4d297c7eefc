"""Train the shipped digits models: classifier, class-conditional UNet, distilled consistency model.

    python scripts/train_digits.py classifier      # ~1 min on 2 CPU cores
    python scripts/train_digits.py unet            # ~12 min
    python scripts/train_digits.py consistency     # ~12 min (needs the UNet)
    python scripts/train_digits.py card            # evaluates all three, writes MODEL_CARD.md and SHA256SUMS

Each stage writes into src/sqdf/digits/weights/ (or --out DIR) and a JSON of its settings and loss curve
(``*_train.json``) next to the weights, which the card stage reads. Deterministic given --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.digits.classifier import DigitClassifier
from sqdf.digits.data import load_digits_split
from sqdf.digits.store import WEIGHTS_DIR, load_model, save_model
from sqdf.digits.training import distill_consistency, train_classifier, train_unet
from sqdf.digits.unet import DigitUNet

GUIDANCE = 1.0  # the guidance scale the consistency model is distilled at (the task default: the best Frechet)


def _log(out: str, name: str, settings: dict, losses: list[float], seconds: float) -> None:
    tail = losses[-200:]
    record = {"settings": settings, "seconds": round(seconds, 1), "final_loss": sum(tail) / len(tail),
              "loss_curve_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                                       for i in range(0, len(losses), 100)]}
    with open(os.path.join(out, f"{name}_train.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"{name}: {len(losses)} steps in {seconds:.0f} s, final loss {record['final_loss']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["classifier", "unet", "consistency", "card"])
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--steps", type=int, help="optimizer steps (default per stage: 3000 / 8000 / 4000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    train, _ = load_digits_split()
    start = time.time()
    if args.stage == "classifier":
        steps = args.steps or 3000
        model = DigitClassifier()
        losses = train_classifier(model, train, steps=steps, seed=args.seed, progress=True)
        save_model(model, os.path.join(args.out, "digits_classifier.safetensors"), "classifier")
        _log(args.out, "classifier", {"steps": steps, "seed": args.seed, "batch_size": 128, "lr": 2e-3}, losses,
             time.time() - start)
    elif args.stage == "unet":
        steps = args.steps or 8000
        schedule = NoiseSchedule(ScheduleConfig(kind="cosine", num_train_steps=1000), 1)
        ema, losses = train_unet(DigitUNet(), train, schedule, steps=steps, seed=args.seed, progress=True)
        save_model(ema, os.path.join(args.out, "digits_unet.safetensors"), "unet", schedule="cosine",
                   num_train_steps=1000)
        _log(args.out, "unet", {"steps": steps, "seed": args.seed, "batch_size": 128, "lr": 2e-3,
                                "label_dropout": 0.1, "ema_decay": 0.999, "schedule": "cosine"}, losses,
             time.time() - start)
    elif args.stage == "consistency":
        steps = args.steps or 4000
        teacher, _ = load_model(os.path.join(args.out, "digits_unet.safetensors"), "unet")
        model, losses = distill_consistency(teacher, train, GUIDANCE, steps=steps, seed=args.seed, progress=True)
        save_model(model, os.path.join(args.out, "digits_consistency.safetensors"), "consistency",
                   guidance_scale=GUIDANCE)
        _log(args.out, "consistency", {"steps": steps, "seed": args.seed, "batch_size": 128, "lr": 2e-4,
                                       "skip": 20, "target_decay": 0.95, "guidance_scale": GUIDANCE,
                                       "uncond_fraction": 0.5}, losses,
             time.time() - start)
    else:
        from sqdf.digits.model_card import write_model_card

        write_model_card(args.out)


if __name__ == "__main__":
    main()
