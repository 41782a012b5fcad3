"""PEFT core: registry, freezing, trainable-parameter accounting and delta checkpoints."""

from monai_prompt.peft.delta import (
    DeltaMismatchError,
    backbone_fingerprint,
    check_delta_meta,
    delta_meta,
    delta_state_dict,
    load_delta,
    load_trainable_state,
    save_delta,
    trainable_state,
)
from monai_prompt.peft.registry import (
    METHOD_MODULES,
    PEFTMethod,
    apply_method,
    freeze_for,
    get_method,
    method_names,
    register_method,
)
from monai_prompt.peft.report import backbone_parameter_count, format_report, trainable_report
