import logging
import shutil
from pathlib import Path

import pytest

from batchseg.testing import TinyModels, make_tiny_models, write_image_folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def _image_folder_template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images-template")
    write_image_folder(folder, 8, seed=1)
    return folder


@pytest.fixture
def image_folder(tmp_path, _image_folder_template) -> Path:
    """A fresh copy of 8 small generated images (in subfolders a/ and b/)."""
    folder = tmp_path / "images"
    shutil.copytree(_image_folder_template, folder)
    return folder


@pytest.fixture(scope="session")
def dask_scheduler(tmp_path_factory) -> str:
    """Address of a 2-worker local cluster shared by tests that pass --scheduler."""
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        local_directory=str(tmp_path_factory.mktemp("dask")),
        silence_logs=logging.CRITICAL,
        env={"OMP_NUM_THREADS": "1"},
    )
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="session")
def labelled_build(tmp_path_factory, tiny_models, dask_scheduler) -> Path:
    """8 world images embedded (tiny CLIP, no SAM) and pseudo-labelled (rounds 0 and 1, with background).

    Shared by the student tests; copy it before writing into it.
    """
    from helpers import embed_args, run_cli
    from batchseg.world import write_world

    root = tmp_path_factory.mktemp("student-build")
    write_world(root / "world", 8, seed=11, max_side=80)
    out = root / "build"
    result = run_cli(embed_args(root / "world" / "images", out, tiny_models, "--no-sam", "--scheduler", dask_scheduler))
    assert result.exit_code == 0, result.output
    result = run_cli(["pseudolabel", str(out), "--vocab", str(root / "world" / "classes.txt"), "--background",
                      "--rounds", "1", "--epochs", "1", "--scheduler", dask_scheduler, "-q"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory, labelled_build, dask_scheduler) -> Path:
    """A tiny semantic student (2 epochs) trained on ``labelled_build``: OUT/students/s."""
    from helpers import run_cli

    out = tmp_path_factory.mktemp("trained") / "build"
    shutil.copytree(labelled_build, out)
    result = run_cli(["train-student", str(out), "--name", "s", "--epochs", "2", "--scheduler", dask_scheduler,
                      "--width", "16", "--depth", "1", "--input-size", "32", "--batch-size", "4",
                      "--conf-thresh", "0", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    return out / "students" / "s"


@pytest.fixture(scope="session")
def clean_root(tmp_path_factory, tiny_models, dask_scheduler) -> Path:
    """A finished build of the 6-image pipeline (read only; copy it to change it)."""
    from helpers import run_build, write_build_root

    root = tmp_path_factory.mktemp("clean-build")
    pipeline = write_build_root(root, tiny_models)
    result = run_build(pipeline, dask_scheduler)
    assert result.exit_code == 0, result.output
    (root / "stdout.txt").write_text(result.output)
    return root
