"""The model catalog: public model names mapped to a provider, an upstream model id and options, from YAML."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from services.prices import Price

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_TOP_LEVEL_KEYS = {"models", "remote_images"}
_ENTRY_KEYS = {
    "name", "provider", "model", "owned_by", "options", "deployments", "retry", "cooldown", "timeouts", "price",
}  # fmt: skip
_DEPLOYMENT_KEYS = {"provider", "model", "options", "weight", "timeouts"}
# Option names that would hold a secret in the file itself. Secrets are named by environment variable instead.
_SECRET_OPTIONS = {"api_key", "key", "secret", "password", "token", "aws_secret_access_key"}


class CatalogError(Exception):
    """A catalog that cannot be served. The message names the file, the entry and the problem."""


class MissingSecret(CatalogError):
    """An entry whose secret's environment variable is unset: the entry is served as unavailable, not fatal."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the core retries a deployment that failed before its first output (never after).

    Retried by default: an entry with no `retry:` section (the README's first example) rides out a 429 or 503 from
    its upstream with a few tries, inside `budget_seconds` and the caller's deadline, rather than failing at once.
    """

    attempts: int = 3  # tries of each deployment; 1 means no retry, only fallback to the next deployment
    initial_backoff_seconds: float = 0.1  # doubled after each try, with full jitter, capped below
    max_backoff_seconds: float = 2.0
    budget_seconds: float = 30.0  # all tries and waits of one request, across deployments


@dataclass(frozen=True, slots=True)
class TimeoutPolicy:
    """Limits on one try of a deployment, enforced by the core whatever the provider (None: no limit)."""

    first_token_seconds: float | None = None  # from the call to the provider's first output
    total_seconds: float | None = None  # from the call to the end of the completion


@dataclass(frozen=True, slots=True)
class CooldownPolicy:
    """A deployment that fails `failures` times in a row is skipped for `seconds`, then tried again."""

    failures: int = 3
    seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One public model name and the deployment(s) that serve it.

    An entry with a single deployment carries it in provider/model/options; an entry with several lists them in
    `deployments` (each itself a CatalogEntry with the same name), and provider/model/options are the first one's.
    """

    name: str
    provider: str
    model: str
    owned_by: str
    options: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""  # "catalog.yaml: models[0] (smollm2-135m)", for error messages
    deployments: tuple[CatalogEntry, ...] = ()
    weight: float | None = None  # a deployment's share of traffic; None: tried in list order
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cooldown: CooldownPolicy | None = None  # None: no circuit breaker (a lone deployment is never skipped)
    timeouts: TimeoutPolicy = field(default_factory=TimeoutPolicy)  # a deployment's own, else its entry's
    price: Price | None = None  # USD per million tokens, what callers pay; None: unpriced (cost unknown, not free)

    def url_option(self, name: str) -> str | None:
        """Option `name` as an http(s) URL, or None when it is absent or empty."""
        value = self.option(name, str, "")
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise self.problem(f"option {name!r} must be an http(s) URL, got {value!r}")
        return value

    def routes(self) -> tuple[CatalogEntry, ...]:
        """The deployments that serve this name, in catalog order."""
        return self.deployments or (self,)

    def problem(self, message: str) -> CatalogError:
        """A CatalogError about this entry."""
        return CatalogError(f"{self.where}: {message}")

    def check_options(self, allowed: set[str]) -> None:
        """Refuse options the provider does not know, so a typo never silently falls back to a default."""
        unknown = set(self.options) - allowed
        if unknown:
            raise self.problem(f"unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")

    def option(self, name: str, kind: type[T], default: T) -> T:
        """Option `name`, checked to be of type `kind` (an int is accepted where a float is wanted)."""
        value = self.options.get(name, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.problem(f"option {name!r} must be of type {kind.__name__}, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class RemoteImages:
    """The top-level `remote_images:` section: whether and how the core fetches http(s) image URLs.

    Off by default: fetching a URL a caller chose lets callers make the gateway reach any address it can (SSRF).
    When on, loopback, private, link-local (cloud metadata) and other non-public addresses are still refused unless
    `allowed_networks` names them, and only ports 80 and 443 unless `allowed_ports` says otherwise.
    """

    enabled: bool = False
    max_bytes: int = 5 * 1024 * 1024  # an image larger than this is refused, and stops downloading past it
    timeout_seconds: float = 10.0  # the whole fetch: connect, headers and body
    allowed_hosts: frozenset[str] | None = None  # lower-case host names; None: any host
    allowed_networks: tuple[IPNetwork, ...] = ()  # non-public networks the operator opens (an internal image store)
    allowed_ports: frozenset[int] = frozenset({80, 443})  # replaces the default when the catalog lists ports
    max_images: int = 8  # image URLs in one request at most (inline data: images are not counted: nothing to fetch)


@dataclass(frozen=True, slots=True)
class Catalog:
    """All entries, in file order, and the gateway-wide sections."""

    path: str
    entries: tuple[CatalogEntry, ...]
    remote_images: RemoteImages = field(default_factory=RemoteImages)

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]


def load_catalog(path: str | Path) -> Catalog:
    """Read and check a catalog file; raise CatalogError on any problem."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror or exc}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    return parse_catalog(document, path)


def parse_catalog(document: object, path: str) -> Catalog:
    """Check an already-parsed catalog document."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise CatalogError(f"{path}: the catalog must be a mapping with a 'models' list")
    extra = set(document) - _TOP_LEVEL_KEYS
    if extra:
        raise CatalogError(f"{path}: unknown top-level keys {sorted(extra)}; allowed: {sorted(_TOP_LEVEL_KEYS)}")
    if not document["models"]:
        raise CatalogError(f"{path}: 'models' is empty; list at least one model")
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["models"]):
        entry = _parse_entry(raw, f"{path}: models[{index}]")
        if entry.name in seen:
            raise entry.problem(f"duplicate model name {entry.name!r}")
        seen.add(entry.name)
        entries.append(entry)
    return Catalog(path=path, entries=tuple(entries), remote_images=_remote_images(document.get("remote_images"), path))


def _parse_entry(raw: object, where: str) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: each model must be a mapping")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} ({name})"
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CatalogError(f"{where}: 'name' must be a model name such as 'smollm2-135m', got {name!r}")
    retry = _retry(raw.get("retry"), where)
    cooldown = _cooldown(raw.get("cooldown"), where)
    price = _price(raw.get("price"), where)
    timeouts = _timeouts(raw.get("timeouts"), where, TimeoutPolicy())
    listed = raw.get("deployments")
    if listed is None:
        provider, model, options = _deployment_fields(raw, where)
        owned_by = _owned_by(raw, provider, where)
        return CatalogEntry(
            name, provider, model, owned_by, options, where, retry=retry, cooldown=cooldown, timeouts=timeouts,
            price=price,
        )  # fmt: skip
    if {"provider", "model", "options"} & set(raw):
        raise CatalogError(f"{where}: give either 'deployments' or provider/model/options, not both")
    if not isinstance(listed, list) or not listed:
        raise CatalogError(f"{where}: 'deployments' must be a non-empty list")
    deployments = []
    for index, item in enumerate(listed):
        at = f"{where} deployments[{index}]"
        if not isinstance(item, dict):
            raise CatalogError(f"{at}: each deployment must be a mapping")
        unknown = set(item) - _DEPLOYMENT_KEYS
        if unknown:
            raise CatalogError(f"{at}: unknown keys {sorted(unknown)}; allowed: {sorted(_DEPLOYMENT_KEYS)}")
        provider, model, options = _deployment_fields(item, at)
        weight = item.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0):
            raise CatalogError(f"{at}: 'weight' must be a number >= 0")
        deployments.append(
            CatalogEntry(
                name,
                provider,
                model,
                "",
                options,
                at,
                weight=None if weight is None else float(weight),
                timeouts=_timeouts(item.get("timeouts"), at, timeouts),
            )  # fmt: skip
        )
    if any(d.weight is not None for d in deployments) and not any(d.weight for d in deployments):
        raise CatalogError(f"{where}: at least one deployment needs a weight above 0")
    first = deployments[0]
    owned_by = _owned_by(raw, first.provider, where)
    return CatalogEntry(name, first.provider, first.model, owned_by, first.options, where, tuple(deployments),
                        retry=retry, cooldown=cooldown, timeouts=timeouts, price=price)  # fmt: skip


def _price(raw: object, where: str) -> Price | None:
    """`price: {input: 3, cached_input: 0.3, output: 15}`, USD per million tokens; absent: unpriced."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: 'price' must be a mapping such as {{input: 3, output: 15}} (USD per 1M tokens)")
    try:
        return Price.from_mapping(raw)
    except ValueError as exc:
        raise CatalogError(f"{where}: price: {exc}") from None


def _deployment_fields(raw: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    provider = raw.get("provider")
    if not isinstance(provider, str) or not provider:
        raise CatalogError(f"{where}: 'provider' is required (for example 'local' or 'openai')")
    model = raw.get("model", "")
    if not isinstance(model, str):
        raise CatalogError(f"{where}: 'model' must be a string (the upstream model id)")
    options = raw.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise CatalogError(f"{where}: 'options' must be a mapping of names to values")
    for key in options:
        if key.lower() in _SECRET_OPTIONS:
            raise CatalogError(
                f"{where}: option {key!r} would put a secret in the file; "
                f"name an environment variable instead ({key}_env: MY_VARIABLE)"
            )
    return provider, model, dict(options)


def _owned_by(raw: dict[str, Any], provider: str, where: str) -> str:
    owned_by = raw.get("owned_by", provider)
    if not isinstance(owned_by, str):
        raise CatalogError(f"{where}: 'owned_by' must be a string")
    return owned_by


def _policy_fields(raw: object, where: str, key: str, fields: dict[str, type]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: '{key}' must be a mapping")
    unknown = set(raw) - set(fields)
    if unknown:
        raise CatalogError(f"{where}: unknown keys in '{key}' {sorted(unknown)}; allowed: {sorted(fields)}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        kind = fields[name]
        ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok or value < 0:
            raise CatalogError(f"{where}: '{key}.{name}' must be a {kind.__name__} >= 0, got {value!r}")
        out[name] = kind(value)
    return out


def _retry(raw: object, where: str) -> RetryPolicy:
    fields = {"attempts": int, "initial_backoff_seconds": float, "max_backoff_seconds": float, "budget_seconds": float}
    policy = RetryPolicy(**_policy_fields(raw, where, "retry", fields))
    if policy.attempts < 1:
        raise CatalogError(f"{where}: 'retry.attempts' must be at least 1 (1 = no retry)")
    return policy


def _timeouts(raw: object, where: str, inherited: TimeoutPolicy) -> TimeoutPolicy:
    fields = _policy_fields(raw, where, "timeouts", {"first_token_seconds": float, "total_seconds": float})
    if any(value <= 0 for value in fields.values()):
        raise CatalogError(f"{where}: 'timeouts' values must be above 0")
    return TimeoutPolicy(
        fields.get("first_token_seconds", inherited.first_token_seconds),
        fields.get("total_seconds", inherited.total_seconds),
    )


def _cooldown(raw: object, where: str) -> CooldownPolicy | None:
    if raw is None:
        return None
    policy = CooldownPolicy(**_policy_fields(raw, where, "cooldown", {"failures": int, "seconds": float}))
    if policy.failures < 1:
        raise CatalogError(f"{where}: 'cooldown.failures' must be at least 1")
    return policy


def _remote_images(raw: object, path: str) -> RemoteImages:
    if raw is None:
        return RemoteImages()
    where = f"{path}: remote_images"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: must be a mapping")
    allowed = {"enabled", "max_bytes", "timeout_seconds", "allowed_hosts", "allowed_networks", "allowed_ports",
               "max_images"}  # fmt: skip
    unknown = set(raw) - allowed
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    defaults = RemoteImages()
    enabled = raw.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise CatalogError(f"{where}: 'enabled' must be true or false, got {enabled!r}")
    max_bytes = _positive_int(raw, "max_bytes", defaults.max_bytes, where)
    max_images = _positive_int(raw, "max_images", defaults.max_images, where)
    timeout = raw.get("timeout_seconds", defaults.timeout_seconds)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise CatalogError(f"{where}: 'timeout_seconds' must be a number above 0, got {timeout!r}")
    hosts = raw.get("allowed_hosts")
    if hosts is not None and (
        not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h.strip() for h in hosts)
    ):
        raise CatalogError(f"{where}: 'allowed_hosts' must be a non-empty list of host names, got {hosts!r}")
    return RemoteImages(
        enabled=enabled,
        max_bytes=max_bytes,
        timeout_seconds=float(timeout),
        allowed_hosts=None if hosts is None else frozenset(h.strip().lower() for h in hosts),
        allowed_networks=_networks(raw.get("allowed_networks"), where),
        allowed_ports=_ports(raw.get("allowed_ports"), where, defaults.allowed_ports),
        max_images=max_images,
    )


def _positive_int(raw: dict[str, Any], key: str, default: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CatalogError(f"{where}: '{key}' must be an int >= 1, got {value!r}")
    return value


def _networks(raw: object, where: str) -> tuple[IPNetwork, ...]:
    """`allowed_networks: [10.20.0.0/16, "fd00::/8"]`: CIDR strings (a bare address is a /32 or /128)."""
    if raw is None:
        return ()
    problem = f"{where}: 'allowed_networks' must be a non-empty list of networks such as 10.20.0.0/16 or 'fd00::/8'"
    if not isinstance(raw, list) or not raw:
        raise CatalogError(f"{problem}, got {raw!r}")
    networks: list[IPNetwork] = []
    for item in raw:
        if not isinstance(item, str):
            raise CatalogError(f"{problem}; {item!r} is not a string")
        try:
            networks.append(ipaddress.ip_network(item.strip()))
        except ValueError as exc:  # not a network, or host bits set ("10.0.0.1/8"): say which and why
            raise CatalogError(f"{problem}; {item!r} is not one: {exc}") from None
    return tuple(networks)


def _ports(raw: object, where: str, default: frozenset[int]) -> frozenset[int]:
    if raw is None:
        return default
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in raw)
    ):
        raise CatalogError(f"{where}: 'allowed_ports' must be a non-empty list of ports (1-65535), got {raw!r}")
    return frozenset(raw)


def read_secret(entry: CatalogEntry, option: str, env: Mapping[str, str]) -> str | None:
    """The secret named by option `<option>_env`, read from env; None when the option is absent."""
    variable = entry.options.get(f"{option}_env")
    if variable is None:
        return None
    if not isinstance(variable, str) or not variable:
        raise entry.problem(f"option '{option}_env' must name an environment variable")
    value = env.get(variable)
    if not value:
        raise MissingSecret(f"{entry.where}: environment variable {variable} (option '{option}_env') is not set")
    return value
