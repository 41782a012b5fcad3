"""ignite/MONAI glue for bundles: delta checkpoints, PEFT handlers, classification metrics, MLflow extras."""

from monai_prompt.engine.checkpoint import AtomicCheckpointSaver, PeftMeta, TrainableState, latest_checkpoint, unwrap
from monai_prompt.engine.handlers import PeakMemoryHandler, TrainableReportHandler, peak_memory_mb
from monai_prompt.engine.metrics import QuadraticWeightedKappa, class_decisions, macro_f1, quadratic_weighted_kappa
from monai_prompt.engine.tracking import MLflowPeftLogger, find_mlflow_handlers, peft_params, unique_run_name
from monai_prompt.engine.workflow import bundle_root, check_task, warn_if_not_pretrained
