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


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "2001:db8::1", "api.example.com"])
def test_a_public_host_needs_a_token_or_an_explicit_setting(host, tmp_path):
    """A host beyond loopback with no api_token_file is refused unless allow_unauthenticated says so; a token
    file, or the setting, lets it start (with a warning, for the setting: test_the_unauthenticated_warning)."""
    with pytest.raises(ConfigError, match=f"host = '{host}' serves the API beyond this machine, and no "
                                          "api_token_file is set"):
        load_config(None, env={}, overrides={"host": host})
    assert load_config(None, env={}, overrides={"host": host, "allow_unauthenticated": True}).host == host
    assert load_config(None, env={"NEUROND_API_TOKEN_FILE": str(tmp_path / "t")}, overrides={"host": host}).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_host_needs_no_token(host):
    assert load_config(None, env={}, overrides={"host": host}).host == host


def test_the_unauthenticated_warning(caplog):
    """With allow_unauthenticated on a public host, every start logs a warning; on loopback, or with a token,
    nothing."""
    from neurond.server import read_tokens

    with caplog.at_level("WARNING", logger="neurond"):
        read_tokens(Config(host="127.0.0.1"))
        assert caplog.records == []
        read_tokens(Config(host="0.0.0.0", allow_unauthenticated=True))
    assert [r.getMessage() for r in caplog.records] == [
        "the API on 0.0.0.0:8000 needs no token (allow_unauthenticated = true, no api_token_file): anyone who "
        "reaches the port can use the model"]


def test_connection_places_settings():
    c = Config()
    assert c.connection_reserve < c.max_connections_per_peer <= c.max_connections - c.connection_reserve
    assert c.max_connections_per_peer >= c.max_concurrent_requests  # one load balancer can fill every request slot
    with pytest.raises(ConfigError, match=r"connection_reserve \(1024\) must be >= 0 and below max_connections"):
        load_config(None, env={}, overrides={"connection_reserve": 1024})
    with pytest.raises(ConfigError, match="connection_reserve"):
        load_config(None, env={}, overrides={"connection_reserve": -1})
    with pytest.raises(ConfigError, match="max_connections_per_peer must be >= 1"):
        load_config(None, env={}, overrides={"max_connections_per_peer": 0})


def test_neurond_serve_refuses_a_public_host_without_a_token(tmp_path):
    """The daemon itself: exit code 2 and the reason, before it binds or loads anything. (The model does not
    exist either, so that a daemon that let the host through would still stop before it binds.)"""
    import subprocess
    import sys

    conf = tmp_path / "neurond.toml"
    conf.write_text(f'host = "0.0.0.0"\nmodel = "{tmp_path / "no-such-model"}"\n')
    proc = subprocess.run([sys.executable, "-m", "neurond", "serve", "--config", str(conf), "--device", "cpu",
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "host = '0.0.0.0' serves the API beyond this machine" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "cache").exists()
