"""Settings and class parameters: each refusal names the key, quotes the value, says what to do."""

from __future__ import annotations

import pytest

from provisioner.config import (
    ClassParameters,
    ConfigError,
    LockKind,
    OnDelete,
    ParameterError,
    load_settings,
    parse_class_parameters,
)

BASE = {"PROVISIONER_NAME": "fuseim.pri/ifs", "NFS_SERVER": "10.0.0.5", "NFS_PATH": "/exports/"}


def test_defaults_match_nfs_subdir() -> None:
    command, settings = load_settings([], BASE)
    assert command == "run"
    assert settings.nfs_path == "/exports"
    assert settings.mount_path == "/persistentvolumes"
    assert settings.leader_election is True
    assert settings.lock_kind is LockKind.ENDPOINTS
    assert settings.namespace == "default"
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (15, 10, 2)
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8080)  # noqa: S104
    assert settings.lock_name == "fuseim.pri-ifs"


def test_flag_wins_over_environment_and_check_command() -> None:
    command, settings = load_settings(["--nfs-server", "nas.local", "check"], BASE)
    assert command == "check"
    assert settings.nfs_server == "nas.local"


def test_namespace_falls_back_to_service_account_file() -> None:
    _, settings = load_settings([], BASE, lambda: "storage")
    assert settings.namespace == "storage"


def test_events_have_their_own_budget() -> None:
    _, settings = load_settings([], {**BASE, "EVENTS_QPS": "2.5", "EVENTS_BURST": "7"})
    assert (settings.event_qps, settings.event_burst) == (2.5, 7)
    _, default = load_settings([], BASE)
    assert (default.event_qps, default.event_burst) == (10.0, 50)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {"NFS_PATH": ""},
            "NFS_PATH is not set; set it to the exported directory",
            id="missing-path",
        ),
        pytest.param({"PROVISIONER_NAME": ""}, "PROVISIONER_NAME is not set", id="missing-name"),
        pytest.param({"NFS_SERVER": ""}, "NFS_SERVER is not set", id="missing-server"),
        pytest.param(
            {"NFS_PATH": "exports"},
            'NFS_PATH="exports" is invalid; expected an absolute path',
            id="relative-path",
        ),
        pytest.param({"NFS_PATH": "/a/../b"}, '".." is not allowed in NFS_PATH', id="dotdot-path"),
        pytest.param({"NFS_MOUNT_PATH": "/"}, 'NFS_MOUNT_PATH="/" is invalid', id="mount-root"),
        pytest.param(
            {"ENABLE_LEADER_ELECTION": "maybe"},
            'ENABLE_LEADER_ELECTION="maybe" is invalid; expected true or false',
            id="bool",
        ),
        pytest.param(
            {"LEADER_ELECTION_LOCK": "configmaps"},
            'LEADER_ELECTION_LOCK="configmaps" is invalid; expected endpoints, leases or '
            "endpointsleases",
            id="lock",
        ),
        pytest.param(
            {"WORKERS": "0"},
            'WORKERS="0" is invalid; expected a positive whole number',
            id="workers",
        ),
        pytest.param(
            {"EVENTS_QPS": "0"},
            'EVENTS_QPS="0" is invalid; expected a positive number',
            id="events-qps",
        ),
        pytest.param(
            {"EVENTS_BURST": "1.5"},
            'EVENTS_BURST="1.5" is invalid; expected a positive whole number',
            id="events-burst",
        ),
        pytest.param({"FS_TIMEOUT": "nan"}, 'FS_TIMEOUT="nan" is invalid', id="timeout-nan"),
        pytest.param(
            {"HTTP_ADDRESS": "8080"},
            'HTTP_ADDRESS="8080" is invalid; expected host:port',
            id="http",
        ),
        pytest.param(
            {"RENEW_DEADLINE": "20"},
            "inconsistent; expected LEASE_DURATION > RENEW_DEADLINE",
            id="timings",
        ),
        pytest.param(
            {"PROVISIONER_NAME": "bad name"},
            'PROVISIONER_NAME="bad name" is invalid',
            id="name-chars",
        ),
        pytest.param(
            {"PROVISIONER_NAME": "Example.com/nfs"},
            'PROVISIONER_NAME="Example.com/nfs" is invalid for leader election: the lock name '
            '"Example.com-nfs" derived from it',
            id="lock-name-upper-case",
        ),
        pytest.param(
            {"PROVISIONER_NAME": "example.com/my_nfs"},
            'PROVISIONER_NAME="example.com/my_nfs" is invalid for leader election',
            id="lock-name-underscore",
        ),
        pytest.param(
            {"PROVISIONER_NAME": "example..com/nfs"},
            "must be a DNS-1123 subdomain",
            id="lock-name-empty-label",
        ),
        pytest.param(
            {"LOG_FORMAT": "xml"},
            'LOG_FORMAT="xml" is invalid; expected text or json',
            id="log-format",
        ),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([], {**BASE, **env})
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        pytest.param({}, ClassParameters(), id="defaults-archive"),
        pytest.param(
            {"archiveOnDelete": "false"},
            ClassParameters(on_delete=OnDelete.DELETE),
            id="archive-false",
        ),
        pytest.param(
            {"archiveOnDelete": "TRUE"},
            ClassParameters(on_delete=OnDelete.ARCHIVE),
            id="archive-true",
        ),
        pytest.param(
            {"onDelete": "Retain", "archiveOnDelete": "false"},
            ClassParameters(on_delete=OnDelete.RETAIN),
            id="ondelete-wins",
        ),
        pytest.param(
            {"ondelete": "DELETE"},
            ClassParameters(on_delete=OnDelete.DELETE),
            id="case-insensitive-key",
        ),
        pytest.param(
            {"onDelete": "archive"},
            ClassParameters(on_delete=OnDelete.ARCHIVE),
            id="ondelete-archive",
        ),
        pytest.param(
            {"mode": "2775", "uid": "1000", "gid": "0"},
            ClassParameters(mode=0o2775, uid=1000, gid=0),
            id="owner",
        ),
        pytest.param({"mode": "0o750"}, ClassParameters(mode=0o750), id="mode-0o"),
        pytest.param(
            {"pathPattern": "${.PVC.namespace}/${.PVC.name}"},
            ClassParameters(path_pattern="${.PVC.namespace}/${.PVC.name}"),
            id="pattern",
        ),
    ],
)
def test_class_parameters(parameters: dict[str, str], expected: ClassParameters) -> None:
    assert parse_class_parameters("nfs", parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        pytest.param(
            {"archiveOnDelte": "false"},
            'unknown parameter "archiveOnDelte"; accepted parameters are: pathPattern',
            id="typo",
        ),
        pytest.param(
            {"archiveOnDelete": "nope"},
            'archiveOnDelete="nope" is invalid: expected "true" or "false"',
            id="bool",
        ),
        pytest.param(
            {"onDelete": "keep"},
            'onDelete="keep" is invalid: expected delete, retain or archive',
            id="ondelete",
        ),
        pytest.param({"mode": "999"}, 'mode="999" is invalid', id="mode"),
        pytest.param({"uid": "-1"}, 'uid="-1" is invalid', id="uid"),
        pytest.param({"pathPattern": " "}, 'pathPattern=" " is invalid', id="empty-pattern"),
    ],
)
def test_bad_class_parameters_list_what_is_accepted(
    parameters: dict[str, str], expected: str
) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_class_parameters("nfs", parameters)
    assert 'StorageClass "nfs"' in str(caught.value)
    assert expected in str(caught.value)


def test_lock_name_is_checked_only_with_leader_election() -> None:
    env = {**BASE, "PROVISIONER_NAME": "Example.com/my_nfs", "ENABLE_LEADER_ELECTION": "false"}
    _, settings = load_settings([], env)
    assert settings.provisioner_name == "Example.com/my_nfs"
    _, settings = load_settings([], {**BASE, "PROVISIONER_NAME": "k8s-sigs.io/nfs-subdir"})
    assert settings.lock_name == "k8s-sigs.io-nfs-subdir"
