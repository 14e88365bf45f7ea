"""Config files: validation errors name the file and key; overrides are typed."""

import pytest

from ntk_torch.config import ConfigError, load_config, parse_config, set_by_path


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path):
    config = load_config(write(tmp_path, "name: exp\ntrain: {lr: 1, steps: 20, batch_size: null}\n"))
    assert config.name == "exp"
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.batch_size is None and config.train.steps == 20
    assert config.data.name == "digits" and config.track.mode == "trace"
    assert config.sweep is None


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "train: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown key 'train.lrr' \(known keys: train.optimizer"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(write(tmp_path, "trainer: {}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lr: fast}", "train.lr must be a number, got 'fast'"),
        ("train: {steps: 2.5}", "train.steps must be an integer, got 2.5"),
        ("train: {nesterov: 1}", "train.nesterov must be true or false"),
        ("train: {optimizer: lbfgs}", "train.optimizer must be one of sgd, adam, adamw, rmsprop, adagrad, got 'lbfgs'"),
        ("train: {optimizer: adam, momentum: 0.9}", "train.momentum applies to sgd and rmsprop, not adam"),
        ("train: {optimizer: rmsprop, nesterov: true}", "train.nesterov applies to sgd only"),
        ("train: {clip_grad_norm: 0}", r"train.clip_grad_norm must be positive \(or null\), got 0.0"),
        ("train: {clip_grad_norm: big}", "train.clip_grad_norm must be a number"),
        ("train: {scheduler: {name: exponential}}", "train.scheduler.name must be one of step, cosine, one-cycle"),
        ("train: {scheduler: {name: cosine, gamma: 0.5}}",
         r"train.scheduler.gamma is not an option of the cosine scheduler \(its options: eta_min\)"),
        ("train: {scheduler: {name: step, step_size: 0}}", "train.scheduler.step_size must be at least 1"),
        ("train: {scheduler: {name: step, gamma: -1}}", "train.scheduler.gamma must be positive"),
        ("train: {scheduler: {name: one-cycle, pct_start: 1.5}}", "train.scheduler.pct_start must be between 0 and 1"),
        ("train: {scheduler: {name: one-cycle, warmup: 3}}", "unknown key 'train.scheduler.warmup'"),
        ("train: {scheduler: cosine}", "train.scheduler must be a mapping"),
        ("track: {forecast: both}", "track.forecast must be one of auto, kernel, twin or null"),
        ("track: {method: fastest}", "track.method must be one of auto, jacobian, ntk_vp, structured, loop, got 'fastest'"),
        ("track: {spectrum: some}", "track.spectrum must be one of auto, full, top, got 'some'"),
        ("train: {steps: 0}", "train.steps must be at least 1"),
        ("train: {lr: -1}", "train.lr must be non-negative"),
        ("track: {schedule: sometimes}", "track.schedule must be 'log'"),
        ("track: {schedule: [0, x]}", r"track.schedule\[1\] must be an integer"),
        ("model: {options: 3}", "model.options must be a mapping"),
        ("data: 5", "data must be a mapping"),
        ("sweep: {values: []}", "sweep.values must list at least one value"),
        ("sweep: {values: [1], seeds: 0}", "sweep.seeds must be at least 1"),
        ("- a list", "the top level must be a mapping"),
    ],
)
def test_wrong_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text + "\n"))


def test_optimizers_schedulers_clipping_and_the_forecast(tmp_path):
    text = ("train: {optimizer: adamw, lr: 0.001, clip_grad_norm: 1, scheduler: {name: one-cycle, max_lr: 0.01}}\n"
            "track: {forecast: twin}\n")
    config = load_config(write(tmp_path, text))
    assert config.train.optimizer == "adamw" and config.train.clip_grad_norm == 1.0
    assert config.train.scheduler.name == "one-cycle" and config.train.scheduler.max_lr == 0.01
    assert config.train.scheduler.pct_start is None  # the default, filled in when it is built
    assert config.track.forecast == "twin"
    assert load_config(write(tmp_path, "track: {forecast: null}\n")).track.forecast is None
    assert load_config(write(tmp_path, "train: {optimizer: rmsprop, momentum: 0.9}\n")).train.momentum == 0.9
    defaults = load_config(write(tmp_path, "name: plain\n"))
    assert defaults.train.scheduler is None and defaults.train.clip_grad_norm is None
    assert defaults.track.forecast == "auto"
    step = load_config(write(tmp_path, "train: {scheduler: {name: step}}\n"), ["train.scheduler.gamma=0.5"])
    assert step.train.scheduler.gamma == 0.5


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: {lr: [\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path, "model: {name: mlp, options: {width: 64}}\n")
    config = load_config(path, ["model.options.width=512", "train.lr=0.05", "track.schedule=[0, 5, 10]"])
    assert config.model.options == {"width": 512}
    assert config.train.lr == 0.05
    assert config.track.schedule == [0, 5, 10]
    with pytest.raises(ConfigError, match=r"--set train.lr=x\): train.lr must be a number"):
        load_config(path, ["train.lr=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown key 'train.speed'"):
        load_config(path, ["train.speed=3"])


def test_set_by_path_returns_a_validated_copy():
    config = parse_config({"model": {"options": {"width": 8}}})
    wider = set_by_path(config, "model.options.width", 1024)
    assert wider.model.options["width"] == 1024 and config.model.options["width"] == 8
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        set_by_path(config, "train.steps", "many")
