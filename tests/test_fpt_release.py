"""FPT training from the preload cache without holding the LPM: ``FPTClassifier.release_lpm``.

The released network trains from cached features, keeps its fingerprints (cache and delta), and the delta it saves
loads into a fresh network built with the LPM weights and gives the same logits online.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import PrepareBatchExtraInput
from monai.transforms import Compose, Resized

from bundle_support import copy_bundle, tiny_overrides
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS
from monai_prompt.fpt import LoadFPTFeaturesd, cache_identity, preload_features
from monai_prompt.nets import FPTClassifier
from monai_prompt.peft import delta_state_dict, load_delta, save_delta, trainable_report
from monai_prompt.runs.runner import run_bundle
from net_support import TINY_FPT_BACKBONE as TINY
from net_support import fpt_images, tiny_fpt


@pytest.mark.parametrize("variant", ["fpt", "fptplus"])
def test_train_from_cache_after_release_then_online_logits_of_a_fresh_network(tmp_path, variant):
    lpm_file = tmp_path / "lpm.pt"
    net = tiny_fpt(variant, seed=0)
    torch.save(net.lpm.state_dict(), lpm_file)
    items = fpt_images(4, seed=1)
    preload_features(net, items, tmp_path / "cache")
    identity, report, meta = cache_identity(net), trainable_report(net), delta_state_dict(net)["peft"]

    net.release_lpm()
    assert all(p.device.type == "meta" for p in net.lpm.parameters())
    assert net.to("cpu").float() is net and all(p.device.type == "meta" for p in net.lpm.parameters())
    assert cache_identity(net) == identity and net.cache_fingerprint() == identity["fingerprint"]
    assert trainable_report(net) == report and delta_state_dict(net)["peft"] == meta
    chain = Compose([LoadFPTFeaturesd("image", tmp_path / "cache", network=net), Resized("image", (16, 16))])
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(Dataset(items, chain), batch_size=2),
        network=net,
        optimizer=torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=PrepareBatchExtraInput(extra_keys="fpt_kv"),
    )
    before = net.fusion.out_proj.weight.detach().clone()
    trainer.run()
    assert trainer.state.iteration == 2 and not torch.equal(net.fusion.out_proj.weight, before)

    delta = torch.load(save_delta(net, tmp_path / "delta.pt"), weights_only=True)
    fresh = tiny_fpt(variant, pretrained=str(lpm_file), seed=5).eval()
    load_delta(fresh, delta)  # tied to the LPM weights the released network recorded
    lookup = DataLoader(Dataset(items, LoadFPTFeaturesd("image", tmp_path / "cache", network=net)), batch_size=4)
    batch = next(iter(lookup))
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch["image"]), net.eval()(batch["image"], batch["fpt_kv"]),
                                   rtol=0, atol=1e-6)
    released_again = tiny_fpt(variant, pretrained=str(lpm_file), seed=6)
    released_again.release_lpm()
    load_delta(released_again, delta)  # a resumed training loads its delta into the released network too
    with pytest.raises(RuntimeError, match=r"weights were released .* pretrained= to run the LPM online"):
        net(batch["image"])
    with pytest.raises(RuntimeError, match="weights were released"):
        preload_features(net, items, tmp_path / "other_cache")


#: DDP over a released network, in a process of its own that ends with os._exit: gloo's process-group destructor
#: joins its worker threads while holding the GIL and can deadlock in the process that ran the work, so the test
#: process never tears a process group down.
_DDP_RELEASED = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from net_support import tiny_fpt
net = tiny_fpt(seed=0)
kv = net.lpm_features(torch.rand(2, 3, 32, 32))
net.release_lpm()
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
ddp = torch.nn.parallel.DistributedDataParallel(net)
ddp(torch.rand(2, 3, 16, 16), kv).sum().backward()
print("side gradient:", net.fusion.out_proj.weight.grad is not None, flush=True)
os._exit(0)
"""


def test_ddp_skips_the_released_lpm(tmp_path):
    result = subprocess.run([sys.executable, "-c", _DDP_RELEASED, str(Path(__file__).parent), str(tmp_path / "store")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "side gradient: True" in result.stdout


@pytest.mark.slow
def test_fptplus_bundle_trains_from_the_cache_after_release(tiny, tmp_path):
    """The FPT bundles' training with the release step after the preload (notes: fpt_bundle_change.md): training
    and validation run on the released network, the delta loads for the online evaluation."""
    spec = BUNDLE_SPECS["fptplus_classification"]
    bundle = copy_bundle(spec.name, tmp_path)
    overrides = tiny_overrides(spec, tiny["data"], tiny["backbone"])
    initialize = ConfigParser.load_config_file(str(bundle / "configs" / "train.json"))["initialize"]
    initialize = [*initialize, "$@network_def.release_lpm()"]
    workflow = run_bundle(bundle, ["train.json"], "train", **overrides, initialize=initialize,
                          **{"train#trainer#max_epochs": 1})
    network = workflow.parser.get_parsed_content("network_def")
    assert all(p.device.type == "meta" for p in network.lpm.parameters())
    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert delta["peft"]["backbone"]["fingerprint"] == delta_state_dict(network)["peft"]["backbone"]["fingerprint"]
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", **overrides)  # the fresh network loads the delta
    assert os.path.getsize(bundle / "eval" / "metrics.csv") > 0
    assert json.loads((bundle / "models" / "training_config.json").read_text())


def test_side_sdpa_gives_the_literal_logits_and_gradients():
    """``sdpa=True`` (the memory-lean setting for training from the cache) changes only how the side network's
    attention is computed: float64 logits and gradients equal the literal path."""
    literal = tiny_fpt("fpt", seed=0).double()
    fused = tiny_fpt("fpt", seed=0).double()
    fused.load_state_dict(literal.state_dict())
    fused.side.vit.set_sdpa(True)
    assert not literal.side.vit.blocks[0].attn.use_flash_attention
    assert FPTClassifier(3, "fpt", {"side_img_size": 16}, backbone="vit_tiny", img_size=32, backbone_overrides=TINY,
                         sdpa=True).side.vit.blocks[0].attn.use_flash_attention
    assert not fused.lpm.blocks[0].attn.use_flash_attention  # the LPM needs its attention probabilities
    kv = literal.lpm_features(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    image = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    outputs = []
    for net in (literal, fused):
        logits = net.eval()(image, kv)  # eval: no fusion dropout; gradients still flow
        logits.square().sum().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-10, atol=1e-12)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-9, atol=1e-12, msg=name)
