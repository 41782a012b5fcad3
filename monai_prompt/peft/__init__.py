"""PEFT core: registry, freezing, trainable-parameter accounting, delta checkpoints and merging."""

from monai_prompt.peft.delta import (
    DeltaMismatchError,
    UnreadableCheckpointError,
    backbone_fingerprint,
    check_delta_meta,
    delta_meta,
    delta_state_dict,
    load_delta,
    load_trainable_state,
    read_checkpoint,
    save_delta,
    trainable_state,
)
from monai_prompt.peft.merge import MergeableLayer, merge_and_unload
from monai_prompt.peft.registry import (
    PEFTMethod,
    apply_method,
    freeze_for,
    get_method,
    import_package_modules,
    method_names,
    register_method,
)
from monai_prompt.peft.report import backbone_parameter_count, format_report, trainable_report

__all__ = [
    "DeltaMismatchError",
    "MergeableLayer",
    "PEFTMethod",
    "UnreadableCheckpointError",
    "apply_method",
    "backbone_fingerprint",
    "backbone_parameter_count",
    "check_delta_meta",
    "delta_meta",
    "delta_state_dict",
    "format_report",
    "freeze_for",
    "get_method",
    "import_package_modules",
    "load_delta",
    "load_trainable_state",
    "merge_and_unload",
    "method_names",
    "read_checkpoint",
    "register_method",
    "save_delta",
    "trainable_report",
    "trainable_state",
]
