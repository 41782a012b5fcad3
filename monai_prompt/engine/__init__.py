"""ignite/MONAI components that bundle configs reference: delta checkpoints, PEFT handlers, classification and
segmentation metrics, the inference CSV, MLflow extras and the time-left lines. What a run keeps beside them (the
run-folder lock, the training record, errors shown last, the config checks, the in-process runner) is
:mod:`monai_prompt.runs`."""

from monai_prompt.engine.checkpoint import (
    AtomicCheckpointSaver,
    BestMetricState,
    CheckedCheckpointLoader,
    NonFiniteError,
    PeftMeta,
    TrainableState,
    latest_checkpoint,
    non_finite_entries,
    unwrap,
)
from monai_prompt.engine.eta import EtaHandler, ProgressLog, TimeLeft, clock, is_main_process
from monai_prompt.engine.handlers import (
    NonFiniteGuard,
    PeakMemoryHandler,
    ResumeLrScheduleHandler,
    TrainableReportHandler,
    batch_images,
    peak_memory_mb,
    process_status_mib,
)
from monai_prompt.engine.in_backward import OptimizerInBackward, in_backward
from monai_prompt.engine.metrics import (
    ClassHausdorffDistance,
    ClassMeanDice,
    ClassMetricsSaver,
    ClassReportHandler,
    QuadraticWeightedKappa,
    SegmentationCollapseHandler,
    class_decisions,
    expected_calibration_error,
    macro_f1,
    per_class_scores,
    quadratic_weighted_kappa,
)
from monai_prompt.engine.predictions import PredictionSaver, SavedMasks
from monai_prompt.engine.summary import report_evaluation, report_training
from monai_prompt.engine.tracking import (
    MLflowPeftLogger,
    check_tracking_uri,
    find_mlflow_handlers,
    peft_params,
    unique_run_name,
)

__all__ = [
    "AtomicCheckpointSaver",
    "BestMetricState",
    "CheckedCheckpointLoader",
    "ClassHausdorffDistance",
    "ClassMeanDice",
    "ClassMetricsSaver",
    "ClassReportHandler",
    "EtaHandler",
    "MLflowPeftLogger",
    "NonFiniteError",
    "NonFiniteGuard",
    "OptimizerInBackward",
    "PeakMemoryHandler",
    "PeftMeta",
    "PredictionSaver",
    "ProgressLog",
    "QuadraticWeightedKappa",
    "ResumeLrScheduleHandler",
    "SavedMasks",
    "SegmentationCollapseHandler",
    "TimeLeft",
    "TrainableReportHandler",
    "TrainableState",
    "batch_images",
    "check_tracking_uri",
    "class_decisions",
    "clock",
    "expected_calibration_error",
    "find_mlflow_handlers",
    "in_backward",
    "is_main_process",
    "latest_checkpoint",
    "macro_f1",
    "non_finite_entries",
    "peak_memory_mb",
    "peft_params",
    "per_class_scores",
    "process_status_mib",
    "quadratic_weighted_kappa",
    "report_evaluation",
    "report_training",
    "unique_run_name",
    "unwrap",
]
