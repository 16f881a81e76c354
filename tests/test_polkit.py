"""contrib/rbeed.polkit.rules, judged by a real polkitd on a private system bus."""

# Needs root and polkitd, dbus-daemon, pkcheck, setpriv and unshare. In a private mount and pid
# namespace: a tmpfs on /run holds a fresh system bus, the rule is bound over
# /etc/polkit-1/rules.d, and copies of /etc/passwd and /etc/group that add the users rbee and
# guest are bound over the originals. pkcheck asks about processes running as those users, with
# the details systemd passes for org.freedesktop.systemd1.manage-units (unit, verb); the bus
# starts polkitd on the first question. Nothing outside the namespaces changes, and everything
# started in them ends with the script.

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POLKITD = Path("/usr/lib/polkit-1/polkitd")
RBEE, GUEST = 4242, 4243
MANAGE_UNITS = "org.freedesktop.systemd1.manage-units"
WORKER = "rbeed-worker@gemma3-270m-q4_k_m-cuda0-12.service"

# (uid, action, unit, verb, allowed): every verb rbeed's systemd backend uses, and the neighbours
# the rule must refuse.
CASES = [
    *[(RBEE, MANAGE_UNITS, WORKER, verb, True)
      for verb in ("start", "stop", "restart", "kill", "reset-failed", "set-property")],
    (RBEE, MANAGE_UNITS, WORKER, "reload", False),
    (RBEE, MANAGE_UNITS, "rbeed.service", "stop", False),
    (RBEE, MANAGE_UNITS, "ssh.service", "start", False),
    (RBEE, MANAGE_UNITS, "rbeed-worker@.service", "start", False),
    (RBEE, MANAGE_UNITS, "rbeed-worker@a/b.service", "start", False),
    (RBEE, MANAGE_UNITS, f"{WORKER}.d", "start", False),
    (RBEE, "org.freedesktop.systemd1.manage-unit-files", WORKER, "start", False),
    (GUEST, MANAGE_UNITS, WORKER, "start", False),
]  # fmt: skip

# Runs as `sh -ec SCRIPT sh BASE RULES UID ACTION UNIT VERB [UID ACTION UNIT VERB ...]` inside
# the namespaces; prints pkcheck's exit status for each case, one per line.
_SCRIPT = r"""
base=$1 rules=$2; shift 2
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/dbus "$base/rules"
cp "$rules" "$base/rules/50-rbeed.rules"
mount --bind "$base/rules" /etc/polkit-1/rules.d
cp /etc/passwd "$base/passwd"; cp /etc/group "$base/group"
echo "rbee:x:4242:4242::/nonexistent:/usr/sbin/nologin" >> "$base/passwd"
echo "guest:x:4243:4243::/nonexistent:/usr/sbin/nologin" >> "$base/passwd"
printf 'rbee:x:4242:\nguest:x:4243:\n' >> "$base/group"
mount --bind "$base/passwd" /etc/passwd; mount --bind "$base/group" /etc/group
mkfifo "$base/address"
dbus-daemon --system --nofork --nopidfile --print-address=3 3>"$base/address" 2>"$base/bus.log" &
head -n 1 "$base/address" > /dev/null  # printed once the bus listens
while [ $# -gt 0 ]; do
  setpriv --reuid="$1" --regid="$1" --clear-groups sleep 60 &
  subject=$!
  # Until setpriv has switched, the subject is this root shell's child, which polkit allows all.
  while ! grep -q "^Uid:[[:space:]]*$1[[:space:]]" "/proc/$subject/status"; do sleep 0.01; done
  status=0
  pkcheck --action-id "$2" --process "$subject" --detail unit "$3" --detail verb "$4" >/dev/null 2>&1 || status=$?
  kill "$subject"
  echo "$status"
  shift 4
done
"""


def ask(base: Path, rules: Path, cases: list[tuple]) -> list[int]:
    """pkcheck's exit status for each (uid, action, unit, verb, ...) case, with `rules` installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root for the private namespaces")
    missing = [tool for tool in ("dbus-daemon", "pkcheck", "setpriv", "unshare") if shutil.which(tool) is None]
    if missing or not POLKITD.exists():
        pytest.skip(f"needs polkitd and {', '.join(missing) or 'its tools'}")
    args = [str(field) for case in cases for field in case[:4]]
    result = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
         "sh", "-ec", _SCRIPT, "sh", str(base), str(rules), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    bus_log = (base / "bus.log").read_text() if (base / "bus.log").exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{bus_log}"
    statuses = [int(line) for line in result.stdout.split()]
    assert len(statuses) == len(cases), result.stdout
    return statuses


# pkcheck's exit status: 0 authorized; 1 not authorized; 2 authentication could authorize (a
# challenge). Anything else is an error, which must fail a test rather than pass as a refusal.
AUTHORIZED, REFUSED = {0}, {1, 2}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    return ask(tmp_path_factory.mktemp("polkit"), REPO / "contrib/rbeed.polkit.rules", CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{c[1].rsplit('.', 1)[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_rule_lets_rbee_manage_its_worker_units_and_nothing_else(verdicts, index):
    uid, action, unit, verb, allowed = CASES[index]
    assert verdicts[index] in (AUTHORIZED if allowed else REFUSED), (uid, action, unit, verb)


def test_without_the_rule_rbee_is_refused(tmp_path):
    # The control: what the rule allows is polkit's to refuse without it.
    empty = tmp_path / "none.rules"
    empty.write_text("")
    allowed = [case for case in CASES if case[4]]
    statuses = ask(tmp_path, empty, allowed)
    assert all(status in REFUSED for status in statuses), statuses
