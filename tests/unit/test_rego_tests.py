"""Run the OPA-style `test_` rules of policies/*_test.rego through regopy.

Each test rule becomes one pytest case: it passes when the rule evaluates to
true, and fails when it is undefined (a failed assertion in Rego) or errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import regopy

from remediator.settings import REPO_ROOT

POLICY_DIR = REPO_ROOT / "policies"
TEST_RULE = re.compile(r"^(test_\w+)\s+if\b", re.MULTILINE)
PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)


def collect_test_rules() -> list[tuple[Path, str, str]]:
    """Find (file, package, rule) for every test rule of the policy directory."""
    rules = []
    for path in sorted(POLICY_DIR.glob("*_test.rego")):
        source = path.read_text(encoding="utf-8")
        package = PACKAGE.search(source)
        assert package, f"{path} has no package line"
        for name in TEST_RULE.findall(source):
            rules.append((path, package.group(1), name))
    return rules


def load_interpreter() -> regopy.Interpreter:
    interpreter = regopy.Interpreter()
    for path in sorted(POLICY_DIR.glob("*.rego")):
        interpreter.add_module(path.name, path.read_text(encoding="utf-8"))
    return interpreter


TEST_RULES = collect_test_rules()


@pytest.fixture(scope="module")
def package_results() -> dict[str, dict[str, Any] | None]:
    """Evaluate each test package once.

    rego-cpp 1.5.2 takes about 1 s per query of remediation_test.rego, for one
    rule or for the whole package alike.
    """
    interpreter = load_interpreter()
    results: dict[str, dict[str, Any] | None] = {}
    for package in sorted({package for _, package, _ in TEST_RULES}):
        output = interpreter.query(f"data.{package}")
        if output.ok() and output.results and output.results[0].expressions:
            results[package] = output.results[0].expressions[0]
        else:
            results[package] = None
    return results


def test_rego_tests_found() -> None:
    assert len(TEST_RULES) >= 10


@pytest.mark.parametrize(
    ("path", "package", "rule"),
    TEST_RULES,
    ids=[f"{path.stem}.{rule}" for path, _, rule in TEST_RULES],
)
def test_rego_rule(
    package_results: dict[str, dict[str, Any] | None],
    path: Path,
    package: str,
    rule: str,
) -> None:
    values = package_results[package]
    if values is not None and values.get(rule) is True:
        return
    # Query the rule alone to show whether it is undefined or errors.
    output = load_interpreter().query(f"data.{package}.{rule}")
    assert output.ok(), f"{path.name}: {rule} failed with an error: {output}"
    assert str(output) == '{"expressions":[true]}', f"{path.name}: {rule} is {output}"
