"""Render every bundle from its task's template, write them, or check committed bundles against them."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from monai_prompt.bundle_gen import classification, segmentation
from monai_prompt.bundle_gen.metadata import metadata, segmentation_metadata
from monai_prompt.bundle_gen.readme import readme
from monai_prompt.bundle_gen.specs import ALL_BUNDLE_SPECS, TASKS, BundleSpec

__all__ = ["check_bundles", "render_bundle", "write_bundles"]

#: folders a bundle fills when it runs (checkpoints; metrics, predictions and the MLflow store; the FPT feature
#: cache); never rendered, never checked.
OUTPUT_DIRS = ("models", "eval", "cache")
#: task -> (the configs module: ``train_config``, ``evaluate_config``, ``inference_config``, ``multi_gpu_config``;
#: metadata).
_TEMPLATES = {
    "classification": (classification, metadata),
    "segmentation": (segmentation, segmentation_metadata),
}


def _json(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=4) + "\n"


def _template(name: str) -> str:
    return files("monai_prompt.bundle_gen").joinpath("templates", name).read_text()


def render_bundle(spec: BundleSpec) -> dict[str, str]:
    """Every file of ``spec``'s bundle: relative path -> text."""
    template, bundle_metadata = _TEMPLATES[spec.task]
    return {
        "LICENSE": _template("LICENSE"),
        ".gitignore": "".join(f"/{folder}/\n" for folder in OUTPUT_DIRS),
        "configs/metadata.json": _json(bundle_metadata(spec)),
        "configs/train.json": _json(template.train_config(spec)),
        "configs/evaluate.json": _json(template.evaluate_config(spec)),
        "configs/inference.json": _json(template.inference_config(spec)),
        "configs/multi_gpu_train.json": _json(template.multi_gpu_config(spec)),
        "configs/logging.conf": _template("logging.conf"),
        "docs/README.md": readme(spec),
    }


def _selected(names: list[str] | None) -> list[BundleSpec]:
    if not names:
        return list(ALL_BUNDLE_SPECS.values())
    unknown = sorted(set(names) - set(ALL_BUNDLE_SPECS))
    if unknown:
        raise ValueError(f"unknown bundles {unknown}; known: {sorted(ALL_BUNDLE_SPECS)}.")
    return [ALL_BUNDLE_SPECS[name] for name in names]


def write_bundles(root: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write the rendered bundles under ``root`` (``bundles/``); returns the files whose content changed."""
    changed = []
    for spec in _selected(names):
        for relative, text in render_bundle(spec).items():
            path = Path(root, spec.name, relative)
            if not path.is_file() or path.read_text() != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                changed.append(path)
    return changed


def check_bundles(root: str | Path, names: list[str] | None = None) -> list[str]:
    """Differences between the bundles under ``root`` and what the generator renders (empty when in sync).

    Reports missing and differing files, files the generator does not render (outside ``models/``/``eval/``)
    and ``*_classification``/``*_segmentation`` folders that no spec renders.
    """
    problems = []
    root = Path(root)
    for spec in _selected(names):
        rendered = render_bundle(spec)
        folder = root / spec.name
        for relative, text in rendered.items():
            path = folder / relative
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.read_text() != text:
                problems.append(f"{path}: differs from the generator's output")
        if folder.is_dir():
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                relative = path.relative_to(folder).as_posix()
                if relative not in rendered and relative.split("/")[0] not in OUTPUT_DIRS:
                    problems.append(f"{path}: not rendered by the generator")
    if not names and root.is_dir():
        problems += [
            f"{folder}: no bundle spec renders it"
            for task in TASKS
            for folder in sorted(root.glob(f"*_{task}"))
            if folder.name not in ALL_BUNDLE_SPECS
        ]
    return problems
