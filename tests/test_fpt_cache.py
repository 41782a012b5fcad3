"""FPT preload cache: content keys, resume, atomic writes, stale detection, fp16, and cached == online logits."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import PrepareBatchExtraInput
from monai.transforms import Compose, RandFlipd, Resized
from PIL import Image
from safetensors.torch import save_file

import monai_prompt.fpt.cache as cache_module
from monai_prompt.cli import main
from monai_prompt.data.transforms import classification_transforms
from monai_prompt.fpt import (
    FPTCacheError,
    FPTFeatureCache,
    LoadFPTFeaturesd,
    cache_identity,
    content_key,
    preload_features,
)
from monai_prompt.nets import FPTClassifier
from net_support import TINY_FPT_BACKBONE, fpt_images, tiny_fpt

#: a 2-block LPM: the cache needs no depth
TINY = {**TINY_FPT_BACKBONE, "num_layers": 2}


def cached_batch(items: list[dict], cache_dir, net: FPTClassifier) -> dict:
    loader = DataLoader(Dataset(items, LoadFPTFeaturesd("image", cache_dir, network=net)), batch_size=len(items))
    return next(iter(loader))


class Interrupted(Dataset):
    """Items of ``data`` until ``stop``, then a crash (a killed preload)."""

    def __init__(self, data: list[dict], stop: int) -> None:
        super().__init__(data)
        self.stop = stop

    def __getitem__(self, index: int) -> dict:
        if index >= self.stop:
            raise KeyboardInterrupt
        return super().__getitem__(index)


@pytest.mark.parametrize("variant", ["fpt", "fptplus"])
def test_preloaded_logits_equal_online_logits(tmp_path, variant):
    net = tiny_fpt(variant, seed=0, backbone_overrides=TINY).eval()
    items = fpt_images(4)
    report = preload_features(net, items, tmp_path, batch_size=3)
    assert (report.images, report.computed, report.reused, report.entries) == (4, 4, 0, 4)
    batch = cached_batch(items, tmp_path, net)
    assert batch["fpt_kv"].dtype == torch.float32 and list(batch["fpt_kv"].shape[1:]) == net.feature_shape
    with torch.no_grad():
        online = net(batch["image"])
        cached = net(batch["image"], batch["fpt_kv"])
    torch.testing.assert_close(cached, online, rtol=0, atol=1e-6)


def test_training_loop_reads_cache_and_never_runs_the_lpm(tmp_path, monkeypatch):
    net = tiny_fpt(seed=0, backbone_overrides=TINY).train()
    items = fpt_images(4)
    preload_features(net, items, tmp_path)
    chain = Compose(
        [
            LoadFPTFeaturesd("image", tmp_path, network=net),
            RandFlipd("image", prob=0.5, spatial_axis=1),  # augmentation touches the side input only
            Resized("image", spatial_size=(16, 16)),
        ]
    )

    def no_lpm(*args):
        raise AssertionError("the LPM ran during training from the cache")

    monkeypatch.setattr(net.lpm, "extract", no_lpm)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(Dataset(items, chain), batch_size=2),
        network=net,
        optimizer=torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=PrepareBatchExtraInput(extra_keys="fpt_kv"),
    )
    before = net.fusion.out_proj.weight.detach().clone()
    trainer.run()
    assert trainer.state.iteration == 2 and np.isfinite(trainer.state.output[0]["loss"])
    assert not torch.equal(net.fusion.out_proj.weight, before)


def test_miss_is_reported(tmp_path):
    net = tiny_fpt(seed=0, backbone_overrides=TINY).eval()
    preload_features(net, fpt_images(2), tmp_path)
    transform = LoadFPTFeaturesd("image", tmp_path, network=net)
    with pytest.raises(FPTCacheError, match="is not in the FPT cache"):
        transform(fpt_images(1, seed=9)[0])


def test_interrupted_preload_resumes(tmp_path):
    net = tiny_fpt(seed=0, backbone_overrides=TINY).eval()
    items = fpt_images(5)
    with pytest.raises(KeyboardInterrupt):
        preload_features(net, Interrupted(items, stop=3), tmp_path, batch_size=1)
    assert len(FPTFeatureCache(tmp_path, cache_identity(net))) == 3
    assert not list(tmp_path.rglob("*.tmp"))
    report = preload_features(net, items, tmp_path, batch_size=2)
    assert (report.computed, report.reused, report.entries) == (2, 3, 5)


def test_crash_while_writing_leaves_no_partial_entry(tmp_path, monkeypatch):
    net = tiny_fpt(seed=0, backbone_overrides=TINY).eval()
    items = fpt_images(1)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half an entry")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        preload_features(net, items, tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(cache_module, "save_file", save_file)
    assert preload_features(net, items, tmp_path).computed == 1


def test_stale_cache_is_detected_with_the_reason(tmp_path):
    net = tiny_fpt(seed=0, backbone_overrides=TINY).eval()
    preload_features(net, fpt_images(2), tmp_path)
    other_weights = tiny_fpt(seed=1, backbone_overrides=TINY).eval()
    with pytest.raises(FPTCacheError, match="stale FPT cache .*the LPM weights differ"):
        LoadFPTFeaturesd("image", tmp_path, network=other_weights)
    other_layers = tiny_fpt("fpt", seed=0, backbone_overrides=TINY, layers=[0, 1]).eval()
    with pytest.raises(FPTCacheError, match=r"extraction layers: \[1\] in the cache vs \[0, 1\] here"):
        LoadFPTFeaturesd("image", tmp_path, network=other_layers)
    with pytest.raises(FPTCacheError, match=r"stale FPT cache .*into a new cache directory \(a bundle's "
                                            r"--fpt_cache_dir, .*\), or replace it \(monai-prompt preload --overwrite; "
                                            r"a bundle: delete it\)\.$"):  # a bundle's --overwrite is its models/'
        preload_features(other_weights, fpt_images(2), tmp_path)
    report = preload_features(other_weights, fpt_images(1), tmp_path, overwrite=True)
    assert report.entries == 1
    LoadFPTFeaturesd("image", tmp_path, network=other_weights)


def test_entry_from_another_cache_is_refused(tmp_path):
    item = fpt_images(1)[0]
    key = content_key(item["image"])
    net, other = tiny_fpt(seed=0, backbone_overrides=TINY).eval(), tiny_fpt(seed=1, backbone_overrides=TINY).eval()
    preload_features(net, [item], tmp_path / "mine")
    preload_features(other, [item], tmp_path / "other")
    mine = FPTFeatureCache(tmp_path / "mine", cache_identity(net))
    shutil.copy(FPTFeatureCache(tmp_path / "other", cache_identity(other)).path(key), mine.path(key))
    with pytest.raises(FPTCacheError, match="another LPM/config was copied"):
        mine.load(key)


def test_only_empty_or_cache_directories_are_written(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FPTCacheError, match="neither empty nor an FPT feature cache"):
        preload_features(tiny_fpt(seed=0, backbone_overrides=TINY).eval(), fpt_images(1), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_fp16_storage_halves_disk_and_stays_close(tmp_path):
    net = tiny_fpt(seed=0, backbone_overrides=TINY).eval()
    items = fpt_images(3)
    full = preload_features(net, items, tmp_path / "fp32")
    half = preload_features(net, items, tmp_path / "fp16", storage_dtype="float16")
    values = int(np.prod(net.feature_shape))
    assert 0 < half.bytes_per_entry - 2 * values < 256  # payload + a small safetensors header
    assert 0 < full.bytes_per_entry - 4 * values < 256
    batch32, batch16 = cached_batch(items, tmp_path / "fp32", net), cached_batch(items, tmp_path / "fp16", net)
    assert batch16["fpt_kv"].dtype == torch.float16
    torch.testing.assert_close(batch16["fpt_kv"].float(), batch32["fpt_kv"], rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(net(batch16["image"], batch16["fpt_kv"]), net(batch32["image"]), rtol=0, atol=1e-3)
    with pytest.raises(FPTCacheError, match="stores float16, not float32"):
        preload_features(net, items, tmp_path / "fp16")
    cache = FPTFeatureCache(tmp_path / "fp16", cache_identity(net))
    with pytest.raises(FPTCacheError, match="not finite in float16"):
        cache.save("0" * 64, torch.full(net.feature_shape, 1e5))


def test_cli_keys_by_content_not_file_stem(tmp_path, capsys, caplog):
    """a/img.png and b/img.png differ (two entries); c/img.png is a copy of a/img.png (one shared entry); the
    summary comes once."""
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2))
    for folder, pixels in (("a", first), ("b", second), ("c", first)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "data" / folder / "img.png")
    net = tiny_fpt(seed=0, backbone_overrides=TINY).eval()
    weights = tmp_path / "lpm.safetensors"
    save_file({k: v.contiguous() for k, v in net.lpm.state_dict().items()}, str(weights))
    args = ["preload", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--backbone", "vit_tiny"]
    args += ["--img-size", "32", "--backbone-overrides", json.dumps(TINY), "--fpt-config", '{"side_img_size": 16}']
    caplog.set_level(logging.INFO)  # as the command configures logging (pytest's handler takes the place of its own)
    assert main([*args, "--pretrained", str(weights), "--batch-size", "2"]) == 0
    shown = capsys.readouterr().out.splitlines() + [record.getMessage() for record in caplog.records]
    assert [line for line in shown if line.startswith("FPT cache ")] == [
        f"FPT cache {tmp_path / 'cache'}: 3 images read, 2 computed, 1 already cached; 2 entries of 0.00 MiB "
        "(0.00 GiB)"]
    identity = cache_identity(net)
    cache = FPTFeatureCache(tmp_path / "cache", identity)
    assert len(cache) == 2
    chain = Compose([*classification_transforms(32, 2, 3), LoadFPTFeaturesd("image", tmp_path / "cache", network=net)])
    features = {f: chain({"image": str(tmp_path / "data" / f / "img.png")})["fpt_kv"] for f in "abc"}
    assert torch.equal(features["a"], features["c"]) and not torch.equal(features["a"], features["b"])
    online = net.lpm_features(chain({"image": str(tmp_path / "data" / "b" / "img.png")})["image"][None])[0]
    torch.testing.assert_close(features["b"], online, rtol=0, atol=1e-6)
    # another LPM: the CLI refuses the stale cache and names the fix
    with pytest.raises(SystemExit, match="stale FPT cache"):
        main(args)
    with pytest.raises(SystemExit, match=r"^preload: .*img\.png: shape \(3, 40, 40\) \(channel first\) has 2 spatial "
                                         r"dims but the network is 3D"):  # the root cause, not MONAI's wrapper
        main([*args, "--spatial-dims", "3", "--cache-dir", str(tmp_path / "cache3d")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^preload: --device cuda, but torch finds no CUDA device here"):
            main([*args, "--device", "cuda"])
