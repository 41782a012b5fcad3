"""The optimiser step in backward (``monai_prompt.engine.in_backward``): the same parameters as the usual step after
training with groups, a schedule, checkpointing and tied weights; one gradient alive at a time; checkpoints that
load into either; refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from bundle_support import REPO, TINY_BACKBONE, TINY_IMG_SIZE, copy_bundle, tiny_overrides
from monai_prompt.bundle_gen import BUNDLE_SPECS
from monai_prompt.engine import OptimizerInBackward, in_backward
from monai_prompt.nets import PromptClassifier
from monai_prompt.runs.runner import run_bundle


def _classifier(checkpointing: bool | str) -> PromptClassifier:
    torch.manual_seed(0)
    return PromptClassifier(3, "full", None, "vit_tiny", img_size=TINY_IMG_SIZE, backbone_overrides=TINY_BACKBONE,
                            grad_checkpointing=checkpointing, sdpa=True)


def _adamw(net: nn.Module) -> torch.optim.AdamW:
    """Two groups (the head at a higher rate, no weight decay), as a user may set them."""
    head = list(net.head.parameters())
    rest = [p for p in net.parameters() if all(p is not h for h in head)]
    return torch.optim.AdamW([{"params": rest}, {"params": head, "lr": 3e-3, "weight_decay": 0.0}],
                             lr=1e-3, weight_decay=0.05)


def _train(net: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
           steps: int, seed: int = 1) -> None:
    """``steps`` of the usual loop (zero_grad, backward, step, schedule) on random images."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.rand(4, 3, TINY_IMG_SIZE, TINY_IMG_SIZE, generator=generator)
        labels = torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        scheduler.step()


def _assert_same_parameters(first: nn.Module, second: nn.Module) -> None:
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("checkpointing", [False, "blocks", "mlp"])
def test_same_training_as_the_usual_step(checkpointing):
    """Four steps of AdamW with two groups and a cosine schedule give bit-identical parameters, also when
    activation checkpointing recomputes blocks inside backward (the update must not reach a recomputation)."""
    usual, fused = _classifier(checkpointing), _classifier(checkpointing)
    _assert_same_parameters(usual, fused)
    usual_optimizer = _adamw(usual)
    fused_optimizer = in_backward(_adamw(fused))
    for net, optimizer in ((usual, usual_optimizer), (fused, fused_optimizer)):
        _train(net, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4), steps=4)
    _assert_same_parameters(usual, fused)
    assert all(p.grad is None for p in fused.parameters())
    assert [g["lr"] for g in fused_optimizer.param_groups] == [g["lr"] for g in usual_optimizer.param_groups]


class _Tied(nn.Module):
    """A weight used twice (its gradient accumulates from both uses before the step) and one never used."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.tanh(self.shared(x))))


def test_tied_and_unused_parameters():
    torch.manual_seed(0)
    usual = _Tied()
    fused = copy.deepcopy(usual)
    optimizer = torch.optim.SGD(usual.parameters(), lr=0.1, momentum=0.9)
    fused_optimizer = OptimizerInBackward(fused.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(5, 6)
        for net, opt in ((usual, optimizer), (fused, fused_optimizer)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    _assert_same_parameters(usual, fused)
    torch.testing.assert_close(fused.unused, torch.ones(2), rtol=0, atol=0)
    assert fused.unused not in fused_optimizer.state


def test_one_gradient_alive_at_a_time():
    """The point of it: while backward runs, at most one parameter holds its gradient (measured by a hook that
    runs before each step and counts the live gradients)."""
    net = _classifier("blocks")
    params = [p for p in net.parameters() if p.requires_grad]
    live = []
    for param in params:  # registered first, so it runs before the optimiser's hook
        param.register_post_accumulate_grad_hook(lambda _: live.append(sum(p.grad is not None for p in params)))
    optimizer = OptimizerInBackward(params, torch.optim.AdamW, lr=1e-3)
    _train(net, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0), steps=1)
    assert len(live) == len(params) and max(live) == 1


def test_checkpoints_load_into_either_optimizer():
    """A resumed run continues exactly: the state saved by the in-backward optimiser loads into AdamW and back."""
    nets = [_classifier(False) for _ in range(3)]
    optimizers = [in_backward(_adamw(nets[0])), _adamw(nets[1]), in_backward(_adamw(nets[2]))]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6) for o in optimizers]
    _train(nets[0], optimizers[0], schedulers[0], steps=2)
    for net, optimizer, scheduler in zip(nets[1:], optimizers[1:], schedulers[1:]):
        net.load_state_dict(nets[0].state_dict())
        optimizer.load_state_dict(copy.deepcopy(optimizers[0].state_dict()))
        scheduler.load_state_dict(schedulers[0].state_dict())
    assert optimizers[1].state_dict()["param_groups"] == optimizers[0].state_dict()["param_groups"]
    for net, optimizer, scheduler in zip(nets, optimizers, schedulers):
        _train(net, optimizer, scheduler, steps=2, seed=2)
    _assert_same_parameters(nets[0], nets[1])
    _assert_same_parameters(nets[0], nets[2])


def test_refusals(monkeypatch):
    net = _classifier(False)
    stepped = torch.optim.AdamW(net.parameters(), lr=1e-3)
    _train(net, stepped, torch.optim.lr_scheduler.ConstantLR(stepped, factor=1.0), steps=1)
    with pytest.raises(ValueError, match="already stepped"):
        in_backward(stepped)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="--step_in_backward false"):
        in_backward(torch.optim.AdamW(net.parameters(), lr=1e-3))


@pytest.mark.parametrize("name", ["full_classification", "lora_segmentation", "full_3d_segmentation"])
def test_bundles_hand_amp_to_bf16_autocast_with_the_step_in_backward(name):
    """A GradScaler needs every gradient at once: with ``step_in_backward`` the trainer's fp16 AMP is off and the
    training network autocasts to bf16 itself (CUDA with ``amp``); without it, nothing changes."""
    for amp, step_in_backward, trainer_amp, autocast in (("true", "false", True, None), ("true", "true", False, "bf16"),
                                                          ("false", "true", False, None)):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
        parser.update({"amp": amp, "step_in_backward": step_in_backward})
        assert parser.get_parsed_content("train#trainer#amp") is trainer_amp
        assert parser.get_parsed_content("network_def#autocast_dtype") == autocast
    assert "step_in_backward" not in json.loads((REPO / "bundles" / "fpt_classification" / "configs" /
                                                 "train.json").read_text())


@pytest.mark.slow
def test_the_full_bundle_trains_the_same_with_the_step_in_backward(tiny, tmp_path):
    """Two epochs of the full fine-tuning bundle on the tiny data (fixed order, no augmentation): the weights and
    the optimiser state of the last checkpoint are those of the usual step."""
    spec = BUNDLE_SPECS["full_classification"]
    overrides = {**tiny_overrides(spec, tiny["data"], tiny["backbone"]), "shuffle": False,
                 "train#random_transforms": [], "train#trainer#max_epochs": 2}
    checkpoints = {}
    for setting in ("false", "true"):
        bundle = copy_bundle(spec.name, tmp_path / setting)
        workflow = run_bundle(bundle, ["train.json"], "train", step_in_backward=setting, **overrides)
        assert isinstance(workflow.parser.get_parsed_content("optimizer"), OptimizerInBackward) is (setting == "true")
        checkpoints[setting] = torch.load(bundle / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    usual, fused = checkpoints["false"], checkpoints["true"]
    assert usual["model"].keys() == fused["model"].keys() and len(usual["model"]) > 10
    assert all(torch.equal(usual["model"][key], fused["model"][key]) for key in usual["model"])
    assert fused["optimizer"]["param_groups"] == usual["optimizer"]["param_groups"]
    for index, state in usual["optimizer"]["state"].items():
        assert all(torch.equal(fused["optimizer"]["state"][index][k], v) for k, v in state.items())
