"""Task networks for bundles, on one base (PromptNetwork): PromptClassifier and the segmentation networks (backbone +
PEFT method: PromptUNETR on a ViT, PromptSAMUNETR and PromptTinyViTUNETR on the SAM family, segmentation_network
picking one by the backbone's family) and FPTClassifier (FPT's frozen LPM + side network; importing it registers the
LPM backbone family, so the registry refuses FPT for segmentation wherever a network is built, saying why).
"""

from monai_prompt.nets.base import PromptNetwork
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.nets.fpt_classifier import OFFICIAL_LPM_PARAMETERS, FPTClassifier, paper_learnable_percent
from monai_prompt.nets.sam_unetr import PromptSAMUNETR, PromptTinyViTUNETR
from monai_prompt.nets.segmentation import segmentation_network
from monai_prompt.nets.unetr import PromptUNETR

__all__ = ["OFFICIAL_LPM_PARAMETERS", "FPTClassifier", "PromptClassifier", "PromptNetwork", "PromptSAMUNETR",
           "PromptTinyViTUNETR", "PromptUNETR", "paper_learnable_percent", "segmentation_network"]
