"""The built-in image world: sklearn's 8x8 digits, a class-conditional UNet, a classifier and a consistency model,
all trained by scripts/train_digits.py and shipped as safetensors in ``sqdf/digits/weights``."""

from .classifier import DigitClassifier
from .consistency import ConsistencyModel
from .data import IMAGE_SHAPE, NUM_CLASSES, load_digits_split
from .store import load_model, load_shipped, save_model
from .unet import NULL_CLASS, ClassifierFreeGuidance, DigitUNet

__all__ = ["ClassifierFreeGuidance", "ConsistencyModel", "DigitClassifier", "DigitUNet",
           "IMAGE_SHAPE", "NULL_CLASS", "NUM_CLASSES", "load_digits_split", "load_model", "load_shipped",
           "save_model"]
