"""hearth's settings: one documented table, from flags, env, hearth.toml.

Precedence (highest first): command-line flags, `HEARTH_*` environment
variables, `hearth.toml`, defaults. `hearth config` prints every effective
value and where it came from.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
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


class UpstreamTimeouts(BaseModel):
    """How long hearth waits on an upstream, in seconds."""

    model_config = ConfigDict(extra="forbid")
    connect: float = Field(5.0, gt=0, description="Opening a TCP connection to a replica.")
    first_token: float = Field(120.0, gt=0, description="From sending a request to its first token.")
    idle: float = Field(60.0, gt=0, description="Longest silence between two chunks of a stream.")


class UpstreamModel(BaseModel):
    """A model an upstream serves, declared instead of discovered."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The model's name on the upstream.")
    context_length: int = Field(0, ge=0, description="Context size in tokens (0 = unknown).")
    embedding: bool = Field(False, description="True for an embedding model.")
    dimension: int | None = Field(None, ge=1, description="Native embedding dimension, if known.")


class ManagedUpstream(BaseModel):
    """A server hearth starts on first use and stops after its keep-alive."""

    model_config = ConfigDict(extra="forbid")
    command: list[str] = Field(
        min_length=1,
        description="Command line; {port}, {host} and {model_path} are substituted.",
    )
    model_path: Path | None = Field(None, description="Substituted for {model_path} (e.g. a GGUF file).")
    keep_alive: float = Field(300.0, description="Idle seconds before the server is stopped (negative = never).")
    ready_path: str | None = Field(None, description="GET path that answers 200 when ready (default per kind).")
    startup_timeout: float = Field(180.0, gt=0, description="Seconds to wait for the server to become ready.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the server.")


class UpstreamEntry(BaseModel):
    """An OpenAI-compatible or native Ollama server hearth forwards requests to."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["openai", "ollama"] = Field(description="openai (any /v1 server) or ollama (native /api).")
    urls: list[str] = Field(default_factory=list, description="Replica base URLs (a trailing /v1 or /api is dropped).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    api_key_file: Path | None = Field(None, description="File holding the API key.")
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    models: list[str | UpstreamModel] = Field(
        default_factory=list, description="Models served (empty = discover them from the upstream)."
    )
    cloud: bool = Field(False, description="Allow a host outside this machine's network (prompts leave the box).")
    strict: bool = Field(False, description="Always answer 502 when structured output fails its schema.")
    drop_params: list[str] = Field(
        default_factory=list, description="Sampling parameters never forwarded to this upstream."
    )
    health_interval: float = Field(5.0, gt=0, description="Seconds between health checks of each replica (cloud: "
                                   "before an ejected replica is tried again, as it gets no checks).")
    refresh: float = Field(60.0, gt=0, description="Seconds between model list refreshes.")
    managed: ManagedUpstream | None = Field(None, description="Start this server on first use.")

    @model_validator(mode="after")
    def _base_urls(self) -> UpstreamEntry:
        """Accept a URL as SDKs spell it (`.../v1`, Ollama's `.../api`): hearth adds the API path itself."""
        suffix = "/v1" if self.kind == "openai" else "/api"
        self.urls = [u.rstrip("/").removesuffix(suffix) for u in self.urls]
        return self


class AliasEntry(BaseModel):
    """An alias with requirements: `[aliases.embed] target = "..." dimension = 1024`."""

    model_config = ConfigDict(extra="forbid")
    target: str = Field(description="The served model (`name` or `name@upstream`).")
    dimension: int | None = Field(None, ge=1, description="Required embedding dimension.")


def _role_aliases() -> dict[str, str | AliasEntry]:
    """The roles clients are written against, all on the bundled model until configured otherwise."""
    return {"main": BUNDLED_MODEL, "fast": BUNDLED_MODEL, "embed": BUNDLED_MODEL}


class Settings(BaseSettings):
    """Every setting hearth has. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    home: Path = Field(default_factory=default_home, description="Data directory for models, database and logs.")

    @field_validator("home", mode="before")
    @classmethod
    def _home(cls, value: Any) -> Any:
        """`~` expanded and an empty value the default, as `default_home` reads HEARTH_HOME (the
        config file is looked up there, so data and config must agree)."""
        if value is None or str(value).strip() == "":
            return Path(platformdirs.user_data_dir("hearth", appauthor=False))
        return Path(str(value)).expanduser()
    host: str = Field("127.0.0.1", description="Address to listen on. Anything but loopback requires keys.")
    port: int = Field(11435, ge=0, le=65535, description="TCP port to listen on.")
    default_model: str = Field(BUNDLED_MODEL, min_length=1, description="Model used when a request names none.")
    models: dict[str, ModelEntry] = Field(
        default_factory=dict, description="Extra GGUF files to serve, as name = {path = ...}."
    )
    aliases: dict[str, str | AliasEntry] = Field(
        default_factory=_role_aliases,
        description="Public model names mapped to served models (`name`, `name@upstream`, or a table "
                    "with target and dimension).",
    )
    upstreams: dict[str, UpstreamEntry] = Field(
        default_factory=dict, description="Other servers to route to, as name = {kind, urls, ...}."
    )
    threads: int = Field(0, ge=0, description="CPU threads for the in-box engine (0 = physical cores).")
    slots: int = Field(8, ge=1, le=256, description="Sequences the in-box engine decodes together.")
    ctx_per_slot: int = Field(4096, ge=256, description="Context length of each slot, in tokens.")
    batch_size: int = Field(512, ge=32, description="Most tokens fed to one decode step.")
    prefill_chunk: int = Field(
        128, ge=8, le=4096,
        description="Prompt tokens read per step while other requests are generating.",
    )
    deterministic: bool = Field(
        True,
        description="Same seed, same output whatever else is batched (turns off llama.cpp weight "
        "repacking and the tiled K-quant kernel; prompts read in pieces of at most 63 tokens).",
    )
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait for a slot before 429.")
    keep_alive: float = Field(300.0, description="Seconds an idle model stays loaded (negative = forever).")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_tokens_limit: int = Field(0, ge=0, description="Cap on max_tokens per request (0 = context size).")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Largest total size of request headers (431 above).")
    stream_idle_timeout: float = Field(
        300.0, ge=0, description="Seconds a streamed response may stay silent before it is ended with an "
        "error (0 = no bound).")
    cors_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS); empty = CORS off.")
    loopback_needs_key: bool = Field(
        True, description="Once any key exists, clients on this machine need one too (false lets loopback in "
        "without a key; unsafe behind a reverse proxy on the same machine).")
    rate_window: float = Field(60.0, gt=0, description="Seconds a key's --rpm counts requests over.")
    token_window: float = Field(86400.0, gt=0, description="Seconds a key's --tokens-per-day counts tokens over.")
    fake: bool = Field(False, description="Serve a scripted fake engine instead of real models (for tests).")
    allow_network: bool = Field(False, description="Allow downloads from the network (model pulls).")
    hf_endpoint: str = Field("https://huggingface.co", description="Hugging Face base URL for model pulls.")
    ollama_registry: str = Field("https://registry.ollama.ai", description="Ollama registry base URL for pulls.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning, error.")

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
    def alias_targets(self) -> dict[str, str]:
        """Alias -> target model name (`name` or `name@upstream`)."""
        return {k: v if isinstance(v, str) else v.target for k, v in self.aliases.items()}

    @property
    def alias_dimensions(self) -> dict[str, int]:
        """Alias -> required embedding dimension, for aliases that declare one."""
        return {k: v.dimension for k, v in self.aliases.items() if isinstance(v, AliasEntry) and v.dimension}

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
        raise SettingsError(f"config file {path} does not exist; create it, or drop --config / unset HEARTH_CONFIG") from None
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
        err = _most_telling(exc.errors())
        loc = ".".join(str(p) for p in err["loc"])
        # an unknown key's value is not shown: it is often a secret in the wrong place (`api_key = "sk-…"`);
        # nor is a table (a missing key's input is the table around it, with whatever secrets it holds)
        value = err.get("input")
        got = "" if err.get("type") in ("extra_forbidden", "missing") else \
            f" (got {type(value).__name__})" if isinstance(value, (dict, list)) else f" (got {value!r})"
        raise SettingsError(f"setting {loc!r}: {err['msg']}{got}{_did_you_mean(err)}") from None
    check_upstreams(settings)
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


def _most_telling(errors: list[Any]) -> Any:
    """The error to report, its location without pydantic's union tags (`models.0.UpstreamModel.nam`).

    A misspelt key beats the "field required" it causes, and a table's own problem beats "should
    be a valid string" from the other side of a `str | table` union.
    """
    tags = {"str", "int", "float", "bool", "UpstreamModel", "AliasEntry"}
    errors = [{**e, "loc": tuple(p for p in e["loc"] if p not in tags)} for e in errors]
    typos = [e for e in errors if e["type"] == "extra_forbidden" and _did_you_mean(e)]
    tables = [e for e in errors if not str(e["type"]).endswith("_type")]
    return (typos or tables or errors)[0]


def _did_you_mean(err: Any) -> str:
    """For a key no table has: the closest key that table does have (`url` -> `urls`)."""
    if err.get("type") != "extra_forbidden" or len(err["loc"]) < 1:
        return ""
    model: Any = Settings
    for part in err["loc"][:-1]:  # walk to the table that holds the unknown key
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        field = fields.get(str(part))
        if field is not None:  # else a dict key (an upstream's name): the value type is the next table
            model = _table_type(field.annotation)
    known = list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
    if err["loc"][-1] == "api_key" and "api_key_env" in known:
        return "; keys are not written in the config: name an env var with api_key_env or a file with api_key_file"
    close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _table_type(annotation: Any) -> Any:
    """The settings table a field holds: the model itself, or the one inside a dict, list or optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _table_type(arg)
        if found is not None:
            return found
    return None


INBOX_ENGINES = frozenset({"local", "fake"})  # engine names taken by hearth's own engines


def _check_managed(where: str, m: ManagedUpstream) -> None:
    """A managed command that could never become ready, caught before the first request waits for it."""
    joined = " ".join(m.command)
    if "{port}" not in joined:
        raise SettingsError(f"{where}.managed: command has no {{port}}; hearth picks a free port and probes it, "
                            'so pass it on, e.g. "--port", "{port}"')
    if "{model_path}" in joined and m.model_path is None:
        raise SettingsError(f"{where}.managed: command uses {{model_path}} but model_path is not set; "
                            'add model_path = "/path/to/model.gguf"')
    if m.ready_path is not None and not m.ready_path.startswith("/"):
        raise SettingsError(f"{where}.managed: ready_path {m.ready_path!r} must start with '/' (e.g. \"/health\")")


def _ascii_host(host: str) -> str:
    """How the resolver spells a host (full-width dots and digits folded, punycode)."""
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return "punycode, e.g. xn--..."


USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _check_url(where: str, url: str, cloud: bool) -> None:
    """One upstream URL: http(s), parseable, a plain-ASCII host, no credentials, local unless `cloud`.
    Messages show it without its `user:password@` part: that may be a secret."""
    from hearth.core.privacy import is_cloud_url

    shown = USERINFO.sub(r"\1…@", url)
    if not url.startswith(("http://", "https://")):
        raise SettingsError(f"{where}: url {shown!r} must start with http:// or https://")
    if shown != url:  # never sent (hearth sends a bearer key) and would be shown wherever the URL is
        raise SettingsError(f"{where}: url {shown!r} carries a user name or password; remove it and put the "
                            "key in api_key_env or api_key_file")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port that is not a number in range
    except ValueError as exc:
        raise SettingsError(f"{where}: url {url!r} is not a valid URL ({exc}); "
                            "write it as http://host:port") from None
    if not parts.hostname:
        raise SettingsError(f"{where}: url {url!r} names no host; write it as http://host:port")
    if not parts.hostname.isascii():
        raise SettingsError(f"{where}: url {url!r} has a host that is not plain ASCII; write it "
                            f"as the resolver reads it ({_ascii_host(parts.hostname)})")
    if is_cloud_url(url) and not cloud:
        raise SettingsError(
            f"{where}: {url} is not on this machine or a private network, so prompts would leave "
            "the box; add cloud = true to that table if this is intended"
        )


def check_upstreams(settings: Settings) -> None:
    """Refuse upstreams and aliases that cannot work, one readable line each."""
    for name, up in settings.upstreams.items():
        where = f"[upstreams.{name}]"
        if "@" in name or ":" in name:
            raise SettingsError(f"{where}: upstream names may not contain '@' or ':'; rename it")
        if name in INBOX_ENGINES:
            raise SettingsError(f"{where}: {name!r} is the in-box engine's name (as in model@{name}); rename it")
        if up.managed is not None:
            _check_managed(where, up.managed)
        if not up.urls and up.managed is None:
            raise SettingsError(f"{where} has no urls; add urls = [\"http://host:port\"] or a managed command")
        if up.urls and up.managed is not None:
            raise SettingsError(f"{where} has both urls and managed; a managed upstream gets its URL from hearth")
        if up.managed is not None and not up.models:
            raise SettingsError(f"{where} is managed but lists no models; add models = [\"name\"] "
                                "(it starts on first use, so hearth cannot ask it)")
        if up.api_key_env and up.api_key_file:
            raise SettingsError(f"{where} sets both api_key_env and api_key_file; keep one")
        for url in up.urls:
            _check_url(where, url, up.cloud)
    for alias, target in settings.alias_targets.items():
        model, _, upstream = target.rpartition("@")
        if not model:
            continue
        named = settings.upstreams.get(upstream)
        if named is None and upstream in INBOX_ENGINES:
            continue  # model@local: the in-box engine, checked by the router at startup
        if named is None:
            known = ", ".join(sorted(settings.upstreams)) or "none declared"
            raise SettingsError(f"alias {alias!r} points to {target!r}, but there is no upstream {upstream!r} "
                                f"(upstreams: {known}); fix the alias or add [upstreams.{upstream}]")
        names = [m if isinstance(m, str) else m.name for m in named.models]
        if names and model.removesuffix(":latest") not in {n.removesuffix(":latest") for n in names}:
            raise SettingsError(f"alias {alias!r} points to {target!r}, but upstream {upstream!r} lists only "
                                f"{', '.join(names)}; fix the alias or add the model to its models")


def _env_value(raw: str) -> Any:
    """Env values are strings; JSON tables/lists (for dict settings) are parsed."""
    text = raw.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw
