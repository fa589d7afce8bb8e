"""`python -m tandem.studio`: serve the studio on 127.0.0.1 (see tandem/studio/__init__.py).

    python -m tandem.studio runs/demo/20261201-0300                      # read a run
    python -m tandem.studio runs/demo/x --senior runs/demo/x \\
        --problems arithmetic --set eval.max_response_tokens=512            # and co-write

`--senior` takes what `eval.checkpoints` takes (an HF directory or model spec, a run directory,
its `checkpoints/step_N`); `--set` passes Hydra overrides to the config the co-write engine,
sampling (eval.*), budgets and reward run under. Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from tandem.config.compose import user_errors

log = logging.getLogger("tandem")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tandem.studio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path,
                        help="run directories whose episodes/step_N.jsonl to show")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--tokenizer", default=None,
                        help="model whose tokenizer the episodes are in (default: each run's "
                             "model.senior.path)")
    parser.add_argument("--senior", default=None,
                        help="load this senior on a vLLM engine and enable co-write")
    parser.add_argument("--problems", default=None,
                        help="problems to pick from: an eval.benchmarks entry (a conf/data name, "
                             "<name>:<file> or a .jsonl/.parquet file)")
    parser.add_argument("--cowrite-dir", type=Path, default=Path("runs/studio"),
                        help="where co-write sessions are saved (episodes/step_000000.jsonl)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for the co-write config, e.g. eval.temperature=0")
    args = parser.parse_args(argv)
    if not args.runs and args.senior is None:
        parser.error("give a run directory to read, or --senior MODEL to co-write, or both")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # why here: a bad run directory or config fails in a second, before vLLM and Ray load
    import uvicorn

    from tandem.models import load_tokenizer
    from tandem.studio.app import Studio, create_app
    from tandem.studio.episodes import RunEpisodes

    with user_errors(), contextlib.ExitStack() as cleanup:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        for run in args.runs:
            RunEpisodes(run, tokenizer)  # NoEpisodesError: one line, exit 2
        room = None
        if args.senior is not None:
            room = _open_room(args, cleanup)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("studio: serving on %s: anyone who reaches this address can read these "
                        "runs and drive the engine", args.host)
        app = create_app(Studio(args.runs, tokenizer, room))
        log.info("studio: http://%s:%d", args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _open_room(args: argparse.Namespace, cleanup: contextlib.ExitStack):
    """Start the senior's engine (as evaluation starts it) and the co-write room."""
    from tandem.benchmarks import load_benchmark
    from tandem.config.compose import compose
    from tandem.eval_models import resolve_checkpoint, start_engines_for, stop_engines
    from tandem.models import load_tokenizer
    from tandem.runtime.cluster import connect
    from tandem.studio.cowrite import CowriteRoom

    config = compose([f"model.senior.path={args.senior}", *args.set])
    out_dir = args.cowrite_dir.resolve()
    checkpoint = resolve_checkpoint(args.senior, config, out_dir)
    problems, instruction = [], None
    if args.problems:
        benchmark = load_benchmark(args.problems, config)
        problems, instruction = benchmark.problems, benchmark.instruction
    tokenizer = load_tokenizer(checkpoint.model_dir)
    log.info(cleanup.enter_context(connect(config)))
    engines = start_engines_for(config, checkpoint.model_dir, "senior", tokenizer)
    cleanup.callback(stop_engines, engines)
    log.info("studio: senior %s ready for co-write; sessions saved under %s",
             checkpoint.name, out_dir)
    room = CowriteRoom(config, engines[0], tokenizer, checkpoint.model_dir, out_dir, problems,
                       instruction)
    cleanup.callback(room.close)
    return room


if __name__ == "__main__":
    main()
