"""ignite/MONAI glue for bundles: delta checkpoints, PEFT handlers, classification metrics, MLflow extras, and the
guards that make a run trustworthy (run-folder lock, non-finite stops, errors shown last), the training record and
the inference CSV."""

from monai_prompt.engine.checkpoint import (
    AtomicCheckpointSaver,
    BestMetricState,
    NonFiniteError,
    PeftMeta,
    TrainableState,
    latest_checkpoint,
    non_finite_entries,
    unwrap,
)
from monai_prompt.engine.errors import format_root_cause, root_cause, show_cause_last
from monai_prompt.engine.handlers import (
    NonFiniteGuard,
    PeakMemoryHandler,
    ResumeLrScheduleHandler,
    TrainableReportHandler,
    batch_images,
    peak_memory_mb,
)
from monai_prompt.engine.metrics import (
    ClassReportHandler,
    QuadraticWeightedKappa,
    class_decisions,
    macro_f1,
    per_class_scores,
    quadratic_weighted_kappa,
)
from monai_prompt.engine.predictions import PredictionSaver
from monai_prompt.engine.record import TRAINING_CONFIG, RunIdentity, read_training_config, run_id, write_training_config
from monai_prompt.engine.run_folder import RunFolderError, RunLock, claim_run_folder, remove_partial_writes
from monai_prompt.engine.tracking import (
    MLflowPeftLogger,
    check_tracking_uri,
    find_mlflow_handlers,
    peft_params,
    unique_run_name,
)
from monai_prompt.engine.workflow import bundle_root, check_task, find_datalist, warn_if_not_pretrained
