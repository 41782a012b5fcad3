"""``monai-prompt benchmark efficiency``: the memory reading, the configurations, and the ``--quick`` run end to end
(no timing assertions: times depend on the machine's load)."""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from monai_prompt.benchmarks.efficiency import (
    COLUMNS,
    DEFAULT_NOTE,
    FPT_METHODS,
    IN_BACKBONE,
    PEER_VARIANTS,
    BenchSettings,
    PeakMemory,
    build_configs,
    format_peer_table,
    format_table,
    run_benchmark,
    summarise,
)
from monai_prompt.benchmarks.peer import PEER_METHODS, PeerViT
from monai_prompt.cli import main
from monai_prompt.nets import PromptClassifier

REPO = Path(__file__).resolve().parents[1]


def test_peak_memory_sees_a_known_allocation_and_forgets_earlier_peaks():
    memory = PeakMemory("cpu")
    big = torch.ones(300 * 2**20 // 4)  # 300 MiB touched, then freed: an earlier peak
    del big
    memory.reset()
    assert memory.peak() < 50
    block = torch.ones(200 * 2**20 // 4)  # 200 MiB, every page written
    assert memory.peak() >= 190
    del block


def test_memory_freed_before_the_reset_and_kept_by_the_heap_does_not_hide_a_later_peak():
    """A long-lived process (a test worker) keeps freed memory resident in glibc's heap; an allocation served from it
    raised no resident peak (read 0 MiB for 200 MiB written). The reset hands those pages back first. In a process of
    its own: glibc is told to serve everything from the heap and never trim it."""
    script = textwrap.dedent("""
        import ctypes, torch
        from monai_prompt.benchmarks.efficiency import PeakMemory
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation by mmap
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap resident
        memory = PeakMemory("cpu")
        big = torch.ones(300 * 2**20 // 4)
        del big
        memory.reset()
        block = torch.ones(200 * 2**20 // 4)
        print(memory.peak())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) >= 190


def test_configurations_and_variant_errors():
    settings = BenchSettings()
    configs = build_configs(settings, ["lora", "fptplus", "ssf"], ["none", "mlp+sdpa+bf16"])
    assert [c.name for c in configs] == [
        "full none @224", "full none @512", "lora none @224", "ssf none @224", "lora mlp+sdpa+bf16 @224",
        "ssf mlp+sdpa+bf16 @224", "fptplus online @512", "fptplus cached @512", "fptplus cached+sdpa @512",
    ]
    assert configs[-1].cached and configs[-1].options()["sdpa"] and not configs[-3].cached
    assert configs[4].options() == {"checkpointing": "mlp", "sdpa": True, "autocast": "bf16", "in_backward": False}
    assert configs[2].options() == {"checkpointing": "none", "sdpa": False, "autocast": None, "in_backward": False}
    with_sdpa = [c.name for c in build_configs(settings, ["lora"], ["none", "sdpa"])]
    assert with_sdpa == ["full none @224", "full sdpa @224", "lora none @224", "lora sdpa @224"]
    with_full = build_configs(settings, ["full", "lora"], ["none", "sdpa", "blocks+sdpa+bf16+inbackward"])
    assert [c.name for c in with_full] == [
        "full none @224", "full sdpa @224", "lora none @224", "lora sdpa @224", "full blocks+sdpa+bf16+inbackward @224",
        "lora blocks+sdpa+bf16+inbackward @224"]
    assert with_full[-1].options() == {"checkpointing": "blocks", "sdpa": True, "autocast": "bf16", "in_backward": True}
    with pytest.raises(ValueError, match=r"variant 'blocks\+attn': join at most one checkpointing mode"):
        build_configs(settings, ["lora"], ["blocks+attn"])
    with pytest.raises(ValueError, match="method 'dora' is not one of"):
        build_configs(settings, ["dora"], ["none"])


def test_the_step_in_backward_lowers_full_fine_tuning_s_peak_by_the_gradients(tmp_path):
    """A ViT of 4 M parameters (16 MiB of float32 gradients): the variant's peak is lower by most of that, as the
    gradients are freed one by one instead of all held until the step."""
    settings = BenchSettings("vit_tiny", {"hidden_size": 256, "num_layers": 6, "num_heads": 4, "mlp_dim": 768,
                                          "patch_size": 16}, img_size=32, batch_size=2, steps=2, warmup=1,
                             inference_steps=1)
    # each in a process of its own, as the benchmark runs them (this process's level moves with the tests before)
    configs = build_configs(settings, ["full"], ["inbackward"])
    usual, fused = run_benchmark(settings, configs, 1, tmp_path, log=lambda line: None)
    gradient_mib = usual["trainable"] * 4 / 2**20
    assert gradient_mib > 15
    assert fused["trainable"] == usual["trainable"]
    assert fused["peak_mib"] < usual["peak_mib"] - 0.6 * gradient_mib, (usual["peak_mib"], fused["peak_mib"])


def test_ratios_come_from_the_same_round():
    def row(method, size, peak, wall):
        values = {"trainable": 1, "percent_of_backbone": 1.0, "delta_bytes": 10, "base_mib": 5.0, "peak_mib": peak,
                  "step_cpu_s": wall, "step_wall_s": wall, "infer_ms_per_image": 1.0}
        return {"config": f"{method} @{size}", "method": method, "variant": "none", "img_size": size,
                "batch_size": 4, **values}

    rounds = [[row("full", 224, 100, 1.0), row("lora", 224, 30, 0.8)],  # a slow round: both slower
              [row("full", 224, 100, 2.0), row("lora", 224, 20, 1.6)],
              [row("full", 224, 100, 4.0), row("lora", 224, 40, 3.2)]]
    lora = summarise(rounds)[1]
    assert lora["wall_ratio"] == pytest.approx(0.8) and lora["memory_ratio"] == pytest.approx(0.3)
    assert lora["step_wall_s"] == pytest.approx(1.6) and list(lora) == list(COLUMNS)

    fused = {**row("full", 224, 50, 0.5), "config": "full sdpa @224", "variant": "sdpa"}
    rows = summarise([[*rounds[0], fused]])  # full fine-tuning with SDPA is measured against the one without
    assert rows[1]["memory_ratio"] == pytest.approx(0.3) and rows[2]["memory_ratio"] == pytest.approx(0.5)
    table = format_table(rows)
    assert "full sdpa @224 *" in table and "lora @224 *" not in table and table.endswith(DEFAULT_NOTE)


def test_the_peer_lora_trains_what_the_project_lora_trains():
    """transformers ViT + peft LoRA (query/value, rank 8) at the project LoRA's shape: the same trainable count."""
    shape = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}
    options = {"checkpointing": "blocks", "sdpa": True, "autocast": "bf16"}
    peer = PeerViT("peft_lora", shape, 32, 3, options)
    ours = PromptClassifier(3, "lora", backbone="vit_tiny", img_size=32, backbone_overrides=shape)
    assert peer.trainable_report()["trainable"] == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    lora = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in peer.named_parameters() if "lora_" in name}
    assert lora <= {"query", "value", "q_proj", "v_proj"} and len(lora) == 2
    logits = peer(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in peer.parameters() if p.requires_grad)


def test_peer_table_compares_with_the_peer_s_own_best():
    def row(method, variant, peak, wall):
        return {"config": f"{method} {variant} @224", "method": method, "variant": variant, "img_size": 224,
                "peak_mib": peak, "step_wall_s": wall}

    rows = [row("full", "none", 100, 1.0), row("lora", "blocks+sdpa+bf16", 30, 0.9),
            row("hf_full", "none", 110, 1.0), row("peft_lora", "none", 60, 1.0),
            row("peft_lora", "blocks+sdpa+bf16", 40, 1.2)]
    lines = format_peer_table(rows).splitlines()
    lora = next(line for line in lines if line.startswith("lora blocks+sdpa+bf16"))
    assert lora.split()[3:8] == ["peft_lora", "blocks+sdpa+bf16", "@224", "0.750", "0.75"]  # its lowest memory
    assert lora.split()[-2:] == ["0.750", "0.75"]  # the same variant
    full = next(line for line in lines if line.startswith("full none"))
    assert full.split()[-2:] == ["0.909", "1.00"]


def test_peer_rows_without_the_peer_libraries_name_the_install(monkeypatch):
    import monai_prompt.benchmarks.peer as peer

    def missing() -> None:
        raise ImportError("the peer rows need transformers and peft: " + peer.PEER_INSTALL)

    monkeypatch.setattr(peer, "require_peer", missing)
    with pytest.raises(SystemExit, match=r"monai-prompt\[benchmark\]"):
        main(["benchmark", "efficiency", "--quick", "--peer", "none"])


#: the CI smoke run as docs/benchmarks.md gives it (run here rather than by tests/test_docs.py).
DOCUMENTED_QUICK_RUN = "monai-prompt benchmark efficiency --quick --out runs/benchmark_efficiency_quick"


@pytest.mark.slow
def test_quick_run_writes_every_method(tmp_path, capsys):
    assert f"\n{DOCUMENTED_QUICK_RUN}\n" in (REPO / "docs" / "benchmarks.md").read_text()
    argv = shlex.split(DOCUMENTED_QUICK_RUN)[1:]
    assert argv[-2] == "--out"
    main([*argv[:-1], str(tmp_path)])
    table = capsys.readouterr().out
    with open(tmp_path / "efficiency.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == {"full", *IN_BACKBONE, *FPT_METHODS, *PEER_METHODS}
    assert {(r["method"], r["variant"]) for r in rows if r["method"] in PEER_METHODS} == {
        (m, v) for m in PEER_METHODS for v in PEER_VARIANTS}
    assert "peft_lora" in table.split("project configuration")[1]  # the peer table closes the output
    assert {(r["method"], r["variant"]) for r in rows if r["method"] in FPT_METHODS} == {
        (m, v) for m in FPT_METHODS for v in ("online", "cached", "cached+sdpa")}
    assert all(r["config"] in table for r in rows)
    numbers = [c for c in COLUMNS if c not in ("config", "method", "variant")]
    for r in rows:
        assert all(math.isfinite(float(r[c])) and float(r[c]) > 0 for c in numbers), r
    for r in (r for r in rows if r["method"] == "full"):
        assert all(float(r[c]) == 1.0 for c in ("memory_ratio", "cpu_ratio", "wall_ratio", "infer_ratio",
                                                "delta_ratio"))
    record = json.loads((tmp_path / "efficiency.json").read_text())
    assert record["summary"] == json.loads(json.dumps(record["summary"])) and len(record["measured"]) == 1
    assert [r["config"] for r in record["summary"]] == [r["config"] for r in rows]
    for chart in ("memory_ratio.png", "time_ratio.png", "tradeoff.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sam_family_backbones_refuse_partial_checkpointing_and_peer_rows():
    with pytest.raises(SystemExit, match=r"'lite_medsam' recomputes whole blocks or nothing \(variants \['attn', 'mlp"):
        main(["benchmark", "efficiency", "--backbone", "lite_medsam", "--checkpointing", "attn", "--methods", "fpt"])
    with pytest.raises(SystemExit, match="the peer rows .* are ViT-only"):
        main(["benchmark", "efficiency", "--backbone", "sam_vit_b", "--checkpointing", "none", "--variants", "--peer",
              "none"])


def test_segmentation_configurations_refuse_fpt_and_the_peer():
    settings = BenchSettings(task="segmentation", spatial_dims=3, img_size=64)
    configs = build_configs(settings, ["linear", "lora"], ["none", "blocks+sdpa+bf16"])
    assert [c.name for c in configs] == ["full none @64", "linear none @64", "lora none @64",
                                         "linear blocks+sdpa+bf16 @64", "lora blocks+sdpa+bf16 @64"]
    assert settings.channels == 1 and settings.shape(64) == (64, 64, 64)
    assert BenchSettings().channels == 3 and BenchSettings().shape(224) == (224, 224)
    with pytest.raises(ValueError, match="FPT: classification only"):
        build_configs(settings, ["lora", "fpt"], ["none"])
    with pytest.raises(ValueError, match="the peer rows: classification only"):
        build_configs(settings, ["lora"], ["none"], peer_variants=["none"])
    with pytest.raises(SystemExit, match="'lite_medsam' segments 2D images only"):
        main(["benchmark", "efficiency", "--backbone", "lite_medsam", "--task", "segmentation", "--spatial-dims", "3",
              "--checkpointing", "none", "--variants", "--methods", "lora"])


@pytest.mark.slow
def test_quick_segmentation_run_measures_the_bundles_network(tmp_path, capsys):
    """The 3D UNETR of the segmentation bundles on a label map: the trainable counts are those of
    segmentation_network built directly (decoder included), and every value is finite."""
    from monai_prompt.benchmarks.efficiency import QUICK_BACKBONE
    from monai_prompt.nets import segmentation_network
    from monai_prompt.peft import trainable_report

    main(["benchmark", "efficiency", "--quick", "--task", "segmentation", "--spatial-dims", "3", "--methods",
          "linear", "lora", "--out", str(tmp_path)])
    assert "3D segmentation network" in capsys.readouterr().out
    rows = {r["config"]: r for r in json.loads((tmp_path / "efficiency.json").read_text())["summary"]}
    assert set(rows) == {"full none @32"} | {f"{m} {v} @32" for m in ("linear", "lora") for v in ("none", "blocks")}
    shape = {**QUICK_BACKBONE, "patch_size": 16}
    for method in ("full", "linear", "lora"):
        net = segmentation_network(1, 5, 32, method, backbone="vit_tiny", spatial_dims=3, backbone_overrides=shape)
        assert rows[f"{method} none @32"]["trainable"] == trainable_report(net)["trainable"]
    trainable = [rows[f"{method} none @32"]["trainable"] for method in ("linear", "lora", "full")]
    assert trainable == sorted(set(trainable))
    for row in rows.values():
        assert all(math.isfinite(row[c]) and row[c] > 0 for c in ("peak_mib", "step_wall_s", "infer_ms_per_image"))
