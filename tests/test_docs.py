"""The README matches the code: every flag documented with its default, the CI command is the
README's test command."""

from __future__ import annotations

import dataclasses
import re

from distrib.config import OPTION_INDEX, flag_name, markdown_options

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_flag_is_documented_with_its_default() -> None:
    for name, (_, f) in OPTION_INDEX.items():
        flag = flag_name(name)
        rows = [line for line in README.splitlines() if line.startswith(f"| `{flag}")]
        assert rows, f"{flag} is not in the README's option tables"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = {None: "off", (): "none"}.get(default if not isinstance(default, dict) else (),
                                               default)
        if isinstance(shown, tuple):
            shown = ",".join(map(str, shown))
        assert f"`{shown}`" in rows[0], (flag, shown, rows[0])


def test_option_tables_are_generated_from_the_declarations() -> None:
    """The README's option tables are exactly what distrib.config.markdown_options() makes
    (regenerate them with it after changing an option)."""
    assert markdown_options() in README


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = "bash launch/setup.sh test && .venv/bin/python -m pytest"
    assert test_cmd in README
    assert test_cmd in ci
    assert re.search(r"bash launch/setup.sh && \.venv/bin/torchrun --nproc_per_node=2 -m distrib\.train\n",
                     README)
