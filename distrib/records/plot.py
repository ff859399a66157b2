"""The run report's picture (matplotlib, Agg backend): imported only by :mod:`distrib.report`.

Three panels: loss per epoch (train, validation, the monitored metric if it is not a loss; the
best epoch and the early-stopping epoch marked), the learning rate per optimizer step, and the
run on a wall-clock axis (optimizer step over time) with checkpoint saves, interruptions (the
time lost shaded, the replayed work dashed) and resumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distrib.records.events import History  # noqa: E402

if TYPE_CHECKING:
    from distrib.report import Summary

TRAIN, VAL, METRIC = "#1f77b4", "#ff7f0e", "#2ca02c"
BEST, STOP, SAVE, LOST, RESUME = "#2ca02c", "#d62728", "#9467bd", "#d62728", "#2ca02c"


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _epochs(ax: Any, history: History, summary: "Summary") -> None:
    epochs = history.kind("epoch")
    _style(ax, "Loss per epoch", "epoch", "loss")
    for key, colour, label in (("train_loss", TRAIN, "train"), ("val_loss", VAL, "validation")):
        xs, ys = _series(epochs, "epoch", key)
        if xs:
            ax.plot(xs, ys, "o-", color=colour, label=label, lw=2, ms=5)
    target = ax
    monitor = summary.monitor
    if monitor and not monitor.endswith("loss"):
        target = ax.twinx()
        xs, ys = _series(epochs, "epoch", monitor)
        target.plot(xs, ys, "s--", color=METRIC, label=monitor, lw=1.5, ms=4)
        target.set_ylabel(monitor, color=METRIC)
        target.spines["top"].set_visible(False)
    if summary.best_epoch is not None and summary.best is not None:
        ax.axvline(summary.best_epoch, color=BEST, ls=":", lw=1.5)
        target.plot([summary.best_epoch], [summary.best], marker="*", ms=18, color=BEST,
                    mec="white", zorder=5, ls="none",
                    label=f"best {monitor} {summary.best:.4g} (epoch {summary.best_epoch})")
    if summary.stopped_epoch is not None:
        ax.axvline(summary.stopped_epoch, color=STOP, ls="--", lw=1.5,
                   label=f"early stop (epoch {summary.stopped_epoch})")
    handles = [h for a in {ax, target} for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles=handles, frameon=False, fontsize=9, loc="best")
    if epochs:
        ax.xaxis.get_major_locator().set_params(integer=True)


def _learning_rate(ax: Any, history: History) -> None:
    _style(ax, "Learning rate", "optimizer step", "lr")
    records = history.kind("step") or history.kind("epoch")
    xs, ys = _series(records, "step", "lr")
    if not xs:
        return
    ax.plot(xs, ys, color="#444444", lw=2, drawstyle="steps-post")
    if min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(ys) * 1.25 or 1.0)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if min(ys) == max(ys):
        ax.text(0.5, 0.5, f"constant {ys[0]:.3g}", transform=ax.transAxes, ha="center",
                color="#666666")


def _timeline(ax: Any, history: History) -> None:
    everything = history.records + history.superseded
    t0 = min((float(r["time"]) for r in everything), default=0.0)
    span = max((float(r["time"]) for r in everything), default=t0) - t0
    scale, unit = (1.0, "s") if span < 180 else (60.0, "min") if span < 7200 else (3600.0, "h")

    def t(r: dict[str, Any]) -> float:
        return (float(r["time"]) - t0) / scale

    _style(ax, "The run in time: steps, checkpoint saves, interruptions",
           f"wall-clock time since the first launch ({unit})", "optimizer step")
    progress = [r for r in history.records if r["kind"] in ("start", "step", "epoch")]
    segments: list[list[dict[str, Any]]] = []
    for r in progress:  # a new line at every start, so gaps are not bridged
        if r["kind"] == "start" or not segments:
            segments.append([])
        segments[-1].append(r)
    for i, seg in enumerate(segments):
        ax.plot([t(r) for r in seg], [r["step"] for r in seg], color=TRAIN, lw=2,
                label="training" if i == 0 else None)
    lost = sorted((r for r in history.superseded if r["kind"] in ("step", "epoch")),
                  key=lambda r: float(r["time"]))
    if lost:
        ax.plot([t(r) for r in lost], [r["step"] for r in lost], ".", color=LOST, ms=3,
                alpha=0.6, label="work lost (replayed after resume)")
    saves = [r for r in history.records if r["kind"] == "checkpoint"]
    ok = [r for r in saves if not r.get("error")]
    if ok:
        ax.plot([t(r) for r in ok], [r["step"] for r in ok], "v", color=SAVE, ms=7,
                label=f"checkpoint saved ({len(ok)})", ls="none", mec="white", mew=0.5, zorder=6)
    bad = [r for r in saves if r.get("error")]
    if bad:
        ax.plot([t(r) for r in bad], [r["step"] for r in bad], "x", color=STOP, ms=9, mew=2,
                ls="none", label=f"save failed ({len(bad)})")
    top = max((r["step"] for r in everything if isinstance(r.get("step"), int)), default=1)
    for n, r in enumerate(history.kind("resume")):
        end, start = t(r), t(r) - float(r.get("time_lost_s") or 0) / scale
        ax.axvspan(start, end, color=LOST, alpha=0.12, lw=0,
                   label="interrupted (time lost)" if n == 0 else None)
        ax.axvline(end, color=RESUME, lw=1.5, ls="--", label="resumed" if n == 0 else None)
        ax.annotate(f"resumed at step {r['step']}\n{r.get('steps_replayed', 0)} steps replayed\n"
                    f"{float(r.get('time_lost_s') or 0):.0f}s lost", (end, top),
                    xytext=(4, -4), textcoords="offset points", va="top", fontsize=8,
                    color="#333333")
    for r in history.kind("end"):
        if r.get("status") in ("preempted", "failed"):
            why = f" ({r['reason']})" if r.get("reason") else ""
            ax.plot([t(r)], [r["step"]], "X", color=STOP, ms=10, ls="none",
                    label=f"launch ended: {r['status']}{why}")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=True, framealpha=0.9, edgecolor="none", fontsize=9, loc="upper left")


def draw(history: History, summary: "Summary", out: str, title: str) -> tuple[int, int]:
    """Write the report PNG to ``out``; return its (width, height) in pixels."""
    fig = plt.figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 5, height_ratios=[1.1, 1])
    _epochs(fig.add_subplot(grid[0, :3]), history, summary)
    _learning_rate(fig.add_subplot(grid[0, 3:]), history)
    _timeline(fig.add_subplot(grid[1, :]), history)
    headline = (f"{summary.status} · {summary.epochs} epochs, {summary.steps} steps · "
                f"stop: {summary.stop_reason or '-'}")
    detail = (f"{summary.interruptions} interruption(s) survived, {summary.steps_replayed} steps "
              f"replayed, {summary.time_lost_s:.0f}s lost · {summary.saves} checkpoint saves, "
              f"{summary.saving_s:.1f}s spent saving")
    fig.suptitle(f"{title}\n{headline}\n{detail}", fontsize=10, x=0.01, ha="left")
    fig.savefig(out)
    width, height = fig.canvas.get_width_height()
    plt.close(fig)
    return int(width), int(height)
