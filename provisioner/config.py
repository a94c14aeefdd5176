"""Process settings and StorageClass parameters, parsed once into frozen, validated values.

Called by ``__main__`` (environment and flags) and by the reconciler (class parameters). Every
error names the variable or parameter, quotes the value and says what is accepted. Pure: this
module touches neither the filesystem nor the network and imports no Kubernetes library.
"""

from __future__ import annotations

import argparse
import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

from provisioner.paths import RelativeDir, UnsafePathError, parse_relative

DEFAULT_MOUNT_PATH = "/persistentvolumes"
ANNOTATION_PREFIX = "nfs.provisioner.dev"
"""The one DNS-subdomain prefix of every annotation this provisioner writes (on PVs only)."""


class ConfigError(ValueError):
    """A process setting is missing or invalid; the message is the one line the user sees."""


class ParameterError(ValueError):
    """A StorageClass parameter is unknown or malformed; the message lists what is accepted."""


class LockKind(enum.StrEnum):
    ENDPOINTS = "endpoints"
    LEASES = "leases"
    ENDPOINTS_LEASES = "endpointsleases"


class OnDelete(enum.StrEnum):
    """What happens to a volume's directory when the volume is released under policy Delete."""

    DELETE = "delete"
    RETAIN = "retain"
    ARCHIVE = "archive"


@dataclass(frozen=True)
class Settings:
    """Everything the process needs, validated. Durations are seconds."""

    provisioner_name: str
    nfs_server: str
    nfs_path: str
    """The exported path, absolute and normalised; PVs point at ``nfs_path/<relative dir>``."""
    mount_path: str
    """Where the export is mounted in the provisioner (nfs-subdir hard-codes /persistentvolumes)."""
    leader_election: bool = True
    lock_kind: LockKind = LockKind.ENDPOINTS
    namespace: str = "default"
    """Namespace of the leader-election lock."""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    http_host: str = "0.0.0.0"  # noqa: S104 - probes and metrics must be reachable from the kubelet
    http_port: int = 8080
    client_qps: float = 100.0
    """Sustained API requests per second (4 per provisioned claim); upstream's 5 is far slower."""
    client_burst: int = 200
    event_qps: float = 10.0
    """Events have their own budget: they never spend the one of PersistentVolume writes."""
    event_burst: int = 50
    workers: int = 16
    """Claims and volumes reconciled in parallel; the filesystem pool is sized from it."""
    resync_period: float = 300.0
    """Every object is re-reconciled this often, so a missed watch event is repaired."""
    fs_timeout: float = 30.0
    """A filesystem call that takes longer fails the attempt (a hung NFS mount)."""
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    """Retries back off exponentially from ``backoff_base`` up to this cap and never give up."""
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def lock_name(self) -> str:
        return self.provisioner_name.replace("/", "-")


@dataclass(frozen=True)
class _Option:
    env: str
    flag: str
    help: str
    default: str | None


_OPTIONS: tuple[_Option, ...] = (
    _Option("PROVISIONER_NAME", "--provisioner-name", "must equal StorageClass.provisioner", None),
    _Option("NFS_SERVER", "--nfs-server", "NFS server written into every PV", None),
    _Option("NFS_PATH", "--nfs-path", "exported path written into every PV", None),
    _Option(
        "NFS_MOUNT_PATH", "--nfs-mount-path", "where the export is mounted", DEFAULT_MOUNT_PATH
    ),
    _Option("ENABLE_LEADER_ELECTION", "--enable-leader-election", "true or false", "true"),
    _Option("LEADER_ELECTION_LOCK", "--leader-election-lock", "lock kind", "endpoints"),
    _Option("POD_NAMESPACE", "--pod-namespace", "namespace of the lock", None),
    _Option("LEASE_DURATION", "--lease-duration", "seconds", "15"),
    _Option("RENEW_DEADLINE", "--renew-deadline", "seconds", "10"),
    _Option("RETRY_PERIOD", "--retry-period", "seconds", "2"),
    _Option("HTTP_ADDRESS", "--http-address", "host:port of /metrics, /healthz, /readyz", None),
    _Option("KUBE_API_QPS", "--kube-api-qps", "API requests per second", "100"),
    _Option("KUBE_API_BURST", "--kube-api-burst", "API request burst", "200"),
    _Option("EVENTS_QPS", "--events-qps", "Events posted per second (own budget)", "10"),
    _Option("EVENTS_BURST", "--events-burst", "Event burst (own budget)", "50"),
    _Option("WORKERS", "--workers", "objects reconciled in parallel", "16"),
    _Option("RESYNC_PERIOD", "--resync-period", "seconds between full resyncs", "300"),
    _Option("FS_TIMEOUT", "--fs-timeout", "seconds a filesystem call may take", "30"),
    _Option("RETRY_BACKOFF_BASE", "--retry-backoff-base", "first retry delay, seconds", "1"),
    _Option("RETRY_BACKOFF_MAX", "--retry-backoff-max", "retry delay cap, seconds", "300"),
    _Option("LOG_FORMAT", "--log-format", "text or json", "text"),
    _Option("LOG_LEVEL", "--log-level", "DEBUG, INFO, WARNING or ERROR", "INFO"),
)

_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def build_arg_parser() -> argparse.ArgumentParser:
    """The CLI: every environment variable is also a flag; a flag wins over the variable."""
    parser = argparse.ArgumentParser(
        prog="nfs-provisioner",
        description="Dynamic NFS sub-directory provisioner for Kubernetes.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "check", "handover"),
        help=(
            "run the provisioner (default), only run the preflight check (exit 0/1), or hand "
            "an existing directory over to a namespace (with --directory and --namespace)"
        ),
    )
    parser.add_argument(
        "--migration",
        action="store_true",
        help=(
            "check: instead of the preflight, list the PersistentVolumes of the previous "
            "provisioner (nfs-subdir, nfs-client) that would be adopted and those that cannot "
            "be, with why; changes nothing"
        ),
    )
    parser.add_argument(
        "--directory",
        dest="handover_directory",
        metavar="DIR",
        help="handover: the directory, relative to the export, e.g. team-a/data",
    )
    parser.add_argument(
        "--namespace",
        dest="handover_namespace",
        metavar="NAMESPACE",
        help="handover: the namespace whose claims may reuse the directory from now on",
    )
    for option in _OPTIONS:
        default = f" (default {option.default})" if option.default is not None else ""
        parser.add_argument(
            option.flag,
            dest=option.env,
            default=None,
            metavar="VALUE",
            help=f"{option.help}{default}; env {option.env}",
        )
    return parser


def _raw_values(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for option in _OPTIONS:
        flag_value = getattr(args, option.env)
        if flag_value is not None:
            values[option.env] = flag_value
        elif env.get(option.env, "") != "":
            values[option.env] = env[option.env]
        else:
            values[option.env] = option.default
    return values


_T = TypeVar("_T")


def _parse(name: str, raw: str, parse: Callable[[str], _T], accepted: str) -> _T:
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f'{name}="{raw}" is invalid; expected {accepted}') from None


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):  # also refuses NaN
        raise ValueError(raw)
    return value


def _positive_int(raw: str) -> int:
    value = int(raw, 10)
    if value <= 0:
        raise ValueError(raw)
    return value


_TRUE = frozenset({"1", "t", "true", "yes", "y", "on"})
_FALSE = frozenset({"0", "f", "false", "no", "n", "off"})


def parse_bool(raw: str) -> bool:
    """Go's strconv.ParseBool spellings (as nfs-subdir), case-insensitive, plus yes/no."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(raw)


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-:\[\]]*[A-Za-z0-9\]])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_OBJECT_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
"""A DNS-1123 subdomain: how the API server validates Endpoints and Lease names."""
_PROVISIONER = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/\-]*[A-Za-z0-9])?$")


def _required(values: Mapping[str, str | None], name: str, example: str) -> str:
    value = values[name]
    if value is None or value.strip() == "":
        raise ConfigError(f"{name} is not set; set it to {example}")
    return value.strip()


def _absolute_path(name: str, raw: str, example: str) -> str:
    if not raw.startswith("/") or "\x00" in raw:
        raise ConfigError(f'{name}="{raw}" is invalid; expected an absolute path such as {example}')
    normalised = str(PurePosixPath(raw))
    if ".." in PurePosixPath(normalised).parts:
        raise ConfigError(f'{name}="{raw}" is invalid; ".." is not allowed in {name}')
    return normalised


def _http_address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    accepted = "host:port with a port from 0 to 65535, e.g. 0.0.0.0:8080"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f'HTTP_ADDRESS="{raw}" is invalid; expected {accepted}')
    return (host.strip("[]") or "0.0.0.0"), int(port)  # noqa: S104 - documented default


class _Values:
    """The raw settings (flags over environment), read by key with one error wording."""

    def __init__(self, raw: dict[str, str | None]) -> None:
        self.raw = raw

    def __getitem__(self, key: str) -> str | None:
        return self.raw[key]

    def number(self, key: str, accepted: str = "a positive number of seconds") -> float:
        return _parse(key, self.raw[key] or "", _positive_float, accepted)

    def integer(self, key: str) -> int:
        return _parse(key, self.raw[key] or "", _positive_int, "a positive whole number")


def load_settings(
    argv: Sequence[str],
    env: Mapping[str, str],
    read_sa_namespace: Callable[[], str | None] = lambda: None,
) -> tuple[str, Settings]:
    """Parse flags and environment into ``(command, Settings)``; raise ``ConfigError``.

    Checked in this order, the first mistake is the one reported: the provisioner's name, the
    export, leader election, the namespace, the lease timings, HTTP, logging, retries."""
    args = build_arg_parser().parse_args(list(argv))
    values = _Values(_raw_values(args, env))
    name = _provisioner_name(values)
    server, nfs_path, mount_path = _export(values)
    leader, lock = _election(values, name)
    namespace = values["POD_NAMESPACE"] or read_sa_namespace() or "default"
    if not _DNS_SUBDOMAIN.match(namespace) or len(namespace) > 63:
        raise ConfigError(f'POD_NAMESPACE="{namespace}" is invalid; expected a namespace name')
    lease, renew, retry = _lease_timings(values)
    host, port = _http_address(values["HTTP_ADDRESS"] or "0.0.0.0:8080")
    log_format, log_level = _logging(values)
    backoff_base, backoff_max = _backoff(values)
    settings = Settings(
        provisioner_name=name,
        nfs_server=server,
        nfs_path=nfs_path,
        mount_path=mount_path,
        leader_election=leader,
        lock_kind=lock,
        namespace=namespace,
        lease_duration=lease,
        renew_deadline=renew,
        retry_period=retry,
        http_host=host,
        http_port=port,
        client_qps=values.number("KUBE_API_QPS", "a positive number"),
        client_burst=values.integer("KUBE_API_BURST"),
        event_qps=values.number("EVENTS_QPS", "a positive number"),
        event_burst=values.integer("EVENTS_BURST"),
        workers=values.integer("WORKERS"),
        resync_period=values.number("RESYNC_PERIOD"),
        fs_timeout=values.number("FS_TIMEOUT"),
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        log_format=log_format,
        log_level=log_level,
    )
    return args.command, settings


def _provisioner_name(values: _Values) -> str:
    name = _required(
        values.raw, "PROVISIONER_NAME", "the StorageClass provisioner, e.g. example.com/nfs"
    )
    if len(name) > 253 or not _PROVISIONER.match(name):
        raise ConfigError(
            f'PROVISIONER_NAME="{name}" is invalid; use letters, digits, ".", "-", "_" and "/" '
            "(for example k8s-sigs.io/nfs-subdir-external-provisioner)"
        )
    return name


def _export(values: _Values) -> tuple[str, str, str]:
    """NFS_SERVER, NFS_PATH and NFS_MOUNT_PATH."""
    server = _required(values.raw, "NFS_SERVER", "the NFS server's host name or IP, e.g. 10.0.0.5")
    if not _HOSTNAME.match(server):
        raise ConfigError(
            f'NFS_SERVER="{server}" is invalid; expected a host name or an IP address'
        )
    nfs_path = _absolute_path(
        "NFS_PATH",
        _required(values.raw, "NFS_PATH", "the exported directory, e.g. /exports"),
        "/exports",
    )
    mount_path = _absolute_path(
        "NFS_MOUNT_PATH", values["NFS_MOUNT_PATH"] or DEFAULT_MOUNT_PATH, DEFAULT_MOUNT_PATH
    )
    if mount_path == "/":
        raise ConfigError('NFS_MOUNT_PATH="/" is invalid; mount the export on its own directory')
    return server, nfs_path, mount_path


def _election(values: _Values, name: str) -> tuple[bool, LockKind]:
    """ENABLE_LEADER_ELECTION and LEADER_ELECTION_LOCK, and the lock name ``name`` gives."""
    leader = _parse(
        "ENABLE_LEADER_ELECTION",
        values["ENABLE_LEADER_ELECTION"] or "true",
        parse_bool,
        "true or false",
    )
    lock = _parse(
        "LEADER_ELECTION_LOCK",
        (values["LEADER_ELECTION_LOCK"] or "endpoints").lower(),
        LockKind,
        "endpoints, leases or endpointsleases",
    )
    lock_name = name.replace("/", "-")  # Settings.lock_name
    if leader and (len(lock_name) > 253 or not _OBJECT_NAME.match(lock_name)):
        raise ConfigError(
            f'PROVISIONER_NAME="{name}" is invalid for leader election: the lock name '
            f'"{lock_name}" derived from it ("/" replaced by "-") must be a DNS-1123 subdomain, '
            'as Kubernetes requires of object names: lower-case letters, digits, "-" and ".", '
            "starting and ending with a letter or digit (for example example.com/nfs); or set "
            "ENABLE_LEADER_ELECTION=false"
        )
    return leader, lock


def _lease_timings(values: _Values) -> tuple[float, float, float]:
    lease = values.number("LEASE_DURATION")
    renew = values.number("RENEW_DEADLINE")
    retry = values.number("RETRY_PERIOD")
    if not lease > renew > retry * 1.2:
        raise ConfigError(
            f"LEASE_DURATION={lease:g}, RENEW_DEADLINE={renew:g}, RETRY_PERIOD={retry:g} are "
            "inconsistent; expected LEASE_DURATION > RENEW_DEADLINE > 1.2 x RETRY_PERIOD"
        )
    return lease, renew, retry


def _logging(values: _Values) -> tuple[str, str]:
    log_format = (values["LOG_FORMAT"] or "text").lower()
    if log_format not in {"text", "json"}:
        raise ConfigError(f'LOG_FORMAT="{values["LOG_FORMAT"]}" is invalid; expected text or json')
    log_level = (values["LOG_LEVEL"] or "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(
            f'LOG_LEVEL="{values["LOG_LEVEL"]}" is invalid; expected DEBUG, INFO, WARNING or ERROR'
        )
    return log_format, log_level


def _backoff(values: _Values) -> tuple[float, float]:
    backoff_base = values.number("RETRY_BACKOFF_BASE")
    backoff_max = values.number("RETRY_BACKOFF_MAX")
    if backoff_max < backoff_base:
        raise ConfigError(
            f'RETRY_BACKOFF_MAX="{values["RETRY_BACKOFF_MAX"]}" is invalid; it must be at least '
            f"RETRY_BACKOFF_BASE ({backoff_base:g})"
        )
    return backoff_base, backoff_max


@dataclass(frozen=True)
class Handover:
    """``nfs-provisioner handover``: give an existing directory to a namespace (admin only)."""

    directory: RelativeDir
    namespace: str


def parse_handover(argv: Sequence[str]) -> Handover:
    args = build_arg_parser().parse_args(list(argv))
    directory = args.handover_directory
    namespace = args.handover_namespace
    if not directory or not namespace:
        raise ConfigError(
            "handover needs --directory DIR (relative to the export) and --namespace NAMESPACE"
        )
    try:
        relative = parse_relative(directory)
    except UnsafePathError as error:
        raise ConfigError(
            f'--directory="{directory}" is invalid: {error.rule}; give the directory relative '
            "to the export, as the refused claim's Event names it (e.g. team-a/data)"
        ) from None
    if not _DNS_SUBDOMAIN.match(namespace) or len(namespace) > 63 or "." in namespace:
        raise ConfigError(
            f'--namespace="{namespace}" is invalid; expected a namespace name (lower case '
            "letters, digits and '-', at most 63 characters)"
        )
    return Handover(relative, namespace)


def wants_migration(argv: Sequence[str]) -> bool:
    """``check --migration``; the flag belongs to ``check`` only."""
    args = build_arg_parser().parse_args(list(argv))
    if args.migration and args.command != "check":
        raise ConfigError(
            "--migration is a flag of the check command: nfs-provisioner check --migration"
        )
    return bool(args.migration)


def read_service_account_namespace() -> str | None:
    """The in-cluster namespace file, used when POD_NAMESPACE is not set."""
    try:
        with open(_SA_NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


# --- StorageClass parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class ClassParameters:
    """A StorageClass's ``parameters``, validated. Defaults are nfs-subdir's."""

    path_pattern: str | None = None
    on_delete: OnDelete = OnDelete.ARCHIVE
    mode: int = 0o777
    uid: int | None = None
    gid: int | None = None


ACCEPTED_PARAMETERS: dict[str, str] = {
    "pathPattern": "a template such as ${.PVC.namespace}/${.PVC.name}",
    "onDelete": "delete, retain or archive",
    "archiveOnDelete": '"true" or "false"',
    "mode": "an octal mode such as 0777 or 2775",
    "uid": "a numeric user id",
    "gid": "a numeric group id",
}

_MODE = re.compile(r"^(0o|0)?([0-7]{3,4})$")
_MAX_ID = 2**32 - 2


def _accepted_list() -> str:
    return "; ".join(f"{key} ({meaning})" for key, meaning in ACCEPTED_PARAMETERS.items())


def _parameter_error(class_name: str, key: str, value: str, rule: str) -> ParameterError:
    return ParameterError(
        f'StorageClass "{class_name}" parameter {key}="{value}" is invalid: {rule}. '
        "Fix the StorageClass (parameters cannot be edited: delete and re-create it)"
    )


def _parse_id(class_name: str, key: str, value: str) -> int:
    stripped = value.strip()
    if not stripped.isdigit() or int(stripped) > _MAX_ID:
        raise _parameter_error(class_name, key, value, f"expected {ACCEPTED_PARAMETERS[key]}")
    return int(stripped)


def parse_class_parameters(class_name: str, parameters: Mapping[str, str]) -> ClassParameters:
    """Validate a class's parameters; keys match case-insensitively, values too."""
    canonical = {key.lower(): key for key in ACCEPTED_PARAMETERS}
    given: dict[str, str] = {}
    for key, value in parameters.items():
        known = canonical.get(key.lower())
        if known is None:
            raise ParameterError(
                f'StorageClass "{class_name}" has unknown parameter "{key}"; '
                f"accepted parameters are: {_accepted_list()}"
            )
        given[known] = str(value)

    on_delete = OnDelete.ARCHIVE
    if "archiveOnDelete" in given:
        try:
            archive = parse_bool(given["archiveOnDelete"])
        except ValueError:
            raise _parameter_error(
                class_name,
                "archiveOnDelete",
                given["archiveOnDelete"],
                'expected "true" or "false"',
            ) from None
        on_delete = OnDelete.ARCHIVE if archive else OnDelete.DELETE
    if "onDelete" in given:  # onDelete wins over archiveOnDelete, as in nfs-subdir's README
        try:
            on_delete = OnDelete(given["onDelete"].strip().lower())
        except ValueError:
            raise _parameter_error(
                class_name, "onDelete", given["onDelete"], "expected delete, retain or archive"
            ) from None

    mode = 0o777
    if "mode" in given:
        match = _MODE.match(given["mode"].strip().lower())
        if match is None:
            raise _parameter_error(
                class_name, "mode", given["mode"], f"expected {ACCEPTED_PARAMETERS['mode']}"
            )
        mode = int(match.group(2), 8)

    pattern = given.get("pathPattern")
    if pattern is not None and pattern.strip() == "":
        raise _parameter_error(
            class_name, "pathPattern", pattern, "it is empty; remove it to use the default name"
        )
    return ClassParameters(
        path_pattern=pattern,
        on_delete=on_delete,
        mode=mode,
        uid=_parse_id(class_name, "uid", given["uid"]) if "uid" in given else None,
        gid=_parse_id(class_name, "gid", given["gid"]) if "gid" in given else None,
    )
