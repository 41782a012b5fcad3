from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.fpt.classifier import FPTClassifier
