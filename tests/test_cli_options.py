"""Options several commands share are defined once (issue 8): the cluster options, and choices.

The cluster options come from one decorator (``batchseg.cli.cluster_options``) with the
defaults of ``ClusterSettings``; every ``click.Choice`` is built from the library's tuples.
"""
from __future__ import annotations

import ast
from pathlib import Path

import click
from click.testing import CliRunner

from batchseg.cli import cli
from batchseg.cluster import SCHEDULER_ENV, ClusterSettings

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_COMMANDS = ("embed", "pseudolabel", "train-student", "predict", "build")
LOCAL_CLUSTER_COMMANDS = CLUSTER_COMMANDS[:-1]  # build takes the rest from its pipeline file
CLUSTER_OPTIONS = ("workers", "gpus", "threads", "scheduler")


def _option(command: str, name: str) -> click.Option | None:
    return next((p for p in cli.commands[command].params if p.name == name), None)


def _shape(option: click.Option) -> tuple:
    return tuple(option.opts), option.default, option.envvar, option.type, option.show_default, option.required


def test_the_cluster_commands_expose_identical_cluster_options():
    scheduler = {command: _shape(_option(command, "scheduler")) for command in CLUSTER_COMMANDS}
    assert set(scheduler.values()) == {(("--scheduler",), None, SCHEDULER_ENV, click.STRING, None, False)}
    assert SCHEDULER_ENV == "DASK_SCHEDULER_ADDRESS"
    for name in CLUSTER_OPTIONS:
        shapes = {command: _shape(_option(command, name)) for command in LOCAL_CLUSTER_COMMANDS}
        assert len(set(shapes.values())) == 1, shapes
    defaults = ClusterSettings()
    assert [_option("embed", name).default for name in CLUSTER_OPTIONS] == [
        defaults.workers, defaults.gpus, defaults.torch_threads, defaults.scheduler]
    assert [_option("embed", "workers").default, _option("embed", "gpus").default] == [1, 0]
    assert all(_option("build", name) is None for name in ("workers", "gpus", "threads"))


def test_the_cluster_options_keep_their_place_in_each_commands_help():
    for command in LOCAL_CLUSTER_COMMANDS:
        names = [p.name for p in cli.commands[command].params]
        start = names.index("workers")
        assert names[start:start + 4] == list(CLUSTER_OPTIONS), (command, names)


def test_the_cluster_options_reach_the_stage_as_one_settings_object(tmp_path, monkeypatch):
    import batchseg.stages.predict as predict

    seen = []

    def fake_run(config, progress):
        seen.append(config.cluster)
        raise predict.UsageError("stop here")

    monkeypatch.setattr(predict, "run_predict", fake_run)
    args = ["predict", str(tmp_path / "student"), str(tmp_path / "src"), str(tmp_path / "dest")]
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    CliRunner().invoke(cli, [*args, "--workers", "3", "--threads", "2"])
    CliRunner().invoke(cli, args, env={SCHEDULER_ENV: "tcp://10.0.0.5:8786"})
    CliRunner().invoke(cli, [*args, "--scheduler", "tcp://a:1", "--gpus", "2"], env={SCHEDULER_ENV: "tcp://b:2"})
    assert seen == [
        ClusterSettings(workers=3, torch_threads=2),
        ClusterSettings(scheduler="tcp://10.0.0.5:8786"),
        ClusterSettings(scheduler="tcp://a:1", gpus=2),
    ]


def test_every_click_choice_is_built_from_the_librarys_tuples():
    offenders = []
    for node in ast.walk(ast.parse((ROOT / "batchseg" / "cli.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Choice":
            if any(isinstance(arg, (ast.List, ast.Tuple, ast.Set, ast.Constant)) for arg in node.args):
                offenders.append(f"cli.py:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
