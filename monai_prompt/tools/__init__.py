"""Offline tools for a trained bundle: ``monai-prompt export`` (one merged state dict and TorchScript) and
``monai-prompt package`` (a copy with its pre-trained backbone inside, for MONAI Label)."""

from monai_prompt.tools.export import ExportReport, export_bundle
from monai_prompt.tools.package import BACKBONE_NAME, PackageReport, package_bundle

__all__ = ["BACKBONE_NAME", "ExportReport", "PackageReport", "export_bundle", "package_bundle"]
