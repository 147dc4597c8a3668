import pytest

from medsd.config import DataConfig, DemoConfig, PhantomConfig, load_config


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("out: here\nphantom:\n  n_images: 50\n  seed: 3\n")
    cfg = load_config(DemoConfig, path, ["phantom.seed=7", "model.precision=fp32"])
    assert cfg.out == "here"
    assert cfg.phantom == PhantomConfig(n_images=50, seed=7)
    assert cfg.model.precision == "fp32"


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'phantom.n_image'; did you mean 'phantom.n_images'"):
        load_config(DemoConfig, None, ["phantom.n_image=3"])


def test_invalid_value_names_the_dotted_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("phantom:\n  n_images: 0\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*phantom.n_images"):
        load_config(DemoConfig, path)
    with pytest.raises(ValueError, match="data.projections"):
        load_config(DataConfig, None, ["projections=[XX]"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(DataConfig, tmp_path / "nope.yaml")


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(DataConfig, None, ["image_size_px"])


def test_round_trip_through_json_dump():
    cfg = load_config(DemoConfig, None, ["phantom.n_images=10"])
    assert DemoConfig.model_validate(cfg.model_dump(mode="json")) == cfg
