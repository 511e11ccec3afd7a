"""hearth's settings: one documented table, from flags, env, hearth.toml.

Precedence (highest first): command-line flags, `HEARTH_*` environment
variables, `hearth.toml`, defaults. `hearth config` prints every effective
value and where it came from.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "HEARTH_"
BUNDLED_MODEL = "gemma3-270m:latest"


def default_home() -> Path:
    """Data directory: `$HEARTH_HOME`, else the platform's user data dir (XDG)."""
    env = os.environ.get("HEARTH_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("hearth", appauthor=False))


class ModelEntry(BaseModel):
    """A GGUF file served by the in-box engine under a name."""

    model_config = ConfigDict(extra="forbid")
    path: Path = Field(description="Path to the GGUF file.")
    embedding_dimensions: list[int] = Field(
        default_factory=list,
        description="Shorter embedding sizes the model was trained for (Matryoshka).",
    )


class Settings(BaseSettings):
    """Every setting hearth has. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    home: Path = Field(default_factory=default_home, description="Data directory for models, database and logs.")
    host: str = Field("127.0.0.1", description="Address to listen on. Anything but loopback requires keys.")
    port: int = Field(11435, ge=0, le=65535, description="TCP port to listen on.")
    default_model: str = Field(BUNDLED_MODEL, description="Model used when a request names none.")
    models: dict[str, ModelEntry] = Field(
        default_factory=dict, description="Extra GGUF files to serve, as name = {path = ...}."
    )
    aliases: dict[str, str] = Field(
        default_factory=lambda: {"main": BUNDLED_MODEL, "fast": BUNDLED_MODEL, "embed": BUNDLED_MODEL},
        description="Public model names mapped to served models.",
    )
    threads: int = Field(0, ge=0, description="CPU threads for the in-box engine (0 = physical cores).")
    slots: int = Field(8, ge=1, le=256, description="Sequences the in-box engine decodes together.")
    ctx_per_slot: int = Field(4096, ge=256, description="Context length of each slot, in tokens.")
    batch_size: int = Field(512, ge=32, description="Most tokens fed to one decode step.")
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait for a slot before 429.")
    keep_alive: float = Field(300.0, description="Seconds an idle model stays loaded (negative = forever).")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_tokens_limit: int = Field(0, ge=0, description="Cap on max_tokens per request (0 = context size).")
    fake: bool = Field(False, description="Serve a scripted fake engine instead of real models (for tests).")
    allow_network: bool = Field(False, description="Allow downloads from the network (model pulls).")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` merges flags, env and hearth.toml itself so that it
        # can say where each value came from; only init data is read here.
        return (init_settings,)

    @property
    def models_dir(self) -> Path:
        """Where model files live."""
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        """Where log files live."""
        return self.home / "logs"

    @property
    def db_path(self) -> Path:
        """The SQLite database."""
        return self.home / "hearth.db"


class SettingsError(Exception):
    """A setting that cannot be used; the message says which and why."""


@dataclass(slots=True)
class LoadedSettings:
    """Settings plus where each value came from (for `hearth config`)."""

    settings: Settings
    sources: dict[str, str]
    config_path: Path | None


def find_config(flag: str | None, env: dict[str, str]) -> Path | None:
    """The hearth.toml to read: flag, `HEARTH_CONFIG`, ./hearth.toml, home."""
    if flag:
        return Path(flag).expanduser()
    if env.get("HEARTH_CONFIG"):
        return Path(env["HEARTH_CONFIG"]).expanduser()
    for candidate in (Path("hearth.toml"), default_home() / "hearth.toml"):
        if candidate.is_file():
            return candidate
    return None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a hearth.toml, with one readable line on failure."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist; create it or drop --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(
    flags: dict[str, Any] | None = None,
    config: str | None = None,
    env: dict[str, str] | None = None,
) -> LoadedSettings:
    """Build settings from flags > env > toml > defaults, recording sources."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = dict(os.environ if env is None else env)
    path = find_config(config, env)
    file_data = read_toml(path) if path else {}
    fields = Settings.model_fields
    unknown = sorted(set(file_data) - set(fields))
    if unknown:
        raise SettingsError(
            f"{path}: unknown setting {unknown[0]!r}; run `hearth config` to see the settings that exist"
        )
    env_values = {
        name: _env_value(env[ENV_PREFIX + name.upper()])
        for name in fields
        if ENV_PREFIX + name.upper() in env
    }
    env_keys = set(env_values)
    init = {**file_data, **env_values, **flags}
    try:
        settings = Settings(**init)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise SettingsError(f"setting {loc!r}: {err['msg']} (got {err.get('input')!r})") from None
    sources: dict[str, str] = {}
    for name in fields:
        if name in flags:
            sources[name] = "flag"
        elif name in env_keys:
            sources[name] = f"env {ENV_PREFIX}{name.upper()}"
        elif name in file_data:
            sources[name] = str(path)
        else:
            sources[name] = "default"
    return LoadedSettings(settings=settings, sources=sources, config_path=path)


def _env_value(raw: str) -> Any:
    """Env values are strings; JSON tables/lists (for dict settings) are parsed."""
    text = raw.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw
