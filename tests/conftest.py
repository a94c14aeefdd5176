"""Shared fixtures: one real control plane per test session, and its logs on failure."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from controlplane.binaries import resolve_binaries
from controlplane.runner import ControlPlane

CONTROL_PLANE = pytest.StashKey[ControlPlane]()


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager, started once for the session.

    A control plane that cannot start fails the tests that need it, with the reason: it is
    never a skip. The binaries are not built here (a cold build outlasts the test timeout);
    `make test` builds them first.
    """
    problem = None
    try:
        binaries = resolve_binaries(build=False)
        plane = ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries)
        plane.start()
    except RuntimeError as exc:
        problem = str(exc)
    if problem is not None:  # outside the except block: one message, no chained traceback
        pytest.fail(f"the control plane did not start: {problem}", pytrace=False)
    request.config.stash[CONTROL_PLANE] = plane
    try:
        yield plane
    finally:
        del request.config.stash[CONTROL_PLANE]
        plane.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the control plane's log tails to a failed integration test's report."""
    report = yield
    if report.failed and item.get_closest_marker("integration") is not None:
        plane = item.config.stash.get(CONTROL_PLANE, None)
        if plane is not None:
            report.sections.append(("control-plane logs", plane.logs_tail()))
    return report
