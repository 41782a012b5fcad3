"""``monai-prompt gpu-check``: its path run on the CPU (``--dry-run``) as an offline GPU machine runs it
(``gpu/offline_check.sh``), its refusals, its report, its benchmark runs."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bundle_support import REPO
from monai_prompt.benchmarks import gpu_check
from monai_prompt.benchmarks.efficiency import IN_BACKBONE, build_configs, build_parser
from monai_prompt.benchmarks.gpu_check import (
    EFFICIENCY_RUNS,
    FPT_PAPER_MB,
    format_bundle_table,
    format_paper_table,
)


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
    settings = BenchSettings(args.backbone, {}, args.img_size, args.fpt_img_size, None, args.batch_size,
                             task=args.task, spatial_dims=args.spatial_dims)
    configs = build_configs(settings, args.methods, [*args.checkpointing, *args.variants])
    methods = {config.method for config in configs}
    if "unetr" in name:  # the segmentation bundles' 3D network, with and without the lean settings
        assert methods == {"full", "lora"} and (settings.task, settings.spatial_dims) == ("segmentation", 3)
        assert {c.variant for c in configs} == {"none", "blocks+sdpa+bf16+inbackward"}
    elif "512" in name:  # the FPT paper's memory table: ViT-B/16 at 512, batch 16
        assert methods == {"full", "lora", "fpt", "fptplus"}
        assert (args.img_size, args.fpt_img_size, args.batch_size) == (512, 512, 16)
    elif "step_in_backward" in name:
        assert methods == {"full"} and "blocks+sdpa+bf16+inbackward" in {c.variant for c in configs}
    else:
        assert methods == {"full", *IN_BACKBONE} and "blocks+sdpa+bf16" in {c.variant for c in configs}


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


def test_failed_row_names_the_error_under_monais_wrapper():
    """MONAI wraps an error inside a config expression in a RuntimeError; the row gives the error under it."""
    from monai.bundle import ConfigParser

    with pytest.raises(RuntimeError) as raised:
        ConfigParser({"x": "$__import__('no_such_module_xyz')"}).get_parsed_content("x")
    assert "Failed to evaluate" in str(raised.value)
    assert gpu_check._last_line(raised.value) == "ModuleNotFoundError: No module named 'no_such_module_xyz'"


def test_report_is_rewritten_after_each_bundle(tmp_path, monkeypatch):
    """Each finished bundle reaches the report at once (a check stopped by a time limit keeps what it finished)."""
    calls = []
    monkeypatch.setattr(gpu_check, "check_bundle", lambda spec, *args: calls.append(spec.name) or
                        {"bundle": spec.name, "status": "ok" if spec.name.startswith("lora") else "FAILED: x"})
    seen = []
    rows = gpu_check.check_bundles([("lora_classification", False), ("ssf_segmentation", False)], tmp_path, tmp_path,
                                   {}, jobs=1, on_row=lambda done: seen.append([row["bundle"] for row in done]))
    assert calls == ["lora_classification", "ssf_segmentation"]
    assert seen == [["lora_classification"], ["lora_classification", "ssf_segmentation"]]
    assert [row["status"] for row in rows] == ["ok", "FAILED: x"]


def _slow_check(spec, *args):
    """A bundle check that takes two minutes (one second for ``lora_classification``); module level, so that the
    spawned workers of :func:`gpu_check.check_bundles` import it."""
    time.sleep(1 if spec.name == "lora_classification" else 120)
    return {"bundle": spec.name, "status": "ok"}


def test_an_interrupted_check_stops_its_workers_at_once(tmp_path, monkeypatch):
    """A time limit's SIGTERM or Ctrl-C during the bundles (here: an error once the first row is in) ends the check
    at once: the queued bundles are dropped and the running ones stopped. Leaving the pool's ``with`` waited for
    every bundle submitted, so a check over its time limit ran on to the end of all of them."""
    monkeypatch.setattr(gpu_check, "check_bundle", _slow_check)

    def interrupt(rows):
        raise KeyboardInterrupt

    checks = [("lora_classification", False), ("ssf_segmentation", False), ("vpt_classification", False)]
    before, start = set(multiprocessing.active_children()), time.perf_counter()  # another test's may be ending
    with pytest.raises(KeyboardInterrupt):
        gpu_check.check_bundles(checks, tmp_path, tmp_path, {}, jobs=2, on_row=interrupt)
    assert time.perf_counter() - start < 90  # not the 120 s of a slow check, let alone two
    assert not set(multiprocessing.active_children()) - before  # the check's workers are gone


def test_refuses_jobs_below_one(capsys):
    with pytest.raises(SystemExit) as exited:
        gpu_check.main(["--dry-run", "--jobs", "0", "--out", "unused"])
    assert exited.value.code == 2 and "--jobs 0" in capsys.readouterr().err.splitlines()[-1]


def _requirement_names(path: Path) -> set[str]:
    """The canonical distribution names of a requirements file."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(Requirement(line).name) for line in lines if line}


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and, as installed here, every distribution they require (extras left out), canonical."""
    from importlib.metadata import PackageNotFoundError, distribution

    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:  # on the image, not installed here
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return found


def _hidden_modules() -> set[str]:
    """The top-level modules of every installed distribution that is neither on the image (gpu/image.txt; with the
    dependencies its packages have at the versions installed here) nor in the kit (gpu/kit.txt)."""
    from importlib.metadata import packages_distributions

    image = _with_dependencies(_requirement_names(REPO / "gpu" / "image.txt"))
    allowed = image | _requirement_names(REPO / "gpu" / "kit.txt") | {"monai-prompt"}
    return {module for module, dists in packages_distributions().items()
            if not any(canonicalize_name(dist) in allowed for dist in dists)}


#: a sitecustomize that hides modules from every finder, as if they were not installed (import fails with
#: ModuleNotFoundError, importlib.util.find_spec gives None), in the check and every process it starts
_HIDE = """
import sys

HIDDEN = frozenset({hidden!r})


class _Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
"""


def test_offline_check_says_last_that_it_ran_out_of_time(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "GPU_KIT_DIR": str(tmp_path / "no_kit"), "GPU_CHECK_LIMIT_S": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "gpu" / "offline_check.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 124
    assert result.stdout.splitlines()[-1] == ("gpu/offline_check.sh: the check ran past GPU_CHECK_LIMIT_S=1 s and was "
                                              "stopped; gpu_check.md holds what it had finished")
    assert "ran past" in (tmp_path / "out" / "gpu_check.log").read_text()


@pytest.mark.slow
def test_offline_check_runs_on_the_image_and_the_kit_alone(tmp_path):
    """gpu/offline_check.sh as on an offline GPU machine: every installed package that is neither on the assumed image
    (gpu/image.txt) nor in the kit (gpu/kit.txt) hidden, on the CPU (--dry-run), two bundles at once: a
    classification and a 3D segmentation bundle train, evaluate, infer and export (TorchScript run again), the
    classification bundle once more with the optimiser step in backward, then the quick efficiency benchmarks
    (classifiers, 3D UNETR); the report, the log and the benchmarks' tables reach $OUT."""
    hidden = _hidden_modules()
    assert {"mlflow", "itk", "pydicom", "fire"} <= hidden  # what the full install has and the check must not need
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE.format(hidden=sorted(hidden)))
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OUT": str(tmp_path / "out"), "GPU_KIT_DIR": str(tmp_path / "no_kit"), "TMPDIR": str(tmp_path)}
    hides = subprocess.run(["python3", "-c", "import mlflow"], env=env, capture_output=True, text=True)
    assert "No module named 'mlflow'" in hides.stderr

    result = subprocess.run(
        ["bash", str(REPO / "gpu" / "offline_check.sh"), "--dry-run", "--jobs", "2", "ept_classification",
         "lora_3d_segmentation", "--in-backward", "ept_classification"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "efficiency_quick.json", "efficiency_quick_unetr_3d.json", "gpu_check.log", "gpu_check.md"]
    report = (out / "gpu_check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ept_") or line.startswith("| lora_")]
    assert len(rows) == 3 and all(row.rstrip().endswith("| ok |") for row in rows)
    assert rows[-1].startswith("| ept_classification_step_in_backward |")
    assert "## Efficiency: quick against the FPT paper" in report and "## Efficiency: quick_unetr_3d" in report
    assert "## Efficiency: quick against the peer (transformers + peft)" in report
    assert "every bundle passed" in (out / "gpu_check.log").read_text()
