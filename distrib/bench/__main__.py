"""``python -m distrib.bench``: run the figures, print the table, optionally write JSON."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, NoReturn, Sequence

from distrib.bench.core import Figure, Settings, environment, figure, markdown_table, text_table

ALL = tuple(range(1, 17))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _only(text: str) -> list[int]:
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected figure numbers like 1,3, got {text!r}") from None
    bad = [n for n in chosen if n not in ALL]
    if not chosen or bad:
        raise argparse.ArgumentTypeError(f"figures are numbered 1 to 16, got {text!r}")
    return chosen


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m distrib.bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and 3 repetitions (about 4 minutes on 2 cores)")
    p.add_argument("--only", type=_only, default=list(ALL), metavar="N,M",
                   help="run only these figures (1-16)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--markdown", action="store_true",
                   help="print the table as Markdown (the README's Performance table)")
    p.add_argument("--size-mb", type=_positive(float), default=None,
                   help="training-state size for figures 1-3, 6, 11, 12 and 13-15; figure 8 "
                        "uses size/8, size/2, 2*size; figure 16 size/8, size, 4*size; figure 7 "
                        "size/8; figure 10 trains a fixed 29 MB model (default 512, --quick 64)")
    p.add_argument("--reps", type=_positive(int), default=None,
                   help="repetitions per figure (default 5, --quick 3)")
    p.add_argument("--dir", default=".",
                   help="where to write (a scratch folder is made inside and removed)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.dir):
        p.error(f"--dir: {args.dir!r} is not a directory")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json: the folder of {args.json!r} does not exist")
    return args


def run(chosen: Sequence[int], settings: Settings,
        report: Callable[[Figure], None]) -> list[Figure]:
    """Run the chosen figures in order, reporting each as it is done."""
    from distrib.bench import dcp, jobs, local, relaunch, s3, tier

    figures: list[Figure] = []
    state: list[local.TrainingState] = []

    def shared_state() -> local.TrainingState:  # figures 1-3 and 13-15 save the same state
        if not state:
            state.append(local.TrainingState(int(settings.size_mb * 2**20)))
        return state[0]

    groups: list[tuple[tuple[int, ...], Callable[[], list[Figure]]]] = [
        ((1, 2), lambda: local.figures_1_2(settings, shared_state())),
        ((3,), lambda: [local.figure_3(settings, shared_state())]),
        ((13, 14, 15), lambda: dcp.figures_13_15(settings, shared_state())),
        ((4,), lambda: [jobs.figure_4(settings)]),
        ((5, 9), lambda: jobs.figures_5_9(settings)),
        ((6,), lambda: [jobs.figure_6(settings)]),
        ((10,), lambda: [tier.figure_10(settings)]),
        ((11,), lambda: [relaunch.figure_11(settings)]),
        ((12,), lambda: [relaunch.figure_12(settings)]),
        ((7,), lambda: [s3.figure_7(settings)]),
        ((8,), lambda: [local.figure_8(settings)]),
        ((16,), lambda: [dcp.figure_16(settings)]),
    ]
    for numbers, measure in groups:
        if not set(numbers) & set(chosen):
            continue
        if numbers[0] not in (1, 3, 13):
            state.clear()  # free the shared state's memory for the rest
        try:
            new = measure()
        except Exception as exc:  # one broken figure must not lose the others' results
            lines = str(exc).strip().splitlines() or [""]
            problem = f"error: {type(exc).__name__}: {lines[0]}"
            # the table keeps the first line; the whole error (a job's stderr) goes to stderr
            print(f"figures {numbers}: {problem}", *lines[1:], sep="\n", file=sys.stderr)
            new = [figure(n, [], problem=problem) for n in numbers]
        for f in new:
            if f.number in chosen:
                figures.append(f)
                report(f)
    return sorted(figures, key=lambda f: f.number)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix=".distrib-bench-", dir=args.dir)
    settings = Settings(workdir=scratch, size_mb=args.size_mb or (64.0 if args.quick else 512.0),
                        reps=args.reps or (3 if args.quick else 5), quick=args.quick)
    env = environment(settings)
    started = time.perf_counter()
    print(f"distrib.bench: torch {env['torch']}, {env['cores']} cores, storage {env['storage']}, "
          f"{settings.reps} repetitions", file=sys.stderr)

    def report(f: Figure) -> None:
        print(f"figure {f.number}: {f.median:.3g} (goal {f.goal_op} {f.goal:g}) "
              f"{'PASS' if f.passed else 'MISS'} [{time.perf_counter() - started:.0f}s]",
              file=sys.stderr, flush=True)

    try:
        figures = run(args.only, settings, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    env["seconds"] = round(time.perf_counter() - started, 1)
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(markdown_table(figures) if args.markdown else text_table(figures))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "figures": [f.to_json() for f in figures]}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
