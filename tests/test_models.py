"""Built-in architectures and checkpoint loading."""

from __future__ import annotations

import open_clip
import pytest
import torch

from wit_pipeline import models
from wit_pipeline.errors import WitError


def test_builtin_configs_are_registered_with_open_clip():
    models.register_model_configs()
    models.register_model_configs()  # idempotent
    names = set(open_clip.list_models())
    assert {"wit-nano", "wit-tiny", "wit-small"} <= names
    assert models.builtin_model_names() == ["wit-nano", "wit-small", "wit-tiny"]


def test_wit_tiny_is_a_64px_vit_with_a_few_million_parameters():
    cfg = models.model_config("wit-tiny")
    assert cfg["vision_cfg"] == {
        "image_size": 64,
        "layers": 3,
        "width": 128,
        "head_width": 32,
        "patch_size": 8,
    }
    assert cfg["text_cfg"]["layers"] == 3 and cfg["text_cfg"]["width"] == 128
    model = open_clip.create_model("wit-tiny")
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n < 10_000_000
    with torch.no_grad():
        out = model(
            torch.zeros(2, 3, 64, 64), open_clip.get_tokenizer("wit-tiny")(["a dog", "a cat"])
        )
    assert out[0].shape == (2, 128) and out[1].shape == (2, 128)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(WitError, match="unknown model 'vit-b-32'"):
        models.model_config("vit-b-32")
    with pytest.raises(WitError, match="no model architecture given"):
        models.load_model(None, None)


def test_checkpoint_without_registered_name_loads_from_its_recorded_config(tmp_path):
    """A trainer checkpoint of a custom architecture carries its config and loads anywhere."""
    cfg = models.model_config("wit-nano")
    cfg["embed_dim"] = 48
    model = open_clip.model.CLIP(**cfg)
    path = tmp_path / "custom.pt"
    torch.save(
        {
            "format": models.CHECKPOINT_FORMAT,
            "model_name": "my-custom-clip",
            "model_cfg": cfg,
            "state_dict": model.state_dict(),
        },
        path,
    )
    loaded = models.load_model(None, str(path), device="cpu")
    assert loaded.model_name == "my-custom-clip" and loaded.image_size == 32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_ddp_prefix_is_stripped(tmp_path):
    model = open_clip.create_model("wit-nano")
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = models.load_model("wit-nano", str(path), device="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = open_clip.create_model("wit-nano")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors")
    )
    loaded = models.load_model("wit-nano", str(tmp_path / "m.safetensors"), device="cpu")
    assert torch.equal(loaded.model.logit_scale, model.logit_scale)
    with pytest.raises(WitError, match=r"checkpoint .* is a directory"):
        models.load_model("wit-nano", str(tmp_path), device="cpu")
