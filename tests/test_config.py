import pytest

from neurond.config import Config, ConfigError, describe_settings, load_config


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "neurond.toml"
    f.write_text('tp_size = 2\nport = 9000\nhost = "0.0.0.0"\n')
    c = load_config(f, env={"NEUROND_PORT": "9100"}, overrides={"host": "127.0.0.2", "tp_size": None})
    assert (c.tp_size, c.port, c.host) == (2, 9100, "127.0.0.2")
    assert c.step_deadline_floor_s == Config().step_deadline_floor_s


def test_unknown_key_and_bad_types_are_errors(tmp_path):
    f = tmp_path / "neurond.toml"
    f.write_text("tp_sise = 2\n")
    with pytest.raises(ConfigError, match="unknown setting 'tp_sise'"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="NEUROND_TP_SIZE"):
        load_config(None, env={"NEUROND_TP_SIZE": "two"})
    with pytest.raises(ConfigError, match="tp_size must be >= 1"):
        load_config(None, env={}, overrides={"tp_size": 0})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})


def test_model_name_defaults():
    assert Config().model_name() == "neurond-builtin"
    assert Config(model="/models/Llama-3-8B").model_name() == "Llama-3-8B"
    assert Config(model="/m/x", served_model_name="chat").model_name() == "chat"


def test_every_setting_is_described():
    text = describe_settings()
    for name in Config.__dataclass_fields__:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split("  ", 2)[-1]) > 3, f"{name} has no description"


def test_a_retired_setting_is_accepted_only_at_its_one_remaining_value(tmp_path):
    """tp_impl was retired: an operator's file that says what neurond does anyway still loads; one that asks
    for the removed behaviour is refused with the reason."""
    from neurond.config import ConfigError, load_config

    path = tmp_path / "neurond.toml"
    path.write_text('tp_impl = "neurond"\ntp_size = 2\n')
    assert load_config(path, env={}).tp_size == 2
    path.write_text('tp_impl = "transformers"\n')
    with pytest.raises(ConfigError, match="tp_impl = 'transformers' is no longer supported"):
        load_config(path, env={})
