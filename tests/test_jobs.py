"""medsd.jobs.run_job, what every jobs/*.py entrypoint runs: bad input is one clear line and exit status 2."""

import pytest

from medsd.config import TrainConfig
from medsd.jobs import BAD_INPUT_EXIT, run_job


def fail_if_called(cfg):
    raise AssertionError("run must not start on bad input")


def test_an_unknown_key_exits_2_with_the_nearest_key(capsys):
    status = run_job("train", TrainConfig, fail_if_called, str, ["--set", "max_step=3"])
    assert status == BAD_INPUT_EXIT
    err = capsys.readouterr().err
    assert err.startswith("error:") and "max_steps" in err


def test_a_missing_config_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert run_job("train", TrainConfig, fail_if_called, str, ["--config", str(missing)]) == BAD_INPUT_EXIT
    assert str(missing) in capsys.readouterr().err


def test_errors_raised_by_the_run_are_reported_and_the_result_is_printed(capsys, monkeypatch):
    monkeypatch.setattr("medsd.jobs.ensure_ray", lambda: None)

    def missing_data(cfg):
        raise FileNotFoundError(f"data.csv: {cfg.out}/train.csv does not exist")

    assert run_job("train", TrainConfig, missing_data, str, ["--set", "out=/x"]) == BAD_INPUT_EXIT
    assert "error: data.csv: /x/train.csv does not exist" in capsys.readouterr().err
    assert run_job("train", TrainConfig, lambda cfg: cfg.max_steps, lambda steps: f"steps {steps}", []) == 0
    assert "steps" in capsys.readouterr().out


@pytest.mark.parametrize("bug", [KeyError("x"), RuntimeError("boom")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    monkeypatch.setattr("medsd.jobs.ensure_ray", lambda: None)

    def buggy(cfg):
        raise bug

    with pytest.raises(type(bug)):
        run_job("train", TrainConfig, buggy, str, [])
