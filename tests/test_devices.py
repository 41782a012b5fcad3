"""Device-agnostic by construction: every method on every network runs forward and backward on the ``meta`` device.

A tensor the code creates without the input's device (``torch.zeros(n)`` in a forward, a buffer built at call time,
a mask made on the CPU) meets a ``meta`` tensor and fails here ("Tensor on device cpu is not on the expected device
meta"), as it would fail on a user's GPU. A host sync (``.item()``, ``.tolist()`` on an activation) fails too, which
on a GPU would stall every step. The AMP paths run under CPU autocast in bf16 and fp16 on real tensors.
"""

from __future__ import annotations

import pytest
import torch

from bundle_support import TINY_BACKBONE, TINY_IMG_SIZE
from monai_prompt.backbones.registry import family_names
from monai_prompt.backbones.vit import CHECKPOINT_MODES
from monai_prompt.nets import FPTClassifier, PromptClassifier, PromptUNETR
from monai_prompt.peft import method_names
from monai_prompt.peft.registry import get_method
from net_support import TINY_FPT_BACKBONE

CLASSES = 3
#: the tiny shapes of each in-backbone family at 32 x 32 (TinyViT: LiteMedSAM's layout; SAM: windows and global blocks).
FAMILY_BACKBONES = {
    "vit": ("vit_tiny", TINY_BACKBONE),
    "tinyvit": (
        "lite_medsam",
        {"embed_dims": (8, 16, 24, 32), "depths": (1, 2, 1, 1), "num_heads": (1, 2, 3, 4),
         "window_sizes": (7, 7, 8, 5), "neck_dim": 16},
    ),
    "sam": (
        "sam_vit_b",
        {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "out_chans": 16, "window_size": 3,
         "global_attn_indexes": (1, 3)},
    ),
}
FPT_METHODS = ("fpt", "fptplus")


def _in_backbone_cases() -> list[tuple[str, str]]:
    """``(family, method)`` for every method that family supports (FPT builds its own network)."""
    return [
        (family, method)
        for family in FAMILY_BACKBONES
        for method in method_names()
        if method not in FPT_METHODS and family in get_method(method).families
    ]


def _assert_runs_on_meta(net: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward and backward of ``net`` on the meta device; outputs and every trainable gradient stay there."""
    net = net.to("meta").train()
    out = net(x.to("meta"))
    assert out.device.type == "meta"
    out.float().sum().backward()
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    assert trainable, "the method left nothing trainable"
    missing = [name for name, p in trainable if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert {p.grad.device.type for _, p in trainable} == {"meta"}


def test_every_family_is_covered():
    assert set(FAMILY_BACKBONES) == set(family_names()) - {"lpm"}


@pytest.mark.parametrize(("family", "method"), _in_backbone_cases())
@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_classifier_runs_on_meta(family, method, sdpa):
    backbone, overrides = FAMILY_BACKBONES[family]
    torch.manual_seed(0)
    net = PromptClassifier(CLASSES, method, backbone=backbone, img_size=TINY_IMG_SIZE, backbone_overrides=overrides,
                           sdpa=sdpa)
    _assert_runs_on_meta(net, torch.rand(2, 3, TINY_IMG_SIZE, TINY_IMG_SIZE))


@pytest.mark.parametrize("method", [m for m in method_names() if m not in FPT_METHODS])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unetr_runs_on_meta(method, spatial_dims):
    size = 32
    torch.manual_seed(0)
    net = PromptUNETR(1, CLASSES, size, method, backbone="vit_tiny", spatial_dims=spatial_dims, feature_size=4,
                      backbone_overrides={**TINY_BACKBONE, "patch_size": 16}, sdpa=True)
    _assert_runs_on_meta(net, torch.rand(1, 1, *[size] * spatial_dims))


@pytest.mark.parametrize("mode", list(CHECKPOINT_MODES))
def test_checkpointing_runs_on_meta(mode):
    net = PromptClassifier(CLASSES, "lora", backbone="vit_tiny", img_size=TINY_IMG_SIZE,
                           backbone_overrides=TINY_BACKBONE, grad_checkpointing=mode, sdpa=True)
    _assert_runs_on_meta(net, torch.rand(2, 3, TINY_IMG_SIZE, TINY_IMG_SIZE))


@pytest.mark.parametrize("method", FPT_METHODS)
def test_fpt_runs_on_meta(method):
    """Online (the LPM runs in the forward) and from cached LPM features (the side network alone)."""
    torch.manual_seed(0)
    net = FPTClassifier(CLASSES, method, {"side_img_size": 16}, backbone="vit_tiny", img_size=32,
                        backbone_overrides=TINY_FPT_BACKBONE, sdpa=True)
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        cached = net.lpm_features(image)
    _assert_runs_on_meta(net, image)
    net.zero_grad()
    out = net(torch.rand(2, 3, 16, 16, device="meta"), fpt_kv=cached.to("meta"))
    out.sum().backward()
    assert out.device.type == "meta"


def test_meta_run_catches_a_tensor_made_on_the_cpu():
    """The check can fail: a forward that makes its own CPU tensor is caught."""

    class CPUBias(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + torch.zeros(self.out_features)

    with pytest.raises(RuntimeError, match="device"):
        _assert_runs_on_meta(CPUBias(4, 2), torch.rand(2, 4))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["lora", "ept", "dvpt"])
def test_cpu_autocast_trains(method, dtype):
    """The AMP path (``autocast_dtype``) on the CPU: finite logits in float32 and finite gradients."""
    torch.manual_seed(0)
    net = PromptClassifier(CLASSES, method, backbone="vit_tiny", img_size=TINY_IMG_SIZE,
                           backbone_overrides=TINY_BACKBONE, autocast_dtype=dtype, sdpa=True)
    out = net(torch.rand(2, 3, TINY_IMG_SIZE, TINY_IMG_SIZE))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
