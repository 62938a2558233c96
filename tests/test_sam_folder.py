"""SAM model folders: config JSON with every size + safetensors, loaded safely; `embed --sam-model FOLDER`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from batchseg.assets import TOY_SAM_CHECKPOINT
from batchseg.errors import ModelLoadError
from batchseg.models.sam import SAM_ARCHS, SamEncoder, SamSpec, load_sam
from batchseg.models.sam_folder import (
    build_from_section,
    inspect_sam_folder,
    load_sam_folder,
    sam_folder_identity,
    save_registry_sam,
    save_sam_folder,
)
from helpers import embed_args, run_cli


@pytest.fixture(scope="module")
def toy() -> torch.nn.Module:
    return load_sam(SamSpec("tiny", str(TOY_SAM_CHECKPOINT)))


@pytest.fixture
def folder(tmp_path, toy) -> Path:
    return save_registry_sam(toy, SAM_ARCHS["tiny"], tmp_path / "toy-sam")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _decode(sam, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.tensor([[[60.0, 90.0]], [[200.0, 30.0]]])
    sparse, dense = sam.prompt_encoder(points=(coords, torch.ones(2, 1, dtype=torch.int64)),
                                       boxes=torch.tensor([[10.0, 20.0, 120.0, 160.0]] * 2), masks=None)
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)


def test_round_trip_gives_the_registry_models_outputs(folder, toy):
    config = _config(folder)["sam_model"]
    assert config["image_size"] == 256 and config["embed_dim"] == 32 and config["embed_grid"] == 16
    assert config["image_encoder"]["type"] == "vit" and config["image_encoder"]["global_attn_indexes"] == [1]
    loaded = load_sam(SamSpec(str(folder)))
    image = np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8)
    ours, theirs = SamEncoder(loaded), SamEncoder(toy)
    assert torch.equal(ours.preprocess(image), theirs.preprocess(image))
    with torch.no_grad():
        embedding = ours(ours.preprocess(image)[None])
        assert torch.equal(embedding, theirs(theirs.preprocess(image)[None]))
        for a, b in zip(_decode(loaded, embedding), _decode(toy, embedding)):
            assert torch.equal(a, b)
    assert sam_folder_identity(folder) == sam_folder_identity(folder)


def test_other_sizes_load_too(tmp_path):
    """A fine-tuned SAM of other sizes: another canvas, patch, width and decoder."""
    section = {
        "format": 1, "image_size": 96, "pixel_mean": [100.0, 110.0, 120.0], "pixel_std": [50.0, 51.0, 52.0],
        "embed_dim": 16, "embed_grid": 12,
        "image_encoder": {"type": "vit", "embed_dim": 24, "depth": 3, "num_heads": 3, "global_attn_indexes": [2],
                          "patch_size": 8, "window_size": 4, "mlp_ratio": 2.0},
        "prompt_encoder": {"mask_in_chans": 8},
        "mask_decoder": {"transformer_depth": 1, "mlp_dim": 32, "num_heads": 2, "num_multimask_outputs": 3,
                         "iou_head_depth": 2, "iou_head_hidden_dim": 16},
    }
    torch.manual_seed(1)
    model = build_from_section(section)
    save_sam_folder(model.state_dict(), section, tmp_path / "custom")
    loaded = load_sam_folder(tmp_path / "custom")
    encoder = SamEncoder(loaded)
    assert encoder.embed_shape == (16, 12, 12) and encoder.image_size == 96
    assert loaded.pixel_mean.flatten().tolist() == [100.0, 110.0, 120.0]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), model.image_encoder(x))


def _rewrite(folder: Path, **changes) -> None:
    data = _config(folder)
    section = data["sam_model"]
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = section
        for key in parents:
            target = target[key]
        target[last] = value
    (folder / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "is not readable JSON"),
        (lambda f: (f / "config.json").write_text("{}"), "has no 'sam_model' object"),
        (lambda f: _rewrite(f, image_encoder__depth=100000), "image_encoder.depth must be an integer in [1, 256]"),
        (lambda f: _rewrite(f, image_size=10**7), "image_size must be an integer in [32, 8192]"),
        (lambda f: _rewrite(f, embed_dim=-3), "embed_dim must be an integer"),
        (lambda f: _rewrite(f, image_encoder__type="resnet"), "image_encoder.type must be one of"),
        (lambda f: _rewrite(f, pixel_std=[1.0, 0.0, 1.0]), "pixel_std must be positive"),
        (lambda f: _rewrite(f, image_encoder__embed_dim=64, image_encoder__num_heads=4),
         "do not match the sizes in its config.json"),
        (lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 10), "not a valid .safetensors file"),
    ],
)
def test_bad_folders_are_refused_with_clear_text(folder, damage, fragment):
    damage(folder)
    with pytest.raises(ModelLoadError, match=None) as info:
        load_sam(SamSpec(str(folder)))
    assert fragment in str(info.value)


def test_wrong_weight_shapes_are_found_before_any_weight_is_read(folder, monkeypatch):
    weights = load_file(str(folder / "model.safetensors"))
    weights["mask_decoder.iou_token.weight"] = torch.zeros(1, 64)
    save_file(weights, str(folder / "model.safetensors"))
    import safetensors.torch

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read before the shapes were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    with pytest.raises(ModelLoadError, match=r"1 wrong shape: mask_decoder.iou_token.weight \(1, 64\)"):
        inspect_sam_folder(folder)


@pytest.mark.parametrize(
    "make, extra, fragment",
    [
        (lambda f: (f / "model.safetensors").unlink(), [], "has no model.safetensors"),
        (lambda f: _rewrite(f, mask_decoder__mlp_dim=10**9), [], "mask_decoder.mlp_dim must be an integer"),
        (lambda f: _rewrite(f, image_encoder__depth=3), [], "missing: image_encoder.blocks.2"),
        (lambda f: None, ["--sam-checkpoint", "x.pth"], "carries its own weights"),
    ],
)
def test_embed_refuses_bad_folders_with_exit_2(folder, tmp_path, tiny_models, image_folder, make, extra, fragment):
    make(folder)
    args = embed_args(image_folder, tmp_path / "out", tiny_models)
    at = args.index("--sam-checkpoint")
    del args[at : at + 2]
    args[args.index("--sam-model") + 1] = str(folder)
    result = run_cli(args + extra)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_embed_refuses_an_unknown_model_name(tmp_path, tiny_models, image_folder):
    args = embed_args(image_folder, tmp_path / "out", tiny_models)
    args[args.index("--sam-model") + 1] = "vit_q"
    result = run_cli(args)
    assert result.exit_code == 2 and "unknown SAM model 'vit_q'" in result.output


def test_embed_with_a_folder_equals_embed_with_the_registry_model(folder, tmp_path, tiny_models, image_folder,
                                                                  dask_scheduler):
    import zarr

    from batchseg.io.tables import read_manifest

    registry = embed_args(image_folder, tmp_path / "a", tiny_models, "--scheduler", dask_scheduler, "--no-clip")
    registry[registry.index("--sam-checkpoint") + 1] = str(TOY_SAM_CHECKPOINT)
    assert run_cli(registry).exit_code == 0
    args = embed_args(image_folder, tmp_path / "b", tiny_models, "--scheduler", dask_scheduler, "--no-clip")
    at = args.index("--sam-checkpoint")
    del args[at : at + 2]
    args[args.index("--sam-model") + 1] = str(folder)
    result = run_cli(args)
    assert result.exit_code == 0, result.output

    def by_id(out):
        group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
        return {r["image_id"]: np.asarray(group["sam"][r["zarr_row"]]) for r in read_manifest(out).to_pylist()
                if r["status"] == "ok"}

    a, b = by_id(tmp_path / "a"), by_id(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_the_clis_sam_names_are_the_registry():
    from batchseg.choices import SAM_MODELS

    assert set(SAM_MODELS) == set(SAM_ARCHS)
