"""The CI skip policy (tests/ci_policy.py) on a throw-away test suite run by a real pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SUITE = {
    "test_needs_things.py": '''
        import pytest

        @pytest.fixture
        def redis_server():
            pytest.skip("redis-server is not installed")

        def test_skips_in_its_body():
            pytest.skip("docker-compose is not installed")

        def test_skips_in_a_fixture(redis_server):
            pass

        @pytest.mark.ci_may_skip("needs a GPU")
        def test_may_skip():
            pytest.skip("no GPU here")

        @pytest.mark.xfail(reason="known bug", strict=True)
        def test_expected_failure():
            assert False

        def test_runs():
            assert True
    ''',
    "test_oracle.py": '''
        import pytest

        oracle = pytest.importorskip("no_such_oracle_module_xyz")

        def test_against_the_oracle():
            pass
    ''',
}


def run_suite(tmp_path: Path, ci: str | None, module: str = "test_needs_things.py") -> tuple[dict[str, str], str]:
    (tmp_path / module).write_text(textwrap.dedent(SUITE[module]))
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_policy", "-p", "no:cacheprovider",
                             "-c", os.devnull, "--rootdir", str(tmp_path), f"--junitxml={junit}", "-q", "-rA",
                             str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("name") or case.get("classname")
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = kinds[0] if kinds else "passed"
    return outcomes, result.stdout


def test_outside_ci_missing_dependencies_skip(tmp_path: Path) -> None:
    outcomes, _ = run_suite(tmp_path, None)
    assert outcomes["test_skips_in_its_body"] == outcomes["test_skips_in_a_fixture"] == "skipped"
    assert outcomes["test_may_skip"] == "skipped" and outcomes["test_runs"] == "passed"
    assert outcomes["test_expected_failure"] == "skipped"  # junit's word for xfailed


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_skip_for_a_missing_dependency_is_a_failure_naming_it(tmp_path: Path, ci: str) -> None:
    outcomes, output = run_suite(tmp_path, ci)
    assert outcomes["test_skips_in_its_body"] == "failure"
    assert outcomes["test_skips_in_a_fixture"] == "error"  # failed in setup
    assert "docker-compose is not installed" in output and "redis-server is not installed" in output
    assert "CI=true" in output
    # What is allowed stays allowed.
    assert outcomes["test_may_skip"] == "skipped" and outcomes["test_runs"] == "passed"
    assert outcomes["test_expected_failure"] == "skipped"


def test_under_ci_a_module_that_skips_at_import_for_a_missing_oracle_fails(tmp_path: Path) -> None:
    outcomes, output = run_suite(tmp_path, "true", "test_oracle.py")
    assert list(outcomes.values()) == ["error"], outcomes  # a collection error: the run stops, loudly
    assert "no_such_oracle_module_xyz" in output and "CI=true" in output
    outcomes, _ = run_suite(tmp_path, None, "test_oracle.py")
    assert list(outcomes.values()) == ["skipped"]


def test_ci_false_is_not_ci(tmp_path: Path) -> None:
    outcomes, _ = run_suite(tmp_path, "false")
    assert outcomes["test_skips_in_its_body"] == "skipped"


# --- .ci/check_report.py: a run in which no test ran is a failure ---------------------------

def check_report(junit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TESTS.parent / ".ci" / "check_report.py"), str(junit)],
                          capture_output=True, text=True, timeout=60)


def test_ci_check_report_fails_when_no_test_ran_and_passes_when_some_did(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n\ndef test_two():\n    pass\n")

    def junit_of(*args: str) -> Path:
        junit = tmp_path / f"junit{len(args)}.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir",
                        str(tmp_path), f"--junitxml={junit}", "-q", *args, str(tmp_path)], capture_output=True,
                       cwd=tmp_path, timeout=120)
        return junit

    none_ran = check_report(junit_of("-k", "no_such_test"))
    assert none_ran.returncode == 1 and "ran no tests" in none_ran.stderr
    ran = check_report(junit_of())
    assert ran.returncode == 0 and "2 tests, 0 failures" in ran.stdout
    missing = check_report(tmp_path / "absent.xml")
    assert missing.returncode == 1 and "no readable pytest report" in missing.stderr
