"""One template source per task (classification, 2D and 3D segmentation) for every bundle: ``monai-prompt
render-bundles [--check]``."""

from monai_prompt.bundle_gen.render import check_bundles, render_bundle, write_bundles
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS, BundleSpec, Reference

__all__ = ["BUNDLE_SPECS", "BundleSpec", "Reference", "check_bundles", "render_bundle", "write_bundles"]
