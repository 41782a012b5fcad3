"""``monai-prompt gpu-check``: its path run on the CPU (``--dry-run``), its refusal without CUDA, its benchmark runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monai_prompt.benchmarks.efficiency import IN_BACKBONE, build_configs, build_parser
from monai_prompt.benchmarks.gpu_check import EFFICIENCY_RUNS, FPT_PAPER_MB, format_bundle_table, format_paper_table


def test_refuses_without_cuda_unless_dry_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "monai_prompt.cli", "gpu-check", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr.splitlines()[-1] and "--dry-run" in result.stderr


@pytest.mark.parametrize(("name", "arguments"), EFFICIENCY_RUNS)
def test_efficiency_runs_are_valid_benchmark_options(name, arguments):
    """Each GPU efficiency run parses into known methods and variants."""
    from monai_prompt.benchmarks.efficiency import BenchSettings

    args = build_parser().parse_args(arguments)
    settings = BenchSettings(args.backbone, {}, args.img_size, args.fpt_img_size, None, args.batch_size)
    configs = build_configs(settings, args.methods, [*args.checkpointing, *args.variants])
    methods = {config.method for config in configs}
    if "512" in name:  # the FPT paper's memory table: ViT-B/16 at 512, batch 16
        assert methods == {"full", "lora", "fpt", "fptplus"}
        assert (args.img_size, args.fpt_img_size, args.batch_size) == (512, 512, 16)
    elif "step_in_backward" in name:
        assert methods == {"full"} and "blocks+sdpa+bf16+inbackward" in {c.variant for c in configs}
    else:
        assert methods == {"full", *IN_BACKBONE} and "blocks+sdpa+fp16" in {c.variant for c in configs}


def test_paper_table_sets_the_whole_allocation_against_the_fpt_paper():
    measured = [("full", "none", 1000.0, 22000.0), ("full", "sdpa", 1000.0, 20000.0), ("lora", "none", 400.0, 20000.0),
                ("ept", "none", 400.0, 9000.0), ("fptplus", "cached+sdpa", 90.0, 370.0)]
    rows = [dict(zip(("method", "variant", "base_mib", "peak_mib"), values), config=f"{values[0]} {values[1]} @512",
                 img_size=512) for values in measured]
    lines = format_paper_table(rows).splitlines()
    assert len(lines) == 2 + 3  # full (without SDPA), LoRA, FPT+; EPT has no figure in the paper
    assert lines[2] == "| full none @512 | 23,000 | 1.000 | 23,128 | 1.000 | 0.99 |"
    assert lines[4] == f"| fptplus cached+sdpa @512 | 460 | 0.020 | 736 | {736 / 23128:.3f} | 0.62 |"
    assert FPT_PAPER_MB == {"full": 23128, "lora": 20970, "fpt": 1824, "fptplus": 736}


def test_bundle_table_shows_failures():
    rows = [{"bundle": "a", "metric": 0.5, "status": "ok"}, {"bundle": "b", "status": "FAILED: x"}]
    table = format_bundle_table(rows)
    assert "| a |" in table and "0.500" in table and "FAILED: x" in table.splitlines()[-1]


@pytest.mark.slow
def test_dry_run_trains_evaluates_infers_and_exports(tmp_path):
    """The whole bundle path on the CPU: a classification and a 3D segmentation bundle, TorchScript run again; the
    classification bundle once more with the optimiser step in backward."""
    result = subprocess.run(
        [sys.executable, "-m", "monai_prompt.cli", "gpu-check", "--dry-run", "--skip-efficiency", "--out",
         str(tmp_path), "ept_classification", "lora_3d_segmentation", "--in-backward", "ept_classification"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ept_") or line.startswith("| lora_")]
    assert len(rows) == 3 and all(row.rstrip().endswith("| ok |") for row in rows)
    assert rows[-1].startswith("| ept_classification_step_in_backward |")
    assert (tmp_path / "work" / "runs" / "lora_3d_segmentation" / "export" / "model_full.ts").is_file()
