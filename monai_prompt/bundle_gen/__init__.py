"""One template source for every classification bundle: ``monai-prompt render-bundles [--check]``."""

from monai_prompt.bundle_gen.render import check_bundles, render_bundle, write_bundles
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS, BundleSpec, Reference
