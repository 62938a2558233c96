"""`batchseg export-student`: ONNX (checked with onnxruntime) and TorchScript equal the torch student."""
import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from batchseg.cli import cli
from batchseg.students.data import letterbox_tensors
from batchseg.students.export import deployable
from batchseg.students.load import load_student
from batchseg.world import render_sample


def _pixels(size: int, count: int) -> torch.Tensor:
    """``count`` letterboxed world images, float32 (B, 3, S, S) in 0..255."""
    batch = [letterbox_tensors(render_sample(21, i, max_side=90).image, size)[0] for i in range(count)]
    return torch.stack(batch).float()


def _export(student, *args):
    return CliRunner().invoke(cli, ["export-student", str(student), *args], catch_exceptions=False)


def test_onnx_equals_torch_on_images_with_a_dynamic_batch(trained_student):
    result = _export(trained_student, "--format", "onnx")
    assert result.exit_code == 0, result.output
    path = trained_student / "model.onnx"
    assert path.exists() and "wrote" in result.output
    loaded = load_student(trained_student)
    reference = deployable(loaded)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for count in (1, 3):  # batch sizes other than the one traced (2)
        pixels = _pixels(loaded.input_size, count)
        (probs,) = session.run(None, {"pixels": pixels.numpy()})
        with torch.no_grad():
            expected = reference(pixels).numpy()
        assert probs.shape == (count, len(loaded.config["outputs"]), loaded.input_size, loaded.input_size)
        np.testing.assert_allclose(probs, expected, atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_equals_torch(trained_student, tmp_path):
    target = tmp_path / "deploy" / "s.pt"
    result = _export(trained_student, "--format", "torchscript", "--output", str(target))
    assert result.exit_code == 0, result.output
    scripted = torch.jit.load(str(target))
    loaded = load_student(trained_student)
    pixels = _pixels(loaded.input_size, 3)
    with torch.no_grad():
        torch.testing.assert_close(scripted(pixels), deployable(loaded)(pixels), atol=1e-5, rtol=1e-4)


def test_missing_student_exits_2(tmp_path):
    result = _export(tmp_path / "none", "--format", "onnx")
    assert result.exit_code == 2 and "does not exist" in result.output
