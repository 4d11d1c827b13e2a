"""LoRA adaptation settings and the names they choose from, kept free of torch so that the detector's
settings (and a torch-free front end) can declare them without loading the training code."""
from __future__ import annotations

from dataclasses import dataclass

from anomalyvfm.declare import SettingError, normalise, setting

# Projection kind → leaf module names it has had across transformers versions.
PROJECTION_NAMES = {"query": ("query", "q_proj"), "key": ("key", "k_proj"), "value": ("value", "v_proj")}
LOSSES = ("confidence", "bce")  # patch losses of `adaptation.losses`
# What the adapter is trained for: "heads" — patch/image classifier heads on synthetic anomalies (the
# heads' loss flows into the backbone); "compact" — the kNN distance the detector scores with
# (`losses.compactness_loss`; the heads are then trained on detached features, for head/fusion modes only).
OBJECTIVES = ("heads", "compact")


@dataclass(frozen=True)
class AdaptationConfig:
    """LoRA structure and training settings; defaults fit ViT-S/14 at 448 px in the 20 min CPU budget."""

    rank: int = setting(16, "LoRA rank", flag="--lora-rank", low=1)
    alpha: float = setting(32.0, "LoRA alpha", flag="--lora-alpha", low=0, low_open=True)
    dropout: float = setting(0.0, "LoRA dropout", flag="--lora-dropout", low=0)
    targets: tuple[str, ...] = setting(("query", "value"), "attention projections adapted", flag=None,
                                       choices=tuple(PROJECTION_NAMES))
    steps: int = setting(120, "training steps", flag="--lora-steps", low=1)
    batch_size: int = setting(8, "crops per step, half synthetic", flag="--lora-batch-size", low=2)
    lr: float = setting(5e-4, "AdamW learning rate", flag="--lora-lr", low=0, low_open=True)
    weight_decay: float = setting(0.01, "AdamW weight decay", flag=None, low=0)
    loss: str = setting("confidence", "patch loss", flag="--loss", choices=LOSSES)
    temperature: float = setting(0.5, "confidence-weighting temperature; large = plain BCE", flag="--temperature",
                                 low=0, low_open=True)
    crop_size: int = setting(224, "side of the square training crops, cut at the detector's scale; 0: the full "
                                  "short side", flag="--lora-image-size", low=0)
    objective: str = setting("heads", "what LoRA is trained for: heads (classifier heads on synthetic anomalies) or "
                                      "compact (the kNN distance itself: normal patches near normal, synthetic "
                                      "defects far; model selection on held-out defect types)",
                             flag="--lora-objective", choices=OBJECTIVES)
    margin: float = setting(0.1, "compact objective: synthetic-defect patches must lie this fraction beyond the "
                                 "farthest normal patch of the batch", flag="--lora-margin", low=0)
    distill: float = setting(1.0, "compact objective: weight of keeping normal features near the frozen ones",
                             flag="--lora-distill", low=0)
    eval_every: int = setting(20, "steps between validation scores", flag=None, low=1)
    patience: int = setting(3, "validation scores without improvement before stopping", flag=None, low=1)
    val_images: int = setting(16, "validation images scored for model selection", flag=None, low=1)

    def __post_init__(self) -> None:
        normalise(self)
        if not self.dropout < 1:
            raise SettingError(f"{{dropout}} must be below 1, got {self.dropout}")
        if 0 < self.crop_size < 14:
            raise SettingError(f"{{crop_size}} must be 0 (full short side) or at least 14, got {self.crop_size}")
