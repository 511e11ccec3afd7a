"""Build upstream engines from `[upstreams.*]`, reading API keys (never logging them)."""

from __future__ import annotations

import os
import re

from hearth.engines.upstream.engine import Secret, UpstreamEngine
from hearth.settings import Settings, SettingsError, UpstreamEntry

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _checked(where: str, source: str, value: str) -> Secret:
    """The key, if it can go in an HTTP header (a pasted zero-width space cannot); never echoed."""
    bad = next((i for i, c in enumerate(value) if not (c.isascii() and c.isprintable())), None)
    if bad is not None:
        raise SettingsError(f"{where}: {source} holds a character that cannot be sent in a header "
                            f"({ord(value[bad]):#06x} at position {bad + 1}); paste the key again as plain text")
    return Secret(value)


def read_api_key(name: str, cfg: UpstreamEntry, env: dict[str, str] | None = None) -> Secret | None:
    """The upstream's API key from its env var or file; a SettingsError if named but missing or unsendable."""
    env = dict(os.environ) if env is None else env
    where = f"[upstreams.{name}]"
    if cfg.api_key_env:
        if not ENV_NAME.fullmatch(cfg.api_key_env):  # most likely the key itself, pasted here: not echoed
            raise SettingsError(f"{where}: api_key_env must be the name of an environment variable (letters, "
                                "digits and _), not the key; export the key under a name and give that name")
        value = env.get(cfg.api_key_env, "").strip()
        if not value:
            raise SettingsError(f"{where}: api_key_env names {cfg.api_key_env}, which is not set or empty; "
                                "export it before starting hearth")
        return _checked(where, f"api_key_env {cfg.api_key_env}", value)
    if cfg.api_key_file:
        path = cfg.api_key_file.expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{where}: cannot read api_key_file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:  # e.g. saved as UTF-16 by an editor
            raise SettingsError(f"{where}: api_key_file {path} is not UTF-8 text; save the key in it as plain "
                                "text") from None
        if not value:
            raise SettingsError(f"{where}: api_key_file {path} is empty")
        return _checked(where, f"api_key_file {path}", value)
    return None


def build_upstreams(settings: Settings) -> list[UpstreamEngine]:
    """One engine per configured upstream, in config order."""
    return [UpstreamEngine(name, cfg, read_api_key(name, cfg)) for name, cfg in settings.upstreams.items()]
