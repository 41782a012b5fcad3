"""Running bundles and keeping their runs: what configs call around the engines (errors shown last, the run-folder
claim, the training record, the data and weight checks), the in-process runner with its progress lines, where the
bundles are, and the two demo tasks that ``monai-prompt demo`` and the benchmarks share."""

from monai_prompt.runs.bundles import bundles_folder, find_bundle
from monai_prompt.runs.distributed import RANK0_WAIT, rank0_wait_group, wait_for_rank0
from monai_prompt.runs.errors import format_root_cause, on_error, root_cause, show_cause_last
from monai_prompt.runs.progress import EpochProgress, RunSteps, attach_progress
from monai_prompt.runs.record import (
    TRAINING_CONFIG,
    RunIdentity,
    check_resumed_settings,
    read_training_config,
    recorded_method_config,
    run_id,
    write_training_config,
)
from monai_prompt.runs.run_folder import (
    PREVIOUS_RUN,
    RunFolderError,
    RunLock,
    claim_run_folder,
    delete_previous_run_after_checkpoint,
    remove_partial_writes,
    set_aside_previous_run,
)
from monai_prompt.runs.runner import read_metrics, run_bundle, train_and_evaluate
from monai_prompt.runs.workflow import (
    bundle_root,
    check_optimizer_settings,
    check_task,
    check_validation_interval,
    find_datalist,
    flag,
    flag_entries,
    pretraining_images,
    warn_if_not_pretrained,
)

__all__ = [
    "PREVIOUS_RUN",
    "RANK0_WAIT",
    "TRAINING_CONFIG",
    "EpochProgress",
    "RunFolderError",
    "RunIdentity",
    "RunLock",
    "RunSteps",
    "attach_progress",
    "bundle_root",
    "bundles_folder",
    "check_optimizer_settings",
    "check_resumed_settings",
    "check_task",
    "check_validation_interval",
    "claim_run_folder",
    "delete_previous_run_after_checkpoint",
    "find_bundle",
    "find_datalist",
    "flag",
    "flag_entries",
    "format_root_cause",
    "on_error",
    "pretraining_images",
    "rank0_wait_group",
    "read_metrics",
    "read_training_config",
    "recorded_method_config",
    "remove_partial_writes",
    "root_cause",
    "run_bundle",
    "run_id",
    "set_aside_previous_run",
    "show_cause_last",
    "train_and_evaluate",
    "wait_for_rank0",
    "warn_if_not_pretrained",
    "write_training_config",
]
