"""Command line: ``python -m gradclip bench|plot|info`` and the ``gradclip-bench`` script."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, TextIO

from . import workloads as _workloads
from .competitors import CONTENDERS, MODES
from .timing import RoundPolicy

DEFAULT_OUT = Path("bench") / "out"


class Progress:
    """A one-line progress bar on stderr, drawn only once a run has lasted
    ``delay_s`` (short runs stay quiet). Off a terminal it prints a plain line
    at most every ``line_every_s``."""

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr, delay_s: float = 2.0,
                 line_every_s: float = 15.0) -> None:
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self.delay_s = delay_s
        self.line_every_s = line_every_s
        self.start = time.monotonic()
        self.last_line = self.start
        self.drawn = False

    @staticmethod
    def _clock(s: float) -> str:
        s = int(s)
        return f"{s // 60}:{s % 60:02d}"

    def __call__(self, frac: float, label: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.delay_s and frac < 1.0:
            return
        if frac >= 1.0 and not self.drawn:
            return
        eta = f", ~{self._clock(elapsed * (1 - frac) / frac)} left" if 0.02 < frac < 1.0 else ""
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            bar_w = 24
            fill = int(round(frac * bar_w))
            text = f"[{'#' * fill}{'.' * (bar_w - fill)}] {100 * frac:3.0f}% {self._clock(elapsed)}{eta}  {label}"
            self.stream.write("\r" + text[: width - 1].ljust(width - 1))
            if frac >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
            self.drawn = True
        elif now - self.last_line >= self.line_every_s or frac >= 1.0 or not self.drawn:
            self.stream.write(f"[{100 * frac:3.0f}% {self._clock(elapsed)}{eta}] {label}\n")
            self.stream.flush()
            self.last_line = now
            self.drawn = True


def _csv_list(values: Optional[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="run the benchmark, print a table, write JSON/CSV/Markdown",
        description="Time gradclip against torch.nn.utils.clip_grad_norm_ (foreach on/off), clip_grad_value_, "
                    "torch.compile and a NumPy reference on gradient shape sets of real models, beside this "
                    "machine's measured bandwidth ceilings.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a short run (under a minute on 2 cores): tiny-2000 and transformer-64m, fp32 and bf16, "
                        "no torch.compile, fewer repetitions")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", action="append", metavar="D[,D]", help="fp32, bf16, fp16 (default: all three)")
    p.add_argument("--workload", action="append", metavar="W[,W]",
                   help=f"default: all ({', '.join(_workloads.WORKLOADS)}), except llama-1b on the CPU")
    p.add_argument("--mode", action="append", metavar="M[,M]", help=f"default: all ({', '.join(MODES)})")
    p.add_argument("--contender", action="append", metavar="C[,C]",
                   help=f"default: all ({', '.join(CONTENDERS)}); gradclip is always included")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="timed interleaved rounds per case (default: as many as fit in about 2 s, 7 to 40; "
                        "--quick: 5 to 15)")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed rounds first (default 2, --quick 1; at least 1)")
    p.add_argument("--threads", type=int, metavar="N", help="threads for torch and gradclip (default: as they are)")
    p.add_argument("--compile-max-tensors", type=int, metavar="N",
                   help="time torch.compile only on workloads with at most N tensors (default 256; "
                        "0 turns it off; --quick: 0)")
    p.add_argument("--ceiling-mib", type=int, default=256, metavar="MiB", help="buffer for the ceilings (256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--name", help="file name stem (default DATE_MACHINE_DEVICE[-quick]); a stem whose files "
                                  "exist gets -2, -3, ... unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run with the same stem")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs (they need matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p


def _plot_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="PNG plots from benchmark JSON files (needs matplotlib)",
                       description="Write STEM_speedup.png and STEM_bandwidth.png for each results JSON.")
    p.add_argument("results", nargs="*", type=Path,
                   help=f"JSON files written by 'bench' (default: the newest in {DEFAULT_OUT})")
    p.add_argument("--out", type=Path, help="output directory (default: beside each JSON)")
    p.add_argument("--dpi", type=int, default=100)
    return p


def build_parser(prog: str, default_bench: bool) -> argparse.ArgumentParser:
    description = "gradclip benchmarks and build information."
    if default_bench:
        description += " Without a subcommand, bench (its options: gradclip-bench bench --help)."
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="{bench,plot,info}",
                                required=not default_bench)
    _bench_parser(sub)
    _plot_parser(sub)
    sub.add_parser("info", help="print gradclip.build_info() as JSON")
    return parser


def _free_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ...: the first whose files are not
    there yet, so that a second run on the same day keeps the first one's."""
    candidate, n = stem, 1
    while any(out.glob(f"{candidate}.*")) or any(out.glob(f"{candidate}_*.png")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _run_bench(args: argparse.Namespace) -> int:
    from . import report
    from .runner import Config, dtype_name, plan, run

    if args.list:
        for w in _workloads.WORKLOADS.values():
            print(f"{w.name:16s} {w.tensors:5d} tensors {w.elements / 1e6:8.2f}M elements  {w.description}")
        return 0
    quick = args.quick
    try:
        dtypes = tuple(dtype_name(d) for d in _csv_list(args.dtype)) or (("fp32", "bf16") if quick else
                                                                           ("fp32", "bf16", "fp16"))
        default_wls = _workloads.CUDA_DEFAULT_WORKLOADS if args.device == "cuda" else _workloads.CPU_DEFAULT_WORKLOADS
        wls = tuple(_csv_list(args.workload)) or (_workloads.QUICK_WORKLOADS if quick else default_wls)
        for w in wls:
            _workloads.get(w)
        modes = tuple(_csv_list(args.mode)) or MODES
        for m in modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        contenders = tuple(_csv_list(args.contender)) or CONTENDERS
        for c in contenders:
            if c not in CONTENDERS:
                raise ValueError(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
        if "gradclip" not in contenders:
            contenders = ("gradclip",) + contenders
        contenders = tuple(c for c in CONTENDERS if c in contenders)
    except ValueError as exc:
        print(f"gradclip bench: {exc}", file=sys.stderr)
        return 2
    if args.repeat is not None and args.repeat < 1:
        print("gradclip bench: --repeat must be >= 1", file=sys.stderr)
        return 2
    policy = RoundPolicy(
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        fixed=args.repeat,
        budget_s=0.5 if quick else 2.0,
        min_rounds=5 if quick else 7,
        max_rounds=15 if quick else 40,
    )
    compile_max = args.compile_max_tensors if args.compile_max_tensors is not None else (0 if quick else 256)
    config = Config(
        device=args.device, workloads=wls, dtypes=dtypes, modes=modes, contenders=contenders, policy=policy,
        threads=args.threads, compile_max_tensors=compile_max, seed=args.seed,
        ceiling_bytes=args.ceiling_mib << 20, ceiling_rounds=7 if quick else 15, quick=quick,
    )
    t0 = time.monotonic()
    result = run(config, Progress(enabled=not args.no_progress))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["goals"] = report.goals(result)

    from .env import machine_tag

    meta = result["meta"]
    stem = args.name or "{}_{}_{}{}".format(
        _dt.date.today().isoformat(),
        machine_tag(meta["device_name"], meta["cpu_count"] if args.device == "cpu" else None),
        args.device, "-quick" if quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = stem if args.overwrite else _free_stem(args.out, stem)
    paths = [args.out / f"{stem}.{ext}" for ext in ("json", "csv", "md")]
    report.write_json(result, paths[0])
    report.write_csv(result, paths[1])
    report.write_markdown(result, paths[2])
    plots_note = ""
    if not args.no_plots:
        try:
            from . import plot

            paths += plot.plot_result(result, args.out, stem)
        except plot.NoMatplotlib:
            plots_note = (f"no plots: matplotlib is missing (pip install matplotlib, then python -m gradclip plot "
                          f"{paths[0]})")

    c = result["ceilings"]
    print(f"{meta['device_name']} | torch {meta['torch_version']} ({meta['threads']} threads) | gradclip "
          f"{meta['gradclip_version']} ({meta['gradclip_isa']}, {meta['gradclip_threads']} threads) | commit "
          f"{meta['commit']}")
    print(f"ceilings ({c['buffer_bytes'] >> 20} MiB): read {c['read_gbs']:.1f} GB/s, read+write "
          f"{c['read_write_gbs']:.1f} GB/s, copy {c['copy_gbs']:.1f} GB/s")
    print()
    print(report.text_table(result))
    print()
    for extra in (report.step_text(result), report.goals_text(result["goals"]), report.skipped_text(result)):
        if extra:
            print(extra)
            print()
    print(f"Run: {report.conditions(meta)}.")
    print(f"{len(plan(config))} cases in {result['wall_s']:.0f} s; wrote:")
    for path in paths:
        print(f"  {path}")
    if plots_note:
        print(plots_note)
    bad = [r for r in result["rows"] if r["status"].startswith(("error", "wrong"))]
    return 1 if bad else 0


def _run_plot(args: argparse.Namespace) -> int:
    from . import plot

    files = list(args.results)
    if not files:
        found = sorted(DEFAULT_OUT.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"gradclip plot: no results given and none in {DEFAULT_OUT}; run 'bench' first", file=sys.stderr)
            return 2
        files = [found[-1]]
    try:
        for f in files:
            for png in plot.plot_file(f, args.out, dpi=args.dpi):
                print(png)
    except plot.NoMatplotlib as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plot":
        return _run_plot(args)
    if args.command == "info":
        import gradclip

        print(json.dumps(gradclip.build_info(), indent=2))
        return 0
    return _run_bench(args)


def _quiet_on_closed_pipe(run) -> int:
    """Runs a command; when its reader goes away (``| head``), stops quietly
    instead of printing a BrokenPipeError traceback."""
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``gradclip-bench``: the subcommand defaults to ``bench``; ``--help``
    alone lists every subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser("gradclip-bench", default_bench=True)
    if argv and argv[0] not in ("bench", "plot", "info", "-h", "--help"):
        argv = ["bench", *argv]
    elif not argv:
        argv = ["bench"]
    return _quiet_on_closed_pipe(lambda: _dispatch(parser.parse_args(argv)))


def module_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m gradclip``: a subcommand is required."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser("python -m gradclip", default_bench=False)
    return _quiet_on_closed_pipe(lambda: _dispatch(parser.parse_args(argv)))
