"""`train-student --kind sam-encoder` end to end through the CLI: distil, resume, embed with the student."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import zarr

from batchseg.assets import TOY_SAM_CHECKPOINT
from batchseg.models.sam import SamEncoder, SamSpec, load_sam
from batchseg.students.train import PAUSE_ENV, PAUSE_MARKER
from helpers import embed_args, run_cli

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--width", "16", "--depth", "1", "--batch-size", "4", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def sam_build(tmp_path_factory, tiny_models, dask_scheduler) -> Path:
    """6 world images embedded with the toy SAM (tiny CLIP) and pseudo-labelled (round 0 with SAM masks)."""
    from batchseg.world import write_world

    root = tmp_path_factory.mktemp("sam-student")
    write_world(root / "world", 6, seed=5, max_side=96)
    out = root / "build"
    args = embed_args(root / "world" / "images", out, tiny_models, "--scheduler", dask_scheduler)
    args[args.index("--sam-checkpoint") + 1] = str(TOY_SAM_CHECKPOINT)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    result = run_cli(["pseudolabel", str(out), "--vocab", str(root / "world" / "classes.txt"), "--rounds", "0",
                      "--points-per-side", "4", "--scheduler", dask_scheduler, "-q"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def build(tmp_path, sam_build) -> Path:
    target = tmp_path / "build"
    shutil.copytree(sam_build, target)
    return target


def _train(out: Path, scheduler: str, *args: str):
    return run_cli(["train-student", str(out), "--kind", "sam-encoder", "--scheduler", scheduler, *SMALL, *args])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_distils_a_sam_model_folder_that_embed_uses(build, sam_build, tmp_path, dask_scheduler, tiny_models):
    result = _train(build, dask_scheduler, "--name", "fast", "--epochs", "3", "--prompt-epochs", "1")
    assert result.exit_code == 0, result.output
    assert "6 images, 3 epochs (2 encoder-only, 1 prompt-in-the-loop" in result.output
    assert "instance labels of round 0" in result.output
    folder = build / "students" / "fast"
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "sam-encoder" and config["sam_model"]["image_encoder"]["type"] == "repvit"
    assert config["embed_shape"] == [32, 16, 16]
    metrics = ds.dataset(folder / "metrics", format="parquet").to_table().to_pylist()
    assert sorted(r["epoch"] for r in metrics) == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in metrics)
    # Phase 1 learns: the encoder-only loss falls from epoch 1 to epoch 2.
    by_epoch = {r["epoch"]: r["loss"] for r in metrics}
    assert by_epoch[2] < by_epoch[1]

    # The teacher's prompt encoder and mask decoder travel unchanged; the encoder is the student's.
    teacher = load_sam(SamSpec("tiny", str(TOY_SAM_CHECKPOINT)))
    weights = _weights(folder)
    for key, value in teacher.state_dict().items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            assert torch.equal(weights[key], value), key
    assert not any(k.startswith("image_encoder.blocks.") for k in weights)

    student = load_sam(SamSpec(str(folder)))
    encoder = SamEncoder(student)
    assert encoder.embed_shape == (32, 16, 16) and encoder.image_size == 256

    records = [json.loads(p.read_text()) for p in (build / "runs").glob("*.json")]
    record = next(r for r in records if r["command"] == "train-student")
    assert record["status"] == "finished" and record["config"]["kind"] == "sam-encoder"
    assert record["config"]["prompt_epochs"] == 1 and record["counts"]["images"] == 6

    # Rerun: nothing to do. Other settings: refused.
    again = _train(build, dask_scheduler, "--name", "fast", "--epochs", "3", "--prompt-epochs", "1")
    assert again.exit_code == 0 and "already trained" in again.output, again.output
    other = _train(build, dask_scheduler, "--name", "fast", "--epochs", "4", "--prompt-epochs", "1")
    assert other.exit_code == 2 and "other settings" in other.output

    # The student embeds a new build; the same images get embeddings of the right shape.
    images = sam_build.parent / "world" / "images"
    args = embed_args(images, tmp_path / "student-build", tiny_models, "--scheduler", dask_scheduler)
    at = args.index("--sam-checkpoint")
    del args[at : at + 2]
    args[args.index("--sam-model") + 1] = str(folder)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    stored = zarr.open_group(str(tmp_path / "student-build" / "embeddings.zarr"), mode="r")["sam"]
    assert stored.shape[1:] == (32, 16, 16)
    assert np.isfinite(np.asarray(stored[0], dtype=np.float32)).all()
    recorded = json.loads((tmp_path / "student-build" / "batchseg.json").read_text())["embed"]["models"]
    assert recorded["sam"]["model"] == str(folder.resolve()) and recorded["weights_sha256"]["sam"].startswith("sha256:")
    # ... and pseudolabel runs downstream unchanged, decoding with the student folder's decoder.
    result = run_cli(["pseudolabel", str(tmp_path / "student-build"), "--classes", "red circle,blue square",
                      "--rounds", "0", "--points-per-side", "4", "--scheduler", dask_scheduler, "-q"])
    assert result.exit_code == 0, result.output

    # Mixing: the teacher's build refuses the student's embeddings, and the other way round.
    args = embed_args(images, build, tiny_models, "--scheduler", dask_scheduler)
    at = args.index("--sam-checkpoint")
    del args[at : at + 2]
    args[args.index("--sam-model") + 1] = str(folder)
    mixed = run_cli(args)
    assert mixed.exit_code == 2, mixed.output
    assert "cannot be mixed in one store" in mixed.output and "Traceback" not in mixed.output
    args = embed_args(images, tmp_path / "student-build", tiny_models, "--scheduler", dask_scheduler)
    args[args.index("--sam-checkpoint") + 1] = str(TOY_SAM_CHECKPOINT)
    mixed = run_cli(args)
    assert mixed.exit_code == 2 and "cannot be mixed in one store" in mixed.output


def test_sigkill_then_the_same_command_resumes_to_the_same_weights(build, dask_scheduler):
    """Killed (SIGKILL, the whole process group) after epoch 2 of 3, the same command resumes and ends, through
    the prompt-in-the-loop epoch, with the weights of an uninterrupted run."""
    reference = _train(build, dask_scheduler, "--name", "ref", "--epochs", "3", "--prompt-epochs", "1")
    assert reference.exit_code == 0, reference.output

    folder = build / "students" / "killed"
    command = [sys.executable, "-m", "batchseg", "train-student", str(build), "--kind", "sam-encoder", "--name",
               "killed", "--epochs", "3", "--prompt-epochs", "1", "--workers", "1", *SMALL]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PAUSE_ENV: "2"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    marker = folder / "_checkpoints" / PAUSE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert marker.exists(), process.stderr.read().decode() if process.poll() is not None else "timeout"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the command, its cluster and the training worker
        process.wait()
    assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()

    resumed = _train(build, dask_scheduler, "--name", "killed", "--epochs", "3", "--prompt-epochs", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed after epoch 2" in resumed.output
    ref, got = _weights(build / "students" / "ref"), _weights(folder)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    metrics = ds.dataset(folder / "metrics", format="parquet").to_table()
    assert sorted(metrics.column("epoch").to_pylist()) == [1, 2, 3]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--input-size", "64"], "--input-size does not apply to --kind sam-encoder"),
        (["--prompt-epochs", "9"], "--prompt-epochs must be between 0 and --epochs"),
        (["--width", "12"], "--width must be a multiple of 8"),
        (["--round", "5"], "round 5 does not exist"),
    ],
)
def test_bad_input_exits_2(build, dask_scheduler, args, fragment):
    result = _train(build, dask_scheduler, "--name", "x", "--epochs", "2", *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_a_build_without_sam_embeddings_is_refused(labelled_build, tmp_path, dask_scheduler):
    out = tmp_path / "nosam"
    shutil.copytree(labelled_build, out)  # the shared build stays as it was (the refusal writes a run record)
    result = _train(out, dask_scheduler, "--name", "x", "--epochs", "1")
    assert result.exit_code == 2 and "no SAM embeddings" in result.output


def test_prompt_epochs_only_for_sam_encoder(build, dask_scheduler):
    result = run_cli(["train-student", str(build), "--name", "x", "--prompt-epochs", "1", "--scheduler",
                      dask_scheduler, "-q"])
    assert result.exit_code == 2 and "--prompt-epochs applies to --kind sam-encoder only" in result.output


def test_batched_decoding_equals_segment_anythings_decoder():
    from batchseg.students.sam_distill import decode_per_prompt

    sam = load_sam(SamSpec("tiny", str(TOY_SAM_CHECKPOINT)))
    torch.manual_seed(0)
    embeddings = torch.randn(3, 32, 16, 16)
    coords = torch.rand(3, 2, 2) * 256
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=torch.tensor([[10.0, 10, 90, 120]] * 3),
                                       masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for multimask in (False, True):
            masks, iou = decode_per_prompt(sam.mask_decoder, embeddings, pe, sparse, dense, multimask)
            for k in range(3):
                ref_masks, ref_iou = sam.mask_decoder(image_embeddings=embeddings[k : k + 1], image_pe=pe,
                                                      sparse_prompt_embeddings=sparse[k : k + 1],
                                                      dense_prompt_embeddings=dense[k : k + 1],
                                                      multimask_output=multimask)
                torch.testing.assert_close(masks[k : k + 1], ref_masks, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(iou[k : k + 1], ref_iou, rtol=1e-4, atol=1e-4)


def test_encoder_loss_ignores_the_padding_and_the_teachers_own_embedding_scores_best(tmp_path):
    """Phase 1: an embedding equal to the teacher's on the image cells scores 0 whatever the padding holds.
    Phase 2: the teacher's own embedding gives a finite loss (BCE of its own hard mask), lower than noise's."""
    from batchseg.students.data import TrainImage
    from batchseg.students.sam_distill import DistillImage, PromptSettings, SamDistillObjective

    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(path)
    from batchseg.io.images import content_id

    image = TrainImage(content_id(path.read_bytes()), str(path), 64, 128)
    teacher_embedding = torch.randn(1, 32, 16, 16)
    sam = load_sam(SamSpec("tiny", str(TOY_SAM_CHECKPOINT))).requires_grad_(False)
    objective = SamDistillObjective([DistillImage(image, 0, 128, 256)], teacher_embedding.numpy(), sam, 1,
                                    PromptSettings(objects_per_image=4), {}, 0, "cpu")

    class Fixed(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, pixels):
            return self.value

    padded = teacher_embedding.clone()
    padded[:, :, 8:] = 100.0  # rows 8.. lie in the padding (the image covers 128 of 256 canvas rows)
    loss, cells = objective.loss(Fixed(padded), [0], 0)
    assert cells == 8 * 16 and float(loss) == 0.0
    padded[:, :, 7] += 1.0
    loss, _ = objective.loss(Fixed(padded), [0], 0)
    assert float(loss) == pytest.approx(16 * 32 / (8 * 16 * 32))
    own, used = objective.loss(Fixed(teacher_embedding), [0], 1)
    noise, _ = objective.loss(Fixed(torch.randn(1, 32, 16, 16)), [0], 1)
    assert 1 <= used <= 4 and np.isfinite(float(own)) and float(own) < float(noise)
