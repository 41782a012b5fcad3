"""Task networks for bundles: PromptClassifier and PromptUNETR (backbone + PEFT method), on one base, PromptNetwork.

FPTClassifier, the third network on that base, lives with the rest of FPT in :mod:`monai_prompt.fpt`; importing
this package imports that one too, so FPT's LPM backbone family is registered wherever a network is built (the
registry then refuses FPT for segmentation, saying why).
"""

import monai_prompt.fpt  # noqa: F401  (registers FPT's LPM backbone family)
from monai_prompt.nets.base import PromptNetwork
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.nets.unetr import PromptUNETR

__all__ = ["PromptClassifier", "PromptNetwork", "PromptUNETR"]
