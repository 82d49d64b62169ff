"""The run layout both training and scoring read: the storage root, run names, result URIs."""

from __future__ import annotations

import os
import re

from mmray.config import config_from_dict
from mmray.runs import fresh_run_name, result_uri, storage_root


def root(storage_path: str) -> str:
    return storage_root(config_from_dict({"train": {"storage_path": storage_path}}))


def test_the_storage_root_is_absolute_locally_and_unchanged_on_s3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert root("./runs") == str(tmp_path / "runs")
    assert root("~/runs/") == os.path.join(str(tmp_path), "home", "runs")
    assert root("s3://bucket/runs/") == "s3://bucket/runs"


def test_fresh_names_sort_by_time_and_do_not_collide():
    names = {fresh_run_name() for _ in range(20)}
    assert len(names) == 20 and all(re.fullmatch(r"mmray-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)


def test_ray_s_scheme_less_s3_paths_become_uris_again():
    assert (
        result_uri("bucket/runs/r/checkpoint_epoch0001", "s3://bucket/runs")
        == "s3://bucket/runs/r/checkpoint_epoch0001"
    )
    assert result_uri("s3://bucket/runs/r/c", "s3://bucket/runs") == "s3://bucket/runs/r/c"
    assert result_uri("/local/runs/r/c", "/local/runs") == "/local/runs/r/c"
