"""The ``monai-prompt`` command line as users type it: a positional after a list option, on/off options given a value,
dict options as JSON or Python, unknown bundle names (``monai_prompt.cli``)."""

from __future__ import annotations

import pytest

from bundle_support import write_tiny_dataset
from monai_prompt.cli import build_parser, main
from segmentation_support import write_tiny_segmentation


def test_check_data_takes_the_datalist_after_a_list_option_and_flags_with_values(tmp_path, capsys):
    datalist = write_tiny_dataset(tmp_path, per_class=(1, 1, 0))
    assert main(["check-data", "--classes", "a", "b", "c", str(datalist)]) == 0  # not a fourth class
    assert "images       a       b       c" in capsys.readouterr().out
    assert main(["check-data", "--classes", "a", "b", "c", str(datalist), "--headers-only", "false"]) == 0
    with pytest.raises(SystemExit, match=r"^check-data: datalist .*datalist\.json: a JSON datalist takes no "
                                         r"label_columns \(its options: classes, base_dir, split, strict\)\.$"):
        main(["check-data", "--label-columns", "label", str(datalist)])  # a CSV's option: no TypeError traceback
    with pytest.raises(SystemExit, match=r"^check-data: no datalist given"):
        main(["check-data", "--classes", "a"])
    segmentation = write_tiny_segmentation(tmp_path / "segmentation", 2, counts=(1, 1, 0))
    with pytest.raises(SystemExit, match=r"is a segmentation datalist, whose check takes --classes and --channels, "
                                         r"not --headers-only, --dicom-series\.$"):  # not silently ignored
        main(["check-data", str(segmentation), "--headers-only", "--dicom-series"])

    def parse(*argv: str):
        from monai_prompt.cli import _flag_values

        parser = build_parser()
        return parser.parse_args(_flag_values(parser, argv))

    assert not parse("check-data", "d", "--headers-only", "False").headers_only  # --flag false means False
    assert parse("check-data", "--headers-only", "yes", "d").headers_only and parse("demo", "--tiny=1").tiny
    assert not parse("demo", "--tiny", "no", "--compare-scratch=0").compare_scratch
    assert parse("check-data", "--headers-only", "d").datalist == "d"  # a flag alone takes no value
    assert not parse("benchmark", "accuracy", "--lite-probe", "false").lite_probe  # an --x/--no-x pair


def test_dict_options_take_json_or_python_and_unknown_bundles_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^export: .*typo is not a bundle folder: it has no configs/inference\.json"):
        main(["export", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()  # no models/ folder made for it
    assert main(["info"]) == 0  # every family's presets, not only the ViT's
    assert {"sam backbones: sam_vit_b, sam_vit_l, sam_vit_h", "tinyvit backbones: lite_medsam"} <= set(
        capsys.readouterr().out.splitlines())
    args = build_parser().parse_args(["preload", "d", "--cache-dir", "c", "--backbone-overrides",
                                      "{'num_layers': 2}", "--fpt-config", '{"layers": [1]}'])
    assert (args.backbone_overrides, args.fpt_config) == ({"num_layers": 2}, {"layers": [1]})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["preload", "d", "--cache-dir", "c", "--backbone-overrides", "num_layers=2"])
    assert "'num_layers=2' is not a dict: write JSON, e.g. '{\"num_layers\": 6}', or a Python dict" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):  # the reference TinyViT takes 256 px only: not an AssertionError inside it
        build_parser().parse_args(["benchmark", "tinyvit", "--img-size", "64"])
    assert "argument --img-size: invalid choice: 64 (choose from 256)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a traceback from deep inside the demo-data build
        build_parser().parse_args(["demo-data", "--patch-size", "0"])
    assert "argument --patch-size: '0' is not an integer of at least 1." in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^render-bundles: unknown bundles \['false'\]"):
        main(["render-bundles", "--check", "--root", "bundles", "false"])
