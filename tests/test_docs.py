"""Docs that run: every Python snippet and shell command in README.md, docs/*.md and the bundle READMEs
(``bundles/*_classification``, ``bundles/vit_pretraining``, ``bundles/*segmentation``) is executed here, so that a
documented import, flag or path cannot silently go wrong.

What is collected (one pytest param per snippet, id ``<file>:<line>``):

- ```python blocks, one snippet each;
- ```bash / ```sh / ```console blocks, and bare ``` blocks whose first line is a command: one snippet per command
  (a line and its ``\\`` continuations; comment lines skipped, a ``$ `` prompt stripped);
- inline `code` in prose that starts with a command word (:data:`COMMAND_WORDS`); where such a span only names a
  program in prose (`monai-prompt export`, `python -m monai.bundle run`) a ``mention`` row of :data:`MAPPING` says so;
- ```json blocks: bundle-config excerpts, compared with the rendered bundle's ``train.json``.

Identical commands of one file are one snippet (the first line). Variable assignments of a shell block
(``B=bundles/lora_classification``, ``SCHEMA=$(python -c ...)``) are run before every later command of their file.

How they run (the conventions; every exception is a row of :data:`MAPPING`, the one table of substitutions):

- All snippets of one file share one **work copy**, a temporary folder standing in for the repository root (runs
  never write into the repository), and run in file order, as a reader of the page would. It holds the tiny data
  set (``monai-prompt demo-data`` at :data:`DEMO_TINY`'s sizes) where the bundles' default ``dataset_dir`` points,
  and a copy of every bundle the file's commands name, taken from a tiny bundle trained once per session (an
  interrupted 2-epoch run, so that evaluate / inference / export / resume snippets find ``models/`` filled without
  depending on an earlier snippet). A training command (``run`` of ``train.json`` alone, without ``--resume``) is
  a first run: its bundle's ``models/`` is emptied first, as in a fresh checkout (a bundle refuses to train over a
  previous run). Only ``mlflow ui`` relies on its previous line.
- **Python blocks** are self-contained (no doc today continues a block in a later one); each runs as
  ``python snippet.py`` in the work copy, after the setup code its row names (a ``net`` to train, weights on disk).
- **Shell commands** run under ``bash -e -o pipefail`` with the shim folder and then the venv's ``bin`` first in
  ``PATH``. The shims ``python``, ``python3``, ``monai-prompt`` and ``torchrun`` hand their argv, environment, cwd
  and stdio to a fork server that imported torch / MONAI / ignite once: each command is a new process, forked
  from that server, that imports ``monai_prompt`` itself (so a broken import or export fails as in a fresh
  interpreter) and starts in about a second instead of 20 (any other interpreter option execs the real Python).
- **Tiny sizes** are applied to the argv of bundle commands by :func:`tiny_argv` (see its docstring): every tiny
  override from ``bundle_support.tiny_overrides`` that the command does not set itself is appended, placeholder
  values (``...``, ``/path/to/...``) become the tiny stand-ins, and a training run gets one epoch.

A snippet without a row runs as written (with the tiny argv) and must pass. The bundle READMEs are rendered from four
templates (classification with ``PromptClassifier``, with FPT; segmentation in 2D, in 3D): of each, the README of
:data:`TEMPLATE_RUN` runs; every other one must hold only commands its template runs, with its own bundle name (static
check), and its flags must exist in its own configs (each bundle's workflows run in ``tests/test_bundles.py`` and
``tests/test_segmentation_bundles.py``). Snippets that run bundle workflows of bundles other than the representative
``lora``, ``fptplus`` and ``vit_pretraining`` ones, and whole demo runs, are marked ``slow``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOC_GLOBS = ("README.md", "docs/*.md", "bundles/*_classification/docs/README.md",
             "bundles/vit_pretraining/docs/README.md", "bundles/*segmentation/docs/README.md")
#: a prose `code` span starting with one of these is a command.
COMMAND_WORDS = ("monai-prompt", "python", "python3", "make", "pip", "hf", "huggingface-cli", "torchrun", "mlflow",
                 "OMP_NUM_THREADS=")
#: bundles whose READMEs run in the fast loop (one PromptClassifier bundle, one FPT bundle, the pre-training bundle).
FAST_BUNDLES = ("lora_classification", "fptplus_classification", "vit_pretraining")
#: the segmentation READMEs that run, one per template (2D, 3D).
SEGMENTATION_RUN = {2: "dvpt_segmentation", 3: "dvpt_3d_segmentation"}
#: the bundle READMEs that run, one per template; every other bundle README must hold the same commands with its own
#: bundle name (checked statically, :func:`test_bundle_readmes_share_their_template`).
TEMPLATE_RUN = {"classification": "lora_classification", "fpt_classification": "fptplus_classification",
                "segmentation": SEGMENTATION_RUN[2], "3d_segmentation": SEGMENTATION_RUN[3]}
#: the tiny data set of every work copy: ``monai-prompt demo-data`` at these sizes (MNI152 patches, 3 classes).
DEMO_TINY = {"train-per-class": 4, "eval-per-class": 2, "unlabeled": 0}
#: where the bundle READMEs' ``monai-prompt package`` writes the deployable copies their checks run on.
DEPLOY = "deploy"
SHIMS = ("python", "python3", "monai-prompt", "torchrun", "docs-check-pip", "docs-check-hf", "docs-check-mlflow")
TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Rule:
    """How the snippets a row matches run (the first matching row applies).

    Attributes:
        files: ``fnmatch`` pattern of the doc files (repository-relative).
        match: regular expression searched in the snippet text.
        how: ``run`` (after ``subs``/``append``), ``skip`` (a param that is skipped, with ``why``), ``mention``
            (no param: the span names a program in prose) or ``config`` (a JSON excerpt of ``bundle``'s train.json).
        why: the reason for the substitution.
        subs: exact ``(old, new)`` replacements; each ``old`` must occur (a stale row fails). ``{tiny}``,
            ``{tiny_json}`` and ``{img}`` in ``new`` are the tiny backbone shape (Python / JSON literal) and its image
            size; ``{bundle}`` the bundle of a bundle README.
        append: text appended to the command.
        setup: stand-ins written into the work copy first: ``data:<dir>`` (the tiny data set), ``hf:<dir>`` (a tiny
            HuggingFace ``ViTModel`` directory), ``timm:<file>`` (a tiny timm-layout ``.safetensors``),
            ``repo:<file>`` (a copy of a repository file), ``images:<dir>`` (two test images as ``<dir>/a.png``
            and ``<dir>/b.png``), ``deploy:<bundle>`` (the bundle's deployable copy under :data:`DEPLOY`, made by
            ``monai-prompt package`` unless it exists; ``{bundle}``: the README's), ``seed:`` (the named bundles
            copied again from their tiny trained seed and the tiny data put back where they read it, replacing
            what earlier snippets made of them).
        prelude: Python run before a Python snippet (what the doc's text assumes exists).
        check: Python run after a Python snippet (what the doc's text says of the result).
        slow: mark the snippet ``slow``.
        bundle: the bundle a ``config`` excerpt is compared with.
    """

    files: str
    match: str
    how: str = "run"
    why: str = ""
    subs: tuple[tuple[str, str], ...] = ()
    append: str = ""
    setup: tuple[str, ...] = ()
    prelude: str = ""
    check: str = ""
    slow: bool = False
    bundle: str = ""


_FPT_NET = """\
import torch
from monai.data import Dataset
from monai.transforms import Compose
from monai_prompt.data import classification_transforms, read_classification_datalist
from monai_prompt.fpt import preload_features
from monai_prompt.nets import FPTClassifier
from monai_prompt.fpt.lpm import LPMExtractor

net = FPTClassifier(num_classes=3, variant="fptplus", backbone="vit_tiny", backbone_overrides={tiny}, img_size={img},
                    fpt_config={"side_img_size": {img} // 2}, pretrained="vit-base-patch16-384", layer_norm_eps=1e-12)
datalist = read_classification_datalist("data/datalist.json")
preload_features(net, Dataset(datalist["training"], Compose(classification_transforms({img}, in_channels=3))),
                 "cache/fptplus", storage_dtype="float16")


def lpm_must_not_run(*args):
    raise AssertionError("the LPM ran during training")


LPMExtractor.extract = lpm_must_not_run
"""
_MAKE = ("repo:Makefile", "repo:pyproject.toml")
_INFER = "python -m monai.bundle run --config_file $B/configs/inference.json --pretrained ..."

MAPPING: tuple[Rule, ...] = (
    # --- names of programs in prose, not command lines
    Rule("*", r"^(make|python -m monai\.bundle( run)?|monai-prompt (export|check-data|preload|demo|package|gpu-check|"
         r"benchmark( efficiency| accuracy| tinyvit)?)|"
         r"OMP_NUM_THREADS=1|huggingface-cli|hf|torchrun)$", "mention",
         why="the span names a program in a sentence; its command lines are the fenced blocks"),
    Rule("docs/methods.md", r"^--ffn_num\b", "mention", why="a flag of the official AdaptFormer code, quoted"),
    Rule("docs/segmentation.md", r"^monai-prompt render-bundles --check$",
         why=("`--check` compares a fresh render of every bundle into the work copy (the committed bundles are "
              "test_bundles.py's)"),
         subs=(("monai-prompt render-bundles --check",
                "monai-prompt render-bundles && monai-prompt render-bundles --check"),)),
    # --- set-up and the suite itself
    Rule("*", r"^make test\b", why=("the suite is not run from inside itself: `make -n` shows that the target runs "
                                    "pytest, and every `pip install` it would run must be satisfied here"),
         subs=(("make test", "make -n test"),), append=" | docs-check-pip --expect '-m pytest'", setup=_MAKE),
    Rule("*", r"^make lint$", why="`make -n` shows that the target runs ruff over the package and tests (this venv's)",
         subs=(("make lint", "make -n lint"),), append=" | docs-check-pip --expect 'ruff check monai_prompt tests'",
         setup=_MAKE),
    Rule("*", r"^make setup\b", why=("no installs in a test: `make -n` lists the steps and every `pip install` spec "
                                     "must parse and be satisfied by this venv"),
         subs=(("make setup", "make -n setup"),), append=" | docs-check-pip", setup=_MAKE),
    Rule("*", r"^make label-(env|test)$", why=("MONAI Label's own 8 GB environment: `make -n` shows its recipe here; "
                                              ".ci/run builds it and runs `make label-test` for real"),
         subs=(("make", "make -n"),), append=" | grep 'pip install -c label/constraints.txt monailabel'",
         setup=(*_MAKE, "repo:label/constraints.txt")),
    Rule("*", r"^make gpu-check$", why="no GPU here: `make -n` shows that the target runs `monai-prompt gpu-check`",
         subs=(("make", "make -n"),), append=" | docs-check-pip --expect 'monai-prompt gpu-check'", setup=_MAKE),
    Rule("*", r"^make gpu-kit$", why="no downloads in a test: `make -n` shows the target downloading gpu/kit.txt",
         subs=(("make", "make -n"),), append=" | grep -- '-d .whl -r gpu/kit.txt'", setup=(*_MAKE, "repo:gpu/kit.txt")),
    Rule("*", r"^bash gpu/offline_check\.sh$",
         why=("no GPU here: the script from the work copy's gpu/ (no .whl/ in it) checks its Python and hands --help "
              "to the check; test_gpu_check.py runs its dry run with every package off the image hidden"),
         append=" --help", setup=("repo:gpu/offline_check.sh", "repo:gpu/kit.txt", "repo:gpu/image.txt")),
    Rule("*", r"^make demo TORCH_SPEC=", why="the demo runs under `make demo`; `make -n` shows TORCH_SPEC reaching pip",
         subs=(("make demo", "make -n demo"),), append=" | docs-check-pip --expect cu126", setup=_MAKE),
    Rule("*", r"^make demo\b", why="set-up checked with `make -n`, then `monai-prompt demo` at its --tiny size",
         subs=(("make demo", "make -n demo"),),
         append=" | docs-check-pip --expect 'monai-prompt demo' && monai-prompt demo --tiny", setup=_MAKE, slow=True),
    Rule("*", r"^pip install", why=("no installs in a test: each spec must parse and be satisfied by this venv "
                                   "(`-e .`: this project's dependencies and extras)"),
         subs=(("pip install", "docs-check-pip"),), setup=("repo:pyproject.toml",)),
    # --- downloads and servers
    Rule("*", r"^hf download", why=("no network: `hf download --help` must list every option, then a tiny model of the "
                                   "repository's layout is put at --local-dir and loaded with load_pretrained"),
         subs=(("hf download", "docs-check-hf download"),)),
    Rule("docs/bundles.md", r"^mlflow ui", why=("a web server: the store it would show is opened with MlflowClient and "
                                               "must hold the run of the line above"),
         subs=(("mlflow ui --backend-store-uri", "docs-check-mlflow"),)),
    Rule("docs/bundles.md", r"--tracking_uri http://", why=("no tracking server in a test: the URI is the local store "
                                                           "of the line above (only the flag is checked); `run ...` is "
                                                           "that line's run"),
         subs=(("run ...", "run --config_file $B/configs/train.json --pretrained ..."),
               ("http://127.0.0.1:5000", "sqlite:///$B/eval/mlruns.db"))),
    Rule("bundles/*", r"^(python .*--tracking mlflow|torchrun )", why="as docs/bundles.md's MLflow and torchrun lines",
         slow=True),
    Rule("docs/bundles.md", r"^torchrun .*--nproc_per_node=4", why="2 CPU cores: 2 processes (gloo)",
         subs=(("--nproc_per_node=4", "--nproc_per_node=2"),)),
    # --- real-size runs
    Rule("*", r"^python -m monai_prompt\.benchmarks\.bundle_runs\b", append=" --help",
         why=("it trains every bundle for an hour and rewrites the package's measurements.json: only its command line "
              "is run (--help)")),
    Rule("docs/benchmarks.md", r"^monai-prompt benchmark efficiency --quick --out runs/benchmark_efficiency_quick$",
         how="skip", why=("run, with the same argv, by tests/test_benchmark_efficiency.py::"
                          "test_quick_run_writes_every_method, which checks what it writes")),
    Rule("docs/benchmarks.md", r"^monai-prompt benchmark tinyvit\b", append=" --help",
         why="it times the full-size LiteMedSAM encoder for minutes: only its command line is run (--help)"),
    Rule("*", r"^monai-prompt demo-data --task segmentation$",
         why="runs as written: the segmentation set is small (715 files, 9 MB, seconds)"),
    Rule("*", r"^monai-prompt demo-data", append="".join(f" --{key} {value}" for key, value in DEMO_TINY.items()),
         why="the work copies' tiny sizes (the documented ones write 4,350 PNGs); the same bytes as their data"),
    Rule("docs/demo.md", r"^monai-prompt demo --tiny --out /tmp/smoke", why="outputs stay in the work copy",
         subs=(("/tmp/smoke", "smoke"),)),
    Rule("*", r"^monai-prompt demo\b", append=" --tiny --pretrain-epochs 1 --epochs 1", slow=True,
         why="the demo at its --tiny smoke size, one epoch each"),
    Rule("*", r"^(python|torchrun) .*--resume True", append=" --train#trainer#max_epochs 2", setup=("seed:",),
         why="the bundle and its data are (again) those of the tiny run interrupted after epoch 1 of 2"),
    Rule("docs/bundles.md", r"^monai-prompt export \$B", subs=(("[--set img_size=384]", "--set img_size={img}"),),
         why="the optional `[--set ...]` is given, with the size the tiny bundle was trained at"),
    Rule("docs/methods.md", r"^monai-prompt preload", setup=("data:data", "hf:vit-base-patch16-384"),
         why="a tiny HuggingFace LPM and data; the optional `[--fp16] [--batch-size 8]` are given",
         subs=(("--img-size 512", ("--img-size {img} --backbone vit_tiny --backbone-overrides '{tiny_json}' "
                                   "--fpt-config '{\"side_img_size\": 16}'")),
               ("[--fp16] [--batch-size 8]", "--fp16 --batch-size 8"))),
    Rule("bundles/vit_pretraining/docs/README.md", r"weights/augreg/model\.safetensors",
         why="a tiny timm-layout file stands in for AugReg ViT-B/16", setup=("timm:weights/augreg/model.safetensors",)),
    Rule("docs/data.md", r"^monai-prompt check-data path/to/datalist\.json", setup=("data:path/to",),
         why="the tiny data set at that path"),
    # --- prose flags whose values the shell could mangle: run in a command
    Rule("docs/bundles.md", r"^--device '", why="run in an inference of $B",
         subs=(("--device", f"{_INFER} --device"),)),
    Rule("docs/bundles.md", r"^--infer_images ", setup=("images:new",),
         why="run in an inference of $B, on two test images copied to new/a.png and new/b.png",
         subs=(("--infer_images", f"{_INFER} --infer_images"), ("/data/new/", "new/"))),
    Rule("bundles/*", r"^--infer_images \"\['a\.png','b\.png'\]\"$", setup=("images:.",),
         why="run in an inference of the README's bundle, on two test images copied to a.png and b.png",
         subs=(("--infer_images", _INFER.replace("$B", "bundles/{bundle}") + " --infer_images"),)),
    Rule("bundles/*segmentation/*", r"--infer_images \"/data/new_scans/", setup=("scans:new_scans",),
         why="the tiny test images of the README's bundle (2D or 3D NIfTI), copied to new_scans/",
         subs=(("/data/new_scans/", "new_scans/"),)),
    Rule("bundles/*segmentation/*", r"\$D/configs/", setup=("deploy:{bundle}",),
         why=("the checks and export of the README's deployable copy, as its package command writes it (packaged "
              "here when that command has not run); they run as written, without the tiny overrides")),
    # --- Python blocks
    Rule("docs/getting-started.md", r"PromptClassifier\(", setup=("hf:weights/vit-b16-in21k",),
         why="a tiny HuggingFace ViT at weights/vit-b16-in21k, in place of ViT-B/16 at 224",
         subs=(('backbone="vit_base"', 'backbone="vit_tiny", backbone_overrides={tiny}'),
               ("img_size=224", "img_size={img}"), ("torch.randn(2, 3, 224, 224)", "torch.randn(2, 3, {img}, {img})")),
         check="assert type(logits) is torch.Tensor and logits.shape == (2, 5), logits.shape\n"),
    Rule("docs/pretrained-weights.md", r"load_pretrained\(", setup=("hf:weights/vit-b16-in21k",),
         why="a tiny HuggingFace ViT at weights/vit-b16-in21k, in place of ViT-B/16 (its 3 x 3 grid resized to 4 x 4)",
         subs=(('"vit_base"', '"vit_tiny", **{tiny}'), ("img_size=384", "img_size={img}")),
         check="assert report.missing == [] and report.layout == 'hf', report\n"),
    Rule("docs/methods.md", r"resize_ept_prompt\(",
         why=("`trained_vit` is a tiny EPT ViT at the smaller size (a 4 x 4 grid resized to 6 x 6 instead of "
              "ViT-B/16's 14 x 14 to 24 x 24)"),
         subs=(('build_vit("vit_base", img_size=384)', 'build_vit("vit_tiny", img_size=48, **{tiny})'),
               ("(14, 14), (24, 24)", "(4, 4), (6, 6)")),
         prelude=("from monai_prompt.backbones import build_vit\nfrom monai_prompt.peft import apply_method\n\n"
                  'trained_vit = apply_method(build_vit("vit_tiny", img_size={img}, **{tiny}), "ept")\n'),
         check="assert new_vit.blocks[0].attn.ept_prompt.shape[0] == 1 + 36\n"),
    Rule("docs/methods.md", r"PrepareBatchExtraInput", setup=("data:data", "hf:vit-base-patch16-384"),
         why=("`net` is the tiny FPT+ of the preload command above (its cache/fptplus, filled again if that command "
              "did not run), `datalist` the tiny data; the LPM is patched to fail if it runs"),
         subs=(("classification_transforms(512,", "classification_transforms({img},"),
               ("spatial_size=(128, 128)", "spatial_size=({img} // 2, {img} // 2)"), ("batch_size=16", "batch_size=4"),
               ("max_epochs=20", "max_epochs=1")),
         prelude=_FPT_NET, check="assert trainer.state.epoch == 1\n"),
    # --- configuration excerpts
    Rule("docs/data.md", r"datalist", "config", bundle="lora_classification",
         why="the excerpt is what every classification bundle's train.json holds"),
)


def rule_for(file: str, text: str) -> Rule | None:
    """The first row of :data:`MAPPING` that matches the snippet, or ``None`` (the snippet runs as written)."""
    for rule in MAPPING:
        if fnmatch.fnmatch(file, rule.files) and re.search(rule.match, text):
            return rule
    return None


# ------------------------------------------------------------------------------------------------------ collection
@dataclass(frozen=True)
class Snippet:
    """One snippet of a doc: ``kind`` is ``python``, ``shell`` or ``json``; ``prelude`` the file's shell variable
    assignments before it."""

    file: str
    line: int
    kind: str
    text: str
    prelude: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.file}:flags" if self.kind == "flags" else f"{self.file}:{self.line}"


_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=(\$\(.*\)|\S*)$")


def _is_command(text: str) -> bool:
    return any(text == word or text.startswith(word if word.endswith("=") else word + " ") for word in COMMAND_WORDS)


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` after a blank, outside quotes)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def _shell_commands(lines: list[str], first: int) -> list[tuple[int, str]]:
    """``(line, command)`` of a shell block: continuations joined, blank and comment lines skipped."""
    commands, current, start = [], "", 0
    for number, raw in enumerate(lines, first):
        line = _strip_comment(raw.removeprefix("$ "))
        if not current and not line.strip():
            continue
        if not current:
            start = number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1].strip() + " "
            continue
        commands.append((start, (current + line.strip()).strip()))
        current = ""
    return commands


def collect(path: Path) -> list[Snippet]:
    """The snippets of one doc file, in file order (prose spans that only name a program have kind ``mention``)."""
    file = path.relative_to(REPO).as_posix()
    lines = path.read_text().splitlines()
    found: list[tuple[int, str, str]] = []  # (line, kind, text)
    prose = list(lines)
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, lang = opening.groups()
        end = index + 1
        while end < len(lines) and not (_FENCE.match(lines[end]) and not _FENCE.match(lines[end]).group(2)):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.strip() for line in lines[index + 1:end]]
        prose[index:end + 1] = [""] * (end + 1 - index)
        first = index + 2
        if lang == "python":
            found.append((first, "python", "\n".join(body) + "\n"))
        elif lang == "json":
            found.append((first, "json", "\n".join(body)))
        elif lang in ("bash", "sh", "shell", "console") or (not lang and body and _is_command(body[0].strip())):
            found += [(number, "shell", command) for number, command in _shell_commands(body, first)]
        index = end + 1
    text, inline_lines = "\n".join(prose), set()
    for span in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", text):
        command, line = " ".join(span.group(1).split()), text.count("\n", 0, span.start()) + 1
        if _is_command(command):
            inline_lines.add(line)
            found.append((line, "shell", command))
        elif command.startswith("--"):
            found.append((line, "flag", command))
    snippets, seen, assignments = [], set(), []
    for line, kind, text in sorted(found):
        if kind == "shell" and _ASSIGNMENT.match(text) and line not in inline_lines:
            assignments.append(text)
            if "$(" not in text:  # a plain assignment runs only before the commands that follow it
                continue
            text = f"{text}\ntest -n \"${text.split('=', 1)[0]}\""
        rule = rule_for(file, text)
        if rule is not None and rule.how == "mention":
            kind = "mention"
        elif kind == "flag" and rule is not None and rule.how == "run":
            kind = "shell"  # a flag whose row gives it a command to run in
        if (kind, text) in seen:
            continue
        seen.add((kind, text))
        prelude = tuple(a for a in assignments if a != text.split("\n")[0])
        snippets.append(Snippet(file, line, kind, text, prelude if kind == "shell" else ()))
    flags = [s for s in snippets if s.kind == "flag"]
    if flags:  # one param per file for its prose flags: each option must exist (checked statically)
        listing = "\n".join(f"{s.line}: {s.text}" for s in flags)
        snippets = [s for s in snippets if s.kind != "flag"] + [Snippet(file, flags[0].line, "flags", listing)]
    return snippets


DOC_FILES = sorted({path for pattern in DOC_GLOBS for path in REPO.glob(pattern)})
COLLECTED = [snippet for path in DOC_FILES for snippet in collect(path)]


def template_readme(file: str) -> str | None:
    """The README of :data:`TEMPLATE_RUN` whose commands ``file``'s must repeat (``None``: ``file`` is not a bundle
    README rendered from a template, or it is that one)."""
    parts = file.split("/")
    if parts[0] != "bundles" or parts[1] == "vit_pretraining":
        return None
    name = parts[1]
    template = next(key for key in ("3d_segmentation", "segmentation", "classification") if name.endswith(key))
    run = TEMPLATE_RUN["fpt_classification" if name.startswith("fpt") else template]
    return None if name == run else f"bundles/{run}/docs/README.md"


#: what runs: every snippet but prose mentions and the commands of bundle READMEs that repeat their template's
#: (their flags are still checked against their own bundle's configs).
SNIPPETS = [snippet for snippet in COLLECTED if snippet.kind != "mention"
            and (snippet.kind == "flags" or template_readme(snippet.file) is None)]


def _bundles_named(snippet: Snippet, text: str | None = None) -> list[str]:
    """The bundles a snippet's prelude and (mapped) text name as ``bundles/<name>``."""
    text = "\n".join((*snippet.prelude, snippet.text if text is None else text))
    return sorted(set(re.findall(r"bundles/(\w+)", text)) & {p.name for p in (REPO / "bundles").iterdir()})


def _is_slow(snippet: Snippet) -> bool:
    """Slow: the row says so, or a snippet of a bundle README other than :data:`FAST_BUNDLES`'."""
    rule = rule_for(snippet.file, snippet.text)
    if rule is not None and rule.slow:
        return True
    own = snippet.file.split("/")[1] if snippet.file.startswith("bundles/") else None
    return own is not None and own not in FAST_BUNDLES and snippet.kind in ("shell", "python")


def _params() -> list:
    return [pytest.param(s, id=s.id, marks=[pytest.mark.slow] if _is_slow(s) else []) for s in SNIPPETS]


# ------------------------------------------------------------------------------- tiny argv (runs in the fork server)
def _option_names(args: list[str]) -> set[str]:
    return {arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")}


def _is_placeholder(value: str) -> bool:
    return value == "..." or value.startswith("/path/to/")


def tiny_argv(prog: str, args: list[str], tiny: dict[str, dict[str, Any]]) -> list[str]:
    """The argv a bundle command runs with here.

    ``python -m monai.bundle run | verify_net_in_out | ckpt_export`` on a bundle (found in ``--config_file``, or
    the current folder inside a bundle): each of the bundle's tiny overrides the command does not set is appended
    (``_meta_#...spatial_shape`` only for the two checks, which compare it with the network), a placeholder value
    (``...``, ``/path/to/...``) becomes the tiny one, and a ``run`` of ``train.json`` gets
    ``--train#trainer#max_epochs 1``; a command on a packaged copy (under :data:`DEPLOY`) runs as written.
    ``monai-prompt export <bundle>``: the placeholder ``--pretrained`` and ``--set key=value`` of the tiny network
    shape. Anything else is returned unchanged.

    Args:
        prog: ``monai.bundle`` (the module of ``python -m``) or ``monai-prompt``.
        args: the arguments after the program.
        tiny: the tiny overrides per bundle name.
    """
    if prog == "monai-prompt" and args[:1] == ["export"] and len(args) > 1:
        overrides = tiny[Path(args[1]).name]
        args = [overrides["pretrained"] if i > 0 and args[i - 1] == "--pretrained" and _is_placeholder(a) else a
                for i, a in enumerate(args)]
        given = {a.split("=", 1)[0] for i, a in enumerate(args) if i > 0 and args[i - 1] == "--set"}
        sets = ["img_size", "backbone", "backbone_overrides", "method_config#side_img_size"]
        for key in sets:
            if key in overrides and key not in given:
                args += ["--set", f"{key}={json.dumps(overrides[key])}"]
        return args
    if prog != "monai.bundle" or args[:1] not in (["run"], ["verify_net_in_out"], ["ckpt_export"]):
        return args
    configs = ""
    for i, arg in enumerate(args[:-1]):
        if arg == "--config_file":
            configs = args[i + 1]
    if configs.startswith(f"{DEPLOY}/"):  # a packaged copy holds its trained settings and metadata: run as it is
        return args
    names = re.findall(r"([\w.-]+)/configs/[\w.]+\.json", configs) or [Path.cwd().name]
    overrides = dict(tiny.get(names[0], {}))
    if args[0] == "run":
        overrides.pop("_meta_#network_data_format#inputs#image#spatial_shape", None)
        if "train.json" in configs:
            overrides["train#trainer#max_epochs"] = 1
    out = []
    for i, arg in enumerate(args):
        key = args[i - 1][2:] if i > 0 and args[i - 1].startswith("--") else None
        out.append(repr(overrides[key]) if key in overrides and _is_placeholder(arg) else arg)
    given = _option_names(out)
    for key, value in overrides.items():
        if key not in given:
            out += [f"--{key}", repr(value)]
    return out


# --------------------------------------------------------------------------------------------------- fork server
_SHIM = """#!{python} -S
import json, os, signal, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(os.environ["DOCS_FORK_SERVER"])
request = {{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}}
socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
pid = int(conn.recv(64))
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda number, frame: os.kill(pid, number))
reply = conn.recv(64)
sys.exit(int(reply) if reply else 137)
"""
#: third-party modules the fork server imports once (never monai_prompt: each command imports it afresh).
PREIMPORT = ("numpy", "torch", "monai", "monai.bundle", "monai.bundle.scripts", "fire", "ignite.engine",
             "ignite.metrics", "monai.engines", "monai.handlers", "monai.transforms", "monai.data",
             "monai.networks.nets", "safetensors.torch", "PIL.Image", "nibabel", "mlflow", "mlflow.tracking",
             "torch.distributed.run")


def serve(path: str) -> None:
    """The fork server behind the shims: import :data:`PREIMPORT`, then fork one process per request."""
    import importlib

    for name in PREIMPORT:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path + ".tmp")
    server.listen(32)
    os.rename(path + ".tmp", path)  # the socket appears when the server is ready
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if os.fork() == 0:
            server.close()
            _child(conn, json.loads(message), fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Run one request in this forked process and report its exit status (never returns)."""
    import atexit
    import traceback

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    conn.send(str(os.getpid()).encode())
    try:
        code = _run(request["argv"])
    except SystemExit as exit_:  # sys.exit(None | int | message), as the interpreter reports it
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a command's error is its exit status, as in a fresh interpreter
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        conn.send(str(code).encode())
        os._exit(code)


def _run(argv: list[str]) -> int:
    """Run a shim's argv in this process, like the program it stands for."""
    import runpy
    from importlib.metadata import entry_points

    prog, args = argv[0], argv[1:]
    tiny = json.loads(os.environ.get("DOCS_TINY", "{}"))
    if prog in ("python", "python3"):
        if args[:1] == ["-u"]:
            args = args[1:]
            sys.stdout.reconfigure(write_through=True)
        if len(args) >= 2 and args[0] == "-m":
            rest = tiny_argv(args[1], args[2:], tiny)
            if rest != args[2:]:
                print(f"docs: python -m {args[1]} {shlex.join(rest)}", file=sys.stderr, flush=True)
            sys.argv = [args[1], *rest]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif len(args) >= 2 and args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - it is `python -c`
        elif args and not args[0].startswith("-"):
            sys.argv = list(args)
            sys.path.insert(0, str(Path(args[0]).resolve().parent))
            runpy.run_path(args[0], run_name="__main__")
        else:  # a child, not exec: an exec'd program could not report its exit status to the shim
            return subprocess.call([os.environ["DOCS_REAL_PYTHON"], *args])
        return 0
    if prog.startswith("docs-check-"):
        return {"pip": check_pip, "hf": check_hf, "mlflow": check_mlflow}[prog[len("docs-check-"):]](args)
    if prog == "torchrun":  # its workers start through the python shim
        sys.executable = str(Path(os.environ["DOCS_SHIMS"]) / "python")
    rest = tiny_argv(prog, args, tiny)
    if rest != args:
        print(f"docs: {prog} {shlex.join(rest)}", file=sys.stderr, flush=True)
    (entry,) = entry_points(group="console_scripts", name=prog)
    sys.argv = [prog, *rest]
    result = entry.load()()
    return result if isinstance(result, int) else 0


# ------------------------------------------------------------------------- docs-check-* (stand-ins for commands)
def check_pip(args: list[str]) -> int:
    """``pip install ARGS`` without installing: every requirement parses and this venv satisfies it (``-e DIR``:
    DIR's pyproject dependencies and the named extras, and the project is installed); every option is one of
    ``pip install``'s. ``--expect TEXT``: read a ``make -n`` listing from stdin, which must contain TEXT, and check
    each ``pip install`` line in it."""
    from importlib.metadata import PackageNotFoundError, version

    import tomllib
    from packaging.requirements import Requirement

    if not args or args[0] == "--expect":
        listing = sys.stdin.read()
        print(listing, end="")
        if args and args[1] not in listing:
            print(f"docs-check-pip: {args[1]!r} not in the listing", file=sys.stderr)
            return 1
        lines = [line.split(" pip install ", 1)[1] for line in listing.splitlines() if " pip install " in line]
        return max([check_pip(shlex.split(line)) for line in lines], default=0)
    pip_help = subprocess.run([os.environ["DOCS_REAL_PYTHON"], "-m", "pip", "install", "--help"],
                              capture_output=True, text=True, check=True).stdout
    problems, requirements, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg in ("-e", "--editable"):
            target, _, extras = args[index + 1].partition("[")
            project = tomllib.loads((Path(target) / "pyproject.toml").read_text())["project"]
            requirements += project["dependencies"]
            for extra in extras.rstrip("]").split(",") if extras else []:
                requirements += project["optional-dependencies"][extra]
            requirements.append(project["name"])
            index += 2
            continue
        if arg.startswith("-"):
            if not re.search(rf"(^|[\s,]){re.escape(arg.split('=')[0])}\b", pip_help):
                problems.append(f"unknown option {arg}")
            index += 2 if arg in ("--index-url", "-i", "--extra-index-url") else 1
            continue
        requirements.append(arg)
        index += 1
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(f"{text}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{text}: {installed} installed")
    for problem in problems:
        print(f"docs-check-pip: {problem}", file=sys.stderr)
    print(f"docs-check-pip: {len(requirements)} requirement(s) satisfied" if not problems else "", file=sys.stderr)
    return 1 if problems else 0


def check_hf(args: list[str]) -> int:
    """``hf download REPO [FILES] --local-dir DIR`` without network: each option must be in ``hf download --help``,
    then a tiny stand-in of the repository's layout (timm: a ``.safetensors`` file; else a HuggingFace directory)
    is copied to DIR and loads with ``load_pretrained``."""
    from monai_prompt.backbones import build_vit, load_pretrained

    usage = subprocess.run([str(Path(os.environ["DOCS_REAL_PYTHON"]).parent / "hf"), *args[:1], "--help"],
                           capture_output=True, text=True, check=True).stdout
    unknown = [arg for arg in args if arg.startswith("--") and arg.split("=")[0] not in usage]
    if unknown or args[:1] != ["download"]:
        print(f"docs-check-hf: not accepted by `hf download`: {unknown or args[:1]}", file=sys.stderr)
        return 1
    local_dir = Path(args[args.index("--local-dir") + 1])
    files = [a for i, a in enumerate(args[2:], 2) if not a.startswith("--") and args[i - 1] != "--local-dir"]
    standins = Path(os.environ["DOCS_STANDINS"])
    if args[1].startswith("timm/"):
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy(standins / "timm.safetensors", local_dir / name)
        weights = local_dir / files[0]
    else:
        shutil.copytree(standins / "hf", local_dir, dirs_exist_ok=True)
        weights = local_dir
    tiny = json.loads(os.environ["DOCS_TINY_BACKBONE"])
    eps = 1e-6 if args[1].startswith("timm/") else 1e-12
    report = load_pretrained(build_vit("vit_tiny", img_size=32, layer_norm_eps=eps, **tiny), str(weights))
    print(report)
    return 0


def check_mlflow(args: list[str]) -> int:
    """``mlflow ui --backend-store-uri URI`` without a server: URI's store holds a run of the classification
    experiment."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=args[0])
    experiment = client.get_experiment_by_name("monai_prompt_classification")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    print(f"docs-check-mlflow: {len(runs)} run(s) in {args[0]}")
    return 0 if runs else 1


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    """The fork server and the shim folder (``DOCS_*`` variables of the commands' environment)."""
    root = tmp_path_factory.mktemp("docs_server")
    shims = root / "shims"
    shims.mkdir()
    for name in SHIMS:
        (shims / name).write_text(_SHIM.format(python=sys.executable))
        (shims / name).chmod(0o755)
    path = str(root / "server.sock")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tests = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests!r}); import test_docs; test_docs.serve({path!r})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    yield {"DOCS_FORK_SERVER": path, "DOCS_SHIMS": str(shims), "DOCS_REAL_PYTHON": sys.executable}, process, path
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _wait_for(process: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(path):
        assert process.poll() is None, "the docs fork server exited while importing"
        assert time.monotonic() < deadline, "the docs fork server did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def docs(fork_server, tiny, tmp_path_factory):
    """Everything a snippet runs with: the command environment, the tiny stand-ins, trained tiny bundles (seeded
    lazily) and one work copy per doc file."""
    import torch
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    from bundle_support import TINY_BACKBONE, TINY_IMG_SIZE, copy_bundle, tiny_overrides
    from monai_prompt.bundle_gen import BUNDLE_SPECS
    from monai_prompt.bundle_gen.specs import SEGMENTATION_SPECS
    from monai_prompt.data import build_demo_data
    from monai_prompt.runs.runner import run_bundle
    from segmentation_support import tiny_segmentation_overrides, write_tiny_encoder, write_tiny_segmentation

    root = tmp_path_factory.mktemp("docs")
    data = root / "data"
    build_demo_data(data, **{key.replace("-", "_"): value for key, value in DEMO_TINY.items()})
    standins = root / "standins"
    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(hidden_size=TINY_BACKBONE["hidden_size"], num_hidden_layers=TINY_BACKBONE["num_layers"],
                            num_attention_heads=TINY_BACKBONE["num_heads"], intermediate_size=TINY_BACKBONE["mlp_dim"],
                            patch_size=TINY_BACKBONE["patch_size"], image_size=3 * TINY_BACKBONE["patch_size"]),
                  add_pooling_layer=False)
    hf.save_pretrained(standins / "hf")
    save_file(_timm_state(TINY_BACKBONE, grid=3), standins / "timm.safetensors")

    tiny_by_bundle = {name: {k: v for k, v in tiny_overrides(spec, data, tiny["backbone"]).items()
                             if k != "dataset_dir"} for name, spec in BUNDLE_SPECS.items()}
    tiny_by_bundle["vit_pretraining"] = {"batch_size": 4, "num_workers": 0}
    segmentation_data = {}  # the tiny image/label pairs (the datalist's folder) and encoder of each running README
    for dims, name in SEGMENTATION_RUN.items():
        datalist = write_tiny_segmentation(root / f"segmentation{dims}d", dims)
        encoder = write_tiny_encoder(standins / f"encoder{dims}d.pt", dims)
        tiny_by_bundle[name] = tiny_segmentation_overrides(SEGMENTATION_SPECS[name], datalist, encoder)
        segmentation_data[name] = datalist.parent
    seeds = root / "seeds"
    trained: dict[str, Path] = {}

    def data_of(name: str) -> Path:
        """The tiny data ``name`` trains on."""
        return segmentation_data.get(name, data)

    def seed(name: str) -> Path:
        """``name`` trained on the tiny data: an interrupted run (epoch 1 of 2), as ``--resume True`` expects."""
        if name not in trained:
            bundle = copy_bundle(name, seeds)
            overrides = {k: v for k, v in tiny_by_bundle[name].items() if not k.startswith("_meta_")}
            run_bundle(bundle, ["train.json"], "train", quiet=True, attach=_stop_after_first_epoch,
                       dataset_dir=str(data_of(name)), **{**overrides, "train#trainer#max_epochs": 2})
            shutil.rmtree(bundle / "eval", ignore_errors=True)
            trained[name] = bundle
        return trained[name]

    env = {**os.environ, **fork_server[0], "OMP_NUM_THREADS": "1", "DOCS_STANDINS": str(standins),
           "DOCS_TINY": json.dumps(tiny_by_bundle), "DOCS_TINY_BACKBONE": json.dumps(TINY_BACKBONE),
           "PATH": os.pathsep.join([fork_server[0]["DOCS_SHIMS"], str(VENV_BIN), os.environ.get("PATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    values = {"{tiny}": repr(TINY_BACKBONE), "{tiny_json}": json.dumps(TINY_BACKBONE), "{img}": str(TINY_IMG_SIZE)}
    works: dict[str, Path] = {}

    def work(file: str) -> Path:
        """The work copy of ``file``: the seed of every bundle it names, and the tiny data where their configs'
        default ``dataset_dir`` points."""
        if file not in works:
            works[file] = root / "work" / file.replace("/", "_")
            works[file].mkdir(parents=True)
            names = sorted({n for s in SNIPPETS if s.file == file for n in _bundles_named(s, _mapped(s, values))})
            for name in names:
                shutil.copytree(seed(name), works[file] / "bundles" / name)
            for name in names:
                shutil.copytree(data_of(name), works[file] / _default_dataset_dir(name), dirs_exist_ok=True)
        return works[file]

    _wait_for(*fork_server[1:])
    return {"env": env, "data": data, "data_of": data_of, "standins": standins, "seed": seed, "work": work,
            "values": values}


def _default_dataset_dir(bundle: str) -> str:
    """The folder, relative to the repository root, of ``bundle``'s default ``dataset_dir``."""
    expression = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())["dataset_dir"]
    match = re.fullmatch(r"\$@bundle_root \+ '/\.\./\.\./(.+)'", expression)
    assert match, f"{bundle}/configs/train.json: dataset_dir {expression!r} is not below the repository root"
    return match.group(1)


def _clear_first_runs(text: str, work: Path) -> None:
    """Empty ``models/`` of each bundle a training command (``run`` of ``train.json`` without ``--resume``) trains:
    every such doc command is a first run, and a bundle refuses to train over a previous run."""
    for line in text.splitlines():
        if "monai.bundle run" in line and "--resume" not in line and not re.search(r"(evaluate|inference)\.json", line):
            for name in re.findall(r"bundles/(\w+)/configs/train\.json", line.replace("$B", _b_value(text))):
                shutil.rmtree(work / "bundles" / name / "models", ignore_errors=True)


def _b_value(text: str) -> str:
    match = re.search(r"^B=(\S+)$", text, re.MULTILINE)
    return match.group(1) if match else "$B"


def _stop_after_first_epoch(workflow) -> None:
    from ignite.engine import Events

    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())


def _timm_state(arch: dict[str, int], grid: int, channels: int = 3) -> dict:
    """Random tensors under timm's ViT keys and shapes (``patch_embed.proj``, ``blocks.N.attn.qkv``, ...)."""
    import torch

    d, m, p = arch["hidden_size"], arch["mlp_dim"], arch["patch_size"]
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d),
              "patch_embed.proj.weight": (d, channels, p, p), "patch_embed.proj.bias": (d,), "norm.weight": (d,),
              "norm.bias": (d,), "head.weight": (10, d), "head.bias": (10,)}
    per_block = {"norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                 "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d),
                 "attn.proj.bias": (d,), "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m),
                 "mlp.fc2.bias": (d,)}
    for i in range(arch["num_layers"]):
        shapes |= {f"blocks.{i}.{key}": shape for key, shape in per_block.items()}
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------------------- tests
def _apply(text: str, rule: Rule | None, values: dict[str, str]) -> str:
    if rule is None:
        return text
    for old, new in rule.subs:
        assert old in text, f"stale MAPPING row {rule.match!r}: {old!r} is no longer in the snippet:\n{text}"
        for name, value in values.items():
            new = new.replace(name, value)
        text = text.replace(old, new)
    return text + rule.append


def _mapped(snippet: Snippet, values: dict[str, str]) -> str:
    """The snippet's text after its row's substitutions (``{bundle}``: the bundle of a bundle README)."""
    own = {"{bundle}": snippet.file.split("/")[1]} if snippet.file.startswith("bundles/") else {}
    return _apply(snippet.text, rule_for(snippet.file, snippet.text), {**values, **own})


def _fill(code: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        code = code.replace(name, value)
    return code


def _setup(work: Path, items: tuple[str, ...], bundles: list[str], docs: dict) -> None:
    for item in items:
        kind, _, target = item.partition(":")
        dest = work / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kind == "data":
            shutil.copytree(docs["data"], dest, dirs_exist_ok=True)
        elif kind == "hf":
            shutil.copytree(docs["standins"] / "hf", dest, dirs_exist_ok=True)
        elif kind == "timm":
            shutil.copy(docs["standins"] / "timm.safetensors", dest)
        elif kind == "repo":
            shutil.copy(REPO / target, dest)
        elif kind == "images":
            dest.mkdir(parents=True, exist_ok=True)
            for name, image in zip(("a.png", "b.png"), sorted((docs["data"] / "images" / "test").rglob("*.png"))):
                shutil.copy(image, dest / name)
        elif kind == "scans":
            dest.mkdir(parents=True, exist_ok=True)
            for name in bundles:
                for image in (docs["data_of"](name) / "images" / "test").iterdir():
                    shutil.copy(image, dest / image.name)
        elif kind == "deploy":
            from monai_prompt.tools import package_bundle

            if not (work / DEPLOY / target).exists():
                package_bundle(work / "bundles" / target, work / DEPLOY / target)
        elif kind == "seed":
            for name in bundles:
                shutil.rmtree(work / "bundles" / name)
                shutil.copytree(docs["seed"](name), work / "bundles" / name)
                shutil.rmtree(work / _default_dataset_dir(name), ignore_errors=True)
                shutil.copytree(docs["data_of"](name), work / _default_dataset_dir(name))
        else:
            raise ValueError(f"unknown setup item {item!r}")


def _run_script(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        output += f"\n[timed out after {TIMEOUT_S} s]"
    return subprocess.CompletedProcess(script, process.returncode, output)


def _check_config_excerpt(snippet: Snippet, rule: Rule) -> None:
    excerpt = json.loads("{" + snippet.text.strip().rstrip(",") + "}")
    config = json.loads((REPO / "bundles" / rule.bundle / "configs" / "train.json").read_text())
    for key, value in excerpt.items():
        node: Any = config
        for part in key.split("#"):
            found = part in node if isinstance(node, dict) else part.isdigit() and int(part) < len(node)
            assert found, f"{snippet.id}: {key!r} is not in {rule.bundle}/train.json"
            node = node[part] if isinstance(node, dict) else node[int(part)]
        assert node == value, f"{snippet.id}: {key!r} is {node!r} in {rule.bundle}/train.json, the doc says {value!r}"


_FLAG = re.compile(r"(?:^|\s)--([\w#.-]+)")


def _known_options(file: str) -> set[str]:
    """Option names a flag in ``file`` may use: the config ids of its bundle (a bundle README) or of every bundle
    (``_meta_#...`` from metadata.json; nested ids joined with ``#``), the parameters of MONAI's bundle scripts and
    of its MLflow settings, and the options of ``monai-prompt``'s commands (``benchmark efficiency``'s included)."""
    import argparse
    import inspect

    from monai.bundle import scripts
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    from monai_prompt.cli import build_parser

    def ids(node: Any, prefix: str = "") -> set[str]:
        items = list(node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ())
        return {f"{prefix}{key}" for key, _ in items} | {i for key, v in items for i in ids(v, f"{prefix}{key}#")}

    bundles = [file.split("/")[1]] if file.startswith("bundles/") else [p.name for p in (REPO / "bundles").iterdir()]
    known = set(DEFAULT_MLFLOW_SETTINGS["configs"])
    for name in bundles:
        for config in (REPO / "bundles" / name / "configs").glob("*.json"):
            content = json.loads(config.read_text())
            known |= ids({"_meta_": content} if config.name == "metadata.json" else content)
    for function in (scripts.run, scripts.ckpt_export, scripts.verify_metadata, scripts.verify_net_in_out):
        known |= set(inspect.signature(function).parameters)
    from monai_prompt.benchmarks.efficiency import build_parser as efficiency_parser
    from monai_prompt.benchmarks.gpu_check import build_parser as gpu_check_parser

    # `benchmark efficiency` and `gpu-check` hand their options to their own parsers
    parsers = [build_parser(), efficiency_parser(), gpu_check_parser()]
    for parser in parsers:
        for action in parser._actions:
            known |= {option[2:] for option in action.option_strings if option.startswith("--")}
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return known


def _check_flags(snippet: Snippet) -> None:
    known = _known_options(snippet.file)
    unknown = [f"line {entry.split(':')[0]}: --{name}" for entry in snippet.text.splitlines()
               for name in _FLAG.findall(entry.split(": ", 1)[1]) if name not in known]
    assert not unknown, f"{snippet.file}: flags no bundle config, MONAI script or monai-prompt command has: {unknown}"


@pytest.mark.parametrize("snippet", _params())
def test_snippet(snippet: Snippet, docs):
    rule = rule_for(snippet.file, snippet.text)
    if rule is not None and rule.how == "skip":
        pytest.skip(rule.why)
    if rule is not None and rule.how == "config":
        _check_config_excerpt(snippet, rule)
        return
    if snippet.kind == "flags":
        _check_flags(snippet)
        return
    work = docs["work"](snippet.file)
    text = _mapped(snippet, docs["values"])
    own = {"{bundle}": snippet.file.split("/")[1]} if snippet.file.startswith("bundles/") else {}
    _setup(work, tuple(_fill(item, own) for item in rule.setup) if rule else (), _bundles_named(snippet, text), docs)
    if snippet.kind == "python":
        code = _fill((rule.prelude if rule else ""), docs["values"]) + text + (rule.check if rule else "")
        script_file = work / f"snippet_{snippet.line}.py"
        script_file.write_text(code)
        script = f"python {script_file.name}"
    else:
        script = "\n".join((*snippet.prelude, text))
        _clear_first_runs(script, work)
    result = _run_script(script, work, docs["env"])
    print(f"$ {script}\n{result.stdout[-3000:]}")  # shown by pytest -rP or -s
    assert result.returncode == 0, (
        f"{snippet.id} failed (exit {result.returncode}); ran in {work}:\n{script}\n--- output (tail) ---\n"
        f"{result.stdout[-6000:]}"
    )


def test_every_mapping_row_is_used():
    """A row that matches no snippet is stale (its doc text changed): fix or delete it."""
    for rule in MAPPING:
        used = [s.id for s in COLLECTED if rule_for(s.file, s.text) is rule]
        assert used, f"MAPPING row {rule.match!r} ({rule.files}) matches no snippet"


def _commands(file: str) -> set[tuple[str, str]]:
    """``(kind, text)`` of a file's snippets with its bundle's name as ``{bundle}`` (flags one by one, without their
    line numbers)."""
    name = file.split("/")[1]
    found = set()
    for snippet in COLLECTED:
        if snippet.file == file:
            texts = [line.split(": ", 1)[1] for line in snippet.text.splitlines()] if snippet.kind == "flags" else [
                snippet.text]
            found |= {(snippet.kind, text.replace(name, "{bundle}")) for text in texts}
    return found


#: the one command of a segmentation README its template lacks: the demo tuning the README's own method (the template,
#: DVPT's, runs the demo with its default method; the other methods' bundles are run by test_segmentation_bundles.py).
OWN_DEMO = "monai-prompt demo --task segmentation --method {method}"


@pytest.mark.parametrize("file", sorted({s.file for s in COLLECTED if template_readme(s.file)}))
def test_bundle_readmes_share_their_template(file):
    """A bundle README that does not run holds only commands its template runs (with its own bundle name), and at
    most the segmentation demo of its own method, which the demo's command line must accept."""
    from monai_prompt.bundle_gen.specs import ALL_BUNDLE_SPECS
    from monai_prompt.cli import build_parser

    method = ALL_BUNDLE_SPECS[file.split("/")[1]].method
    own_demo = ("shell", OWN_DEMO.format(method=method))
    commands = _commands(file)
    extra = commands - _commands(template_readme(file)) - {own_demo}
    assert not extra, f"{file}: commands its template {template_readme(file)} does not run: {sorted(extra)}"
    assert commands, f"{file}: no commands collected"
    if own_demo in commands:
        args = build_parser().parse_args(shlex.split(own_demo[1])[1:])
        assert (args.task, args.method) == ("segmentation", method)
