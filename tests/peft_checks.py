"""Checks every prompt-tuning method's tests share: what trains, what stays frozen, delta round trips."""

from pathlib import Path

import torch

from monai_prompt.peft import load_delta, save_delta


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms)."""
    return float((a - b).detach().norm() / b.detach().norm())


def perturb_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Move trainable parameters off their (often zero) init (LoRA's B, an adapter's up-projection) so every
    inserted path is active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def assert_adamw_trains_exactly(model: torch.nn.Module, expected: set[str]) -> None:
    """One loss backward gives non-zero gradients to exactly ``expected``; an AdamW step (weight decay on,
    over all parameters) leaves every frozen parameter bit-identical."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # a fixed input: some random ones leave every ReLU of a small adapter dead (no gradient), by chance
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(images).logsumexp(-1).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == expected
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def assert_delta_round_trip(model: torch.nn.Module, fresh: torch.nn.Module, path: Path) -> None:
    """After perturbing ``model``'s trainable parameters, its saved delta makes ``fresh`` (same backbone)
    give the same outputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(model(x), fresh(x))
    load_delta(fresh, save_delta(model, path))
    assert torch.equal(model(x), fresh(x))


def _outputs_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_efficiency_paths_match(model: torch.nn.Module, vit: torch.nn.Module, x: torch.Tensor) -> None:
    """Activation checkpointing and then SDPA on ``vit`` (the model's encoder) leave outputs and gradients of a
    float64 ``model`` in train mode unchanged (to rounding)."""
    plain = _outputs_and_grads(model, x)
    vit.set_grad_checkpointing(True)
    checkpointed = _outputs_and_grads(model, x)
    vit.set_grad_checkpointing(False)
    vit.set_sdpa(True)
    fused = _outputs_and_grads(model, x)
    for other in (checkpointed, fused):
        torch.testing.assert_close(other[0], plain[0], rtol=0, atol=1e-12)
        assert other[1].keys() == plain[1].keys()
        for name in plain[1]:
            torch.testing.assert_close(other[1][name], plain[1][name], rtol=1e-9, atol=1e-12)
