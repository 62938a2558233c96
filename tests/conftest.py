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
