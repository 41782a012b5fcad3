"""Networks for bundles: PromptClassifier and PromptUNETR (ViT + PEFT method), FPTClassifier (from fpt/)."""

from monai_prompt.fpt.classifier import FPTClassifier
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.nets.unetr import PromptUNETR

__all__ = ["FPTClassifier", "PromptClassifier", "PromptUNETR"]
