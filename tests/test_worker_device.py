"""Every stage computes on the device its worker's runtime names (``runtime.worker_device()``).

The stages run in this process (their Dask tasks inline) with that device swapped for a
fake accelerator (tests/fake_device.py): tensors "on" it compute on the CPU, but a call
mixing them with CPU tensors fails as on a GPU, and every module's forward is recorded.
So these tests fail both when a stage leaves a model or tensor on the CPU while the
worker has an accelerator, and when it ignores the worker's device altogether.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import batchseg.stages.embed as embed_stage
import batchseg.stages.predict as predict_stage
import batchseg.stages.pseudolabel as pseudolabel_stage
import batchseg.stages.train_student as train_student_stage
from batchseg.io.tables import read_labels
from batchseg.models import runtime
from batchseg.stages import pseudolabel_shard
from fake_device import FAKE, FakeDevice
from helpers import embed_args, ground_truth_instance_rows, run_cli, run_tasks_inline

TINY_STUDENT = ["--epochs", "1", "--width", "16", "--depth", "1", "--batch-size", "4", "--conf-thresh", "0",
                "--threads", "1", "-q"]


@pytest.fixture
def fake_device(monkeypatch):
    """Every worker task in this thread sees the fake accelerator as its device."""
    threads = torch.get_num_threads()
    run_tasks_inline(monkeypatch, embed_stage, pseudolabel_stage, predict_stage, train_student_stage)
    monkeypatch.setattr(runtime, "worker_device", lambda: FAKE)
    with FakeDevice() as device:
        yield device
    torch.set_num_threads(threads)  # the tasks set the worker's thread count; this is the test process


def _all_on_the_fake_device(device: FakeDevice) -> set[str]:
    """The modules that ran; fails unless each ran with its weights and inputs on the fake device."""
    assert device.forwards, "no model ran"
    off = [f for f in device.forwards if not (f.weights | f.inputs) <= {FAKE}]
    assert off == [], off[:5]
    return {f.module for f in device.forwards}


def test_the_fake_device_catches_what_a_gpu_would(fake_device):
    layer = torch.nn.Linear(3, 2).to(runtime.worker_device())
    assert layer.weight.device == torch.device(FAKE)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        layer(torch.ones(4, 3))
    out = layer(torch.ones(4, 3).to(FAKE))
    assert out.device == torch.device(FAKE) and (out + torch.tensor(1.0)).device == torch.device(FAKE)
    with pytest.raises(TypeError, match="numpy"):
        out.detach().numpy()
    assert out.detach().cpu().numpy().shape == (4, 2)


def test_embed_on_the_worker_device(image_folder, tiny_models, tmp_path, fake_device):
    result = run_cli(embed_args(image_folder, tmp_path / "out", tiny_models))
    assert result.exit_code == 0, result.output
    # The blocks of CLIP's image tower, and SAM's image encoder.
    assert {"ResidualAttentionBlock", "SamEncoder", "ImageEncoderViT"} <= _all_on_the_fake_device(fake_device)


def test_pseudolabel_round0_head_training_and_round1_on_the_worker_device(labelled_build, tmp_path, fake_device):
    out = tmp_path / "build"
    shutil.copytree(labelled_build, out)
    reference = {p.name: load_file(str(p))["classifier"] for p in (out / "text").glob("*.safetensors")}
    shutil.rmtree(out / "text")  # the first task builds it again, on the worker's device
    world = labelled_build.parent / "world"
    result = run_cli(["pseudolabel", str(out), "--vocab", str(world / "classes.txt"), "--background",
                      "--rounds", "1", "--epochs", "1", "--threads", "1", "--overwrite", "-q"])
    assert result.exit_code == 0, result.output

    modules = _all_on_the_fake_device(fake_device)
    # CLIP's text tower (its token Embedding) and its last block (the dense head), the head trained and
    # then labelling round 1.
    assert {"Embedding", "ResidualAttentionBlock", "SegHead"} <= modules, modules
    heads = [f for f in fake_device.forwards if f.module == "SegHead"]
    assert len(heads) > 8  # training steps and the 8 images of round 1
    assert read_labels(out, 0).num_rows > 0 and read_labels(out, 1).num_rows > 0
    # The classifier is built once per worker, on its device, with the values the CPU gives.
    (name, stored), = ((p.name, load_file(str(p))["classifier"]) for p in (out / "text").glob("*.safetensors"))
    torch.testing.assert_close(stored, reference[name], atol=1e-5, rtol=1e-4)
    cached = list(pseudolabel_shard._CLASSIFIER_CACHE.values())
    assert len(cached) == 1 and cached[0].device == torch.device(FAKE)


@pytest.mark.parametrize("kind, model", [("semantic", "SemanticStudent"), ("instance", "Yolact")])
def test_a_train_student_step_on_the_worker_device(labelled_build, tmp_path, fake_device, kind, model):
    out = tmp_path / "build"
    shutil.copytree(labelled_build, out)
    size, labels = "32", []
    if kind == "instance":
        ground_truth_instance_rows(out, labelled_build.parent / "world")
        size, labels = "64", ["--round", "0"]
    result = run_cli(["train-student", str(out), "--name", "s", "--kind", kind, "--input-size", size, *labels,
                      *TINY_STUDENT])
    assert result.exit_code == 0, result.output
    assert model in _all_on_the_fake_device(fake_device)
    assert (out / "students" / "s" / "config.json").exists()  # the weights came back from the device


def test_predict_on_the_worker_device(trained_student, labelled_build, tmp_path, fake_device):
    images = labelled_build.parent / "world" / "images"
    result = run_cli(["predict", str(trained_student), str(images), str(tmp_path / "dest"), "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert "8 labelled" in result.output
    assert "SemanticStudent" in _all_on_the_fake_device(fake_device)


def test_a_tensor_left_on_the_cpu_is_caught(trained_student, labelled_build, tmp_path, fake_device, monkeypatch):
    from batchseg.students import predict as student_predict

    def forgets_to_move(student, batch):
        return student.model(batch).float().softmax(dim=1).cpu()  # the batch stays on the CPU

    monkeypatch.setattr(student_predict, "semantic_probs", forgets_to_move)
    images = labelled_build.parent / "world" / "images"
    result = run_cli(["predict", str(trained_student), str(images), str(tmp_path / "dest"), "--threads", "1", "-q"])
    assert result.exit_code == 1
    assert "Expected all tensors to be on the same device" in result.output, result.output
