"""Where master keys come from (crypto/keysource.py): flags, then environment, then configuration file.

Every test passes an explicit ``environ`` (with its own HOME) so that nothing of the machine's
environment or of ``~/.config`` leaks in; the CLI-level tests use monkeypatch for the same reason.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from dicom_cloud.cli.options import client_encryption
from dicom_cloud.crypto.keys import KeyRing
from dicom_cloud.crypto.keysource import CONFIG_ENV, MASTER_KEY_ENV, PREVIOUS_KEYS_ENV, KeySettings, load_keys
from dicom_cloud.errors import KeyMissingError, UsageError


class KeyFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.text: dict[int, str] = {}

    def spec(self, key_id: int) -> str:
        path = self.root / f"master-{key_id}.key"
        if key_id not in self.text:
            self.text[key_id] = base64.b64encode(os.urandom(32)).decode()
            path.write_text(self.text[key_id] + "\n")
        return f"{key_id}:{path}"

    def key(self, ring: KeyRing, key_id: int) -> bytes:
        return ring.lookup(key_id).key


@pytest.fixture
def keys(tmp_path: Path) -> KeyFiles:
    root = tmp_path / "keys"
    root.mkdir()
    return KeyFiles(root)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def _config(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def _encryption_table(
    master: str | None = None, previous: list[str] | None = None, fmt: str | None = None
) -> str:
    lines = ["[encryption]"]
    if master is not None:
        lines.append(f'master_key = "{master}"')
    if previous is not None:
        lines.append("previous_keys = [" + ", ".join(f'"{p}"' for p in previous) + "]")
    if fmt is not None:
        lines.append(f'format = "{fmt}"')
    return "\n".join(lines) + "\n"


def _ids(settings: KeySettings) -> list[int]:
    assert settings.ring is not None
    return settings.ring.ids


# -- each place on its own -----------------------------------------------------------------


def test_nothing_anywhere_gives_no_ring(home: Path) -> None:
    settings = load_keys(environ={"HOME": str(home)})
    assert settings == KeySettings(None)
    assert settings.source == "none" and settings.format is None


def test_flags(keys: KeyFiles, home: Path) -> None:
    settings = load_keys(keys.spec(7), [keys.spec(6), keys.spec(5)], environ={"HOME": str(home)})
    assert _ids(settings) == [7, 6, 5]
    assert settings.ring is not None and settings.ring.current.id == 7
    assert settings.source == "command line"
    assert settings.format is None


def test_previous_key_flag_needs_a_master_key_flag(keys: KeyFiles, home: Path) -> None:
    with pytest.raises(UsageError, match="--previous-key needs --master-key"):
        load_keys(None, [keys.spec(6)], environ={"HOME": str(home)})
    # Even when the environment names a master key: flags and environment are never mixed.
    with pytest.raises(UsageError, match="--previous-key needs --master-key"):
        load_keys(None, [keys.spec(6)], environ={"HOME": str(home), MASTER_KEY_ENV: keys.spec(7)})


def test_environment(keys: KeyFiles, home: Path) -> None:
    env = {
        "HOME": str(home),
        MASTER_KEY_ENV: keys.spec(7),
        PREVIOUS_KEYS_ENV: f" {keys.spec(6)} ,, {keys.spec(5)},",
    }
    settings = load_keys(environ=env)
    assert _ids(settings) == [7, 6, 5]
    assert settings.source == MASTER_KEY_ENV


def test_environment_master_key_alone(keys: KeyFiles, home: Path) -> None:
    settings = load_keys(environ={"HOME": str(home), MASTER_KEY_ENV: keys.spec(7)})
    assert _ids(settings) == [7]


def test_environment_reads_the_process_environment(
    keys: KeyFiles, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(PREVIOUS_KEYS_ENV, raising=False)
    monkeypatch.setenv(MASTER_KEY_ENV, keys.spec(9))
    assert _ids(load_keys()) == [9]


def test_config_file_named_by_variable(keys: KeyFiles, home: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8), [keys.spec(7), keys.spec(6)], "DC2"))
    settings = load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})
    assert _ids(settings) == [8, 7, 6]
    assert settings.format == "DC2"
    assert settings.source == str(cfg)
    ring = settings.ring
    assert ring is not None
    assert base64.b64encode(keys.key(ring, 7)).decode() == keys.text[7]


def test_config_file_in_home(keys: KeyFiles, home: Path) -> None:
    cfg = _config(home / ".config" / "dicom-cloud" / "config.toml", _encryption_table(keys.spec(8)))
    settings = load_keys(environ={"HOME": str(home)})
    assert _ids(settings) == [8]
    assert settings.source == str(cfg)
    assert settings.format is None


def test_config_file_without_master_key_gives_no_ring(keys: KeyFiles, home: Path, tmp_path: Path) -> None:
    for body in (
        "",
        "[other]\nx = 1\n",
        _encryption_table(None, [keys.spec(6)], "A1"),
        '[encryption]\nmaster_key = ""\n',
    ):
        cfg = _config(tmp_path / "cfg.toml", body)
        assert load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)}).ring is None, body


# -- precedence ------------------------------------------------------------------------------


def test_flags_win_over_environment_and_config(keys: KeyFiles, home: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8), [keys.spec(6)], "DC2"))
    env = {
        "HOME": str(home),
        MASTER_KEY_ENV: keys.spec(9),
        PREVIOUS_KEYS_ENV: keys.spec(5),
        CONFIG_ENV: str(cfg),
    }
    settings = load_keys(keys.spec(7), [], environ=env)
    assert _ids(settings) == [7]  # nothing added from the environment or the file
    assert settings.source == "command line"
    assert settings.format is None  # the file's format comes with the file's keys only


def test_environment_wins_over_config(keys: KeyFiles, home: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8), [keys.spec(6)], "DC2"))
    settings = load_keys(environ={"HOME": str(home), MASTER_KEY_ENV: keys.spec(9), CONFIG_ENV: str(cfg)})
    assert _ids(settings) == [9]
    assert settings.source == MASTER_KEY_ENV
    assert settings.format is None


def test_empty_environment_variable_falls_through_to_config(
    keys: KeyFiles, home: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8)))
    settings = load_keys(environ={"HOME": str(home), MASTER_KEY_ENV: "", CONFIG_ENV: str(cfg)})
    assert _ids(settings) == [8]


def test_variable_config_wins_over_home_config(keys: KeyFiles, home: Path, tmp_path: Path) -> None:
    _config(home / ".config" / "dicom-cloud" / "config.toml", _encryption_table(keys.spec(6)))
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8)))
    assert _ids(load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})) == [8]


# -- configuration file errors -------------------------------------------------------------


def test_config_variable_naming_a_missing_file(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(UsageError) as caught:
        load_keys(environ={"HOME": str(home), CONFIG_ENV: str(missing)})
    assert str(missing) in str(caught.value)
    assert caught.value.exit_code == 2


def test_config_file_not_toml(home: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cfg.toml", "[encryption\nmaster_key = 7:/x\n")
    with pytest.raises(UsageError, match="cannot read") as caught:
        load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})
    assert str(cfg) in str(caught.value)


def test_config_file_unreadable(home: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "dir.toml"
    cfg.mkdir()  # is_file() is false: like a missing file named by the variable
    with pytest.raises(UsageError) as caught:
        load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})
    assert str(cfg) in str(caught.value)


@pytest.mark.parametrize(
    "previous",
    ['"6:/etc/k"', "[6]", '[["6", "/etc/k"]]', '{ a = "6:/etc/k" }'],
    ids=["string", "int-list", "nested-list", "table"],
)
def test_config_previous_keys_must_be_a_list_of_strings(
    home: Path, tmp_path: Path, keys: KeyFiles, previous: str
) -> None:
    cfg = _config(
        tmp_path / "cfg.toml", f'[encryption]\nmaster_key = "{keys.spec(8)}"\nprevious_keys = {previous}\n'
    )
    with pytest.raises(UsageError, match="previous_keys") as caught:
        load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})
    assert str(cfg) in str(caught.value)


def test_config_master_key_not_a_spec(home: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cfg.toml", "[encryption]\nmaster_key = 7\n")
    with pytest.raises(UsageError, match="ID:PATH"):
        load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})


@pytest.mark.parametrize("where", ["flag", "environment", "config master", "config previous", "env previous"])
def test_bad_key_file_named_never_shown(keys: KeyFiles, home: Path, tmp_path: Path, where: str) -> None:
    bad = tmp_path / "short.key"
    content = base64.b64encode(os.urandom(16)).decode()
    bad.write_text(content)
    env = {"HOME": str(home)}
    if where == "flag":
        call = lambda: load_keys(f"7:{bad}", [], environ=env)  # noqa: E731
    elif where == "environment":
        call = lambda: load_keys(environ={**env, MASTER_KEY_ENV: f"7:{bad}"})  # noqa: E731
    elif where == "env previous":
        call = lambda: load_keys(environ={**env, MASTER_KEY_ENV: keys.spec(8), PREVIOUS_KEYS_ENV: f"7:{bad}"})  # noqa: E731
    else:
        table = (
            _encryption_table(f"7:{bad}")
            if where == "config master"
            else _encryption_table(keys.spec(8), [f"7:{bad}"])
        )
        cfg = _config(tmp_path / "cfg.toml", table)
        call = lambda: load_keys(environ={**env, CONFIG_ENV: str(cfg)})  # noqa: E731
    with pytest.raises(UsageError) as caught:
        call()
    shown = f"{caught.value}\n{caught.value.hint}\n{caught.value!r}"
    assert str(bad) in shown
    assert "16 bytes" in shown
    assert content not in shown and content[:8] not in shown
    assert caught.value.exit_code == 2


def test_duplicate_ids_across_master_and_previous(keys: KeyFiles, home: Path, tmp_path: Path) -> None:
    spec7 = keys.spec(7)
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(spec7, [spec7]))
    with pytest.raises(UsageError, match="given twice"):
        load_keys(environ={"HOME": str(home), CONFIG_ENV: str(cfg)})


# -- the CLI's use of it: client_encryption --------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> pytest.MonkeyPatch:
    monkeypatch.setenv("HOME", str(home))
    for var in (CONFIG_ENV, MASTER_KEY_ENV, PREVIOUS_KEYS_ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_client_encryption_without_keys(clean_env: pytest.MonkeyPatch) -> None:
    assert client_encryption(None, None, None, []) is None
    with pytest.raises(UsageError, match="needs a master key") as caught:
        client_encryption("client-side", None, None, [])
    assert not isinstance(caught.value, KeyMissingError)  # a usage error (exit 2), not "object needs key"
    assert caught.value.exit_code == 2


def test_client_encryption_reads_only_unless_asked_to_encrypt(
    clean_env: pytest.MonkeyPatch, keys: KeyFiles
) -> None:
    crypt = client_encryption(None, None, keys.spec(7), [])
    assert crypt is not None and crypt.ring is not None
    assert not crypt.writes_encrypted
    crypt = client_encryption("server-side", None, keys.spec(7), [])
    assert crypt is not None and not crypt.writes_encrypted
    crypt = client_encryption("client-side", None, keys.spec(7), [])
    assert crypt is not None and crypt.encrypt_as == "A1"
    assert client_encryption("client-side", "dc2", keys.spec(7), []).encrypt_as == "DC2"  # type: ignore[union-attr]


def test_client_encryption_format_from_config(
    clean_env: pytest.MonkeyPatch, keys: KeyFiles, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8), None, "dc2"))
    clean_env.setenv(CONFIG_ENV, str(cfg))
    crypt = client_encryption("client-side", None, None, [])
    assert (
        crypt is not None and crypt.encrypt_as == "DC2" and crypt.ring is not None and crypt.ring.ids == [8]
    )
    # The flag wins over the file's format.
    assert client_encryption("client-side", "A1", None, []).encrypt_as == "A1"  # type: ignore[union-attr]


def test_client_encryption_unknown_format_in_config(
    clean_env: pytest.MonkeyPatch, keys: KeyFiles, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cfg.toml", _encryption_table(keys.spec(8), None, "A2"))
    clean_env.setenv(CONFIG_ENV, str(cfg))
    with pytest.raises(UsageError, match="A2"):
        client_encryption("client-side", None, None, [])


def test_client_encryption_non_string_format_in_config(
    clean_env: pytest.MonkeyPatch, keys: KeyFiles, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cfg.toml", f'[encryption]\nmaster_key = "{keys.spec(8)}"\nformat = 2\n')
    clean_env.setenv(CONFIG_ENV, str(cfg))
    with pytest.raises(UsageError):
        client_encryption("client-side", None, None, [])
