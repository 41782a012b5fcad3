from monai_prompt.nets.classifier import PromptClassifier
