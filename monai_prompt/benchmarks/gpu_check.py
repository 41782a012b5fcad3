"""The check to run the moment a GPU is lent: ``monai-prompt gpu-check`` (also ``make gpu-check``).

One command, under 8 minutes on one H100, that

1. runs every bundle (classification and 2D/3D segmentation) a few iterations on the tiny demo data with the
   bundle's own device choice (CUDA with AMP when present): train one epoch, evaluate, infer, export TorchScript
   (:func:`monai_prompt.tools.export.export_bundle`, on the CPU as MONAI's tools do) and run the TorchScript file on
   the device; ``--in-backward`` bundles (by default full fine-tuning, classification and 2D segmentation) once
   more with ``step_in_backward`` (on CUDA the network's own bf16 autocast instead of the trainer's fp16 AMP);
2. runs ``monai-prompt benchmark efficiency`` at ViT-B/16 224 px (batch 4; every in-backbone method, plain and
   ``blocks+sdpa+bf16``, the peer at its defaults and its own best, and both compared) and at 512 px, batch 16
   (full, LoRA, FPT, FPT+: the FPT paper's setting), with CUDA memory, one round (one process per configuration),
   full fine-tuning at 224 px with the optimiser step in backward (``blocks+sdpa+bf16+inbackward``), and last the
   3D UNETR of the segmentation bundles (64^3, batch 2; full fine-tuning and LoRA, plain and
   ``blocks+sdpa+bf16+inbackward``);
3. writes one Markdown report of both (``<out>/gpu_check.md``), with the 512 px rows set against the FPT paper's GPU
   memory (:data:`FPT_PAPER_MB`), and exits non-zero if any bundle failed.

The bundles run ``--jobs`` at a time, each in its own process (on CUDA by default half the CPU cores, at most 8: tiny
runs, bound by Python rather than the GPU); the benchmark runs alone. The report is rewritten after every bundle and
every benchmark run, so a check stopped by a time limit leaves what it finished. A failing bundle is reported in its
row (the error under MONAI's wrapping ``RuntimeError``, ``Failed to evaluate ...``) and the others still run. Without
CUDA it refuses, unless ``--dry-run``: the same path on the CPU at the tiny sizes of ``--quick`` (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from monai_prompt.benchmarks.efficiency import FPT_METHODS, IN_BACKBONE
from monai_prompt.bundle_gen.specs import ALL_BUNDLE_SPECS, BundleSpec
from monai_prompt.io import atomic_write
from monai_prompt.runs.bundles import bundles_folder
from monai_prompt.runs.errors import root_cause

__all__ = ["FPT_PAPER_MB", "check_bundle", "check_bundles", "format_bundle_table", "format_paper_table", "main"]

#: the 3D bundles' ROI on the tiny 64 x 64 x 32 crops (2D: the bundles' own choice, whole slices).
ROI_3D = 32
#: the efficiency runs: (name, ``monai-prompt benchmark efficiency`` arguments) on a GPU; the peer rows (when
#: transformers and peft are installed) in the first only.
EFFICIENCY_RUNS = (
    ("vit_b16_224", ["--img-size", "224", "--batch-size", "4", "--rounds", "1", "--methods", *IN_BACKBONE,
                     "--checkpointing", "none", "--variants", "blocks+sdpa+bf16"]),
    ("vit_b16_512_fpt_setting", ["--img-size", "512", "--fpt-img-size", "512", "--batch-size", "16", "--rounds", "1",
                                 "--methods", "lora", "fpt", "fptplus", "--checkpointing", "none", "--variants",
                                 "--peer"]),
    ("vit_b16_224_step_in_backward", ["--img-size", "224", "--batch-size", "4", "--rounds", "1", "--methods", "full",
                                      "--checkpointing", "none", "--variants", "blocks+sdpa+bf16",
                                      "blocks+sdpa+bf16+inbackward", "--peer"]),
    ("unetr_3d_64", ["--task", "segmentation", "--spatial-dims", "3", "--img-size", "64", "--batch-size", "2",
                     "--rounds", "1", "--methods", "full", "lora", "--checkpointing", "none", "--variants",
                     "blocks+sdpa+bf16+inbackward"]),
)
#: the dry run's efficiency runs at ``--quick`` sizes: every kind of row (an in-backbone method, FPT+, the peer)
#: and the 3D segmentation network (``benchmark efficiency --quick`` itself, every method, is tested on its own).
DRY_RUN_EFFICIENCY = (
    ("quick", ["--quick", "--methods", "lora", "fptplus"]),
    ("quick_unetr_3d", ["--quick", "--task", "segmentation", "--spatial-dims", "3", "--methods", "lora",
                        "--variants", "blocks+sdpa+bf16+inbackward"]),
)
#: the FPT paper's training memory on a GPU at ViT-B/16, 512 px, batch 16 (MB), per method.
FPT_PAPER_MB = {"full": 23128, "lora": 20970, "fpt": 1824, "fptplus": 736}
#: the bundles checked once more with ``step_in_backward`` when no bundle is named.
IN_BACKWARD_BUNDLES = ("full_classification", "full_segmentation")


def _task_data(work: Path, print_fn: Callable[[str], None]) -> dict[str, Any]:
    """The tiny demo data and MAE encoders: classification, 2D segmentation (3D uses a random encoder)."""
    from monai_prompt.runs.demo_task import TINY_DEMO, prepare_data, pretrain, pretrained_overrides
    from monai_prompt.runs.segmentation_demo_task import (
        TINY_SEGMENTATION_DEMO,
        prepare_segmentation_data,
        pretrain_encoder,
    )

    datalist, _ = prepare_data(work / "data", TINY_DEMO)
    checkpoint, _ = pretrain(work / "vit_pretraining", datalist, TINY_DEMO, print_fn=print_fn)
    seg_datalist, _ = prepare_segmentation_data(work / "segmentation_data", TINY_SEGMENTATION_DEMO)
    encoder, _ = pretrain_encoder(work / "segmentation_pretraining", seg_datalist, TINY_SEGMENTATION_DEMO,
                                  print_fn=print_fn)
    return {"datalist": datalist, "backbone": pretrained_overrides(TINY_DEMO, checkpoint),
            "segmentation_data": seg_datalist.parent, "encoder": encoder,
            "encoder_3d": _random_encoder_3d(work / "encoder_3d.pt")}


def _random_encoder_3d(path: Path) -> Path:
    """A random 3D encoder of the tiny segmentation demo's shape, saved so that export rebuilds the same one."""
    from monai_prompt.backbones.vit import build_vit
    from monai_prompt.runs.segmentation_demo_task import TINY_SEGMENTATION_DEMO

    torch.manual_seed(0)
    vit = build_vit("vit_tiny", in_channels=1, img_size=ROI_3D, spatial_dims=3, cls_token=False,
                    **TINY_SEGMENTATION_DEMO.encoder)
    torch.save(vit.state_dict(), path)
    return path


def _run_classification(spec: BundleSpec, bundle: Path, out: Path, data: dict[str, Any], extra: dict[str, Any]
                        ) -> tuple[float, dict]:
    """Train one epoch, evaluate and infer (``extra``: more overrides); the overrides every later step needs and the
    test metric."""
    from monai_prompt.benchmarks.bundle_runs import demo_overrides
    from monai_prompt.runs.runner import run_bundle, train_and_evaluate

    overrides = {**demo_overrides(spec, data["datalist"], data["backbone"]), "num_workers": 0, **extra}
    _, metrics = train_and_evaluate(bundle, out, overrides, epochs=1)
    run_bundle(bundle, ["inference.json"], "infer", quiet=True, bundle_root=str(out), **overrides)
    return metrics["accuracy"], overrides


def _run_segmentation(spec: BundleSpec, bundle: Path, out: Path, data: dict[str, Any], extra: dict[str, Any]
                      ) -> tuple[float, dict]:
    """Train one epoch, evaluate and infer (2D: the MAE encoder; 3D: a saved random one; ``extra``: more
    overrides); the overrides and mean Dice."""
    from monai_prompt.runs.segmentation_demo_task import TINY_SEGMENTATION_DEMO, demo_overrides, tune_segmentation

    encoder = data["encoder"]
    if spec.spatial_dims == 3:
        extra = {**extra, "spatial_dims": 3, "datalist_file": str(data["segmentation_data"] / "datalist_3d.json"),
                 "img_size": ROI_3D, "_meta_#network_data_format#inputs#image#spatial_shape": [ROI_3D] * 3,
                 "_meta_#network_data_format#outputs#pred#spatial_shape": [ROI_3D] * 3}
        encoder = data["encoder_3d"]
    result = tune_segmentation(spec.name, out, data["segmentation_data"], encoder, TINY_SEGMENTATION_DEMO,
                               print_fn=lambda line: None, extra_overrides=extra)
    overrides = demo_overrides(TINY_SEGMENTATION_DEMO, data["segmentation_data"], encoder, extra)
    return result["metrics"]["mean_dice"], {**{k: v for k, v in overrides.items() if not k.startswith("_meta_")},
                                            "img_size": result["img_size"]}


def _scripted_runs_on(script: Path, device: torch.device, example: torch.Tensor) -> None:
    """Load the TorchScript file onto ``device`` and check it gives finite outputs there."""
    module = torch.jit.load(str(script), map_location=device)
    with torch.no_grad():
        out = module(example.to(device))
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{script}: the TorchScript network gives non-finite outputs on {device}.")


def _last_line(error: BaseException) -> str:
    """The last line of ``error`` below MONAI's wrapping ``RuntimeError``s (``Failed to evaluate ...``)."""
    return traceback.format_exception_only(root_cause(error)[0])[-1].strip()


def _row_name(bundle: str, step_in_backward: bool) -> str:
    """A check's name in the report (and its run folder)."""
    return f"{bundle}_step_in_backward" if step_in_backward else bundle


def check_bundle(spec: BundleSpec, bundles: Path, work: Path, data: dict[str, Any], step_in_backward: bool = False
                 ) -> dict[str, Any]:
    """Run ``spec``'s bundle through train, evaluate, inference and export; one table row (status and timings).

    Args:
        spec: the bundle.
        bundles: the bundles folder.
        work: scratch folder (the run goes to ``work/runs/<bundle>``, ``<bundle>_step_in_backward``).
        data: :func:`_task_data`'s data and encoders.
        step_in_backward: train with the optimiser step in backward (the bundle's ``step_in_backward``).
    """
    from monai_prompt.tools.export import export_bundle

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = _row_name(spec.name, step_in_backward)
    row: dict[str, Any] = {"bundle": name, "device": device.type, "amp": device.type == "cuda"}
    out = work / "runs" / name
    start = time.perf_counter()
    try:
        run = _run_segmentation if spec.task == "segmentation" else _run_classification
        extra = {"step_in_backward": True} if step_in_backward else {}
        row["metric"], overrides = run(spec, bundles / spec.name, out, data, extra)
        row["train_eval_infer_s"] = round(time.perf_counter() - start, 1)
        report = export_bundle(bundles / spec.name, ckpt=out / "models" / "model.pt", out_dir=out / "export",
                               overrides={**overrides, "bundle_root": str(out)})
        vit_size = [overrides["img_size"]] * (spec.spatial_dims or 2)
        channels = overrides.get("in_channels", 1)
        _scripted_runs_on(report.torchscript, device, torch.rand(1, channels, *vit_size))
        row.update(export_max_diff=f"{report.max_abs_diff:.1e}", merged=report.merged, status="ok")
    except Exception as err:  # the row says what failed; the other bundles still run
        row.update(status=f"FAILED: {_last_line(err)[:200]}")
    return row


def _worker_threads(jobs: int) -> None:
    """A bundle worker's share of the CPU cores."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def check_bundles(checks: Sequence[tuple[str, bool]], bundles: Path, work: Path, data: dict[str, Any], jobs: int,
                  on_row: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """:func:`check_bundle` of each ``(bundle name, step in backward)``, ``jobs`` at a time in their own processes
    (one: in this process, in order); the rows in the order of ``checks``.

    Args:
        checks: the bundles and whether each trains with the optimiser step in backward.
        bundles: the bundles folder.
        work: scratch folder.
        data: :func:`_task_data`'s data and encoders.
        jobs: bundles run at once.
        on_row: called with the rows finished so far (in the order of ``checks``) after each one.
    """
    finished: dict[int, dict[str, Any]] = {}

    def done(index: int, row: dict[str, Any]) -> None:
        finished[index] = row
        print(json.dumps(row), flush=True)
        on_row([finished[i] for i in sorted(finished)])

    arguments = [(ALL_BUNDLE_SPECS[name], bundles, work, data, in_backward) for name, in_backward in checks]
    if jobs == 1:
        for index, args in enumerate(arguments):
            done(index, check_bundle(*args))
    else:  # spawn: CUDA cannot be used in a forked child
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_threads,
                                   initargs=(jobs,))
        try:
            futures = {pool.submit(check_bundle, *args): index for index, args in enumerate(arguments)}
            for future in as_completed(futures):
                index = futures[future]
                try:
                    row = future.result()
                except Exception as err:  # the worker died (e.g. killed): its row says so, the others still run
                    row = {"bundle": _row_name(*checks[index]), "status": f"FAILED: {_last_line(err)[:200]}"}
                done(index, row)
        except BaseException:  # a time limit's SIGTERM, Ctrl-C: stop now
            _stop_workers(pool)
            raise
        pool.shutdown()
    return [finished[i] for i in range(len(checks))]


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Drop the checks ``pool`` has not started and end its workers at once. Leaving the pool's ``with`` instead
    waits for every check submitted, and a worker survives a ``SIGTERM`` (the bundle run turns it into an exception
    that the worker hands back before it takes the next check), so a time limit stopped the check only once every
    bundle had run. (``ProcessPoolExecutor`` names its workers only in ``_processes``, which ``shutdown`` forgets;
    Python 3.14's ``terminate_workers`` does the same.)"""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
            worker.join()


def format_bundle_table(rows: Sequence[dict[str, Any]]) -> str:
    """The bundle rows as a Markdown table."""
    header = ["bundle", "device", "amp", "train+eval+infer s", "metric", "export max diff", "merged", "status"]
    keys = ["bundle", "device", "amp", "train_eval_infer_s", "metric", "export_max_diff", "merged", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.get(key, "") for key in keys]
        cells[4] = f"{cells[4]:.3f}" if isinstance(cells[4], float) else cells[4]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def format_paper_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of full fine-tuning, LoRA, FPT and FPT+ against :data:`FPT_PAPER_MB`, as a Markdown table: each row's
    whole allocation in a training step (``base_mib + peak_mib``; CUDA: the network, the batch and the step; CPU:
    the process's resident memory) and its share of full fine-tuning's at the same input size, beside the paper's
    figure and share.

    Args:
        rows: :func:`~monai_prompt.benchmarks.efficiency.summarise`'s rows of one run.
    """
    full = {r["img_size"]: r["base_mib"] + r["peak_mib"] for r in rows
            if (r["method"], r["variant"]) == ("full", "none")}
    lines = ["| configuration | network + step MiB | / full | FPT paper MB | paper / full | this / paper |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        paper = FPT_PAPER_MB.get(row["method"])
        if paper is None or (row["method"] == "full" and row["variant"] != "none"):
            continue
        total = row["base_mib"] + row["peak_mib"]
        lines.append(f"| {row['config']} | {total:,.0f} | {total / full[row['img_size']]:.3f} | {paper:,} | "
                     f"{paper / FPT_PAPER_MB['full']:.3f} | {total / paper:.2f} |")
    return "\n".join(lines)


def _efficiency(out: Path, dry_run: bool, print_fn: Callable[[str], None],
                on_tables: Callable[[list[tuple[str, str]]], None]) -> None:
    """Run the efficiency benchmark (:data:`DRY_RUN_EFFICIENCY` on a dry run); after each run, ``on_tables`` gets
    ``(name, table)`` of the runs so far, the FPT runs' (512 px; the dry run's quick one) followed by their
    comparison with the FPT paper."""
    from monai_prompt.benchmarks.efficiency import format_peer_table, format_table
    from monai_prompt.benchmarks.efficiency import main as efficiency_main
    from monai_prompt.benchmarks.peer import PEER_METHODS

    runs = DRY_RUN_EFFICIENCY if dry_run else EFFICIENCY_RUNS
    tables = []
    for name, arguments in runs:
        folder = out / f"efficiency_{name}"
        print_fn(f"efficiency benchmark {name}: {' '.join(arguments)}")
        efficiency_main(["--out", str(folder), *arguments])
        rows = json.loads((folder / "efficiency.json").read_text())["summary"]
        tables.append((name, format_table(rows)))
        if any(row["method"] in PEER_METHODS for row in rows):
            tables.append((f"{name} against the peer (transformers + peft)", format_peer_table(rows)))
        if any(row["method"] in FPT_METHODS for row in rows):
            tables.append((f"{name} against the FPT paper (ViT-B/16, 512 px, batch 16)", format_paper_table(rows)))
        on_tables(tables)


def _report(start: float, rows: Sequence[dict[str, Any]], tables: Sequence[tuple[str, str]]) -> str:
    """The Markdown report: the device, the time so far, the bundle table and each benchmark table."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    report = [f"# GPU check on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s", "",
              "## Bundles", "", format_bundle_table(rows)]
    for name, table in tables:  # the benchmark's fixed-width tables in a text block, the Markdown ones as they are
        report += ["", f"## Efficiency: {name}", "", table if table.startswith("|") else f"```text\n{table}\n```"]
    return "\n".join(report) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-prompt gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="bundles (default: all)")
    parser.add_argument("--out", default="runs/gpu_check", help="output folder (default: runs/gpu_check)")
    parser.add_argument("--bundles", help="the bundles folder (default: the package's)")
    parser.add_argument("--in-backward", nargs="*", default=None,
                        help="bundles checked once more with step_in_backward (default: "
                             f"{' '.join(IN_BACKWARD_BUNDLES)} when no bundle is named, else none)")
    parser.add_argument("--jobs", type=int,
                        help="bundles run at once, each in its own process (default: on CUDA half the CPU cores, at "
                             "most 8; else 1, in this process)")
    parser.add_argument("--skip-efficiency", action="store_true", help="bundles only")
    parser.add_argument("--dry-run", action="store_true",
                        help="without CUDA: the same path on the CPU, efficiency benchmark at --quick sizes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``monai-prompt gpu-check [names] [options]``; 0 when every bundle passed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        parser.error("no CUDA device: run it on a GPU machine, or add --dry-run to check the path on the CPU.")
    in_backward = (list(IN_BACKWARD_BUNDLES) if not args.names else []) if args.in_backward is None \
        else args.in_backward
    unknown = sorted(set(args.names + in_backward) - set(ALL_BUNDLE_SPECS))
    if unknown:
        parser.error(f"unknown bundles {unknown}; known: {sorted(ALL_BUNDLE_SPECS)}")
    fpt = [name for name in in_backward if ALL_BUNDLE_SPECS[name].fpt]
    if fpt:
        parser.error(f"--in-backward {fpt}: FPT bundles have no step_in_backward setting.")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more bundles at once.")
    jobs = args.jobs or (min(8, max(1, (os.cpu_count() or 1) // 2)) if torch.cuda.is_available() else 1)
    out, bundles = Path(args.out).absolute(), bundles_folder(args.bundles).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start, path = time.perf_counter(), out / "gpu_check.md"

    def write(rows: Sequence[dict[str, Any]], tables: Sequence[tuple[str, str]] = ()) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(_report(start, rows, tables)))

    data = _task_data(out / "work", print_fn=print)
    checks = [(name, False) for name in args.names or list(ALL_BUNDLE_SPECS)] + [(name, True) for name in in_backward]
    rows = check_bundles(checks, bundles, out / "work", data, jobs, on_row=write)
    if not args.skip_efficiency:
        _efficiency(out, args.dry_run, print, on_tables=lambda tables: write(rows, tables))
    print(path.read_text())
    failed = [row["bundle"] for row in rows if row["status"] != "ok"]
    print(f"written: {out / 'gpu_check.md'}" + (f"; FAILED: {failed}" if failed else "; every bundle passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
