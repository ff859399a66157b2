"""``python -m distrib.bench`` keeps working: the shape of its output on tiny sizes (never timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import base_env, run_cli

BENCH = [sys.executable, "-m", "distrib.bench"]
TINY = ["--quick", "--size-mb", "4", "--reps", "1"]
FIGURE_KEYS = {"number", "title", "ratio", "goal", "goal_value", "pass", "min", "median", "max",
               "ratios", "sizes", "details", "problem"}


def _bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str, str]:
    out = tmp_path / "bench.json"
    proc = run_cli([*BENCH, *TINY, "--dir", str(tmp_path), "--json", str(out), *args],
                   cwd=tmp_path, env=base_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [out], "the scratch folder is left behind"
    return json.loads(out.read_text()), proc.stdout, proc.stderr


def _check(result: dict[str, Any], table: str, numbers: list[int], stderr: str) -> None:
    env = result["environment"]
    assert {"torch", "cores", "storage", "storage_path"} <= set(env)
    assert [f["number"] for f in result["figures"]] == numbers
    lines = table.strip().splitlines()
    assert len(lines) == 1 + len(numbers)  # a header and one row per figure
    for f, line in zip(result["figures"], lines[1:]):
        assert FIGURE_KEYS <= set(f), f
        assert f["problem"] == "", stderr[-10000:]
        assert f["ratios"] and f["min"] <= f["ratio"] <= f["max"]
        assert f["goal"].split()[0] in (">=", "<=")
        cells = line.replace("|", " ").split()  # a text or a Markdown row
        assert cells[0] == str(f["number"])
        assert cells[-1] == ("PASS" if f["pass"] else "MISS")


@pytest.mark.slow
def test_quick_in_process_figures(tmp_path: Path) -> None:
    result, table, err = _bench(tmp_path, "--only", "1,2,3,7,8,13,14,15,16")
    _check(result, table, [1, 2, 3, 7, 8, 13, 14, 15, 16], err)
    for scale in (result["figures"][4], result["figures"][-1]):  # 8 and 16: fitted over 3 sizes
        assert len(scale["sizes"]["sizes_mb"]) == 3
    dcp = result["figures"][5]["details"]  # 13-15: both sides timed in every repetition
    assert len(dcp["dcp_load_s"]) == len(dcp["load_s"]) == 1


@pytest.mark.slow
def test_quick_training_job_figures(tmp_path: Path) -> None:
    result, table, err = _bench(tmp_path, "--only", "4,5,6,9", "--markdown")
    _check(result, "\n".join(table.strip().splitlines()[1:]), [4, 5, 6, 9], err)  # minus |---|
    assert table.startswith("| # | figure |")
    same = result["figures"][1]["details"]["losses_equal_to_5_decimals"]
    assert same is True


@pytest.mark.parametrize("args, message", [
    (["--only", "0"], "numbered 1 to 16"),
    (["--only", "17"], "numbered 1 to 16"),
    (["--only", "1,x"], "expected figure numbers"),
    (["--size-mb", "0"], "must be > 0"),
    (["--reps", "two"], "expected a number"),
    (["--dir", "/nonexistent/place"], "not a directory"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m distrib.bench`` is ``sys.exit(main())``: its main, in this process."""
    from distrib.bench.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- figures 10-12: their pure parts only
# (their jobs take minutes: a worker SIGKILL per repetition and side, node replacements)

def test_the_checkpoint_interval_at_one_percent_overhead() -> None:
    from distrib.bench.tier import interval

    assert interval(0.010, 0.0, 0.040) == 25  # 10 ms / (25 x 40 ms) = 1%
    assert interval(0.0101, 0.0, 0.040) == 26
    assert interval(0.010, 2.0, 0.040) == 50  # the write must finish within the interval
    assert interval(0.0, 0.0, 0.040) == 1


def test_a_step_log_is_read_up_to_its_last_complete_line(tmp_path: Path) -> None:
    from distrib.bench.tier import _steps

    log = tmp_path / "steps-0.log"
    log.write_text("1 0.50\n2 0.54\n3 0.5")  # a kill can cut the last line short
    assert _steps(str(log)) == [(1, 0.5), (2, 0.54)]
    assert _steps(str(tmp_path / "missing.log")) == []


def test_the_first_step_after_a_node_replacement_is_found(tmp_path: Path) -> None:
    from distrib.bench.jobs import FIRST_STEP
    from distrib.bench.relaunch import STARTUP, _after, committed

    text = (f"a\n[rank 0] {FIRST_STEP} 3.07s after start-up began\nfailed\n"
            f"resuming from the memory tier: step 2\n[rank 0] {FIRST_STEP} 2.41s after start-up "
            "began\n")
    after = _after(text, 1)
    assert after.startswith("failed\n") and "3.07s" not in after
    match = STARTUP.search(after)
    assert match and match.group(1) == "2.41"
    assert _after(text, 0) == text
    (tmp_path / ".step-000000002.tmp-ab12").mkdir()  # being written: not committed yet
    (tmp_path / ".step-000000002.tmp-ab12" / "manifest.json").write_text("{}")
    assert not committed(str(tmp_path / "step-*"))
    (tmp_path / ".step-000000002.tmp-ab12").rename(tmp_path / "step-000000002")
    assert committed(str(tmp_path / "step-*"))
