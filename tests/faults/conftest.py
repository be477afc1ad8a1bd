"""Fault-injection tests: the same loopback fakes and fixtures as tests/adapters, and a tally of cases.

Each fault test adds to `TALLY` ("<adapter>:tried", "<adapter>:held"); the totals are printed in
pytest's terminal summary (issue 17 asks for counts of cases tried and held).
"""

from collections import Counter

from tests.adapters.conftest import (  # noqa: F401  (fixtures, by name)
    discord_bot,
    fake_discord,
    fake_slack,
    http_bot,
    loopback_only,
    naughty_strings,
    slack_bot,
)

TALLY: Counter = Counter()


def tally(adapter: str, tried: int, held: int) -> None:
    """Count `tried` cases for `adapter`, of which `held` held."""
    for key in (adapter, "all"):
        TALLY[f"{key}:tried"] += tried
        TALLY[f"{key}:held"] += held


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    adapters = sorted({key.split(":")[0] for key in TALLY} - {"all"})
    per = ", ".join(f"{a} {TALLY[a + ':held']}/{TALLY[a + ':tried']}" for a in adapters)
    terminalreporter.write_sep("-", "fault injection")
    terminalreporter.write_line(f"cases tried: {TALLY['all:tried']}, held: {TALLY['all:held']} ({per})")
