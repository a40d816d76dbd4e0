from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, load_config

JOBS = sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml"))


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method.name=nope", "train.steps=-1", "train.nope=1", "zzz.a=1",
                           "method.lr=fast", "broken"])
    text = str(info.value)
    assert len(info.value.errors) == 6
    assert "method.name: 'nope' is not allowed; choose one of" in text and "mezo" in text
    assert "train.steps: -1 is too small; it must be >= 0" in text
    assert "train.nope: unknown key" in text and "steps" in text
    assert "zzz: unknown section" in text
    assert "method.lr: expected float, got 'fast'" in text
    assert "'broken': overrides are section.key=value" in text


def test_overrides_are_typed_and_applied(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("method:\n  lr: 1.0e-5\ntrain:\n  steps: 10\n")
    cfg = load_config(job, ["train.steps=3", "method.eps=1e-2", "model.trainable=*.q_proj.*",
                            "method.two_sided=false"])
    assert cfg.train.steps == 3 and cfg.method.lr == 1e-5 and cfg.method.eps == 1e-2
    assert cfg.model.trainable == ["*.q_proj.*"] and cfg.method.two_sided is False
    assert isinstance(load_config(job, ["method.lr=1"]).method.lr, float)


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "data.data_dir=/tmp/x"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.flat()["train.steps"] == 7
    assert JobConfig().method.name == "mezo"


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_every_shipped_job_validates(job):
    load_config(job)


def test_jobs_exist():
    assert any(j.name == "demo.yaml" for j in JOBS)
