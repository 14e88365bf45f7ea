"""Audit items 1, 3, 5 and 9 at config validation: duplicate keys, numbers finite and in
range, plain run names, import paths only from trusted modules."""

import pytest

from ntk_torch.config import (
    IMPORT_ENV,
    ConfigError,
    check_imports,
    check_run_name,
    import_paths,
    load_config,
    parse_config,
    trusted_modules,
)


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    """Item 9: 'lr: 0.1' then 'lr: 50' silently gave 50."""
    path = write(tmp_path, "name: exp\ntrain:\n  lr: 0.1\n  steps: 5\n  lr: 50\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: duplicate key 'lr' at line 5 \(first given at line 3\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"duplicate key 'train' at line 3 \(first given at line 1\)"):
        load_config(write(tmp_path, "train: {lr: 1}\nseed: 1\ntrain: {lr: 2}\n"))
    with pytest.raises(ConfigError, match=r"duplicate key 'width' at line 1"):
        load_config(write(tmp_path, "model: {options: {width: 8, width: 9}}\n"))
    with pytest.raises(ConfigError, match=r"--set model.options=\{a: 1, a: 2\}\): duplicate key 'a'"):
        load_config(write(tmp_path, "name: exp\n"), ["model.options={a: 1, a: 2}"])
    # the same key in different mappings, and YAML merge keys, are fine
    config = load_config(write(tmp_path, "data: {name: digits, options: &o {seed: 1}}\n"
                                         "model: {name: mlp, options: {<<: *o, width: 4}}\n"))
    assert config.data.name == "digits" and config.model.options == {"seed": 1, "width": 4}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.weight_decay=-.inf", "train.weight_decay must be a finite number"),
        ("train.momentum=1.5", r"train.momentum must be below 1 \(momentum 1 or more"),
        ("train.momentum=1", "train.momentum must be below 1"),
        ("train.lr=1.0e+999", "train.lr must be a finite number"),
        ("train.steps=9007199254740992", r"train.steps must be below 2\*\*53"),
        ("track.every=100000000000000000000", r"track.every must be below 2\*\*53"),
        ("track.schedule=[0,-5]", r"track.schedule\[1\] must be a step in \[0, 2\*\*53\), got -5"),
        ("track.schedule=[]", "track.schedule must list at least one step"),
        ("seed=-1", "seed must be non-negative"),
        ("seed=4294967296", r"seed must be below 2\*\*32"),
        ("train.device=meta", "train.device 'meta' holds no data"),
        ("train.device=tpu7", "train.device 'tpu7' is not a device"),
    ],
)
def test_numbers_and_devices_are_checked_at_validation(tmp_path, override, message):
    """Item 5: these reached the optimizer or the tracker and ended in a traceback."""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "name: exp\n"), [override])


@pytest.mark.parametrize("name", ["../../../victim", "/tmp/abs", "a/b", "a\\b", "..", ".", "", " ", "c:x", "a\nb"])
def test_the_name_is_a_plain_name(name):
    """Item 1: a name of '../../../victim' or an absolute one wrote outside --out."""
    with pytest.raises(ConfigError, match="name must be a plain name"):
        parse_config({"name": name})
    assert check_run_name("digits_mlp-width64 v2", "name") == "digits_mlp-width64 v2"


def test_import_paths_need_a_trusted_module(monkeypatch):
    """Item 3: model: {name: "os:system"} ran a shell command."""
    monkeypatch.delenv(IMPORT_ENV, raising=False)
    config = parse_config({"model": {"name": "os:system", "options": {"command": "touch X"}},
                           "data": {"name": "mypkg.data:make"}})
    assert import_paths(config) == [("data.name", "mypkg.data:make"), ("model.name", "os:system")]
    with pytest.raises(ConfigError, match=r"data.name 'mypkg.data:make' would import and run code from module "
                                          r"'mypkg.data', which is not trusted.*--allow-import mypkg.data"):
        check_imports(config, trusted_modules())
    with pytest.raises(ConfigError, match="model.name 'os:system'.*module 'os'"):
        check_imports(config, trusted_modules(["mypkg"]))
    monkeypatch.setenv(IMPORT_ENV, " os , mypkg.data")
    assert trusted_modules(["extra"]) == ("extra", "os", "mypkg.data")
    assert check_imports(config, trusted_modules()) == import_paths(config)
    assert check_imports(parse_config({}), ()) == []  # built-in names import nothing
    with pytest.raises(ConfigError, match="not a dotted module name"):
        trusted_modules(["os;rm"])
    # a package trusts its submodules, but not a module that merely shares a prefix
    assert check_imports(parse_config({"model": {"name": "mypkg.sub.models:f"}}), ["mypkg"])
    with pytest.raises(ConfigError, match="not trusted"):
        check_imports(parse_config({"model": {"name": "mypkgevil:f"}}), ["mypkg"])


@pytest.mark.slow
def test_yaml_alias_bombs_deep_nesting_and_self_reference_are_refused(tmp_path):
    levels = ["    a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10**9 values
    with pytest.raises(ConfigError, match="more than 100,000 values with its YAML aliases expanded"):
        load_config(write(tmp_path, "model:\n  options:\n" + "\n".join(levels) + "\n"))
    with pytest.raises(ConfigError, match="nested too deeply to read|nested deeper than 64 levels"):
        load_config(write(tmp_path, "model: {options: {x: " + "[" * 5000 + "]" * 5000 + "}}\n"))
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_config(write(tmp_path, "model: {options: {x: " + "[" * 80 + "]" * 80 + "}}\n"))
    with pytest.raises(ConfigError, match="a YAML alias refers to a mapping or list that contains it"):
        load_config(write(tmp_path, "model:\n  options: &a\n    x: *a\n"))
    with pytest.raises(ConfigError, match=r"--set model.options.x=\[\[\[.*nested deeper than 64"):
        load_config(write(tmp_path, "name: exp\n"), ["model.options.x=" + "[" * 70 + "]" * 70])
