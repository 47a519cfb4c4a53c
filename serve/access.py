"""Who may call which adapter: API keys -> users, and the adapter catalog.

A user sees the bare base, the adapters they own, and shared ones. A lookup first resolves the
caller's visible catalog (the configured adapters plus the registry listing, filtered by the
carryon.owner / carryon.shared tags the customization job sets) and only then looks the name up in
it, so "exists but is not yours" and "does not exist" do the same work and give the same answer:
names of other users' adapters cannot be probed, not even by timing. Registry answers are kept in
bounded LRU caches (`registry.cache_size`) for `registry.refresh_s`; one user's lookups never
decide what another user sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
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


class TTLCache:
    """A bounded LRU of (value, time) entries that expire after `ttl` seconds (thread-safe)."""

    def __init__(self, size: int, ttl: float):
        self.size, self.ttl = size, ttl
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is None or time.monotonic() - hit[1] >= self.ttl:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = (value, time.monotonic())
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Catalog:
    def __init__(self, cfg: ServeConfig, finetune=None):
        self.cfg = cfg
        self.finetune = finetune  # fine-tuned models (ft:...) come from its job records, never cached
        self.static = {a.name: a for a in cfg.adapters}
        reg = cfg.registry
        self._listing = TTLCache(1, reg.refresh_s)  # the registry's carryon models with their tags
        self._visible = TTLCache(reg.cache_size, reg.refresh_s)  # user -> names they may call
        self._versions = TTLCache(reg.cache_size, reg.refresh_s)  # name -> version behind the alias
        self._client = None
        self.registry_calls = 0  # for tests and stats: what a lookup cost

    # -- registry --------------------------------------------------------------------------------
    def _registry(self):
        if not self.cfg.registry.enabled:
            return None
        if self._client is None:
            from mlflow.tracking import MlflowClient

            uri = self.cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                return None
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def _registry_models(self) -> dict[str, dict]:
        """name -> {owner, shared} of every registered model, paged, cached for refresh_s."""
        cached = self._listing.get("all")
        if cached is not None:
            return cached
        client = self._registry()
        if client is None:
            return {}
        models, token = {}, None
        try:
            while True:
                self.registry_calls += 1
                page = client.search_registered_models(max_results=1000, page_token=token)
                for m in page:  # a fine-tuning job's model is served under its ft: name, not this one
                    if valid_name(m.name) and m.name not in self.static and "carryon.finetune_job" not in m.tags:
                        models[m.name] = {"owner": m.tags.get("carryon.owner"),
                                          "shared": m.tags.get("carryon.shared") == "true"}
                token = getattr(page, "token", None)
                if not token:
                    break
        except Exception as exc:  # noqa: BLE001 - any registry failure is "unavailable", never "not found"
            raise CatalogUnavailable(f"model registry unavailable: {type(exc).__name__}") from None
        self._listing.put("all", models)
        return models

    def _version(self, name: str) -> str:
        cached = self._versions.get(name)
        if cached is not None:
            return cached
        from mlflow.exceptions import MlflowException

        try:
            self.registry_calls += 1
            version = self._registry().get_model_version_by_alias(name, self.cfg.registry.alias).version
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise LookupError(name) from None  # listed, but the alias is not set (yet)
            raise CatalogUnavailable(f"model registry unavailable: {exc.error_code}") from None
        except OSError as exc:
            raise CatalogUnavailable(f"model registry unavailable: {type(exc).__name__}") from None
        self._versions.put(name, str(version))
        return str(version)

    # -- lookups ---------------------------------------------------------------------------------
    @staticmethod
    def _allowed(user: str, owner: str | None, shared: bool) -> bool:
        return shared or (owner is not None and owner == user and user != ANONYMOUS)

    def visible(self, user: str) -> list[str]:
        """The adapter names `user` may call, sorted, then their fine-tuned models."""
        tuned = self._finetuned(user) if user != ANONYMOUS else []
        return sorted(self._names(user)) + tuned

    def _names(self, user: str) -> frozenset[str]:
        names = self._visible.get(user)
        if names is None:
            names = {a.name for a in self.cfg.adapters if self._allowed(user, a.owner, a.shared)}
            names |= {n for n, m in self._registry_models().items() if self._allowed(user, m["owner"], m["shared"])}
            names = frozenset(names)
            self._visible.put(user, names)
        return names

    def _finetuned(self, user: str) -> list[str]:
        if self.finetune is None:
            return []
        try:
            return self.finetune.models(user)
        except Exception as exc:  # noqa: BLE001 - the store unreachable is "unavailable", never "none"
            raise CatalogUnavailable(f"fine-tuning store unavailable: {type(exc).__name__}") from None

    def resolve(self, user: str, name: str) -> Resolved | None:
        """The adapter `name` if `user` may call it; None when it does not exist or is not theirs
        (the same work either way: the caller's visible set, then a membership test). A fine-tuned
        model (ft:...) is looked up by its job id in the job records: the owner's, once succeeded,
        from the next request on."""
        if name.startswith("ft:"):
            if self.finetune is None or user == ANONYMOUS:
                return None
            try:
                found = self.finetune.resolve(user, name)
            except Exception as exc:  # noqa: BLE001
                raise CatalogUnavailable(f"fine-tuning store unavailable: {type(exc).__name__}") from None
            return None if found is None else Resolved(name, found[0], found[1])
        if not valid_name(name) or name not in self._names(user):
            return None
        entry = self.static.get(name)
        if entry is not None:
            return Resolved(name, entry.source, name)
        try:
            version = self._version(name)
        except LookupError:
            return None
        return Resolved(name, f"models:/{name}/{version}", f"{name}@v{version}")


def keys_summary(keys: dict[str, str]) -> str:
    return json.dumps({"users": sorted(set(keys.values())), "keys": len(keys)})
