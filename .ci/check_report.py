"""``python .ci/check_report.py JUNIT.xml``: fail when pytest's JUnit report shows no test ran.

pytest exits 0 when every collected test was deselected or skipped, and a suite whose
tests all vanished (a broken ``testpaths``, a conftest that deselects everything) must
not read as a pass.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

KEYS = ("tests", "failures", "errors", "skipped")


def counts(path: str) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in KEYS}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/check_report.py JUNIT.xml", file=sys.stderr)
        return 2
    try:
        found = counts(argv[0])
    except (OSError, ET.ParseError) as exc:
        print(f"[ci] {argv[0]}: no readable pytest report ({exc})", file=sys.stderr)
        return 1
    print("[ci] {tests} tests, {failures} failures, {errors} errors, {skipped} skipped".format(**found))
    ran = found["tests"] - found["skipped"]
    if ran <= 0:
        print("[ci] pytest ran no tests: that is a failure, not a pass", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
