"""Settings: defaults, the YAML file, precedence (flag > env > file > default), model flags, one-line errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from memserve.config import ModelConfig, PolicyConfig, ProviderConfig, Settings, load_settings
from memserve.errors import InvalidArgument

EXAMPLE = Path(__file__).resolve().parents[1] / "memserve.yaml"
MiB = 1024**2


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MEMSERVE_* variable of the developer's shell leaks in; data_dir defaults under tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("MEMSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def write(tmp_path: Path, text: str, name: str = "memserve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, **kwargs: Any) -> str:
    """The InvalidArgument message for a config file with ``text``; it must be one line."""
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as info:
        load_settings(path, **kwargs)
    message = info.value.message
    assert "\n" not in message
    assert "pydantic" not in message.lower() and "validation error" not in message.lower()
    return message


# ---- defaults and the example file -------------------------------------------------------------------------


def test_defaults_without_file_env_or_flags(tmp_path: Path) -> None:
    settings = load_settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.memory is None and settings.headroom is None
    assert settings.data_dir == tmp_path / "xdg" / "memserve"
    assert settings.keep_alive_seconds == 300
    assert settings.memory_wait_seconds == 30
    assert settings.load_timeout_seconds == 600
    assert settings.watchdog_tolerance == pytest.approx(0.10)
    assert settings.watchdog_tolerance_min_bytes == 128 * MiB
    assert settings.host_floor_bytes == 256 * MiB
    assert (settings.watchdog_interval_seconds, settings.watchdog_loading_interval_seconds) == (0.5, 0.05)
    assert settings.max_body_bytes == 16 * MiB
    assert settings.models == [] and settings.providers == []


def test_data_dir_falls_back_to_home_when_xdg_is_unset_or_relative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME")
    assert load_settings().data_dir == tmp_path / "home" / ".local" / "share" / "memserve"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    assert load_settings().data_dir == tmp_path / "home" / ".local" / "share" / "memserve"


def test_model_defaults() -> None:
    model = ModelConfig(name="m", source="models/m")
    assert model.runner == "auto" and model.concurrency == 4
    assert model.context_tokens is None and model.keep_alive_seconds is None and model.max_queue is None
    assert (model.pinned, model.preload, model.fallback) == (False, False, None)
    assert model.policy == PolicyConfig()
    assert (model.policy.quantization, model.policy.retry_lower, model.policy.min_context_tokens) == (
        "auto",
        True,
        None,
    )


def test_example_file_in_the_repo_loads() -> None:
    settings = load_settings(EXAMPLE)
    tiny, small = settings.model("demo-tiny"), settings.model("demo-small")
    assert tiny is not None and small is not None
    assert (tiny.source, tiny.pinned, tiny.preload, tiny.keep_alive_seconds) == (
        "models/demo-tiny",
        True,
        True,
        math.inf,
    )
    assert small.source == "models/demo-small" and small.fallback == "groq/llama-3.1-8b-instant"
    assert (small.context_tokens, small.policy.min_context_tokens, small.keep_alive_seconds) == (2048, 1024, 600)
    groq = settings.provider("groq")
    assert groq is not None
    assert (groq.base_url, groq.api_key_env) == ("https://api.groq.com/openai/v1", "GROQ_API_KEY")
    assert settings.keep_alive_seconds == 300 and settings.watchdog_loading_interval_seconds == pytest.approx(0.05)


def test_yaml_reads_aliases_field_names_and_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
port: 9001
memory: cpu=8GiB,cuda:0=20GiB
headroom: 512MiB
data_dir: ~/state
keep_alive: 1h30m
host_floor_bytes: 1GiB
watchdog_tolerance_min_bytes: 64MiB
max_body_bytes: 1048576
models:
  - name: a
    source: models/a
    context: 1024
    keep_alive: 0
    policy: {min_context: 512, quantization: int8, allow_gpu: false}
  - name: b
    source: org/b
    context_tokens: 2048
    keep_alive_seconds: 30s
    policy: {min_context_tokens: 256}
providers:
  - name: up
    base_url: http://127.0.0.1:9/v1/
""",
    )
    settings = load_settings(path)
    assert settings.port == 9001 and settings.memory == "cpu=8GiB,cuda:0=20GiB" and settings.headroom == "512MiB"
    assert settings.data_dir == Path("~/state").expanduser()
    assert settings.keep_alive_seconds == 5400
    assert (settings.host_floor_bytes, settings.watchdog_tolerance_min_bytes) == (1024 * MiB, 64 * MiB)
    assert settings.max_body_bytes == MiB
    a, b = settings.models
    assert (a.context_tokens, a.keep_alive_seconds, a.policy.min_context_tokens) == (1024, 0, 512)
    assert (a.policy.quantization, a.policy.allow_gpu) == ("int8", False)
    assert (b.context_tokens, b.keep_alive_seconds, b.policy.min_context_tokens) == (2048, 30, 256)
    assert settings.providers[0].base_url == "http://127.0.0.1:9/v1"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing yet\n")).port == 8000


# ---- precedence -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        (None, None, None, 8000),
        (None, None, 8002, 8002),
        (None, "8001", 8002, 8001),
        (8003, "8001", 8002, 8003),
        (8003, None, 8002, 8003),
        (8003, "8001", None, 8003),
        (None, "8001", None, 8001),
    ],
)
def test_precedence_for_a_scalar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: int | None, env: str | None, file: int | None, expected: int
) -> None:
    if env is not None:
        monkeypatch.setenv("MEMSERVE_PORT", env)
    path = write(tmp_path, f"port: {file}\n" if file is not None else "host: 127.0.0.1\n")
    assert load_settings(path, port=flag).port == expected


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        (None, None, None, 300.0),
        (None, None, "2m", 120.0),
        (None, "3m", "2m", 180.0),
        ("4m", "3m", "2m", 240.0),
        ("4m", None, "2m", 240.0),
        (-1, "3m", None, math.inf),
        (None, "-1", "2m", math.inf),
        (None, "0", "2m", 0.0),
    ],
)
def test_precedence_for_keep_alive(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    flag: str | int | None,
    env: str | None,
    file: str | None,
    expected: float,
) -> None:
    if env is not None:
        monkeypatch.setenv("MEMSERVE_KEEP_ALIVE", env)
    path = write(tmp_path, f"keep_alive: {file}\n" if file is not None else "")
    assert load_settings(path, keep_alive=flag).keep_alive_seconds == expected


def test_keep_alive_flag_and_env_also_accept_the_field_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSERVE_KEEP_ALIVE_SECONDS", "90s")
    assert load_settings().keep_alive_seconds == 90
    assert load_settings(keep_alive_seconds="1h").keep_alive_seconds == 3600


def test_keep_alive_precedence_holds_across_its_two_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "keep_alive_seconds: 2m\n")
    monkeypatch.setenv("MEMSERVE_KEEP_ALIVE", "3m")
    assert load_settings(path).keep_alive_seconds == 180
    assert load_settings(path, keep_alive_seconds="4m").keep_alive_seconds == 240


def test_env_names_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMSERVE_CONFIG", str(write(tmp_path, "port: 8123\n")))
    assert load_settings().port == 8123
    assert load_settings(write(tmp_path, "port: 8124\n", name="other.yaml")).port == 8124


def test_no_file_is_read_unless_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path, "port: 8123\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().port == 8000


def test_the_file_is_parsed_once_and_never_read_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its parsed data is a settings source of its own: pydantic-settings does not read the file a second
    time, nor a third when --model flags make the settings build twice."""
    path = write(tmp_path, "port: 8123\nmodels:\n  - {name: a, source: x}\n")
    parsed: list[object] = []
    safe_load = yaml.safe_load

    def counting_safe_load(stream: Any) -> Any:
        parsed.append(stream)
        return safe_load(stream)

    monkeypatch.setattr(yaml, "safe_load", counting_safe_load)
    settings = load_settings(path, model_flags=["b=y"])
    assert settings.port == 8123 and [m.name for m in settings.models] == ["a", "b"]
    assert len(parsed) == 1
    parsed.clear()
    assert load_settings(path).port == 8123 and len(parsed) == 1


def test_a_missing_file_named_explicitly_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"config file .*nope\.yaml.* \(from --config\) does not exist"):
        load_settings(tmp_path / "nope.yaml")
    monkeypatch.setenv("MEMSERVE_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(InvalidArgument, match=r"gone\.yaml.* \(from MEMSERVE_CONFIG\) does not exist"):
        load_settings()


def test_env_values_including_nested_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMSERVE_PORT", "9000")
    monkeypatch.setenv("MEMSERVE_HOST_FLOOR_BYTES", "512MiB")
    monkeypatch.setenv("MEMSERVE_MEMORY", "cpu=4GiB")
    monkeypatch.setenv("MEMSERVE_PROVIDERS", '[{"name": "local", "base_url": "http://127.0.0.1:1/v1"}]')
    monkeypatch.setenv("MEMSERVE_HEADROOM", "")  # empty means unset, not an empty budget
    settings = load_settings(write(tmp_path, "providers: [{name: groq, base_url: https://x}]\nheadroom: 1GiB\n"))
    assert settings.port == 9000 and settings.host_floor_bytes == 512 * MiB and settings.memory == "cpu=4GiB"
    assert [p.name for p in settings.providers] == ["local"]
    assert settings.headroom == "1GiB"


# ---- model flags ----------------------------------------------------------------------------------------------


FILE_WITH_MODELS = """
models:
  - {name: demo, source: models/old, pinned: true, context: 1024, fallback: groq/x, keep_alive: -1}
  - {name: other, source: models/other}
providers:
  - {name: groq, base_url: "https://api.groq.com/openai/v1"}
"""


def test_model_flags_add_models(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE_WITH_MODELS), model_flags=["new=models/new", "hub=org/repo-1b"])
    assert [m.name for m in settings.models] == ["demo", "other", "new", "hub"]
    assert settings.model("hub") == ModelConfig(name="hub", source="org/repo-1b")


def test_a_model_flag_replaces_the_file_model_of_that_name_keeping_nothing(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE_WITH_MODELS), model_flags=["demo=models/demo-tiny"])
    assert [m.name for m in settings.models] == ["demo", "other"]
    assert settings.model("demo") == ModelConfig(name="demo", source="models/demo-tiny")


def test_model_flags_without_a_file(tmp_path: Path) -> None:
    settings = load_settings(model_flags=["demo=models/demo-tiny"])
    assert [(m.name, m.source) for m in settings.models] == [("demo", "models/demo-tiny")]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["demo"], "expected NAME=SOURCE"),
        (["=models/x"], "expected NAME=SOURCE"),
        (["demo="], "expected NAME=SOURCE"),
        (["a=x", "a=y"], "'a' is given twice"),
        (["a/b=x"], "must be non-empty without spaces or '/'"),
        (["groq=models/x"], "--model: models[2].name: model name 'groq' is also a provider's name"),
    ],
)
def test_bad_model_flags(tmp_path: Path, flags: list[str], expected: str) -> None:
    message = error_of(tmp_path, FILE_WITH_MODELS, model_flags=flags)
    assert "--model" in message and expected in message


# ---- one readable line per validation error -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "hint"),
    [
        ("port: abc\n", "port", "should be a valid integer, unable to parse string as an integer (got 'abc')"),
        ("port: 70000\n", "port", "less than or equal to 65535"),
        ("keep_alive: soon\n", "keep_alive", "300ms, 30s, 5m"),
        ("load_timeout_seconds: -1\n", "load_timeout_seconds", "finite"),
        ("watchdog_interval_seconds: 0\n", "watchdog_interval_seconds", "greater than 0"),
        ("host_floor_bytes: lots\n", "host_floor_bytes", "512MiB, 16GiB"),
        ("memory: gpu=4GiB\n", "memory", "unknown device 'gpu'"),
        ("memory: 16GiB\n", "memory", "does not name a device; write e.g. cpu=16GiB"),
        ("headroom: 1 potato\n", "headroom", "cannot read"),
        ("modles: []\n", "modles", "unknown setting; known settings here: host, port"),
        ("models:\n  - {name: a}\n", "models[0].source", "is required; add source:"),
        (
            "models:\n  - {name: a, source: x}\n  - {name: b, source: y, keep_alive: 5 min}\n",
            "models[1].keep_alive",
            "cannot read duration '5 min'",
        ),
        ("models:\n  - {name: a, source: x, contxt: 1}\n", "models[0].contxt", "known settings here: name, source"),
        ("models:\n  - {name: a, source: x, concurrency: 0}\n", "models[0].concurrency", "greater than or equal to 1"),
        ("models:\n  - {name: a/b, source: x}\n", "models[0].name", "'/'"),
        (
            "models:\n  - {name: a, source: x, policy: {quantization: fp8}}\n",
            "models[0].policy.quantization",
            "'auto', 'none', 'int8' or '4bit' (got 'fp8')",
        ),
        (
            "models:\n  - {name: a, source: x, context: 512, policy: {min_context: 1024}}\n",
            "models[0].policy.min_context",
            "lower min_context or raise context",
        ),
        (
            "models:\n  - {name: a, source: x}\n  - {name: b, source: y}\n  - {name: a, source: z}\n",
            "models[2].name",
            "already used by models[0]",
        ),
        (
            "providers:\n  - {name: p, base_url: 'http://h'}\n  - {name: p, base_url: 'http://i'}\n",
            "providers[1].name",
            "already used by providers[0]",
        ),
        (
            "models:\n  - {name: p, source: x}\nproviders:\n  - {name: p, base_url: 'http://h'}\n",
            "models[0].name",
            "also a provider's name; rename one",
        ),
        ("models:\n  - {name: a, source: x, fallback: groq}\n", "models[0].fallback", "must be provider/model"),
        (
            "models:\n  - {name: a, source: x, fallback: groq/m}\nproviders:\n  - {name: up, base_url: 'http://h'}\n",
            "models[0].fallback",
            "provider 'groq' is not configured (providers: up); add it under providers",
        ),
        ("providers:\n  - {name: p, base_url: api.example.com}\n", "providers[0].base_url", "http:// or https://"),
        (
            "providers:\n  - {name: p, base_url: 'http://h', timeout_seconds: -1}\n",
            "providers[0].timeout_seconds",
            "finite",
        ),
        (
            "providers:\n  - {name: p, base_url: 'http://h', api_key_env: 'sk-not a name'}\n",
            "providers[0].api_key_env",
            "NAME of an environment variable",
        ),
    ],
)
def test_each_validation_error_is_one_line_naming_file_and_field(
    tmp_path: Path, text: str, path: str, hint: str
) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'memserve.yaml'}: {path}: "), message
    assert hint in message, message


def test_several_errors_are_counted_not_dumped(tmp_path: Path) -> None:
    message = error_of(tmp_path, "port: abc\nhost_floor_bytes: lots\nkeep_alive: soon\n")
    assert message.endswith("(and 2 more problems)")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "port: 8000\nmodels:\n  - name: a\n   source: x\n")
    assert message.startswith(f"{tmp_path / 'memserve.yaml'}:4:") and "not valid YAML" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping of settings at the top level" in error_of(tmp_path, "- port: 1\n")


def test_an_env_error_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMSERVE_KEEP_ALIVE", "soon")
    assert error_of(tmp_path, "port: 1\n").startswith("environment variable MEMSERVE_KEEP_ALIVE: keep_alive: ")
    monkeypatch.delenv("MEMSERVE_KEEP_ALIVE")
    monkeypatch.setenv("MEMSERVE_MODELS", "not json")
    assert "MEMSERVE_MODELS and MEMSERVE_PROVIDERS take JSON" in error_of(tmp_path, "port: 1\n")


def test_a_flag_error_names_the_command_line(tmp_path: Path) -> None:
    assert error_of(tmp_path, "port: 1\n", port="eighty").startswith("command line: port: ")


# ---- secrets -------------------------------------------------------------------------------------------------


def test_api_key_is_read_from_env_at_call_time_and_never_shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = load_settings(EXAMPLE)
    groq = settings.provider("groq")
    assert groq is not None
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    assert groq.api_key() is None
    monkeypatch.setenv("GROQ_API_KEY", "gsk_live_secret_123")
    assert groq.api_key() == "gsk_live_secret_123"
    monkeypatch.setenv("GROQ_API_KEY", "gsk_rotated_456")
    assert groq.api_key() == "gsk_rotated_456"
    public = json.dumps(settings.model_dump(mode="json"))
    assert "gsk_rotated_456" not in public and "GROQ_API_KEY" in public
    assert ProviderConfig(name="p", base_url="http://h").api_key() is None


def test_a_key_pasted_into_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    message = error_of(tmp_path, "providers:\n  - {name: p, base_url: 'http://h', api_key: gsk_pasted_789}\n")
    assert "providers[0].api_key" in message and "api_key_env" in message
    assert "gsk_pasted_789" not in message


def test_settings_dump_as_plain_json_with_forever_as_minus_one() -> None:
    settings = load_settings(EXAMPLE, keep_alive=-1)
    public = settings.model_dump(mode="json")
    text = json.dumps(public, allow_nan=False)
    assert public["keep_alive_seconds"] == -1
    assert public["models"][0]["keep_alive_seconds"] == -1 and public["models"][1]["keep_alive_seconds"] == 600
    assert public["models"][1]["policy"]["min_context_tokens"] == 1024
    assert set(public) == set(Settings.model_fields)
    assert json.loads(text)["providers"][0]["api_key_env"] == "GROQ_API_KEY"


# ---- the model's shape ---------------------------------------------------------------------------------------


def test_lookups_by_name() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.model("demo-small") is settings.models[1]
    assert settings.model("groq") is None and settings.provider("demo-tiny") is None


@pytest.mark.parametrize("model", [Settings, ModelConfig, ProviderConfig, PolicyConfig])
def test_every_field_has_a_description(model: type[Any]) -> None:
    missing = [name for name, info in model.model_fields.items() if not info.description]
    assert missing == []


def test_config_does_not_import_torch() -> None:
    code = "import sys, memserve.config; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_adapters_are_named_like_models_and_found_by_either_name() -> None:
    settings = Settings(models=[{"name": "base", "source": "x", "adapters": [{"name": "spam", "source": "y"}]}])
    model, adapter = settings.adapter("spam") or (None, None)
    assert model is not None and adapter is not None and (model.name, adapter.source) == ("base", "y")
    assert settings.adapter("base:spam") == (model, adapter)
    assert settings.adapter("other:spam") is None and settings.adapter("base") is None


@pytest.mark.parametrize(
    ("adapters", "said"),
    [
        ([{"name": "base", "source": "y"}], "already used by models[0]"),
        ([{"name": "a", "source": "y"}, {"name": "a", "source": "z"}], "already used by models[0].adapters[0]"),
        ([{"name": "a:b", "source": "y"}], "must not contain ':'"),
    ],
)
def test_an_adapter_name_that_clients_could_not_tell_apart_is_refused(
    adapters: list[dict[str, str]], said: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(said)):
        Settings(models=[{"name": "base", "source": "x", "adapters": adapters}])


def test_auth_off_unquoted_is_off_and_on_is_refused(tmp_path: Path) -> None:
    """YAML 1.1 reads ``auth: off`` as false; the README writes it unquoted, so it must mean off."""
    assert load_settings(write(tmp_path, "auth: off\n")).auth == "off"
    assert load_settings(write(tmp_path, 'auth: "keys"\n')).auth == "keys"
    with pytest.raises(InvalidArgument, match="auth"):
        load_settings(write(tmp_path, "auth: on\n"))  # true: keys or not? it does not say
