"""LoRA adapters in DINOv2's attention projections (peft), added to a loaded `Backbone`.

Low-rank updates of the query and value projections let the backbone move its patch features towards
what separates defects from normal surface, while every pretrained weight stays frozen: the adapter is
a few hundred kB instead of a copy of the model, and removing it gives back the original features.

The adapter is injected *in place* into `backbone.model`, so `Backbone.forward` is the same code with
and without it. Projection names differ between transformers versions (5.x: `attention.q_proj`; 4.x:
`attention.attention.query`), so targets are found from the model's modules, not hard-coded.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from torch import nn

from anomalyvfm.features.backbone import Backbone
from anomalyvfm.adaptation.config import PROJECTION_NAMES
from anomalyvfm.errors import UserInputError
from anomalyvfm.optional import require


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning
    on every call; it is about peft's internals, not anything a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def find_lora_targets(model: nn.Module, kinds: Sequence[str] = ("query", "value")) -> list[str]:
    """Full names of the `nn.Linear` attention projections of the given kinds, in module order.

    Full names (not leaf names) make peft match exactly these layers and nothing else that happens to
    share a leaf name.
    """
    unknown = [kind for kind in kinds if kind not in PROJECTION_NAMES]
    if not kinds or unknown:
        raise UserInputError(f"LoRA targets must be among {', '.join(PROJECTION_NAMES)}, got {list(kinds)}")
    leaves = {leaf for kind in kinds for leaf in PROJECTION_NAMES[kind]}
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in leaves and ".attention" in f".{name}"
    ]
    if not targets:
        raise UserInputError(f"no attention {'/'.join(kinds)} projections found in {type(model).__name__}")
    return targets


def add_lora(backbone: Backbone, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             kinds: Sequence[str] = ("query", "value")):
    """Inject fresh LoRA adapters into `backbone.model`; return the `PeftModel` (for `save_pretrained`).

    Only the adapter weights are trainable afterwards; peft initialises B to zero, so the adapted
    backbone starts out computing exactly the frozen features.
    """
    peft = require("peft", "lora", "LoRA adaptation")  # imported here: optional, and it pulls in transformers

    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise UserInputError(f"need --lora-rank >= 1, --lora-alpha > 0, 0 <= --lora-dropout < 1; "
                             f"got {rank}, {alpha}, {dropout}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=find_lora_targets(backbone.model, kinds))
    with _quiet_peft():
        return peft.get_peft_model(backbone.model, config)


def load_lora(backbone: Backbone, directory: str | Path):
    """Inject a saved adapter (written by `PeftModel.save_pretrained`) into `backbone.model`, frozen."""
    peft = require("peft", "lora", "A LoRA-adapted model")
    if not (Path(directory) / "adapter_config.json").is_file():
        raise UserInputError(f"{directory}: no LoRA adapter (adapter_config.json missing)")
    with _quiet_peft():
        return peft.PeftModel.from_pretrained(backbone.model, str(directory), is_trainable=False)


def lora_parameters(backbone: Backbone) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name (the only trainable ones of an adapted backbone)."""
    return {name: p for name, p in backbone.named_parameters() if "lora_" in name}
