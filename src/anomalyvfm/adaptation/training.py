"""Training LoRA adapters and anomaly heads on synthetic anomalies made from good images — and on a plant's
real labelled defects when it has some (`fit --lora --defects DIR`).

Each batch is half normal crops, half crops with a three-stage synthetic anomaly (`synthesis`), made
on the fly from the training images, so the model never sees the same defect twice. With real labelled
defects, about `REAL_SHARE` of the anomalous crops are cut from them instead (a random defect, a crop holding
part of its outline, the outline as the patch targets): synthetic anomalies alone teach the heads the
synthetic defects, not the real ones (docs/adaptation.md). Crops are taken at
the detector's scale (short side = `image_size`, the same resize as at inference) so a patch covers
the same surface area in training as in scoring; `AdaptationConfig.crop_size` only sets the crop side,
which bounds the CPU cost of a step. Synthetic crops always contain part of their defect.

Two objectives (`AdaptationConfig.objective`):

* ``heads`` — the backbone is trained through classifier heads (patch + image logits) on the synthetic
  anomalies. Model selection scores the heads on validation crops with synthetic anomalies of the same
  families as training (image AUROC of the image head + patch AP of the patch head); it saturates near 2.
* ``compact`` — the backbone is trained for the kNN distance the detector scores with
  (`losses.compactness_loss`); the heads learn on detached features, only so head/fusion modes exist.
  Model selection is `knn_validation_score`: the same distance, on validation crops with anomalies of a
  family held out from training (`synthesis.HELD_OUT_STAGES`), against a memory of normal training
  crops. It is also scored before the first step, so an adapter that never beats the frozen features on
  unseen defect types is returned as the identity (LoRA's B = 0).

For both, the record holds the held-out kNN criterion before training and at the kept state, so a
study can relate it to test results. Every `eval_every` steps the best state is kept and training
stops after `patience` evaluations without improvement. Test data is never touched.
"""
from __future__ import annotations

import copy
import time
from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.adaptation.lora import add_lora, lora_parameters
from anomalyvfm.features.backbone import Backbone
from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import processed_size, to_tensor
from anomalyvfm.errors import UserInputError
from anomalyvfm.features.tiles import prefetch
from anomalyvfm.adaptation.heads import AnomalyHeads
from anomalyvfm.adaptation.losses import compactness_loss, patch_loss, patch_targets
from anomalyvfm.data.synthesis import HELD_OUT_STAGES, SynthesisConfig, synthesize

HELD_OUT = SynthesisConfig(stages=HELD_OUT_STAGES, weights=(1.0,) * len(HELD_OUT_STAGES))
REAL_SHARE = 0.5  # of the anomalous crops of a batch, the share cut from real labelled defects when there are any
LabelledDefect = tuple[ImageLike, np.ndarray]  # a real defect image and its outline (bool, at the image's size)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images (B,3,S,S), masks (B,S,S), labels (B,)


def _crop_origin(rng: np.random.Generator, length: int, side: int, must_hold: int | None) -> int:
    """Start of a `side`-long window in `length`, uniform, containing index `must_hold` when given."""
    low, high = 0, length - side
    if must_hold is not None:
        low, high = max(low, must_hold - side + 1), min(high, must_hold)
    return int(rng.integers(low, high + 1))


def make_sample(
    images: Sequence[ImageLike], index: int, synthetic: bool, rng: np.random.Generator, image_size: int,
    crop: int | None, patch_size: int, synthesis: SynthesisConfig = SynthesisConfig(),
    defect: LabelledDefect | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One square training crop `(3, S, S)` and its mask coverage `(S, S)` in [0, 1]: a normal crop, one with a
    synthetic anomaly, or (`defect` given) a crop of that real labelled defect image holding part of its outline.

    The anomaly is synthesised at the image's own resolution (defect sizes are relative to it), then
    image and mask go through the inference resize.
    """
    if defect is not None:
        image, mask = load_rgb(defect[0]), np.asarray(defect[1], bool)
    else:
        image = load_rgb(images[index])
        mask = np.zeros(image.shape[:2], dtype=bool)
    if synthetic and defect is None:
        donor = load_rgb(images[(index + int(rng.integers(1, len(images)))) % len(images)]) if len(images) > 1 else None
        image, mask = synthesize(image, int(rng.integers(2**31)), synthesis, donor=donor)
    size = processed_size(*image.shape[:2], image_size, patch_size)
    pixels = to_tensor(image, size)
    cover = F.interpolate(torch.from_numpy(mask).float()[None, None], size=size, mode="bilinear", antialias=True,
                          align_corners=False)[0, 0]
    side = min(size) if crop is None else min(min(size), crop // patch_size * patch_size)
    hold = divmod(int(cover.argmax()), size[1]) if synthetic else (None, None)
    top = _crop_origin(rng, size[0], side, hold[0])
    left = _crop_origin(rng, size[1], side, hold[1])
    window = (slice(top, top + side), slice(left, left + side))
    return pixels[(slice(None), *window)], cover[window]


def make_batch(images: Sequence[ImageLike], picks: Sequence[int], rng: np.random.Generator, image_size: int,
               crop: int | None, patch_size: int, synthesis: SynthesisConfig = SynthesisConfig(),
               synthetic_share: float = 0.5, defects: Sequence[LabelledDefect] = ()) -> Batch:
    """Crops of `picks`: the first part normal, the last `synthetic_share` anomalous — with a synthetic anomaly,
    or, with `defects` given, for about `REAL_SHARE` of them a crop of a real labelled defect drawn at random."""
    first = len(picks) - round(len(picks) * synthetic_share)
    synthetic = [i >= first for i in range(len(picks))]
    real = [defects[int(rng.integers(len(defects)))] if s and defects and rng.random() < REAL_SHARE else None
            for s in synthetic]  # no draw without defects: the batches of a fit without them stay as they were
    samples = [make_sample(images, k, s, rng, image_size, crop, patch_size, synthesis, d)
               for k, s, d in zip(picks, synthetic, real)]
    return (torch.stack([x for x, _ in samples]), torch.stack([m for _, m in samples]),
            torch.tensor(synthetic, dtype=torch.float32))


def _ranking(metric: str, labels: torch.Tensor, scores: torch.Tensor) -> float:
    """AUROC or average precision; 0 when `labels` hold a single class (nothing to rank)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if not 0 < labels.sum() < len(labels):
        return 0.0
    fn = roc_auc_score if metric == "auroc" else average_precision_score
    return float(fn(labels.numpy(), scores.numpy()))


@torch.inference_mode()
def validation_score(backbone: Backbone, heads: AnomalyHeads, batch: Batch, batch_size: int) -> float:
    """Image AUROC of the image head + patch average precision of the patch head on a fixed validation batch.

    Defect patches are rare, so patch AUROC saturates within a few steps while AP still separates
    models. Border patches (0 < coverage < 0.5) are left out: their label is a matter of definition,
    not of detection.
    """
    backbone.eval()
    heads.eval()
    images, masks, labels = batch
    outputs = [heads(backbone(x.to(backbone.device))) for x in images.split(batch_size)]
    patch_logits = torch.cat([p for p, _ in outputs]).cpu().reshape(-1)
    image_logits = torch.cat([i for _, i in outputs]).cpu()
    targets = patch_targets(masks, backbone.patch_size).reshape(-1)
    keep = (targets == 0) | (targets >= 0.5)
    return _ranking("auroc", labels, image_logits) + _ranking("ap", (targets[keep] >= 0.5).float(), patch_logits[keep])


def _features(backbone: Backbone, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([backbone(x.to(backbone.device)) for x in images.split(batch_size)])


@torch.inference_mode()
def knn_validation_score(backbone: Backbone, memory: torch.Tensor, batch: Batch, batch_size: int) -> float:
    """Image AUROC of the max patch kNN distance + patch AP of the kNN distance, on a validation batch.

    This is the detector's distance scorer in miniature: `memory` holds normal training crops (their
    patches are the memory bank), `batch` holds validation crops as is and with held-out synthetic
    defects, so the criterion counts false alarms on normal validation images and misses on defect
    types the adapter was not trained on. Border patches are left out as in `validation_score`.
    """
    backbone.eval()
    images, masks, labels = batch
    bank = _features(backbone, memory, batch_size)
    bank = bank.reshape(-1, bank.shape[-1])
    distances = []
    for x in images.split(batch_size):
        query = backbone(x.to(backbone.device))
        nearest = torch.cdist(query.reshape(-1, bank.shape[-1]), bank).min(dim=-1).values
        distances.append(nearest.reshape(query.shape[:3]).cpu())
    distance = torch.cat(distances)
    targets = patch_targets(masks, backbone.patch_size)
    keep = (targets == 0) | (targets >= 0.5)
    return (_ranking("auroc", labels, distance.flatten(1).max(dim=1).values)
            + _ranking("ap", (targets[keep] >= 0.5).float(), distance[keep]))


def _training_batch(images: Sequence[ImageLike], size: int, seed: int, image_size: int, crop: int | None, patch: int,
                    defects: Sequence[LabelledDefect], step: int) -> Batch:
    rng = np.random.default_rng([seed, 2, step])  # per step: the same batches whatever the thread timing
    return make_batch(images, rng.integers(len(images), size=size), rng, image_size, crop, patch, defects=defects)


def _criterion_batches(train_images: Sequence[ImageLike], val_images: Sequence[ImageLike], config: AdaptationConfig,
                       seed: int, image_size: int, crop: int | None, patch: int) -> tuple[Batch, Batch, torch.Tensor]:
    """The fixed batches model selection is judged on: validation crops with synthetic defects (objective
    `heads`); the held-out criterion's validation crops as is and with unseen defect types, and the normal
    training crops they are compared against (objective `compact`)."""
    val_picks = np.linspace(0, len(val_images) - 1, min(config.val_images, len(val_images))).round().astype(int)
    twice = np.concatenate([val_picks, val_picks])
    val_batch = make_batch(val_images, twice, np.random.default_rng([seed, 1]), image_size, crop, patch)
    held_out = make_batch(val_images, twice, np.random.default_rng([seed, 3]), image_size, crop, patch, HELD_OUT)
    memory_picks = np.linspace(0, len(train_images) - 1, min(config.val_images, len(train_images))).round().astype(int)
    memory = make_batch(train_images, memory_picks, np.random.default_rng([seed, 4]), image_size, crop, patch,
                        synthetic_share=0.0)[0]
    return val_batch, held_out, memory


def _train_step(backbone: Backbone, peft_model, heads: AnomalyHeads, batch: Batch,
                config: AdaptationConfig) -> torch.Tensor:
    """One batch's loss: the heads' patch and image losses, plus (objective `compact`) the compactness loss
    of the adapted features against the frozen ones — then the heads learn on the adapted features without
    steering them."""
    x, masks, labels = batch
    backbone.train()
    heads.train()
    x = x.to(backbone.device)
    features = backbone(x)
    targets = patch_targets(masks, backbone.patch_size).to(features.device)
    loss = features.new_zeros(())
    if config.objective == "compact":
        with torch.no_grad(), peft_model.disable_adapter():
            frozen = backbone(x)
        loss, _ = compactness_loss(features, frozen, targets, labels.to(features.device) == 0, config.margin,
                                   config.distill)
        features = features.detach()
    patch_logits, image_logits = heads(features)
    return (loss + patch_loss(patch_logits, targets, config.loss, config.temperature)
            + F.binary_cross_entropy_with_logits(image_logits, labels.to(image_logits.device)))


def train_adapter(
    backbone: Backbone, train_images: Sequence[ImageLike], val_images: Sequence[ImageLike], config: AdaptationConfig,
    image_size: int, seed: int = 0, progress: bool = True, defects: Sequence[LabelledDefect] = (),
):
    """Add LoRA to `backbone` and train it with fresh heads (and `defects`: real outlined defects, module docstring);
    return `(peft model, heads, record)`. On return the backbone holds the best adapter state (by the objective's
    validation criterion), and both are in eval mode, so dropout is off for feature extraction."""
    if not train_images or not val_images:
        raise UserInputError("LoRA training needs training and validation (good) images")
    torch.manual_seed(seed)
    start = time.perf_counter()
    peft_model = add_lora(backbone, config.rank, config.alpha, config.dropout, config.targets)
    heads = AnomalyHeads(backbone.feature_dim).to(backbone.device)
    adapter = lora_parameters(backbone)
    optimizer = torch.optim.AdamW([*adapter.values(), *heads.parameters()], lr=config.lr, weight_decay=config.weight_decay)
    patch, crop, compact = backbone.patch_size, config.crop_size or None, config.objective == "compact"
    val_batch, held_out, memory = _criterion_batches(train_images, val_images, config, seed, image_size, crop, patch)
    held_out_score = partial(knn_validation_score, backbone, memory, held_out, config.batch_size)
    criterion = held_out_score if compact else partial(validation_score, backbone, heads, val_batch, config.batch_size)
    batch_for = partial(_training_batch, train_images, config.batch_size, seed, image_size, crop, patch, defects)

    def snapshot() -> tuple:
        return {k: v.detach().clone() for k, v in adapter.items()}, copy.deepcopy(heads.state_dict())

    frozen_held_out = held_out_score()  # LoRA starts as the identity: this is the frozen features' criterion
    best: tuple[float, int, tuple] = (frozen_held_out, 0, snapshot()) if compact else (-np.inf, 0, ())
    history, stale = [(0, round(frozen_held_out, 4))] if compact else [], 0
    bar = tqdm(total=config.steps, desc="LoRA training", disable=not progress, unit="step")
    for step, batch in enumerate(prefetch(batch_for, range(config.steps), depth=2), start=1):
        loss = _train_step(backbone, peft_model, heads, batch, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", best_val=f"{best[0]:.3f}@{best[1]}")
        if step % config.eval_every and step != config.steps:
            continue
        score = criterion()
        history.append((step, round(score, 4)))
        if score > best[0]:
            best, stale = (score, step, snapshot()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    with torch.no_grad():  # the best state back into the backbone's adapter and the heads
        for name, value in best[2][0].items():
            adapter[name].copy_(value)
    heads.load_state_dict(best[2][1])
    backbone.eval()
    record = {"objective": config.objective, "steps_run": step, "best_step": best[1],
              "best_validation_score": round(best[0], 4), "validation_history": history,
              "held_out_frozen": round(frozen_held_out, 4),
              "held_out_kept": round(best[0] if compact else held_out_score(), 4),
              "seconds": round(time.perf_counter() - start, 1),
              "trainable_parameters": sum(p.numel() for p in adapter.values()), "real_defects": len(defects)}
    return peft_model, heads.cpu().eval(), record
