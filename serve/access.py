"""Who may call which adapter: API keys -> users, and the adapter catalog.

A user sees the bare base, the adapters they own, and shared ones. An adapter that exists but is
not theirs is reported exactly like one that does not exist, so names of other users' adapters
cannot be probed. Catalog entries come from the serve config and, for other names, from the MLflow
model registry (tags carryon.owner / carryon.shared set by the customization job).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .settings import AuthConfig, ServeConfig, valid_name

log = logging.getLogger(__name__)
ANONYMOUS = "anonymous"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(cfg: AuthConfig) -> dict[str, str]:
    """sha256(key) -> user, from the keys file and the environment variable.

    Only digests are kept, so the deployment's arguments never hold a usable key.
    """
    pairs: dict[str, str] = {}
    if cfg.keys_file:
        path = Path(cfg.keys_file)
        if not path.is_file():
            raise ValueError(f"auth.keys_file: {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"auth.keys_file: {path} must map key strings to user names")
        pairs.update(data)
    for item in filter(None, (p.strip() for p in os.environ.get(cfg.keys_env, "").split(","))):
        key, sep, user = item.partition("=")
        if not sep or not key or not user:
            raise ValueError(f"{cfg.keys_env}: expected comma-separated key=user pairs, got {item[:4]}...")
        pairs[key] = user
    out = {}
    for key, user in pairs.items():
        if not valid_name(user):
            raise ValueError(f"API keys: user name {user!r} is not allowed (letters, digits, . _ -)")
        out[key[7:].lower() if key.startswith("sha256:") else _digest(key)] = user
    return out


def user_for(keys: dict[str, str], authorization: str | None, allow_anonymous: bool) -> str | None:
    """The user a request's Authorization header belongs to, or None (401)."""
    if not authorization:
        return ANONYMOUS if allow_anonymous else None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return keys.get(_digest(token.strip()))


@dataclass(frozen=True)
class Resolved:
    """An adapter a caller may use: its public name, where it loads from, and the multiplexing id
    (includes the registry version, so a moved alias loads the new version)."""

    name: str
    source: str
    mux_id: str


class CatalogUnavailable(RuntimeError):
    """The registry could not be asked (answered as 503, never as 'not found')."""


class Catalog:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.static = {a.name: a for a in cfg.adapters}
        self._cache: dict[str, tuple[float, dict | None]] = {}
        self._listing: tuple[float, list[dict]] | None = None
        self._client = None

    # -- registry --------------------------------------------------------------------------------
    def _registry(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            uri = self.cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                return None
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def _registry_entry(self, name: str) -> dict | None:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit and now - hit[0] < self.cfg.registry.refresh_s:
            return hit[1]
        client = self._registry()
        if client is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            rm = client.get_registered_model(name)
            mv = client.get_model_version_by_alias(name, self.cfg.registry.alias)
            entry = {"owner": rm.tags.get("carryon.owner"), "shared": rm.tags.get("carryon.shared") == "true",
                     "version": mv.version}
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise CatalogUnavailable(f"model registry unavailable: {exc.error_code}") from None
            entry = None
        except OSError as exc:
            raise CatalogUnavailable(f"model registry unavailable: {type(exc).__name__}") from None
        self._cache[name] = (now, entry)
        return entry

    # -- lookups ---------------------------------------------------------------------------------
    @staticmethod
    def _allowed(user: str, owner: str | None, shared: bool) -> bool:
        return shared or (owner is not None and owner == user and user != ANONYMOUS)

    def resolve(self, user: str, name: str) -> Resolved | None:
        """The adapter `name` if `user` may call it; None when it does not exist or is not theirs."""
        if not valid_name(name):
            return None
        entry = self.static.get(name)
        if entry is not None:
            ok = self._allowed(user, entry.owner, entry.shared)
            return Resolved(name, entry.source, name) if ok else None
        if not self.cfg.registry.enabled:
            return None
        reg = self._registry_entry(name)
        if reg is None or not self._allowed(user, reg["owner"], reg["shared"]):
            return None
        return Resolved(name, f"models:/{name}/{reg['version']}", f"{name}@v{reg['version']}")

    def visible(self, user: str) -> list[str]:
        names = [a.name for a in self.cfg.adapters if self._allowed(user, a.owner, a.shared)]
        client = self._registry() if self.cfg.registry.enabled else None
        if client is not None:
            now = time.monotonic()
            if self._listing is None or now - self._listing[0] >= self.cfg.registry.refresh_s:
                try:
                    models = [{"name": m.name, "owner": m.tags.get("carryon.owner"),
                               "shared": m.tags.get("carryon.shared") == "true"}
                              for m in client.search_registered_models(max_results=1000)]
                except Exception as exc:  # noqa: BLE001 - listing degrades to the static catalog
                    log.warning("registry listing failed: %s", exc)
                    models = []
                self._listing = (now, models)
            names += [m["name"] for m in self._listing[1]
                      if m["name"] not in self.static and valid_name(m["name"]) and self._allowed(user, m["owner"], m["shared"])]
        return sorted(set(names))


def keys_summary(keys: dict[str, str]) -> str:
    return json.dumps({"users": sorted(set(keys.values())), "keys": len(keys)})
