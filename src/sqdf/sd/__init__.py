"""The diffusers backend: Stable-Diffusion-class models (SD1.5, SDXL, SD3-style flow) behind the policy interface,
LoRA through peft, latent consistency models, the image reward zoo and prompt sets."""
