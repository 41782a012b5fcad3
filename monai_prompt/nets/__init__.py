"""Task networks for bundles, on one base (PromptNetwork): PromptClassifier and PromptUNETR (backbone + PEFT
method) and FPTClassifier (FPT's frozen LPM + side network; importing it registers the LPM backbone family, so the
registry refuses FPT for segmentation wherever a network is built, saying why).
"""

from monai_prompt.nets.base import PromptNetwork
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.nets.fpt_classifier import OFFICIAL_LPM_PARAMETERS, FPTClassifier, paper_learnable_percent
from monai_prompt.nets.unetr import PromptUNETR

__all__ = ["OFFICIAL_LPM_PARAMETERS", "FPTClassifier", "PromptClassifier", "PromptNetwork", "PromptUNETR",
           "paper_learnable_percent"]
