"""Checks every prompt-tuning method's tests share: what trains, what stays frozen, delta round trips."""

from pathlib import Path

import torch

from monai_prompt.peft import load_delta, save_delta


def assert_adamw_trains_exactly(model: torch.nn.Module, expected: set[str]) -> None:
    """One loss backward gives non-zero gradients to exactly ``expected``; an AdamW step (weight decay on,
    over all parameters) leaves every frozen parameter bit-identical."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
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
