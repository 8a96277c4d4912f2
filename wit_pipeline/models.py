"""CLIP models: built-in small architectures, and loading checkpoints, tags and files.

Every model is an open_clip model. This module registers the architectures shipped in
``wit_pipeline/model_configs/*.json`` with open_clip (so ``open_clip.create_model("wit-tiny")``
works once :func:`register_model_configs` ran), and loads weights from three kinds of source:

- a checkpoint written by ``wit_pipeline.train`` (it records its architecture, so ``model`` may
  be omitted, and a different ``model`` is a clear error),
- any other local ``.pt``/``.pth``/``.bin``/``.safetensors`` file open_clip can read,
- an open_clip pretrained tag such as ``openai`` or ``laion2b_s34b_b79k`` (downloaded by
  open_clip, so it needs the network on the user's machine).

Every failure a user can cause (missing file, wrong architecture, unknown name, no network for
a tag) is a one-line :class:`~wit_pipeline.errors.WitError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from wit_pipeline.errors import WitError

MODEL_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
CHECKPOINT_FORMAT = "wit-pipeline/clip-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def builtin_model_names() -> list[str]:
    """Names of the architectures shipped with wit-pipeline (``wit-tiny``, ...)."""
    return sorted(f[: -len(".json")] for f in os.listdir(MODEL_CONFIG_DIR) if f.endswith(".json"))


def register_model_configs() -> None:
    """Register the shipped architectures with open_clip; a no-op when already registered."""
    import open_clip

    known = set(open_clip.list_models())
    if all(name in known for name in builtin_model_names()):
        return
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def model_config(name: str) -> dict[str, Any]:
    """The open_clip architecture config of ``name`` (a copy); WitError when unknown."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise WitError(
            f"unknown model {name!r}: use an open_clip architecture (e.g. ViT-B-32, RN50) or "
            f"one of {', '.join(builtin_model_names())}"
        )
    return json.loads(json.dumps(cfg))


def _register_config(name: str, cfg: Mapping[str, Any]) -> None:
    """Make an architecture recorded in a checkpoint known to open_clip under ``name``."""
    import open_clip

    directory = tempfile.mkdtemp(prefix="wit-model-config-")
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump(dict(cfg), f)
    open_clip.add_model_config(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors for users."""
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise WitError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise WitError(f"checkpoint {path} is a directory; give the .pt file inside it")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(path, device="cpu")}
        except Exception as e:  # safetensors raises its own error types
            raise WitError(f"cannot read checkpoint {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WitError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(obj, dict):
        raise WitError(f"cannot read checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def is_wit_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    return ckpt.get("format") == CHECKPOINT_FORMAT


def state_dict_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The model weights of a checkpoint dict, without DDP's ``module.`` prefix."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping) or not sd:
        raise WitError("checkpoint holds no model weights (no state_dict)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference, with the transforms and tokenizer that belong to it."""

    model: Any  # open_clip.CLIP (torch.nn.Module)
    preprocess: Callable[[Any], Any]  # PIL image -> normalized tensor (eval transform)
    tokenizer: Callable[..., Any]  # list[str] -> LongTensor [n, context_length]
    model_name: str
    device: str
    image_size: int
    source: str


@contextlib.contextmanager
def quiet_open_clip():
    """Silence open_clip's "No pretrained weights loaded" warning while we load them ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WitError(f"device {device} requested but no CUDA GPU is available")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on a GPU that supports it, else fp16 on GPU and fp32 on CPU; others as given."""
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: str, precision: str = "auto") -> Any:
    """The autocast context for ``precision`` (see :func:`resolve_precision`) on ``device``.

    fp32 is a no-op context; bf16 and fp16 lower matmuls and convolutions, weights stay fp32.
    Training, evaluation and scoring all run their models under it.
    """
    import torch

    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def _mismatch_message(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "size mismatch" in ln or "Missing key" in ln), None)
    if detail is None:
        detail = lines[-1] if lines else type(error).__name__
    return detail[:300]


def load_model(
    model_name: str | None,
    pretrained: str | os.PathLike | None,
    *,
    device: str = "auto",
) -> LoadedModel:
    """Build ``model_name`` with the weights of ``pretrained`` (a checkpoint file or a tag).

    ``pretrained`` empty gives random weights (useful only for tests and speed checks).
    ``model_name`` may be omitted when ``pretrained`` is a checkpoint written by the trainer.
    """
    import open_clip
    import torch

    register_model_configs()
    device = resolve_device(device)
    pretrained = os.fspath(pretrained) if pretrained else None
    ckpt: dict[str, Any] | None = None
    is_file = bool(pretrained) and (
        os.path.sep in str(pretrained)
        or str(pretrained).endswith(CHECKPOINT_SUFFIXES)
        or os.path.exists(str(pretrained))
    )
    if is_file:
        ckpt = read_checkpoint(str(pretrained))
        if is_wit_checkpoint(ckpt):
            recorded = str(ckpt.get("model_name", ""))
            if model_name and recorded and model_name != recorded:
                raise WitError(
                    f"checkpoint {pretrained} holds a {recorded} model, not {model_name}: "
                    f"pass --model {recorded} (or omit --model)"
                )
            model_name = model_name or recorded
            if open_clip.get_model_config(model_name) is None and ckpt.get("model_cfg"):
                _register_config(model_name, ckpt["model_cfg"])
    if not model_name:
        raise WitError("no model architecture given: pass --model NAME (e.g. ViT-B-32, wit-tiny)")
    model_config(model_name)  # a clear error for unknown names

    if ckpt is not None:
        with quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, device="cpu")
        try:
            model.load_state_dict(state_dict_of(ckpt), strict=True)
        except RuntimeError as e:
            # Foreign formats (OpenAI JIT exports, old layouts): let open_clip convert them.
            try:
                open_clip.load_checkpoint(model, str(pretrained), strict=True)
            except Exception:
                raise WitError(
                    f"checkpoint {pretrained} does not fit model {model_name}: {_mismatch_message(e)}"
                ) from None
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            known = ", ".join(tags) if tags else "none"
            raise WitError(
                f"pretrained {pretrained!r} is neither a file nor a known tag for {model_name} "
                f"(tags: {known})"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device="cpu"
            )
        except Exception as e:
            raise WitError(
                f"could not load pretrained weights {model_name}/{pretrained} "
                f"(open_clip downloads them, which needs the network): {_mismatch_message(e)}"
            ) from None
    else:
        with quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, device="cpu")
    model = model.to(torch.device(device)).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, tuple | list) else size)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        model_name=model_name,
        device=device,
        image_size=image_size,
        source=str(pretrained or "random"),
    )
