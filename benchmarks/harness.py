"""The benchmark harness: shipped models and prompts, common arguments, interleaved timing, and one
report writer.

The machines these run on are shared and noisy, so every comparison is measured side by side:
each repeat runs every contender once, in a rotating order, and results are medians. A benchmark
measures into a JSON-able result and describes it as a :class:`Report` (text and Markdown tables,
and a figure) built from that result alone, so a result file written earlier can be drawn again;
:func:`write_report` writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from core.prompt import Prompt
from models.tiny.samples import EVAL_SEED_START, Sample, make_sample
from serve.chat import chat_prompt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHECKPOINTS = ROOT / "checkpoints"
TARGET = CHECKPOINTS / "tiny-target"
DRAFTER = CHECKPOINTS / "tiny-drafter"
ADAPTERS = CHECKPOINTS / "adapters"  # shipped per-user drafter LoRAs, one PEFT folder per user
LONG_USER = "bob"  # detailed answers (50-80 tokens); his adapter ships in ADAPTERS / "bob"
# each benchmark draws its scenes from its own offset past EVAL_SEED_START, so none reuses another's
SINGLE_USER_SEED_OFFSET = 500  # spec_decode, compare_revisions' single_user
BATCH_SEED_OFFSET = 900  # verify_batch, adapter_throughput: the same prompts prefilled
CONCURRENCY_SEED_OFFSET = 2000  # concurrency, compare_revisions' concurrency


# --- shipped prompts ----------------------------------------------------------------------------


def eval_samples(offset: int, n: int) -> list[Sample]:
    """``n`` evaluation scenes from ``EVAL_SEED_START + offset``: mixed question kinds, default
    persona."""
    return [make_sample(EVAL_SEED_START + offset + i) for i in range(n)]


def single_user_samples(mode: str, n: int) -> list[Sample]:
    """The single-user prompts: for ``long``, ``LONG_USER`` asked to describe scenes of 4-5 shapes
    (natural answers of 50-80 tokens); otherwise mixed question kinds in the default style."""
    if mode != "long":
        return eval_samples(SINGLE_USER_SEED_OFFSET, n)
    seeds = (EVAL_SEED_START + SINGLE_USER_SEED_OFFSET + i for i in range(100_000))
    scenes = (make_sample(seed, LONG_USER, kind="describe") for seed in seeds)
    return [s for _, s in zip(range(n), (s for s in scenes if len(s.scene.objects) >= 4), strict=False)]


def prompt_of(processor: Any, sample: Sample) -> Prompt:
    """``sample`` as the engine takes it: system, then the image and the question."""
    return chat_prompt(processor, sample.question.text, [sample.image()], sample.system)


# --- arguments and machine ----------------------------------------------------------------------


def parser(doc: str | None, repeats: int | None = None, device: bool = False) -> argparse.ArgumentParser:
    """``--out`` always; ``--repeats`` with this default where given; ``--device`` where asked.
    The description is the module docstring's first line."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the json, md and png")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (medians are reported)")
    if device:
        p.add_argument("--device", default="cpu", help="where the models run: cpu, cuda or cuda:N")
    return p


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or "unknown"
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The host, and the GPU where ``device`` is one (where the timed models ran)."""
    import transformers

    gpu = {}
    if device is not None and torch.device(device).type == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(torch.device(device)), "cuda_version": torch.version.cuda}
    return {
        **gpu,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": os.getloadavg(),  # other jobs share these cores; see the spread
    }


# --- interleaved timing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One contender: ``run`` is timed; ``reset`` (untimed) undoes its side effects."""

    run: Callable[[], Any]
    reset: Callable[[], None] = lambda: None


def quantile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``values`` (None for none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple[float, ...]  # one wall-clock sample per repeat

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        value = quantile(self.samples_ms, q)
        assert value is not None, "a timing has at least one sample"
        return value

    def as_dict(self, tokens: int) -> dict[str, Any]:
        """Summary plus raw samples; ``tokens`` processed per call gives tokens/s."""
        return {
            "median_ms": self.median_ms,
            "p25_ms": self.quantile_ms(0.25),
            "p75_ms": self.quantile_ms(0.75),
            "min_ms": min(self.samples_ms),
            "tokens": tokens,
            "tokens_per_s": tokens / (self.median_ms / 1e3),
            "samples_ms": list(self.samples_ms),
        }


def time_once(case: Case) -> float:
    """Milliseconds of one ``case.run()``; ``case.reset()`` runs afterwards, untimed."""
    start = time.perf_counter_ns()
    case.run()
    elapsed = time.perf_counter_ns() - start
    case.reset()
    return elapsed / 1e6


def warm_up(cases: Mapping[str, Case], rounds: int) -> dict[str, Any]:
    """Run every case ``rounds`` times untimed; return each case's last result."""
    last: dict[str, Any] = {}
    for _ in range(rounds):
        for name, case in cases.items():
            last[name] = case.run()
            case.reset()
    return last


def rotated(names: Sequence[str], shift: int) -> list[str]:
    """``names`` starting at ``shift`` (mod their number): round ``r`` of a comparison runs its
    contenders in ``rotated(names, r)`` order, so none always goes first."""
    shift %= len(names)
    return [*names[shift:], *names[:shift]]


def time_interleaved(cases: Mapping[str, Case], repeats: int) -> dict[str, Timing]:
    """``repeats`` rounds; each round times every case once, rotating which goes first."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name in rotated(list(cases), r):
            samples[name].append(time_once(cases[name]))
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each numeric measure's median over ``runs`` (passes of one contender), with each run's
    ``tokens_per_s`` kept, in run order, for :func:`paired_median`."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: statistics.median(run[k] for run in runs) for k in keys}
    out["tokens_per_s_runs"] = [round(run["tokens_per_s"], 1) for run in runs]
    return out


def paired_median(mine: Sequence[float], theirs: Sequence[float]) -> float:
    """Median over rounds of ``mine[r] / theirs[r]``: runs of one round are seconds apart, so the
    machine's slow drifts in speed move this less than the ratio of the two medians."""
    return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))


# --- one report writer --------------------------------------------------------------------------


Cell = str | Callable[[Any, Mapping[str, Any]], Any]  # a format string, or a function of (name, record)


@dataclass(frozen=True)
class Table:
    """A Markdown table: ``rows`` of cells already formatted; ``align`` has one of l, r, c per column
    (default: the first column left, the others right)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    align: str = ""

    @classmethod
    def of(
        cls,
        records: Iterable[tuple[Any, Mapping[str, Any]]],
        columns: Mapping[str, Cell],
        align: str = "",
    ) -> Table:
        """A row per ``(name, record)``: each column (header -> cell) a format string over the
        record's fields and ``name`` (``"{tau[own]:.2f}"``), or a function of name and record."""
        rows = [
            [
                cell(name, record) if callable(cell) else cell.format_map({"name": name, **record})
                for cell in columns.values()
            ]
            for name, record in records
        ]
        return cls(list(columns), rows, align)

    def markdown(self) -> str:
        align = self.align or "l" + "r" * (len(self.header) - 1)
        rule = {"l": "---", "r": "---:", "c": ":---:"}
        lines = ["| " + " | ".join(self.header) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class Series:
    """One line, set of bars or set of boxes in a panel (a box per x, ``ys`` its samples)."""

    label: str
    xs: Sequence[Any]
    ys: Sequence[Any]
    style: str = "o-"  # lines only
    color: str | None = None
    yerr: tuple[Sequence[float], Sequence[float]] | None = None  # below, above each point
    texts: Sequence[str] = ()  # written at the end of each bar


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: Sequence[Series]
    kind: Literal["line", "bar", "barh", "box"] = "line"
    xscale: Literal["linear", "log", "log2"] = "linear"  # log2 puts a tick at each x
    yscale: Literal["linear", "log"] = "linear"
    legend: bool | None = None  # None: where there are several series (not for boxes)


@dataclass(frozen=True)
class Plot:
    panels: Sequence[Panel]
    title: str = ""
    panel_size: tuple[float, float] = (5.0, 3.8)  # inches


@dataclass(frozen=True)
class Report:
    """What ``<stem>.md`` says (paragraphs and tables, in order) and ``<stem>.png`` shows."""

    blocks: Sequence[str | Table] = ()
    plot: Plot | None = None

    def markdown(self) -> str:
        return "\n\n".join(b.markdown() if isinstance(b, Table) else b for b in self.blocks) + "\n"


def write_report(stem: Path, result: Mapping[str, Any], report: Report) -> None:
    """``result`` as ``<stem>.json``, ``report`` as ``<stem>.md`` and, with a plot, ``<stem>.png``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if report.blocks:
        stem.with_suffix(".md").write_text(report.markdown())
    if report.plot is not None:
        draw(report.plot, stem.with_suffix(".png"))


def draw(plot: Plot, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    width, height = plot.panel_size
    fig, axes = plt.subplots(1, len(plot.panels), figsize=(width * len(plot.panels), height), squeeze=False)
    for ax, panel in zip(axes[0], plot.panels, strict=True):
        _draw_panel(ax, panel)
    if plot.title:
        fig.suptitle(plot.title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_panel(ax: Any, panel: Panel) -> None:
    # scales first: setting one resets that axis' ticks
    if panel.xscale == "log2":
        ax.set_xscale("log", base=2)
    else:
        ax.set_xscale(panel.xscale)
    ax.set_yscale(panel.yscale)
    if panel.kind == "line":
        for s in panel.series:
            if s.yerr is None:
                ax.plot(s.xs, s.ys, s.style, label=s.label, color=s.color)
            else:
                ax.errorbar(s.xs, s.ys, yerr=s.yerr, fmt=s.style, capsize=3, label=s.label, color=s.color)
    elif panel.kind == "box":
        for i, s in enumerate(panel.series):
            ax.boxplot(s.ys, positions=[i], widths=0.5)
        ax.set_xticks(range(len(panel.series)), [s.label for s in panel.series], fontsize=8)
    else:
        _draw_bars(ax, panel)
    if panel.xscale == "log2":
        ticks = sorted({x for s in panel.series for x in s.xs})
        ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.legend or (panel.legend is None and len(panel.series) > 1 and panel.kind != "box"):
        ax.legend(fontsize=8)


def _draw_bars(ax: Any, panel: Panel) -> None:
    """Bars grouped by category (the xs of the first series), one bar per series in each group."""
    categories = list(panel.series[0].xs)
    width = 0.8 / len(panel.series)
    bar = ax.barh if panel.kind == "barh" else ax.bar
    for j, s in enumerate(panel.series):
        where = [i + (j - (len(panel.series) - 1) / 2) * width for i in range(len(categories))]
        bars = bar(where, s.ys, width, label=s.label, color=s.color)
        for b, text in zip(bars, s.texts, strict=False):
            if panel.kind == "barh":
                ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {text}", va="center", fontsize=8)
            else:
                ax.text(
                    b.get_x() + b.get_width() / 2, b.get_height(), text, ha="center", va="bottom", fontsize=8
                )
    if panel.kind == "barh":
        ax.set_yticks(range(len(categories)), categories)
        ax.invert_yaxis()
    else:
        ax.set_xticks(range(len(categories)), categories)
