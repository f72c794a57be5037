"""``meshward demo``: the namespace-jail lockdown end to end, as a newcomer runs it, and its
pure parts (the table and the verdict).

The end-to-end tests run the command in a subprocess: it starts its own control plane, so they
do not use the session fixtures. Transparent mode needs root and network namespaces; without
them that test is skipped, saying why.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from meshward.demo import _run, _table, _transparent

ALLOW, DENY = _table.Verdict.ALLOW, _table.Verdict.DENY
ROW = re.compile(
    r"^(?P<call>\S+ -> \S+)\s+(?P<be>allow|deny)\s+(?P<bo>allow|deny|\?\?\?) \(.*?\)\s+"
    r"(?P<ae>allow|deny)\s+(?P<ao>allow|deny|\?\?\?) \(.*?\)\s+"
    r"(?P<rule>.+?)\s+(?P<mark>ok|MISMATCH)$"
)


def demo(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", "demo", "--mode", mode],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def leftovers(state: str) -> list[str]:
    """Processes still running from (with the working directory in) the demo's state dir."""
    found = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True).stdout.split()
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd").startswith(state):
                    found.append(proc.name)
            except OSError:
                continue
    return found


def check_run(done: subprocess.CompletedProcess[str], mode: str) -> None:
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    assert re.search(rf"^mode: {mode} \(.+\)$", out, re.M), out
    rows = {m["call"]: m for line in out.splitlines() if (m := ROW.match(line))}
    assert set(rows) == {call.name for call in _run.CALLS}, out
    for call in _run.CALLS:
        row = rows[call.name]
        assert (row["be"], row["bo"]) == ("allow", "allow"), row.group(0)
        assert row["ae"] == call.after.value and row["ao"] == call.after.value, row.group(0)
        assert row["mark"] == "ok"
    # The rules the proxies counted: the sample's authorization lets emojivoto in, each
    # Server's accessPolicy keeps the rest out.
    assert rows["vote-bot -> web"]["rule"] == "Server web-http: ServerAuthorization emojivoto-only"
    assert rows["outsider -> emoji"]["rule"] == "Server emoji-grpc: accessPolicy deny"
    assert rows["plaintext -> web"]["rule"] == "Server web-http: accessPolicy deny"
    assert "default policy all-unauthenticated" in out  # before the lockdown
    assert "every call did what was expected" in out
    total = re.search(r"total (\d+\.\d)s", out)
    assert total is not None and float(total.group(1)) < 120, out
    state = re.search(r"^state: (\S+)$", out, re.M)
    assert state is not None
    assert not pathlib.Path(state.group(1)).exists()
    assert leftovers(state.group(1)) == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mwdemo-" not in netns


@pytest.mark.cluster
def test_the_lockdown_in_local_mode() -> None:
    check_run(demo("local"), "local")


@pytest.mark.cluster
def test_the_lockdown_with_injected_pods_in_network_namespaces() -> None:
    reason = _transparent.problem()
    if reason is not None:
        pytest.skip(f"transparent mode can not run here: {reason}")
    check_run(demo("transparent"), "transparent")


# -- the pure parts ----------------------------------------------------------------------------


def row(after_seen: _table.Verdict | None, after_expected: _table.Verdict = DENY) -> _table.Row:
    return _table.Row(
        "outsider -> web",
        ALLOW,
        _table.Observation(ALLOW, "200", "default policy all-unauthenticated"),
        after_expected,
        _table.Observation(after_seen, "403" if after_seen else "connect: TimeoutError", "r"),
    )


def test_a_table_of_matching_rows_passes() -> None:
    rows = [row(DENY)]
    text = _table.render(rows)
    line = next(line for line in text.splitlines() if line.startswith("outsider -> web"))
    assert line.split() == [
        *("outsider", "->", "web", "allow", "allow", "(200)", "deny", "deny", "(403)", "r", "ok")
    ]
    assert "before the lockdown, calls were decided by: default policy all-unauthenticated" in text
    assert _table.mismatches(rows) == []
    assert _table.exit_status(rows) == 0


def test_a_mismatch_is_named_and_fails_the_run() -> None:
    rows = [row(DENY), row(ALLOW)]
    assert _table.mismatches(rows) == [
        "MISMATCH: outsider -> web after the lockdown: expected deny, observed allow (403)"
    ]
    assert "MISMATCH" in _table.render(rows).splitlines()[3]
    assert _table.exit_status(rows) == 1


def test_an_outcome_that_can_not_be_told_is_a_mismatch() -> None:
    rows = [row(None)]
    assert _table.exit_status(rows) == 1
    assert "observed ??? (connect: TimeoutError)" in _table.mismatches(rows)[0]


def test_a_refusal_no_rule_counted_is_a_mismatch() -> None:
    uncounted = _table.Row(
        "outsider -> web",
        ALLOW,
        _table.Observation(ALLOW, "200", "default policy all-unauthenticated"),
        DENY,
        _table.Observation(DENY, "connection reset", None),
    )
    assert not uncounted.matches and _table.exit_status([uncounted]) == 1
    assert _table.mismatches([uncounted]) == [
        "MISMATCH: outsider -> web after the lockdown: deny (connection reset), but the serving "
        "proxy counted no decision for it"
    ]


def test_no_rows_is_no_success() -> None:
    assert _table.exit_status([]) == 1


def test_observed_outcomes_from_what_callers_saw() -> None:
    told = _run._http({"status": 403, "proxy_error": "Server web-http denies"}, None)
    assert (told.verdict, told.detail) == (DENY, "403, told why")
    closed = _run._http({"error": "connection closed without an answer"}, None)
    assert closed.verdict == DENY
    assert _run._http({"error": "connect: ConnectionRefusedError"}, None).verdict is None
    assert _run._http({"status": 502}, None).verdict is None
    assert _run._grpc({"code": "PERMISSION_DENIED"}, None).verdict == DENY
    assert _run._grpc({"code": "UNAVAILABLE", "detail": "x"}, None).verdict is None
    unreached = _run._downstream({"status": 403}, None)
    assert unreached.verdict is None and "not reached" in unreached.detail


def test_the_rule_is_what_the_proxy_counted_meanwhile() -> None:
    key = ("deny", "Server", "web-http", "default", "deny")
    other = ("allow", "Server", "web-http", "ServerAuthorization", "emojivoto-only")
    assert _run._rule({key: 1.0, other: 3.0}, {key: 2.0, other: 3.0}) == (
        "Server web-http: accessPolicy deny"
    )
    assert _run._rule({other: 3.0}, {other: 3.0}) is None
