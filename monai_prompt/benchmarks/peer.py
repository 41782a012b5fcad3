"""The peer a user would pick instead: a HuggingFace ``transformers`` ViT with ``peft`` LoRA (or fully fine-tuned),
built at the efficiency benchmark's size so that it is measured beside the project's networks.

``transformers`` and ``peft`` are benchmark-only extras (``pip install "monai-prompt[benchmark]"``). The peer gets
its own best settings when the variant names them: ``blocks`` (any checkpointing mode) turns on its activation
checkpointing of every layer (non-reentrant, as ``peft`` recommends for frozen inputs), ``sdpa`` the ``"sdpa"``
attention implementation (else ``"eager"``), ``bf16``/``fp16`` ``torch.autocast``. LoRA: rank 8, alpha 8, no
dropout, on the query and value projections (the original LoRA placement; the same parameter count as the
project's default, rank 8 on the fused ``qkv``), the classifier trained as well.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

__all__ = ["PEER_METHODS", "PeerViT", "peer_delta_bytes", "require_peer"]

#: the peer's methods: ``peft`` LoRA on a transformers ViT, and that ViT fully fine-tuned.
PEER_METHODS = ("peft_lora", "hf_full")
#: what to install when the peer libraries are missing.
PEER_INSTALL = 'pip install "monai-prompt[benchmark]" (transformers and peft)'


def require_peer() -> None:
    """Raise an ``ImportError`` naming the install when ``transformers`` or ``peft`` is missing."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the peer rows need transformers and peft: {PEER_INSTALL} ({err}).") from err


class PeerViT(nn.Module):
    """A transformers ``ViTForImageClassification`` (random weights) returning logits, LoRA'd by ``peft`` or not.

    Args:
        method: ``"peft_lora"`` or ``"hf_full"``.
        shape: ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim``, ``patch_size`` of the ViT.
        img_size: input side.
        num_classes: logits.
        options: ``{"checkpointing", "sdpa", "autocast"}`` (see :meth:`BenchConfig.options`).
    """

    def __init__(self, method: str, shape: dict[str, int], img_size: int, num_classes: int,
                 options: dict[str, Any]) -> None:
        require_peer()
        from transformers import ViTConfig, ViTForImageClassification

        super().__init__()
        config = ViTConfig(image_size=img_size, patch_size=shape["patch_size"], hidden_size=shape["hidden_size"],
                           num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                           intermediate_size=shape["mlp_dim"], num_labels=num_classes)
        model = ViTForImageClassification._from_config(
            config, attn_implementation="sdpa" if options["sdpa"] else "eager")
        if options["checkpointing"] != "none":  # renamed in transformers 5
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "peft_lora":
            from peft import LoraConfig, get_peft_model

            # the query and value projections: "query"/"value" up to transformers 4, "q_proj"/"v_proj" from 5
            names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [name for name in ("query", "value", "q_proj", "v_proj") if name in names]
            lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                              modules_to_save=["classifier"])
            model = get_peft_model(model, lora)
        self.model, self.method = model, method
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options["autocast"])
        self.backbone_parameters = sum(p.numel() for n, p in model.named_parameters()
                                       if "classifier" not in n and "lora_" not in n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return self.model(pixel_values=x).logits
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.model(pixel_values=x).logits.float()

    def trainable_report(self) -> dict[str, float]:
        """Trainable parameters and their share of the ViT (classifier and LoRA excluded from the ViT)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "percent_of_backbone": 100 * trainable / self.backbone_parameters}


def peer_delta_bytes(net: PeerViT) -> int:
    """Bytes of what the peer saves: ``peft``'s adapter state dict, or the whole model's."""
    if net.method == "peft_lora":
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(net.model)
    else:
        state = net.model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes
