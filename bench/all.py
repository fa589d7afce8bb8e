"""`python -m bench.all`: every CPU benchmark, then docs/BENCHMARKS.md's table and plot.

    python -m bench.all                 # full: tiny model and SmolLM2-135M (~80 min, 2 cores)
    python -m bench.all --quick         # tiny model only, fewest repeats (a smoke of the benches)
    python -m bench.all --only rollout vs_trl
    python -m bench.all --only weight_sync --keep   # rerun one, keep the others' rows

Runs bench.rollout, bench.learner, bench.packing, bench.weight_sync, bench.vs_trl and
bench.scaling (each in its own process, one after the other: they would fight for the cores), and
bench.weight_sync_gpu when CUDA is present. Each benchmark prints its headline figures as
`name: value` lines; those become rows of a table (figure, value, goal, machine, date, command)
written between the markers below in docs/BENCHMARKS.md, so the notes around them survive a
rerun. The rollout benchmark's tandem/solo ratio per schedule becomes a bar chart
(docs/benchmarks/schedules.png). The section is rewritten whole: with `--only` it holds only the
benchmarks run, unless `--keep` also keeps every other benchmark's rows and output from the
section as it was (each row keeps its date; the section says which were kept), for a change
that concerns one benchmark, measured again without an 80-minute run. A benchmark that fails
does not lose the others: its figures read "not measured", the document is still written, and
bench.all exits non-zero naming it.

Absolute figures depend on the machine (DESIGN.md: the same kind of machine differs between
sessions), so each row names the CPU model; ratios measured in one run compare across machines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench.all:begin -->", "<!-- bench.all:end -->"
PLOT = "benchmarks/schedules.png"  # relative to docs/


@dataclass(frozen=True)
class Figure:
    """A headline line a benchmark prints, and its goal."""

    name: str  # printed as `name: value`
    goal: str  # human-readable, e.g. ">= 0.85"
    unit: str = ""


@dataclass(frozen=True)
class Bench:
    module: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    figures: tuple[Figure, ...]
    needs_cuda: bool = False


BENCHES = (
    # SmolLM2 samples ~75 tokens/s on 2 cores: 128-token episodes and two repeats keep the full
    # rollout bench near 20 minutes (256 x 3 took over 25 for SmolLM2 alone)
    Bench("rollout", ("--tokens", "128", "--repeats", "2", "--balanced", "step"),
          ("--models", "tiny", "--repeats", "1", "--tokens", "64", "--balanced", "step"),
          (Figure("tandem/solo step", ">= 0.95"), Figure("tandem/solo word", ">= 0.8"),
           Figure("tandem/solo step/balanced", ">= 0.95 (algorithm.first_writer=balanced)"))),
    Bench("learner", (), ("--models", "tiny", "--steps", "1"),
          (Figure("learner/plain", ">= 0.9 (world size 1)"),
           Figure("learner bf16/fp32", "> 1 where the CPU has AVX512-BF16/AMX"))),
    Bench("packing", (), ("--models", "tiny", "--steps", "1"),
          (Figure("learner packed/padded", "> 1 (tokens/s)"),)),
    Bench("weight_sync", (), ("--models", "tiny", "--pushes", "1"),
          (Figure("push GB/s", ">= 1 on CPU", " GB/s"),)),
    Bench("vs_trl", ("--steps", "2"), ("--models", "tiny", "--prompts", "2", "--group-size", "2",
                         "--tokens", "32", "--steps", "1"),
          (Figure("trl/tandem step time", ">= 2"),)),
    Bench("scaling", (), ("--quick",),
          (Figure("rollout 2/1 replicas", "~1 on 2 CPU cores (shared); ~2 with a GPU each"),
           Figure("step s/token largest/smallest group", "< 1"))),
    Bench("weight_sync_gpu", (), ("--models", "qwen3-0.6b", "--pushes", "1"),
          (Figure("push GB/s", "Qwen3-4B push < 0.5 s", " GB/s"),), needs_cuda=True),
)


def parse_figures(output: str) -> dict[str, float]:
    """Every `name: number` line of a benchmark's stdout; the last one of a name wins."""
    found = {}
    for line in output.splitlines():
        match = re.fullmatch(r"([A-Za-z][\w/ .=()-]*?): (-?[\d.]+(?:e-?\d+)?)", line.strip())
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU model from /proc/cpuinfo (or `cpuinfo`), with the core count."""
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("model name")]
    if not names:
        return platform.processor() or platform.machine()
    return f"{names[0]} ({len(names)} cores)"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def table(rows: list[dict]) -> str:
    """Markdown table of figure rows (keys: figure, value, goal, machine, date, command)."""
    lines = ["| figure | value | goal | machine | date | command |", "|---|---|---|---|---|---|"]
    for row in rows:
        value = row["value"]
        shown = "not measured" if value is None else f"{value:.2f}{row.get('unit', '')}"
        lines.append(f"| {row['figure']} | {shown} | {row['goal']} | {row['machine']} | "
                     f"{row['date']} | `{row['command']}` |")
    return "\n".join(lines)


def section(rows: list[dict], outputs: dict[str, str], plot: str | None, quick: bool,
            minutes: dict[str, float] | None = None, kept: list[str] | None = None) -> str:
    """What goes between the markers: the table, the plot and each benchmark's output, with
    the wall minutes each took when `minutes` gives them; `kept` names the benchmarks whose
    rows and output come from an earlier run (`--keep`)."""
    minutes = minutes or {}
    took = (f", {sum(minutes.values()):.0f} minutes of benchmarks in all" if minutes else "")
    parts = [BEGIN, "", f"Written by `python -m bench.all{' --quick' if quick else ''}`"
             + (" (quick mode: the tiny kit model only, one repeat; a smoke of the benchmarks, "
                "not figures to quote)" if quick else "") + took + "."]
    if kept:
        rerun = [name for name in outputs if name not in kept]
        parts += ["", f"{', '.join(rerun) or 'Nothing'} rerun alone (`--only ... --keep`). "
                  f"{KEPT} {', '.join(kept)}: the dates say when each ran."]
    parts += ["", table(rows), ""]
    if plot:
        parts += [f"![tandem/solo rollout throughput by schedule]({plot})", ""]
    for name, output in outputs.items():
        tail = "\n".join(last_paragraphs(printed_lines(output)))
        wall = f", {minutes[name]:.1f} min" if name in minutes else ""
        parts += [f"<details><summary>{name} output{wall}</summary>", "", "```", tail, "```",
                  "", "</details>", ""]
    return "\n".join(parts + [END])


RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\([\w:.]+ pid=\d+(, ip=[\d.]+)?\)")


def printed_lines(output: str) -> list[str]:
    """A benchmark's own printed lines: the worker log lines Ray forwards to the driver's
    stdout (`(RolloutEngineActor pid=123) ...`) left out."""
    return [line for line in output.strip().splitlines() if not RAY_WORKER_LINE.match(line)]


SHOWN_LINES = 40
"""Lines of a benchmark's output the document shows: its end, where the headlines are."""


def last_paragraphs(lines: list[str], limit: int = SHOWN_LINES) -> list[str]:
    """The last `limit` lines, starting at a paragraph (after a blank line) so that no table
    loses its header line; the last paragraph whole when it alone is longer."""
    if len(lines) <= limit:
        return lines
    first = len(lines) - limit
    starts = [i for i in range(1, len(lines)) if not lines[i - 1].strip() and lines[i].strip()]
    fits = [i for i in starts if i >= first]
    if fits:
        return lines[fits[0]:]
    return lines[starts[-1]:] if starts else lines[first:]


def merge(document: str, generated: str) -> str:
    """`document` with the text between the markers replaced by `generated` (appended when
    the markers are missing)."""
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        return head + generated + rest.split(END, 1)[1]
    return document.rstrip() + "\n\n" + generated + "\n"


KEPT = "Rows and outputs kept from an earlier run of"
ROW = re.compile(r"\| (.+?) \| (.+?) \| (.+?) \| (.+?) \| (.+?) \| `(.+)` \|")
OUTPUT_BLOCK = re.compile(r"<details><summary>(bench\.\w+) output(?:, ([\d.]+) min)?</summary>"
                          r"\n\n```\n(.*?)\n```\n\n</details>", re.DOTALL)


@dataclass
class Earlier:
    """The generated section of a document, read back by `read_section`, per benchmark."""

    quick: bool
    plot: str | None
    rows: dict[str, list[dict]]  # bench.<module> -> its table rows, as `table` takes them
    outputs: dict[str, str]  # bench.<module> -> the output lines the section shows
    minutes: dict[str, float]


def read_section(document: str) -> Earlier:
    """What `section` wrote into `document`, for `--keep`; raises if it has no section."""
    if BEGIN not in document or END not in document:
        raise ValueError("the document has no section written by bench.all to keep rows from: "
                         "run without --keep")
    text = document.split(BEGIN, 1)[1].split(END, 1)[0]
    rows: dict[str, list[dict]] = {}
    for line in text.splitlines():
        match = ROW.fullmatch(line)
        if not match or match.group(1) == "figure":
            continue
        figure, shown, goal, machine, date, command = match.groups()
        module = re.match(r"python -m (bench\.\w+)", command)
        value = re.fullmatch(r"(-?[\d.]+)(.*)", shown)
        rows.setdefault(module.group(1) if module else command, []).append({
            "figure": figure, "value": float(value.group(1)) if value else None,
            "unit": value.group(2) if value else "", "goal": goal, "machine": machine,
            "date": date, "command": command})
    outputs, minutes = {}, {}
    for match in OUTPUT_BLOCK.finditer(text):
        outputs[match.group(1)] = match.group(3)
        if match.group(2):
            minutes[match.group(1)] = float(match.group(2))
    return Earlier(quick="`python -m bench.all --quick`" in text,
                   plot=PLOT if f"]({PLOT})" in text else None,
                   rows=rows, outputs=outputs, minutes=minutes)


def plot_schedules(ratios: dict[str, dict[str, float]], path: Path) -> None:
    """Bar chart of tandem/solo rollout throughput per schedule, one bar group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = list(dict.fromkeys(s for by in ratios.values() for s in by if s != "solo"))
    figure, axes = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(ratios), 1)
    for index, (model, by) in enumerate(ratios.items()):
        axes.bar([i + index * width for i in range(len(schedules))],
                 [by.get(s, 0.0) for s in schedules], width, label=model)
    axes.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    axes.set_xticks([i + width * (len(ratios) - 1) / 2 for i in range(len(schedules))],
                    schedules)
    axes.set_ylabel("tandem / solo tokens/s")
    axes.set_title("Rollout throughput by hand-off schedule (p = 0.5)")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_bench(bench: Bench, quick: bool, scratch: Path) -> tuple[str, str, dict, int]:
    """(command line, stdout, extra json, exit status) of one benchmark run."""
    args = list(bench.quick if quick else bench.full)
    extra_file = scratch / f"{bench.module}.json"
    if bench.module in ("rollout", "vs_trl"):
        args += ["--json", str(extra_file)]
    command = [sys.executable, "-m", f"bench.{bench.module}", *args]
    print(f"bench.all: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    print(done.stdout, flush=True)
    shown = " ".join(["python", *command[1:]]).replace(f" --json {extra_file}", "")
    extra = json.loads(extra_file.read_text()) if extra_file.exists() else {}
    return shown, done.stdout, extra, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewest repeats")
    parser.add_argument("--only", nargs="+", choices=[b.module for b in BENCHES])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows and output of the benchmarks --only leaves out")
    args = parser.parse_args()
    earlier = None
    if args.keep:
        if not args.only:
            parser.error("--keep keeps the benchmarks that --only leaves out: name the ones to "
                         "rerun with --only")
        try:
            earlier = read_section(args.out.read_text() if args.out.exists() else "")
        except ValueError as error:
            parser.error(str(error))
        if earlier.quick != args.quick:
            mode = "with" if earlier.quick else "without"
            parser.error(f"{args.out}'s section was written {mode} --quick: keep its rows only "
                         "in the same mode")
    import torch

    machine = cpu_model()
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    date = datetime.date.today().isoformat()
    rows: dict[str, list[dict]] = {}
    outputs, minutes, ratios, failed = {}, {}, {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for bench in BENCHES:
            if args.only and bench.module not in args.only:
                continue
            if bench.needs_cuda and not torch.cuda.is_available():
                print(f"bench.all: bench.{bench.module} skipped: no CUDA GPU", flush=True)
                continue
            name = f"bench.{bench.module}"
            started = time.monotonic()
            command, output, extra, returncode = run_bench(bench, args.quick, Path(scratch))
            minutes[name] = (time.monotonic() - started) / 60
            print(f"bench.all: {name} took {minutes[name]:.1f} min", flush=True)
            if returncode:  # keep going: the others' figures still make the document
                failed.append(name)
                print(f"bench.all: {name} failed (exit {returncode}); its figures "
                      "will read 'not measured'", flush=True)
                output += f"\n{name} failed (exit {returncode}): its traceback went to stderr"
            outputs[name] = output
            if bench.module == "rollout":
                ratios = extra
            figures = parse_figures(output)
            rows[name] = [{"figure": figure.name, "value": figures.get(figure.name),
                           "unit": figure.unit, "goal": figure.goal, "machine": machine,
                           "date": date, "command": command} for figure in bench.figures]
    plot, kept = None, []
    if ratios:
        plot_schedules(ratios, args.out.parent / PLOT)
        plot = PLOT
    order = [f"bench.{b.module}" for b in BENCHES]
    if earlier is not None:  # the benchmarks not rerun, as the section had them
        plot = plot or earlier.plot
        kept = [name for name in order if name not in rows
                and (name in earlier.rows or name in earlier.outputs)]
        for name in kept:
            rows[name] = earlier.rows.get(name, [])
            if name in earlier.outputs:
                outputs[name] = earlier.outputs[name]
            if name in earlier.minutes:
                minutes[name] = earlier.minutes[name]
    table_rows = [row for name in order for row in rows.get(name, [])]
    # read again: the notes around the section may have been edited while the benchmarks ran
    document = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
    outputs = {name: outputs[name] for name in order if name in outputs}
    args.out.write_text(merge(document, section(table_rows, outputs, plot, args.quick, minutes,
                                                kept)))
    print(f"bench.all: wrote {args.out}" + (f" and {args.out.parent / PLOT}" if ratios else ""))
    if failed:
        raise SystemExit(f"bench.all: {', '.join(failed)} failed (the document says 'not "
                         "measured' for their figures)")


if __name__ == "__main__":
    main()
