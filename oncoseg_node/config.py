"""Node configuration: parsed once into frozen dataclasses by :func:`load_config`.

The tree is read by :class:`~oncoseg_node.yamlfile.DataclassParser`, which
reads the protocols file too. Every problem (unknown key, wrong type, bad
value) is collected and raised together in one
:class:`~oncoseg_node.errors.ConfigError` naming each key, so an operator
fixes a config in one pass. Relative paths resolve against the folder of the
config file, not the working directory, so a unit file and a shell agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oncoseg_node.errors import ConfigError
from oncoseg_node.yamlfile import DataclassParser, line_index, located, read_as, read_yaml

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
MIN_PDU = 128 * 1024
# Installed with the package (``config/`` in the repository holds the same files):
# ``oncoseg-node run`` works from any folder with no --config.
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"
DEFAULT_CONFIG = DEFAULTS_DIR / "oncoseg-node.yaml"
DEFAULT_PROTOCOLS = DEFAULTS_DIR / "protocols.yaml"


def default_state_dir() -> Path:
    """Where the node keeps its state when ``state_dir`` is not set (XDG base directories)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "oncoseg-node"


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS for the listener; mutual TLS when ``ca_file`` is set."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    handshake_timeout_s: float = 10.0


@dataclass(frozen=True)
class NodeConfig:
    """The listening application entity (the node as a Storage SCP)."""

    ae_title: str = "ONCOSEG"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 16
    max_associations_per_peer: int = 8
    max_pdu: int = 262144
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    min_free_disk_mb: int = 2048
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class SeriesConfig:
    """When a series counts as complete, and how duplicates are handled.

    ``whole_series_senders``: calling AE titles of scanners that send each
    series whole in one association, so a normal release with InstanceNumbers
    1..N contiguous at uniform slice spacing completes the series at once.
    ``interrupted_wait_s``: how long a series whose association was aborted,
    reset or timed out (or cut off by the node's own stop) waits after its
    last instance for the rest.
    """

    quiet_period_s: float = 10.0
    interrupted_wait_s: float = 300.0
    whole_series_senders: tuple[str, ...] = ()
    duplicate_policy: str = "keep_first"
    max_attempts: int = 3
    slice_spacing_tolerance_mm: float = 0.1
    # A job failing in a way a later attempt can pass waits this long
    # (doubled per attempt, capped) while newer series are contoured.
    retry_delay_s: float = 30.0
    retry_max_delay_s: float = 600.0


@dataclass(frozen=True)
class Sam3Config:
    """Local SAM3 weights (HF format) and an optional LoRA adapter; never downloaded.

    ``base_dir`` (or its older name ``model_dir``): the folder with
    ``config.json``, tokenizer, preprocessor and base weights. ``checkpoint``:
    one file layered over it (a Lightning ``.ckpt``, Meta's ``.pt``, a
    safetensors file); ``lora_alpha`` merges a still peft-wrapped LoRA whose
    checkpoint does not record its alpha.
    """

    model_dir: Path | None = None
    adapter_dir: Path | None = None
    base_dir: Path | None = None
    checkpoint: Path | None = None
    lora_alpha: float | None = None
    device: str = "cuda"
    dtype: str = "bfloat16"
    batch_size: int = 8
    score_threshold: float = 0.5
    low_score_flag: float = 0.6
    max_queries: int = 200
    max_instances: int = 4
    track_gap_slices: int = 2


@dataclass(frozen=True)
class EngineConfig:
    name: str = "classical"
    sam3: Sam3Config = field(default_factory=Sam3Config)


@dataclass(frozen=True)
class RetryConfig:
    """Capped exponential backoff for transient delivery failures."""

    first_delay_s: float = 10.0
    max_delay_s: float = 900.0


@dataclass(frozen=True)
class DestinationConfig:
    """A planning system (or archive) that receives our RT Structure Sets."""

    name: str
    ae_title: str
    host: str
    port: int
    profile: str = "generic"
    calling_ae_title: str | None = None
    timeout_s: float = 30.0
    max_pdu: int = 262144
    storage_commitment: bool = False
    shadow: bool = False
    retry: RetryConfig = field(default_factory=RetryConfig)


@dataclass(frozen=True)
class HttpTlsConfig:
    """HTTPS on the node's own HTTP port: the site's certificate chain and key (PEM)."""

    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class HttpAuthConfig:
    """Who may see the pages: local accounts, or users named by a trusted reverse proxy.

    ``users_file``: the node's own accounts (``oncoseg-node users``), argon2
    hashes, mode 0600. ``trusted_proxy``: addresses or networks of the site's
    reverse proxy; only their requests may name the user in ``user_header``
    (and groups, comma separated, in ``groups_header``, mapped to a role by
    ``group_roles``; ``proxy_default_role`` for a user in no mapped group,
    unset: refused).
    """

    users_file: Path | None = None
    session_idle_s: float = 900.0
    trusted_proxy: tuple[str, ...] = ()
    user_header: str = "X-Remote-User"
    groups_header: str = "X-Remote-Groups"
    group_roles: dict[str, str] = field(default_factory=dict)
    proxy_default_role: str | None = None

    @property
    def enabled(self) -> bool:
        return self.users_file is not None or bool(self.trusted_proxy)


@dataclass(frozen=True)
class HttpConfig:
    """Health, metrics and the jobs page; ``threads`` and ``timeout_s`` bound slow clients.

    Off loopback the pages need HTTPS (``tls``) and sign-in (``auth``);
    ``allow_plain`` admits plain HTTP there, for a TLS proxy in front.
    ``/metrics`` needs the bearer token in ``metrics_token_file``, or is
    answered to loopback clients only.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 8
    timeout_s: float = 10.0
    tls: HttpTlsConfig = field(default_factory=HttpTlsConfig)
    allow_plain: bool = False
    auth: HttpAuthConfig = field(default_factory=HttpAuthConfig)
    metrics_token_file: Path | None = None


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class RetentionConfig:
    """Spool data older than this is purged, unless a delivery is unfinished."""

    max_age_days: float = 30.0
    check_interval_s: float = 3600.0


@dataclass(frozen=True)
class Config:
    """The whole node configuration. ``source`` is the file it came from."""

    state_dir: Path
    protocols: Path
    node: NodeConfig = field(default_factory=NodeConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    source: Path | None = field(default=None, metadata=read_as(in_file=False))

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"


def _check_ae(title: Any, key: str, problems: list[str]) -> None:
    if isinstance(title, str) and not AE_TITLE_RE.match(title):
        problems.append(f"{key}: {title!r} is not a valid AE title (1-16 printable characters)")


def _check_port(port: Any, key: str, problems: list[str], *, allow_zero: bool = False) -> None:
    if isinstance(port, int) and not ((allow_zero and port == 0) or 1 <= port <= 65535):
        problems.append(f"{key}: {port} is not a TCP port (1-65535)")


def _check_positive(value: Any, key: str, problems: list[str]) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        problems.append(f"{key}: {value} must be greater than 0")


ROLES = ("viewer", "physicist")  # physicist: also downloads


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve to anything


def private_file_problem(path: Path) -> str | None:
    """Why a secret file (accounts, token) cannot be used, or None when it is 0600-like."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"{str(path)!r} cannot be read ({exc.strerror})"
    if mode & 0o077:
        return (f"{str(path)!r} has mode {mode & 0o777:04o}: readable by others; "
                f"chmod 600 it")
    return None


def _tls_pair_problem(tls: HttpTlsConfig, problems: list[str]) -> None:
    import ssl

    if tls.cert_file is None or tls.key_file is None:
        missing = "cert_file" if tls.cert_file is None else "key_file"
        problems.append(f"http.tls.{missing}: required when http.tls is set")
        return
    for key in ("cert_file", "key_file"):
        path = getattr(tls, key)
        try:
            path.read_bytes()
        except OSError as exc:
            problems.append(f"http.tls.{key}: {str(path)!r} cannot be read ({exc.strerror})")
            return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"http.tls.key_file: {str(tls.key_file)!r} is not the key of "
                        f"{str(tls.cert_file)!r} in PEM ({exc})")


def _http_checks(http: HttpConfig, problems: list[str]) -> None:
    _check_port(http.port, "http.port", problems, allow_zero=True)
    _check_positive(http.threads, "http.threads", problems)
    _check_positive(http.timeout_s, "http.timeout_s", problems)
    _check_positive(http.auth.session_idle_s, "http.auth.session_idle_s", problems)
    if http.tls.cert_file is not None or http.tls.key_file is not None:
        _tls_pair_problem(http.tls, problems)
    if http.enabled and not is_loopback_host(http.host):
        if not http.tls.enabled and not http.allow_plain:
            problems.append(f"http.tls.cert_file: required when http.host is {http.host!r} "
                            "(not loopback): the pages show patient data; set http.tls, "
                            "or http.allow_plain: true behind a TLS proxy")
        if not http.auth.enabled:
            problems.append(f"http.auth.users_file: required when http.host is {http.host!r} "
                            "(not loopback), or http.auth.trusted_proxy")
    for i, proxy in enumerate(http.auth.trusted_proxy):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(f"http.auth.trusted_proxy[{i}]: {proxy!r} is not an IP address "
                            "or network")
    for group, role in http.auth.group_roles.items():
        if role not in ROLES:
            problems.append(f"http.auth.group_roles.{group}: {role!r} is not one of {ROLES}")
    if http.auth.proxy_default_role not in (None, *ROLES):
        problems.append(f"http.auth.proxy_default_role: {http.auth.proxy_default_role!r} "
                        f"is not one of {ROLES}")
    users = http.auth.users_file
    if users is not None and users.exists() \
            and (problem := private_file_problem(users)) is not None:
        problems.append(f"http.auth.users_file: {problem}")
    token = http.metrics_token_file
    if token is not None:
        if (problem := private_file_problem(token)) is not None:
            problems.append(f"http.metrics_token_file: {problem}")
        elif not token.read_text().strip():
            problems.append(f"http.metrics_token_file: {str(token)!r} is empty")


def http_warnings(http: HttpConfig) -> list[str]:
    """What ``check-config`` and the start warn of in a valid HTTP configuration."""
    warnings = []
    if http.enabled and http.allow_plain and not http.tls.enabled \
            and not is_loopback_host(http.host):
        warnings.append(f"http.allow_plain: the pages are served as plain HTTP on {http.host}; "
                        "only safe behind a TLS proxy on a trusted network")
    users = http.auth.users_file
    if users is not None and not users.exists():
        warnings.append(f"http.auth.users_file: {str(users)!r} does not exist yet: "
                        "add accounts with `oncoseg-node users add NAME --role viewer`")
    return warnings


def _semantic_checks(cfg: Config, problems: list[str]) -> None:
    from oncoseg_node.rtstruct.profiles import (
        PROFILES,  # pure data; imported here to keep config import-light
    )

    node = cfg.node
    _check_ae(node.ae_title, "node.ae_title", problems)
    _check_port(node.port, "node.port", problems, allow_zero=True)
    for i, aet in enumerate(node.allowed_calling_aets):
        _check_ae(aet, f"node.allowed_calling_aets[{i}]", problems)
    for i, peer in enumerate(node.allowed_peers):
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError:
            problems.append(f"node.allowed_peers[{i}]: {peer!r} is not an IP address or network")
    if isinstance(node.max_pdu, int) and node.max_pdu < MIN_PDU:
        problems.append(f"node.max_pdu: {node.max_pdu} is below {MIN_PDU} (128 KiB)")
    for key in ("max_associations", "max_associations_per_peer", "acse_timeout_s",
                "dimse_timeout_s", "network_timeout_s"):
        _check_positive(getattr(node, key), f"node.{key}", problems)
    if node.tls.enabled:
        for key in ("cert_file", "key_file"):
            if getattr(node.tls, key) is None:
                problems.append(f"node.tls.{key}: required when node.tls.enabled is true")
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(node.tls, key)
            if isinstance(path, Path) and not path.is_file():
                problems.append(f"node.tls.{key}: {str(path)!r} does not exist")
    series = cfg.series
    _check_positive(series.quiet_period_s, "series.quiet_period_s", problems)
    _check_positive(series.interrupted_wait_s, "series.interrupted_wait_s", problems)
    for i, title in enumerate(series.whole_series_senders):
        _check_ae(title, f"series.whole_series_senders[{i}]", problems)
    _check_positive(series.max_attempts, "series.max_attempts", problems)
    _check_positive(series.retry_delay_s, "series.retry_delay_s", problems)
    _check_positive(series.retry_max_delay_s, "series.retry_max_delay_s", problems)
    if series.duplicate_policy not in ("keep_first", "replace"):
        problems.append(
            f"series.duplicate_policy: {series.duplicate_policy!r} is not keep_first or replace"
        )
    if cfg.engine.name not in ("classical", "sam3"):
        problems.append(f"engine.name: {cfg.engine.name!r} is not classical or sam3")
    sam3 = cfg.engine.sam3
    if cfg.engine.name == "sam3" and sam3.model_dir is None and sam3.base_dir is None:
        problems.append("engine.sam3.base_dir: required when engine.name is sam3 "
                        "(or its older name, model_dir)")
    if sam3.model_dir is not None and sam3.base_dir is not None:
        problems.append("engine.sam3.base_dir: set together with model_dir; set one of them")
    if sam3.lora_alpha is not None and not sam3.lora_alpha > 0:
        problems.append(f"engine.sam3.lora_alpha: {sam3.lora_alpha} is not positive")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(sam3.device)):
        problems.append(f"engine.sam3.device: {sam3.device!r} is not cpu, cuda or cuda:N")
    if sam3.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"engine.sam3.dtype: {sam3.dtype!r} is not float32, bfloat16 or float16")
    for key in ("batch_size", "max_queries", "max_instances"):
        _check_positive(getattr(sam3, key), f"engine.sam3.{key}", problems)
    if isinstance(sam3.track_gap_slices, int) and sam3.track_gap_slices < 0:
        problems.append(f"engine.sam3.track_gap_slices: {sam3.track_gap_slices} is negative")
    names = set()
    for i, dest in enumerate(cfg.destinations):
        if dest is None:
            continue
        key = f"destinations[{i}]"
        if dest.name in names:
            problems.append(f"{key}.name: {dest.name!r} is used twice")
        names.add(dest.name)
        _check_ae(dest.ae_title, f"{key}.ae_title", problems)
        if dest.calling_ae_title is not None:
            _check_ae(dest.calling_ae_title, f"{key}.calling_ae_title", problems)
        _check_port(dest.port, f"{key}.port", problems)
        if isinstance(dest.profile, str) and dest.profile not in PROFILES:
            problems.append(f"{key}.profile: {dest.profile!r} is not one of {sorted(PROFILES)}")
        _check_positive(dest.timeout_s, f"{key}.timeout_s", problems)
        if isinstance(dest.max_pdu, int) and dest.max_pdu < MIN_PDU:
            problems.append(f"{key}.max_pdu: {dest.max_pdu} is below {MIN_PDU} (128 KiB)")
        _check_positive(dest.retry.first_delay_s, f"{key}.retry.first_delay_s", problems)
        if dest.retry.max_delay_s < dest.retry.first_delay_s:
            problems.append(f"{key}.retry.max_delay_s: must be at least retry.first_delay_s")
    _http_checks(cfg.http, problems)
    if cfg.logging.format not in ("auto", "json", "console"):
        problems.append(f"logging.format: {cfg.logging.format!r} is not auto, json or console")
    if cfg.logging.level not in ("debug", "info", "warning", "error"):
        problems.append(f"logging.level: {cfg.logging.level!r} is not debug/info/warning/error")
    if not cfg.protocols.is_file():
        problems.append(f"protocols: {str(cfg.protocols)!r} does not exist")


def load_config(path: Path | str) -> Config:
    """Read, parse and validate a node config file.

    Raises :class:`ConfigError` listing every problem as ``FILE:LINE: key:
    message``; the returned tree is frozen and all paths in it are absolute.
    Without ``state_dir`` the state goes under the user's data folder
    (:func:`default_state_dir`).
    """
    path = Path(path)
    raw, text = read_yaml(path)
    if raw.get("state_dir") is None:
        raw["state_dir"] = str(default_state_dir())
    parser = DataclassParser(path.resolve().parent)
    cfg = parser.build(Config, raw, "")
    problems = parser.problems
    if cfg is not None:
        # A value of the wrong type was already reported by the parser;
        # checks that trip over it would only repeat it less clearly.
        with contextlib.suppress(TypeError, AttributeError):
            _semantic_checks(cfg, problems)
    if problems:
        raise ConfigError(located(problems, path, line_index(text)), source=str(path))
    return dataclasses.replace(cfg, source=path.resolve())

