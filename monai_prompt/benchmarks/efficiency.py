"""Cost of every method side by side: ``monai-prompt benchmark efficiency`` (docs/benchmarks.md, Efficiency).

Every configuration (method x memory/speed variant) trains on random data in a fresh process of its own (a new child
of a fork server that imported the networks once), so its memory is its own; the configurations are interleaved in
rounds (full fine-tuning first, then every other one, repeated ``--rounds`` times), so each ratio to full fine-tuning
comes from the same round, under the same load. Per configuration:

- trainable parameters (count and % of the backbone) and the delta size (bytes of the saved delta; its ratio to
  full fine-tuning's delta is the ratio to the full checkpoint);
- peak training memory above the process's level once the network and the optimiser are built (and one
  forward/backward has loaded the kernels; its gradients are dropped, the optimiser's state is not yet created), and
  that level itself (``base_mib``; CUDA: the network's weights and the batch, so ``base_mib + peak_mib`` is the
  step's whole allocation, what papers report): CPU,
  the resident peak (``VmHWM``) reset through ``/proc/self/clear_refs`` (glibc is told to mmap every allocation
  above 128 KiB, so freed memory does not hide later peaks); CUDA, ``torch.cuda.max_memory_allocated`` after a
  reset;
- the median CPU and wall time of a training step after warm-up, and the inference latency per image (online:
  FPT runs its LPM).

Variants of the in-backbone methods (``--checkpointing`` modes of
:meth:`~monai_prompt.backbones.vit.PromptableViT.set_grad_checkpointing` and ``--variants`` such as
``blocks+sdpa+bf16``); FPT/FPT+ train online and from preloaded features (the LPM released,
:meth:`~monai_prompt.nets.FPTClassifier.release_lpm`) against full fine-tuning of the same encoder at the LPM's size.
``--backbone`` takes any family's preset: a SAM-family encoder (``lite_medsam``, ``sam_vit_b``) measures FPT/FPT+
from the cache against full fine-tuning of that encoder (``--quick`` then uses a tiny one of the family,
:data:`QUICK_GRID_BACKBONES`; peer rows are ViT-only). ``--task segmentation`` measures the segmentation bundles'
network instead (:func:`~monai_prompt.nets.segmentation_network`: a UNETR on a ViT, ``--spatial-dims`` 2 or 3; the
SAM family's own decoders, 2D) on one-channel images and a random label map, the decoder always trained; ``linear``
(the frozen encoder) is its floor.
Writes ``efficiency.csv``, ``efficiency.json``, ``memory_ratio.png`` / ``time_ratio.png`` and ``tradeoff.png`` (memory
against time of the in-backbone variants) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import gc
import io
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BenchConfig", "BenchSettings", "PeakMemory", "build_configs", "build_parser", "bundle_default",
    "format_peer_table", "measure", "run_benchmark", "summarise",
]

#: methods that change the backbone itself (the checkpointing/SDPA/autocast variants apply to them).
IN_BACKBONE = ("vpt", "lora", "adapter", "bitfit", "ssf", "dvpt", "ept")
#: the tasks: the bundles' classifiers, or their segmentation network (a UNETR on a ViT; SAM family: 2D).
TASKS = ("classification", "segmentation")
#: FPT variants: a frozen LPM at high resolution beside a small side network.
FPT_METHODS = ("fpt", "fptplus")
#: how FPT gets its LPM features, and the FPT configurations measured (``sdpa``: the side network's attention).
FPT_MODES = ("online", "cached")
FPT_CONFIGS = ("online", "cached", "cached+sdpa")
#: the in-backbone variants measured besides the checkpointing modes unless ``--variants`` names others.
DEFAULT_VARIANTS = ("sdpa", "bf16", "mlp+sdpa", "blocks+sdpa+bf16")
#: the peer's variants by default: its defaults, and its own best (gradient checkpointing, SDPA, bf16).
PEER_VARIANTS = ("none", "blocks+sdpa+bf16")
#: torch.autocast dtypes a variant may name.
AUTOCAST = ("bf16", "fp16")
#: the variant option that steps the optimiser inside backward (:func:`monai_prompt.engine.in_backward`).
IN_BACKWARD = "inbackward"
#: the workers mmap every allocation above this many bytes, so freed memory goes back to the OS at once.
MMAP_THRESHOLD = 131072
#: the columns of the table, the CSV and the JSON summary rows.
COLUMNS = (
    "config", "method", "variant", "img_size", "batch_size", "trainable", "percent_of_backbone", "delta_bytes",
    "base_mib", "peak_mib", "step_cpu_s", "step_wall_s", "infer_ms_per_image", "memory_ratio", "cpu_ratio",
    "wall_ratio", "infer_ratio", "delta_ratio",
)
#: measured value -> its ratio column.
RATIOS = {"peak_mib": "memory_ratio", "step_cpu_s": "cpu_ratio", "step_wall_s": "wall_ratio",
          "infer_ms_per_image": "infer_ratio", "delta_bytes": "delta_ratio"}
#: measured values reported without a ratio.
UNRATIOED = ("base_mib",)
QUICK_BACKBONE = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "mlp_dim": 128, "patch_size": 8}
#: ``--quick`` shapes of the SAM-family presets (checkpointing: whole blocks or none).
QUICK_GRID_BACKBONES = {
    "lite_medsam": {"embed_dims": (8, 16, 24, 32), "depths": (1, 2, 1, 2), "num_heads": (1, 2, 3, 4),
                    "window_sizes": (7, 7, 8, 5), "neck_dim": 16},
    "sam_vit_b": {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "out_chans": 16, "window_size": 3,
                  "global_attn_indexes": (1, 3)},
}
#: the checkpointing modes of the SAM-family encoders (whole blocks or nothing).
GRID_CHECKPOINTING = ("none", "blocks")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What every configuration of one run shares.

    Args:
        backbone: ViT preset of every network (the FPT LPM too).
        backbone_overrides: :func:`~monai_prompt.backbones.build_vit` overrides (``--quick``: a tiny ViT).
        img_size: input size of the in-backbone methods and their full fine-tuning row.
        fpt_img_size: the LPM's input size (FPT's setting), and that of the full fine-tuning row FPT is compared to.
        fpt_side_img_size: side-network input size (None: the variant's default for the LPM size, 224 FPT and 128
            FPT+ at 512).
        batch_size: images per step.
        num_classes: logits.
        steps: timed training steps (after ``warmup``).
        warmup: untimed training steps first (inside the memory window: they are training too).
        inference_steps: timed inference batches (after one untimed).
        threads: torch threads of each worker.
        device: ``"cpu"`` or ``"cuda"``.
        task: ``"classification"`` (3-channel images, a class each) or ``"segmentation"`` (1-channel images, a
            label map; ``num_classes`` classes).
        spatial_dims: the segmentation images' dimensions (2 or 3; ``img_size`` is each side).
    """

    backbone: str = "vit_base"
    backbone_overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    img_size: int = 224
    fpt_img_size: int = 512
    fpt_side_img_size: int | None = None
    batch_size: int = 4
    num_classes: int = 5
    steps: int = 5
    warmup: int = 2
    inference_steps: int = 3
    threads: int = 1
    device: str = "cpu"
    task: str = "classification"
    spatial_dims: int = 2

    @property
    def channels(self) -> int:
        """Image channels: RGB for classification, one for segmentation (an MRI or CT)."""
        return 1 if self.task == "segmentation" else 3

    def shape(self, img_size: int) -> tuple[int, ...]:
        """The spatial shape of an image of side ``img_size``."""
        return (img_size,) * (self.spatial_dims if self.task == "segmentation" else 2)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One measured configuration.

    Args:
        method: ``"full"``, ``"linear"``, an in-backbone method (:data:`IN_BACKBONE`) or an FPT variant.
        variant: ``"+"``-joined options: a checkpointing mode (``none``, ``blocks``, ``attn``, ``mlp``,
            ``alternate``), ``sdpa``, an autocast dtype (``bf16``, ``fp16``), ``inbackward`` (the optimiser step
            in backward, which frees each gradient at once); FPT: ``online`` or ``cached``, with ``+sdpa`` for the
            side network's attention.
        img_size: input size (FPT and its full row: the LPM's).
    """

    method: str
    variant: str
    img_size: int

    @property
    def name(self) -> str:
        return f"{self.method} {self.variant} @{self.img_size}"

    @property
    def cached(self) -> bool:
        """FPT trained from preloaded features (the LPM released)."""
        return "cached" in self.variant.split("+")

    def options(self) -> dict[str, Any]:
        """``{"checkpointing", "sdpa", "autocast", "in_backward"}`` of a variant."""
        parts = self.variant.split("+")
        modes = [p for p in parts if p not in ("sdpa", IN_BACKWARD, *AUTOCAST, *FPT_MODES)]
        autocast = [p for p in parts if p in AUTOCAST]
        return {"checkpointing": modes[0] if modes else "none", "sdpa": "sdpa" in parts,
                "autocast": autocast[0] if autocast else None, "in_backward": IN_BACKWARD in parts}


def check_variant(variant: str) -> str:
    """``variant`` if it names at most one checkpointing mode, ``sdpa``, one autocast dtype and ``inbackward``; else
    a clear error."""
    from monai_prompt.backbones.vit import CHECKPOINT_MODES

    parts = variant.split("+")
    modes = [p for p in parts if p in CHECKPOINT_MODES]
    unknown = [p for p in parts if p not in (*CHECKPOINT_MODES, "sdpa", IN_BACKWARD, *AUTOCAST)]
    if unknown or len(modes) > 1 or sum(p in AUTOCAST for p in parts) > 1 or len(set(parts)) < len(parts):
        raise ValueError(
            f"variant {variant!r}: join at most one checkpointing mode of {list(CHECKPOINT_MODES)}, 'sdpa', one "
            f"autocast dtype of {list(AUTOCAST)} and {IN_BACKWARD!r} with '+', e.g. 'blocks+sdpa+bf16'."
        )
    return variant


def build_configs(settings: BenchSettings, methods: Sequence[str], variants: Sequence[str],
                  peer_variants: Sequence[str] = ()) -> list[BenchConfig]:
    """Full fine-tuning at each size first (at ``img_size`` also with ``sdpa`` when that variant is measured), then
    each variant for every in-backbone method (and for full fine-tuning when ``methods`` names ``"full"``), then FPT
    (:data:`FPT_CONFIGS`), then the peer (:data:`~monai_prompt.benchmarks.peer.PEER_METHODS`) in each of
    ``peer_variants``.

    Args:
        settings: the run's settings.
        methods: in-backbone methods, ``"full"``, ``"linear"`` and FPT variants to measure.
        variants: in-backbone variants (see :class:`BenchConfig`).
        peer_variants: the peer's variants (the same options: checkpointing, ``sdpa``, autocast).

    Raises:
        ValueError: an unknown method or variant; FPT or the peer with ``task="segmentation"`` (classifiers only).
    """
    from monai_prompt.benchmarks.peer import PEER_METHODS

    fpt = [m for m in methods if m in FPT_METHODS]
    if settings.task == "segmentation" and (fpt or peer_variants):
        raise ValueError(f"{'FPT' if fpt else 'the peer rows'}: classification only; with --task segmentation "
                         f"measure {['full', 'linear', *IN_BACKBONE]}.")
    configs = [BenchConfig("full", "none", settings.img_size)]
    if "sdpa" in variants:  # the full fine-tuning bundle's default, beside the reference without SDPA
        configs.append(BenchConfig("full", "sdpa", settings.img_size))
    if fpt and settings.fpt_img_size != settings.img_size:
        configs.append(BenchConfig("full", "none", settings.fpt_img_size))
    unknown = [m for m in methods if m not in ("full", "linear", *IN_BACKBONE, *FPT_METHODS)]
    if unknown:
        raise ValueError(f"method {unknown[0]!r} is not one of {['full', 'linear', *IN_BACKBONE, *FPT_METHODS]}.")
    # variant by variant, so that a run stopped early has every method in its first variants
    in_backbone = [m for m in methods if m in ("full", "linear", *IN_BACKBONE)]
    configs += [c for c in (BenchConfig(m, check_variant(v), settings.img_size) for v in variants for m in in_backbone)
                if c not in configs]
    configs += [BenchConfig(m, mode, settings.fpt_img_size) for m in fpt for mode in FPT_CONFIGS]
    return configs + [BenchConfig(m, check_variant(v), settings.img_size) for v in peer_variants
                      for m in PEER_METHODS]


class PeakMemory:
    """Peak memory above the level at :meth:`reset`, in MiB.

    CPU (Linux): the resident set's high-water mark ``VmHWM``, reset to the current resident size by writing
    ``5`` to ``/proc/self/clear_refs``. Before that, glibc hands the heap's free pages back (``malloc_trim``): memory
    freed earlier but kept resident would otherwise serve later allocations without raising the resident set, hiding
    their peak. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline = 0.0

    @staticmethod
    def _status_mib(field: str) -> float:
        from monai_prompt.engine.handlers import process_status_mib

        try:
            return process_status_mib(field)
        except (OSError, KeyError) as err:
            raise RuntimeError(f"cannot read {field} of /proc/self/status ({err}); the CPU memory benchmark needs "
                               "Linux.") from err

    def reset(self) -> None:
        """Take the current level as the baseline and forget earlier peaks."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
            return
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError as err:
            raise RuntimeError(f"cannot reset the resident peak through /proc/self/clear_refs ({err}).") from err
        self.baseline = self._status_mib("VmRSS")

    def peak(self) -> float:
        """Peak MiB above the baseline since :meth:`reset`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline
        return self._status_mib("VmHWM") - self.baseline


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else ``None``."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """glibc: serve every allocation above :data:`MMAP_THRESHOLD` bytes by mmap, so that memory freed earlier is
    returned to the OS instead of hiding later peaks from the resident-set reading (no-op elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also stops glibc raising it dynamically)


def _network(config: BenchConfig, settings: BenchSettings, online: bool = False) -> torch.nn.Module:
    """The network of ``config`` (random weights: timings and memory do not depend on them)."""
    from monai_prompt.backbones.vit import is_vit_preset, vit_config
    from monai_prompt.benchmarks.peer import PEER_METHODS, PeerViT
    from monai_prompt.nets import FPTClassifier, PromptClassifier, segmentation_network

    if config.method in PEER_METHODS:
        shape = {**vit_config(settings.backbone), **settings.backbone_overrides}
        return PeerViT(config.method, shape, config.img_size, settings.num_classes, config.options())
    common = {"backbone": settings.backbone, "img_size": config.img_size,
              "backbone_overrides": settings.backbone_overrides or None}
    if config.method in FPT_METHODS:
        fpt_config = {"side_img_size": settings.fpt_side_img_size} if settings.fpt_side_img_size else None
        net = FPTClassifier(settings.num_classes, config.method, fpt_config, sdpa=config.options()["sdpa"], **common)
        if config.cached and not online:
            net.release_lpm()
        return net
    options = config.options()
    checkpointing = options["checkpointing"]
    if not is_vit_preset(settings.backbone):  # the SAM-family encoders take a bool
        checkpointing = checkpointing != "none"
    variant = {"grad_checkpointing": checkpointing, "sdpa": options["sdpa"], "autocast_dtype": options["autocast"]}
    if settings.task == "segmentation":
        return segmentation_network(settings.channels, settings.num_classes, method=config.method,
                                    spatial_dims=settings.spatial_dims, **variant, **common)
    return PromptClassifier(settings.num_classes, config.method, **variant, **common)


def _serialized_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def _timed(fn: Any, repeats: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median CPU and wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    cpu, wall = [], []
    for index in range(warmup + repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start_wall)
    return statistics.median(cpu), statistics.median(wall)


def measure(config: BenchConfig, settings: BenchSettings) -> dict[str, Any]:
    """Build, train and time one configuration in this process (run it in a fresh one: see :func:`run_benchmark`).

    Returns:
        ``trainable``, ``percent_of_backbone``, ``delta_bytes``, ``base_mib``, ``peak_mib``, ``step_cpu_s``,
        ``step_wall_s``, ``infer_ms_per_image``.
    """
    from monai_prompt.benchmarks.peer import PeerViT, peer_delta_bytes
    from monai_prompt.engine import in_backward
    from monai_prompt.peft import delta_state_dict, trainable_report

    torch.set_num_threads(settings.threads)
    _return_freed_memory()
    torch.manual_seed(0)
    device = torch.device(settings.device)
    net = _network(config, settings).to(device).train()
    batch, channels, shape = settings.batch_size, settings.channels, settings.shape(config.img_size)
    label_shape = (batch, *shape) if settings.task == "segmentation" else (batch,)  # a label map, or a class
    labels = torch.randint(0, settings.num_classes, label_shape, device=device)
    if config.cached:  # what the loader hands over: the side-size image and the cached K/V
        inputs = (torch.rand(batch, channels, *net.side_img_size, device=device),
                  torch.randn(batch, *net.feature_shape, device=device))
    else:
        inputs = (torch.rand(batch, channels, *shape, device=device),)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(*inputs), labels).backward()
        optimizer.step()

    # one forward/backward first, its gradients dropped: the kernels' code and lazily built state are loaded before
    # the reset, while the optimiser's state and the gradients are still created inside the measured window (the
    # step in backward is hooked after it, so that it does not step yet)
    torch.nn.functional.cross_entropy(net(*inputs), labels).backward()
    optimizer.zero_grad(set_to_none=True)
    if config.options()["in_backward"]:
        optimizer = in_backward(optimizer)
    memory = PeakMemory(device)
    memory.reset()
    step_cpu, step_wall = _timed(train_step, settings.steps, settings.warmup, device)
    peak = memory.peak()
    if isinstance(net, PeerViT):
        report, delta_bytes = net.trainable_report(), peer_delta_bytes(net)
    else:
        report, delta_bytes = trainable_report(net), _serialized_bytes(delta_state_dict(net))
    optimizer.zero_grad(set_to_none=True)
    if config.cached:  # inference runs online, with the LPM
        del net, optimizer
        net = _network(config, settings, online=True).to(device)
    net.eval()
    image = torch.rand(batch, channels, *shape, device=device)
    with torch.no_grad():
        _, infer_wall = _timed(lambda: net(image), settings.inference_steps, 1, device)
    return {
        "trainable": report["trainable"],
        "percent_of_backbone": report["percent_of_backbone"],
        "delta_bytes": delta_bytes,
        "base_mib": memory.baseline,
        "peak_mib": peak,
        "step_cpu_s": step_cpu,
        "step_wall_s": step_wall,
        "infer_ms_per_image": 1000 * infer_wall / batch,
    }


def _fresh_processes() -> multiprocessing.context.BaseContext:
    """A fork server that has imported the networks once; each configuration runs in a new child of it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["monai_prompt.benchmarks.efficiency", "monai_prompt.nets", "monai_prompt.fpt",
                                    "monai_prompt.peft"])
    return context


def _run_worker(config: BenchConfig, settings: BenchSettings, context: multiprocessing.context.BaseContext
                ) -> dict[str, Any]:
    """:func:`measure` in a fresh process (a child of the fork server, used for this configuration only)."""
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(measure, config, settings).result()


def summarise(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration: medians over rounds of each value and of its ratio to the same round's full
    fine-tuning at the same input size (without SDPA: ``full none``).

    Args:
        rounds: per round, the measured rows (``config``, ``method``, ``variant``, ``img_size``, values).
    """
    ratios: dict[str, dict[str, list[float]]] = {}
    values: dict[str, dict[str, list[float]]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for measured in rounds:
        full = {row["img_size"]: row for row in measured if (row["method"], row["variant"]) == ("full", "none")}
        for row in measured:
            rows.setdefault(row["config"], {k: row[k] for k in ("config", "method", "variant", "img_size",
                                                                "batch_size", "trainable", "percent_of_backbone")})
            for value in (*RATIOS, *UNRATIOED):
                values.setdefault(row["config"], {}).setdefault(value, []).append(row[value])
            for value, ratio in RATIOS.items():
                ratios.setdefault(row["config"], {}).setdefault(ratio, []).append(
                    row[value] / full[row["img_size"]][value])
    for name, row in rows.items():
        row.update({k: statistics.median(v) for k, v in values[name].items()})
        row.update({k: statistics.median(v) for k, v in ratios[name].items()})
    return [{k: rows[name][k] for k in COLUMNS} for name in rows]


def bundle_default(method: str, variant: str) -> bool:
    """Whether ``variant`` is how the bundles run ``method`` by default: attention on SDPA (``sdpa``; FPT: from the
    preload cache with the side network on SDPA, ``cached+sdpa``); ``--sdpa false`` gives the ``none`` row
    (FPT: ``cached``)."""
    return variant == ("cached+sdpa" if method in FPT_METHODS else "sdpa")


#: the table's footnote on :func:`bundle_default`'s rows.
DEFAULT_NOTE = ("* the bundles' default (attention on SDPA); the row without SDPA (`none`, FPT `cached`) is "
                "`--sdpa false`")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`summarise`'s rows, the bundles' defaults marked ``*``
    (:func:`bundle_default`)."""
    names = [r["config"] + (" *" if bundle_default(r["method"], r["variant"]) else "") for r in rows]
    width = max([34, *map(len, names)])
    header = (f"{'configuration':<{width}} {'trainable':>11} {'% bb':>7} {'delta MiB':>9} {'peak MiB':>9} "
              f"{'mem x':>6} {'cpu s':>7} {'cpu x':>6} {'wall s':>7} {'wall x':>6} {'inf ms':>7} {'inf x':>6} "
              f"{'delta x':>8}")
    lines = [header, "-" * len(header)]
    for name, r in zip(names, rows):
        lines.append(
            f"{name:<{width}} {r['trainable']:>11,} {r['percent_of_backbone']:>7.3f} "
            f"{r['delta_bytes'] / 2**20:>9.2f} {r['peak_mib']:>9.1f} {r['memory_ratio']:>6.3f} "
            f"{r['step_cpu_s']:>7.3f} {r['cpu_ratio']:>6.2f} {r['step_wall_s']:>7.3f} {r['wall_ratio']:>6.2f} "
            f"{r['infer_ms_per_image']:>7.1f} {r['infer_ratio']:>6.2f} {r['delta_ratio']:>8.4f}"
        )
    if any(bundle_default(r["method"], r["variant"]) for r in rows):
        lines.append(DEFAULT_NOTE)
    return "\n".join(lines)


def _charts(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``memory_ratio.png`` and ``time_ratio.png``: one horizontal bar per configuration (full fine-tuning = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    shown = [r for r in rows if r["method"] != "full"]
    for column, title, name in (("memory_ratio", "peak training memory / full fine-tuning", "memory_ratio.png"),
                                ("cpu_ratio", "training step CPU time / full fine-tuning", "time_ratio.png")):
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.22 * len(shown)))
        colours = ["tab:orange" if r["method"] in FPT_METHODS else "tab:blue" for r in shown]
        ax.barh([r["config"] for r in shown], [r[column] for r in shown], color=colours)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel(title)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        written.append(out / name)
    in_backbone = [r for r in shown if r["method"] in IN_BACKBONE]
    if in_backbone:
        written.append(_tradeoff_chart(in_backbone, out / "tradeoff.png"))
    return written


def _tradeoff_chart(rows: list[dict[str, Any]], path: Path) -> Path:
    """``tradeoff.png``: memory ratio against step CPU-time ratio of the in-backbone methods, a colour per variant
    and a marker per method, with the target region (<= 0.3 of full fine-tuning's memory at <= 0.9 of its time)."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([0, 0.3], 0, 0.9, color="tab:green", alpha=0.12, label="target: memory <= 0.3, time <= 0.9")
    for r in rows:
        ax.scatter(r["memory_ratio"], r["cpu_ratio"], color=plt.cm.tab10(variants.index(r["variant"]) % 10),
                   marker="osD^v<>px*h"[methods.index(r["method"]) % 11], s=30)
    handles = [plt.Line2D([], [], color=plt.cm.tab10(i % 10), marker="o", linestyle="", label=v)
               for i, v in enumerate(variants)]
    handles += [plt.Line2D([], [], color="grey", marker="osD^v<>px*h"[i % 11], linestyle="", label=m)
                for i, m in enumerate(methods)]
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *handles], fontsize=7, loc="upper right", ncol=2)
    ax.set(xlabel="peak training memory / full fine-tuning", ylabel="training step CPU time / full fine-tuning",
           xlim=(0, max(1.0, max(r["memory_ratio"] for r in rows) * 1.05)),
           ylim=(0, max(1.3, max(r["cpu_ratio"] for r in rows) * 1.05)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def machine(settings: BenchSettings) -> str:
    """CPU model, cores, torch version, device and threads of this run."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    device = torch.cuda.get_device_name() if settings.device == "cuda" else "CPU"
    network = f", {settings.spatial_dims}D segmentation network" if settings.task == "segmentation" else ""
    return (f"{cpu} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, device {device}, "
            f"{settings.threads} torch thread(s){network}")


def _write(out: Path, settings: BenchSettings, configs: list[BenchConfig], measured: list[list[dict[str, Any]]]
           ) -> list[dict[str, Any]]:
    """CSV, JSON and charts of the rounds measured so far; returns :func:`summarise`'s rows."""
    rows = summarise(measured)
    with open(out / "efficiency.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    record = {"settings": dataclasses.asdict(settings), "rounds": len(measured), "machine": machine(settings),
              "configs": [c.name for c in configs], "summary": rows, "measured": measured}
    (out / "efficiency.json").write_text(json.dumps(record, indent=1))
    _charts(rows, out)
    return rows


def run_benchmark(settings: BenchSettings, configs: list[BenchConfig], rounds: int, out: Path,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure ``configs`` ``rounds`` times, each in a fresh process, and write CSV, JSON and charts into ``out``
    (after every configuration, so an interrupted run keeps what it measured; a configuration's values are its
    medians over the rounds that reached it).

    Returns:
        :func:`summarise`'s rows.
    """
    out.mkdir(parents=True, exist_ok=True)
    measured: list[list[dict[str, Any]]] = []
    context = _fresh_processes()
    for index in range(rounds):
        this_round = []
        for config in configs:
            start = time.perf_counter()
            values = _run_worker(config, settings, context)
            this_round.append({"config": config.name, "method": config.method, "variant": config.variant,
                               "img_size": config.img_size, "batch_size": settings.batch_size, **values})
            log(f"round {index + 1}/{rounds} {config.name}: peak {values['peak_mib']:.1f} MiB, step "
                f"{values['step_wall_s']:.3f} s ({time.perf_counter() - start:.0f} s)")
            rows = _write(out, settings, configs, [*measured, this_round])
        measured.append(this_round)
    return rows


def _peer_variants(requested: Sequence[str] | None) -> list[str]:
    """The peer's variants: those asked for (the peer libraries must be installed), else :data:`PEER_VARIANTS` when
    they are installed and none when not (said on stdout)."""
    from monai_prompt.benchmarks.peer import require_peer

    if requested is not None:
        if requested:
            require_peer()
        return list(requested)
    try:
        require_peer()
    except ImportError as err:
        print(f"no peer rows: {err}", flush=True)
        return []
    return list(PEER_VARIANTS)


def format_peer_table(rows: list[dict[str, Any]]) -> str:
    """Each LoRA and full fine-tuning row of the project against the peer's same method at the peer's lowest-memory
    variant (its own best) and at the same variant: memory and step-time ratios (< 1: the project uses less)."""
    from monai_prompt.benchmarks.peer import PEER_METHODS

    peers = dict(zip(("lora", "full"), PEER_METHODS))
    lines = [f"{'project configuration':<34} {'peer (own best)':<32} {'mem x':>6} {'wall x':>7}   "
             f"{'peer (same variant)':<32} {'mem x':>6} {'wall x':>7}"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        peer_rows = [r for r in rows if r["method"] == peers.get(row["method"]) and r["img_size"] == row["img_size"]]
        if not peer_rows:
            continue
        best = min(peer_rows, key=lambda r: r["peak_mib"])
        same = next((r for r in peer_rows if r["variant"] == row["variant"]), None)
        cells = f"{row['config']:<34} {best['config']:<32} {row['peak_mib'] / best['peak_mib']:>6.3f} " \
                f"{row['step_wall_s'] / best['step_wall_s']:>7.2f}   "
        if same is not None:
            cells += f"{same['config']:<32} {row['peak_mib'] / same['peak_mib']:>6.3f} " \
                     f"{row['step_wall_s'] / same['step_wall_s']:>7.2f}"
        lines.append(cells.rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``monai-prompt benchmark efficiency``."""
    from monai_prompt.backbones.vit import CHECKPOINT_MODES

    parser = argparse.ArgumentParser(prog="monai-prompt benchmark efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/benchmark_efficiency", help="output folder")
    parser.add_argument("--methods", nargs="+",
                        help="methods besides full fine-tuning (default: every in-backbone method, and FPT and FPT+ "
                             "for classification); 'full' measures full fine-tuning in every variant too, 'linear' "
                             "the frozen encoder")
    parser.add_argument("--checkpointing", nargs="+", default=list(CHECKPOINT_MODES), choices=list(CHECKPOINT_MODES),
                        help="checkpointing modes, one variant each (default: all)")
    parser.add_argument("--variants", nargs="*",
                        help="more in-backbone variants, '+'-joined options (default: "
                             f"{' '.join(DEFAULT_VARIANTS)}; --quick: none; on CUDA use fp16/bf16); 'sdpa' is the "
                             "bundles' default and adds full fine-tuning with SDPA")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default: 2)")
    parser.add_argument("--inference-steps", type=int, default=3, help="timed inference batches (default: 3)")
    parser.add_argument("--backbone", default="vit_base",
                        help="preset of any family (default: vit_base, patch 16); a SAM-family encoder (lite_medsam, "
                             "sam_vit_b, ...) measures FPT/FPT+ from the cache against full fine-tuning of it")
    parser.add_argument("--img-size", type=int, default=224, help="input size (default: 224)")
    parser.add_argument("--fpt-img-size", type=int, default=512, help="FPT's LPM input size (default: 512)")
    parser.add_argument("--task", choices=TASKS, default="classification",
                        help="the classifiers (default), or the segmentation bundles' network (a UNETR on a ViT, "
                             "the SAM family's in 2D; 1-channel images, a label map, the decoder trained; no FPT or "
                             "peer rows)")
    parser.add_argument("--spatial-dims", type=int, choices=[2, 3], default=2,
                        help="--task segmentation: 2D slices or 3D volumes of side --img-size (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument("--peer", nargs="*", default=None,
                        help="variants of the peer rows, transformers ViT + peft LoRA and its full fine-tuning "
                             "(default when transformers and peft are installed: none blocks+sdpa+bf16, their "
                             "defaults and their own best; none: --peer)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: tiny ViT, 32 px (FPT 64), batch 2, 2 steps, 1 round, none/blocks (and "
                             "--variants when given)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``monai-prompt benchmark efficiency [options]`` (also ``python -m monai_prompt.benchmarks.efficiency``)."""
    from monai_prompt.backbones.vit import CHECKPOINT_MODES, is_vit_preset

    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = not is_vit_preset(args.backbone)
    segmentation = args.task == "segmentation"
    task = {"task": args.task, "spatial_dims": args.spatial_dims}
    methods = args.methods or [*IN_BACKBONE, *(() if segmentation else FPT_METHODS)]
    if args.quick:
        backbone, shape = (args.backbone, QUICK_GRID_BACKBONES[args.backbone]) if grid else ("vit_tiny", QUICK_BACKBONE)
        if segmentation and not grid:  # UNETR's decoder up-samples a patch grid of 16
            shape = {**shape, "patch_size": 16}
        settings = BenchSettings(backbone, shape, 32, 64, 16, 2, steps=2, warmup=1, inference_steps=1,
                                 threads=args.threads, device=device, **task)
        checkpointing, variants, rounds = ["none", "blocks"], args.variants or [], 1
    else:
        settings = BenchSettings(args.backbone, {}, args.img_size, args.fpt_img_size, None, args.batch_size,
                                 steps=args.steps, warmup=args.warmup, inference_steps=args.inference_steps,
                                 threads=args.threads, device=device, **task)
        variants = DEFAULT_VARIANTS if args.variants is None else args.variants
        checkpointing, rounds = args.checkpointing, args.rounds
    variants = list(dict.fromkeys([*checkpointing, *variants]))
    try:
        if grid:
            other = [v for v in variants for p in v.split("+") if p in CHECKPOINT_MODES and p not in GRID_CHECKPOINTING]
            if other or (args.quick and args.backbone not in QUICK_GRID_BACKBONES):
                raise ValueError(
                    f"backbone {args.backbone!r} recomputes whole blocks or nothing (variants {other} need a ViT; "
                    f"pass --checkpointing {' '.join(GRID_CHECKPOINTING)}); --quick knows {list(QUICK_GRID_BACKBONES)}."
                )
            if args.peer:
                raise ValueError("the peer rows (transformers ViT + peft) are ViT-only; drop --peer.")
            if segmentation and args.spatial_dims == 3:
                raise ValueError(f"backbone {args.backbone!r} segments 2D images only; pass --spatial-dims 2.")
        # the peer rows are classifiers: with --task segmentation only when asked for (build_configs refuses them)
        peer = [] if grid or (segmentation and args.peer is None) else _peer_variants(args.peer)
        configs = build_configs(settings, methods, variants, peer)
    except (ValueError, ImportError) as err:
        raise SystemExit(f"benchmark efficiency: {err}") from None
    print(f"{len(configs)} configurations x {rounds} round(s) on {machine(settings)}", flush=True)
    rows = run_benchmark(settings, configs, rounds, Path(args.out), log=lambda line: print(line, flush=True))
    print(format_table(rows))
    if peer:
        print(format_peer_table(rows))
    print(f"written: {args.out}/efficiency.csv, efficiency.json, memory_ratio.png, time_ratio.png, tradeoff.png")


if __name__ == "__main__":
    main()
