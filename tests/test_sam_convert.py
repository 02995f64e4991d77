"""Official SAM checkpoint -> keras-hub preset: architecture inference, exact weights, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)
from ml_backend.errors import ModelSourceError
from ml_backend.sam.convert import (
    SamArchitecture,
    convert_checkpoint,
    convert_state_dict,
    infer_sam_architecture,
    load_official_state_dict,
    port_weights,
)
from benchmarks.official_sam import segment_anything_module
from official_sam import TINY, tiny_checkpoint, tiny_official_sam

ATOL = 1e-4


@pytest.fixture(scope="module")
def official():
    return tiny_official_sam(seed=0)


@pytest.fixture(scope="module")
def converted(official):
    return convert_state_dict(official.state_dict())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0)


# --- architecture ------------------------------------------------------------------------


def test_tiny_architecture_is_read_back_from_shapes(official):
    assert infer_sam_architecture(official.state_dict()) == TINY


@pytest.mark.parametrize(
    ("variant", "dim", "depth", "heads", "global_blocks"),
    [
        ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
        ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
        ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    ],
)
def test_official_sizes_are_inferred(variant, dim, depth, heads, global_blocks):
    sa = segment_anything_module()
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        state_dict = sa.sam_model_registry[variant]().state_dict()
    assert infer_sam_architecture(state_dict) == SamArchitecture(
        image_size=1024,
        patch_size=16,
        encoder_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_mlp_dim=4 * dim,
        encoder_qkv_bias=True,
        window_size=14,
        global_attention_indices=global_blocks,
        prompt_dim=256,
        mask_in_channels=16,
        decoder_depth=2,
        decoder_num_heads=8,
        decoder_mlp_dim=2048,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


# --- numerical equality with the official modules -----------------------------------------


def _image(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, TINY.image_size, TINY.image_size, 3)).astype(np.float32)


def test_image_embeddings_match(official, converted):
    pixels = _image()
    with torch.no_grad():
        expected = official.image_encoder(official.preprocess(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
        ours = converted.backbone.image_encoder(torch.from_numpy(pixels / 255.0))
    expected = expected.permute(0, 2, 3, 1).numpy()
    assert np.abs(expected).mean() > 0.1  # a real signal, not zeros on both sides
    np.testing.assert_allclose(np.asarray(ours.cpu()), expected, atol=ATOL)


POINTS = np.array([[[30.0, 70.0], [100.0, 20.0]]], np.float32)
LABELS = np.array([[1, 0]], np.int32)
BOX = np.array([[10.0, 20.0, 90.0, 110.0]], np.float32)


@pytest.mark.parametrize("prompt", ["points", "box", "box+points", "points+mask"])
def test_mask_logits_and_iou_predictions_match(official, converted, prompt):
    """Same image embedding and prompts in model-input pixels: same low-res logits and IoU for all 4 outputs."""
    embed = TINY.embedding_size
    rng = np.random.default_rng(2)
    with torch.no_grad():
        features = official.image_encoder(
            official.preprocess(torch.from_numpy(_image()).permute(0, 3, 1, 2))
        )
    mask_in = rng.normal(0, 1, (1, 1, 4 * embed, 4 * embed)).astype(np.float32) if "mask" in prompt else None
    with_points = "points" in prompt
    with_box = "box" in prompt
    with torch.no_grad():
        sparse, dense = official.prompt_encoder(
            points=(torch.from_numpy(POINTS), torch.from_numpy(LABELS)) if with_points else None,
            boxes=torch.from_numpy(BOX) if with_box else None,
            masks=None if mask_in is None else torch.from_numpy(mask_in),
        )
        outputs = [
            official.mask_decoder(
                image_embeddings=features,
                image_pe=official.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            for multimask in (False, True)
        ]
    expected_masks = torch.cat([outputs[0][0], outputs[1][0]], dim=1).numpy()
    expected_iou = torch.cat([outputs[0][1], outputs[1][1]], dim=1).numpy()

    points, labels = np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.float32)
    if with_points:
        points, labels = POINTS, LABELS.astype(np.float32)
        if not with_box:  # the official encoder pads point-only prompts with one "not a point"
            points = np.concatenate([points, np.zeros((1, 1, 2), np.float32)], axis=1)
            labels = np.concatenate([labels, -np.ones((1, 1), np.float32)], axis=1)
    boxes = BOX.reshape(1, 1, 2, 2) if with_box else np.zeros((1, 0, 2, 2), np.float32)
    masks = (
        np.zeros((1, 0, 4 * embed, 4 * embed, 1), np.float32)
        if mask_in is None
        else mask_in.transpose(0, 2, 3, 1)[:, None]
    )
    backbone = converted.backbone
    with torch.no_grad():
        prompt_embeddings = backbone.prompt_encoder(
            points=torch.from_numpy(points),
            labels=torch.from_numpy(labels),
            boxes=torch.from_numpy(boxes),
            masks=torch.from_numpy(masks),
        )
        ours = backbone.mask_decoder(image_embeddings=features.permute(0, 2, 3, 1), **prompt_embeddings)
    assert np.abs(expected_masks).max() > 1e-2
    np.testing.assert_allclose(np.asarray(ours["masks"].cpu()), expected_masks, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours["iou_pred"].cpu()), expected_iou, atol=ATOL)


def test_different_weights_give_different_outputs(converted):
    """Guards the equality tests above against comparing things that cannot differ."""
    other = convert_state_dict(tiny_official_sam(seed=1).state_dict())
    pixels = torch.from_numpy(_image() / 255.0)
    with torch.no_grad():
        a = np.asarray(converted.backbone.image_encoder(pixels).cpu())
        b = np.asarray(other.backbone.image_encoder(pixels).cpu())
    assert np.abs(a - b).max() > 10 * ATOL


# --- the preset on disk --------------------------------------------------------------------


def test_convert_checkpoint_writes_a_loadable_preset(checkpoint, official, tmp_path):
    import keras_hub

    out = convert_checkpoint(checkpoint, tmp_path / "preset")
    assert out == tmp_path / "preset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]  # no staging directory left behind
    segmenter = keras_hub.models.SAMImageSegmenter.from_preset(str(out))
    assert tuple(segmenter.backbone.image_encoder.image_shape) == (TINY.image_size, TINY.image_size, 3)
    converter = json.loads((out / "image_converter.json").read_text())["config"]
    assert converter["scale"] == pytest.approx(1 / 255)  # [0, 1] pixels: the backbone applies ImageNet stats
    pixels = _image()
    with torch.no_grad():
        expected = official.image_encoder(official.preprocess(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
        ours = segmenter.backbone.image_encoder(torch.from_numpy(pixels / 255.0))
    np.testing.assert_allclose(np.asarray(ours.cpu()), expected.permute(0, 2, 3, 1).numpy(), atol=ATOL)


def test_convert_refuses_a_non_empty_output_directory(checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ModelSourceError, match="not empty"):
        convert_checkpoint(checkpoint, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_wrapped_and_data_parallel_checkpoints_load(official, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.state_dict().items()}}, path)
    state_dict = load_official_state_dict(path)
    assert set(state_dict) == set(official.state_dict())


# --- bad input -----------------------------------------------------------------------------


def test_a_text_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(ModelSourceError, match="notes.pth.*not a readable PyTorch checkpoint"):
        load_official_state_dict(path)


def test_a_truncated_checkpoint_is_refused_naming_it(checkpoint, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ModelSourceError, match="cut.pth"):
        load_official_state_dict(path)


def test_another_models_checkpoint_is_refused_naming_it(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), path)
    with pytest.raises(ModelSourceError, match="resnet.pth is not an official SAM checkpoint"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: weights_only loading refuses it
    with pytest.raises(ModelSourceError, match="object.pth"):
        load_official_state_dict(path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_official_state_dict(tmp_path / "nowhere.pth")


def test_an_unknown_extra_tensor_is_refused(official, converted):
    state_dict = dict(official.state_dict())
    state_dict["mask_decoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ModelSourceError, match="does not understand: mask_decoder.extra_head.weight"):
        port_weights(converted, state_dict)


def test_a_missing_tensor_is_refused(official, converted):
    state_dict = dict(official.state_dict())
    del state_dict["image_encoder.blocks.2.norm2.weight"]
    with pytest.raises(ModelSourceError, match="lacks tensor image_encoder.blocks.2.norm2.weight"):
        port_weights(converted, state_dict)


def test_a_tensor_of_the_wrong_shape_is_refused(official, converted):
    state_dict = dict(official.state_dict())
    state_dict["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    with pytest.raises(ModelSourceError, match="mask_decoder.iou_token.weight has shape"):
        port_weights(converted, state_dict)


# --- command line ----------------------------------------------------------------------------


def test_convert_command_writes_a_preset(checkpoint, tmp_path, capsys):
    from ml_backend.sam.__main__ import main

    assert main(["convert", str(checkpoint), str(tmp_path / "cli-preset")]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == str(tmp_path / "cli-preset")
    assert (tmp_path / "cli-preset" / "config.json").is_file()


def test_convert_command_rejects_a_bad_file_with_exit_code_2(tmp_path, capsys):
    from ml_backend.sam.__main__ import main

    bad = tmp_path / "photo.pth"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert "photo.pth is not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_half_precision_checkpoints_convert_to_float32(official):
    state_dict = {key: value.half() for key, value in official.state_dict().items()}
    segmenter = convert_state_dict(state_dict)
    kernel = segmenter.backbone.mask_decoder.iou_token.embeddings
    assert str(kernel.dtype) == "float32"
    np.testing.assert_array_equal(
        kernel.numpy(), state_dict["mask_decoder.iou_token.weight"].float().numpy()
    )


def test_stored_pixel_statistics_must_be_the_standard_ones(official, converted):
    state_dict = dict(official.state_dict())
    state_dict["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    state_dict["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    port_weights(converted, state_dict)  # the standard ones are accepted (and count as used)
    state_dict["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(-1, 1, 1)
    with pytest.raises(ModelSourceError, match="pixel_std"):
        port_weights(converted, state_dict)
