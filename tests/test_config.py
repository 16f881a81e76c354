"""The config file: defaults, the example in contrib/, flag overrides, clear errors."""

from pathlib import Path

import msgspec
import pytest

from rbeed import config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "contrib" / "rbeed.toml"


def all_keys(struct_type=config.Config, prefix="") -> list[str]:
    keys = []
    for field in msgspec.structs.fields(struct_type):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            keys += all_keys(field.type, f"{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_example_config_is_the_defaults():
    loaded = config.load(EXAMPLE)
    assert msgspec.to_builtins(loaded) == msgspec.to_builtins(config.Config())


@pytest.mark.parametrize("document", [EXAMPLE, ROOT / "man" / "rbeed.toml.5"])
def test_every_key_is_documented(document):
    text = document.read_text()
    missing = [key for key in all_keys() if key.rsplit(".", 1)[-1] not in text]
    assert not missing, f"{document.name} does not mention {missing}"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "rbeed.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:1"]\nsse_keepalive = 2.5\n')
    loaded = config.load(path, {"server.listen": ["127.0.0.1:2"], "state_dir": "/x"})
    assert loaded.server.listen == ["127.0.0.1:2"]
    assert loaded.server.sse_keepalive == 2.5
    assert loaded.state_path == Path("/x")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[server]\nlisten = 5\n", "Expected `array`, got `int` - at `$.server.listen`"),
        ("[server]\nbogus = 1\n", "unknown field `bogus` - at `$.server`"),
        ("[workers]\nbackend = 'docker'\n", "at `$.workers.backend`"),
        ("[jobs]\nttl = ", "Invalid"),
        # inf passed ge=0, and SIGTERM then crashed the daemon (OverflowError in EXTEND_TIMEOUT_USEC).
        ("[server]\nshutdown_grace = inf\n", "Expected `float` <= 31536000.0 - at `$.server.shutdown_grace`"),
        ("[workers]\nkeep_alive = inf\n", "at `$.workers.keep_alive`"),
        # A range is a set in memory: 0-4294967295 hung the daemon; 3-1 left no CPU for any worker.
        ("[workers]\ncpu_affinity = '0-4294967295'\n", "at `$.workers.cpu_affinity`"),
        ("[workers]\ncpu_affinity = '0,3-1'\n", "cpu_affinity '0,3-1': the range 3-1 runs backwards - at `$.workers`"),
        # Every download, a local path's too, formatted it: an internal KeyError for each.
        ("[models]\nhf_base = 'https://x/{owner}/{bogus}'\n",
         "hf_base 'https://x/{owner}/{bogus}' is unusable: KeyError('bogus') (it may name {owner}, {repo} and {path})"),
        ("[models]\nhf_base = 'file:///srv/{path}'\n", "hf_base 'file:///srv/{path}' is not an http(s):// URL"),
        # Refused only by systemctl set-property as each worker started, restarts of live ones too.
        ("[workers]\nmemory_max = '4 GB'\n", "at `$.workers.memory_max`"),
        ("[workers]\ncpu_quota = '2 cores'\n", "at `$.workers.cpu_quota`"),
        ("[workers]\ncpu_quota = '0%'\n", "cpu_quota '0%' is out of range: more than 0%"),
        *((f"[workers]\nmemory_max = '{value}'\n", f"memory_max '{value}' is out of range")
          for value in ("0", "0.0G", "0%", "101%", "16E", "20000000000000000000")),  # systemd 252 refuses them
    ],
)
def test_bad_config_names_the_key(tmp_path, text, expected):
    path = tmp_path / "rbeed.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_a_bad_value_from_the_command_line_is_said_to_be_its():
    # It named /etc/rbeed/rbeed.toml, which need not even exist.
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {"server.listen": ["127.0.0.1:99999"]})
    assert str(info.value).startswith("the command line: Expected `str` matching regex")
    assert str(info.value).endswith("- at `$.server.listen[0]`")


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_default_paths_follow_systemd_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/rbeed:/other")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/rbeed")
    assert config.default_state_dir() == Path("/var/lib/rbeed")
    assert config.Config().socket_path == Path("/run/rbeed/rbeed.sock")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert config.default_state_dir() == tmp_path / "state" / "rbeed"
    assert config.Config().socket_path == tmp_path / "run" / "rbeed" / "rbeed.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert config.default_runtime_dir().name.startswith("rbeed-")
