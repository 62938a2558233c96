"""The fitted qc model: reduced dimension rule, thresholds, and an exact round trip through its files."""
import numpy as np
import pytest
import torch

from batchseg.io.qc_table import read_model_files, write_model_files
from batchseg.qc.duplicates import normalise_rows
from batchseg.qc.model import QcModel, fit_qc_model
from batchseg.qc.reduction import Moments, choose_dim
from batchseg.qc.settings import QcSettings


@pytest.mark.parametrize("n_fit,max_dim,dim,expected", [(1000, 32, 64, 32), (100, 32, 64, 20), (5, 32, 64, 2),
                                                        (1000, 32, 8, 8), (1000, 4, 64, 4)])
def test_reduced_dimension_keeps_five_rows_per_dimension(n_fit, max_dim, dim, expected):
    assert choose_dim(np.linspace(1.0, 0.0, dim), n_fit, max_dim) == expected


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 16)) + 3.0
    data[:10] = rng.normal(size=(10, 16)) * 4.0  # outlying directions
    return normalise_rows(data)


def _moments(rows: np.ndarray) -> Moments:
    moments = Moments(rows.shape[1])
    for start in range(0, len(rows), 64):  # streamed in chunks, as the stage does
        moments.add(rows[start:start + 64])
    return moments


def test_thresholds_flag_the_contamination_and_outliers_rank_first(rows):
    torch.set_num_threads(1)
    model = fit_qc_model(_moments(rows), rows, QcSettings(method="rglasso", compare=("mcd",), contamination=0.05))
    scores = model.score(rows)
    assert set(scores) == {"rglasso", "mcd"} and model.mogaal is None
    flagged = model.is_outlier(scores)
    assert flagged.sum() == pytest.approx(0.05 * len(rows), abs=2)
    assert flagged[:10].sum() >= 8  # the injected rows are among the flagged
    assert model.info["reduced_dim"] == 16 and model.info["rglasso"]["converged"]
    fixed = fit_qc_model(_moments(rows), rows, QcSettings(contamination=None, threshold=1e9))
    assert not fixed.is_outlier(fixed.score(rows)).any()


def test_model_files_round_trip_exactly(tmp_path, rows):
    model = fit_qc_model(_moments(rows), rows,
                         QcSettings(method="mcd", compare=("rglasso", "mogaal"), max_dim=8, seed=3))
    write_model_files(tmp_path, *model.to_parts())
    loaded = QcModel.from_parts(*read_model_files(tmp_path))
    assert loaded.model_id == model.model_id and loaded.settings == model.settings
    assert loaded.thresholds == model.thresholds
    for name, values in model.score(rows).items():
        np.testing.assert_array_equal(loaded.score(rows)[name], values, err_msg=name)
    assert [p.name for p in sorted(tmp_path.joinpath("qc").iterdir())] == ["_model-%s.safetensors" % model.model_id,
                                                                          "_model.json"]
    assert read_model_files(tmp_path / "elsewhere") is None
