"""The CLIP training recipe (Radford et al. 2021, section 2.5): one optimizer step's pieces.

- the model: an open_clip architecture, seeded, its temperature initialized to
  ``--temperature-init`` (CLIP: 0.07) and clamped after every step so logits are scaled by at
  most 100;
- AdamW with decoupled weight decay, none on gains, biases and the logit scale;
- linear warmup then cosine decay (:func:`lr_at`);
- :func:`forward_backward`: the symmetric contrastive loss and its gradients, with gradient
  accumulation that keeps the contrastive batch whole (features of the other micro-batches are
  cached, as open_clip does);
- :func:`optimizer_step`: unscale (fp16), clip the global gradient norm, step, clamp.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from wit_pipeline import models
from wit_pipeline.train.config import TrainConfig
from wit_pipeline.train.distributed import unwrap

MAX_LOGIT_SCALE = 100.0


def build_model(cfg: TrainConfig, device: str) -> Any:
    """A fresh (or ``--pretrained``-initialized) open_clip model in training mode."""
    import open_clip
    import torch

    models.model_config(cfg.model)  # clear error for unknown names
    if cfg.pretrained:
        model = models.load_model(cfg.model, cfg.pretrained, device="cpu").model
    else:
        torch.manual_seed(cfg.seed)
        with models.quiet_open_clip():
            model = open_clip.create_model(cfg.model, device="cpu")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg.temperature_init))
    model.output_dict = True
    return model.to(torch.device(device)).train()


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def no_weight_decay(name: str, param: Any) -> bool:
    """Gains, biases, the logit scale (and other 1-d parameters) get no weight decay (CLIP)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: first the parameters without weight decay, then those with it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def clamp_logit_scale(model: Any, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep ``exp(logit_scale)`` in [1, max_scale] (the CLIP paper clips it at 100)."""
    import torch

    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(max_scale))


def make_optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW over :func:`param_groups`, fused where the device has the kernel."""
    import torch

    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    # The fused kernel updates every tensor in one pass (CPU and CUDA), several times faster than
    # the per-tensor loop for models with a large token embedding.
    try:
        return torch.optim.AdamW(param_groups(model, cfg.wd), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # devices without a fused kernel
        return torch.optim.AdamW(param_groups(model, cfg.wd), **kwargs)


def forward_backward(
    model: Any, loss_fn: Any, images: list, texts: list, autocast: Any, scaler: Any
) -> float:
    """Loss and gradients for one optimizer step over ``len(images)`` micro-batches.

    With one micro-batch this is the plain step. With several, the features of every
    micro-batch are first computed without gradients; each micro-batch is then re-run with
    gradients and its loss computed against the cached features of the others, so the
    contrastive batch (and every negative) is the whole accumulated batch.

    Under DDP every backward but the last runs in ``model.no_sync()`` (gradients accumulate
    locally), and the last one, where DDP reduces, reaches every parameter: it is the one that
    takes the temperature's gradient. DDP without ``find_unused_parameters`` needs both.
    """
    import torch

    def backward(loss: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(images) == 1:
        with autocast:
            out = model(images[0], texts[0])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        backward(loss)
        return float(loss.detach())
    cached_img, cached_txt = [], []
    with torch.no_grad(), autocast:
        for x, t in zip(images, texts, strict=True):
            out = model(x, t)
            cached_img.append(out["image_features"])
            cached_txt.append(out["text_features"])
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    last = len(images) - 1
    total = 0.0
    for j, (x, t) in enumerate(zip(images, texts, strict=True)):
        # DDP's no_sync must cover the forward too: the forward arms the reducer.
        with no_sync() if j < last else contextlib.nullcontext():
            with autocast:
                out = model(x, t)
                img = torch.cat([*cached_img[:j], out["image_features"], *cached_img[j + 1 :]])
                txt = torch.cat([*cached_txt[:j], out["text_features"], *cached_txt[j + 1 :]])
                # Every pass sees the whole loss; the temperature's gradient is taken once (on
                # the last pass), so the summed gradients equal one step over the whole batch.
                scale = out["logit_scale"] if j == last else out["logit_scale"].detach()
                loss = loss_fn(img, txt, scale)
            backward(loss)
        total = float(loss.detach())
    return total


def optimizer_step(model: Any, optimizer: Any, scaler: Any, grad_clip: float) -> float:
    """Unscale, clip the global gradient norm to ``grad_clip`` (0: no clipping), step, clamp.

    Returns the gradient norm before clipping (inf/nan when an fp16 step overflowed; the scaler
    then skips the update), or 0.0 without clipping.
    """
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = 0.0
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scale(model)
    return norm
