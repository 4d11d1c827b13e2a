"""DINOv2 backbone: loading (hub id or local directory) and multi-block patch features.

Anomalies are local, so features are the *patch tokens* of a few intermediate blocks — never the CLS or
register tokens, which summarise the whole image. Middle blocks localise better than the last one, whose
features are tuned for global semantics. Blocks after the deepest one requested are dropped at load time:
they would cost compute and memory and change nothing.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomalyvfm.declare import SettingError
from anomalyvfm.errors import UserInputError

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_layers(depth: int) -> tuple[int, ...]:
    """Default feature blocks for a backbone of `depth` blocks: one third and two thirds of the way in.

    Chosen on magnetic_tile from train + validation data with synthetic anomalies only
    (benchmarks/choose_settings.py, README "Choosing the defaults"): for ViT-S/14's 12 blocks, blocks 4 and 8
    gave the best validation image AUROC + AU-PRO; the last blocks localise far worse. Deeper models use
    the same fractions of their depth.
    """
    return tuple(sorted({max(1, round(depth * f)) for f in (1 / 3, 2 / 3)}))


class Backbone(nn.Module):
    """A (possibly truncated) DINOv2 returning L2-normalised patch features of chosen blocks.

    `layers` are 1-based block indices (block 1 is the first transformer block). Output of `forward` is
    `(B, h, w, len(layers) * hidden_size)`: one patch-feature grid per image, each block's part unit-norm
    so that no block dominates the distance.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, precision: str = "fp32") -> None:
        super().__init__()
        config = model.config
        depth = config.num_hidden_layers
        layers = default_layers(depth) if layers is None else layers
        bad = [layer for layer in layers if not 1 <= layer <= depth]
        if not layers or bad:
            raise SettingError(f"{{layers}} must be block indices in 1..{depth}, got {list(layers)}")
        if precision not in _DTYPES:
            raise SettingError(f"unknown {{precision}} '{precision}' (choose from {', '.join(_DTYPES)})")
        self.layers = tuple(sorted(set(int(layer) for layer in layers)))
        model.encoder.layer = model.encoder.layer[: max(self.layers)]
        self.model = model
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.precision = precision

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        dtype = _DTYPES[self.precision]
        if dtype is None or self.device.type != "cuda":
            return nullcontext()  # fp32 on CPU: half-precision CPU kernels are slower, not faster
        return torch.autocast("cuda", dtype=dtype)

    def block_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states of the requested blocks, all tokens: each `(B, prefix + h*w, hidden)`."""
        with self._autocast():
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return tuple(out.hidden_states[layer].float() for layer in self.layers)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, h*w, C)` patch features, each block's part L2-normalised; shape-agnostic, so the exported
        graph (`anomalyvfm.deploy.export`) is this method with dynamic height and width."""
        parts = [F.normalize(tokens[:, self.num_prefix_tokens :], dim=-1) for tokens in self.block_tokens(pixel_values)]
        return torch.cat(parts, dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, height, width = pixel_values.shape
        return self.patch_features(pixel_values).reshape(b, height // self.patch_size, width // self.patch_size, -1)


def load_backbone(
    name_or_path: str, layers: Sequence[int] | None = None, device: str = "cpu", precision: str = "fp32"
) -> Backbone:
    """Load DINOv2 from a Hugging Face hub id or a local directory, frozen and in eval mode.

    Offline machines cannot download hub weights; the error then says how to use a local directory.
    """
    from transformers import AutoModel  # imported here: transformers is slow to import
    from transformers.utils import logging as hf_logging

    local = Path(name_or_path)
    if local.exists() and not (local / "config.json").is_file():
        raise UserInputError(f"{local}: not a model directory (no config.json)")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"cannot load backbone '{name_or_path}' ({str(exc).splitlines()[0][:160]}). Offline? Save the model "
            "elsewhere with AutoModel.from_pretrained(ID).save_pretrained(DIR), copy DIR here and pass --backbone DIR"
        ) from None
    if getattr(model.config, "model_type", "") not in ("dinov2", "dinov2_with_registers"):
        raise UserInputError(f"{name_or_path}: expected a DINOv2 model, got model_type '{model.config.model_type}'")
    model.requires_grad_(False)
    backbone = Backbone(model.eval(), layers, precision)
    return backbone.to(device)


def save_blocks(source: str | Path, depth: int, out: Path) -> None:
    """The pretrained blocks up to `depth`, re-read from `source` (hub id or directory) and saved to `out`.

    Re-reading (rather than saving the loaded module) keeps LoRA weights out of the base weights: an
    adapted detector stores its adapter beside them, exactly as it is trained.
    """
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source))
    model.encoder.layer = model.encoder.layer[:depth]
    config = model.config.to_dict()
    for derived in ("out_features", "out_indices", "stage_names"):  # recomputed from the depth
        config.pop(derived, None)
    model.config = type(model.config)(**{**config, "num_hidden_layers": depth})
    model.save_pretrained(str(out))
