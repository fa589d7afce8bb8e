"""The studio's server: the run readers, the co-write room and uvicorn (`python -m tandem.studio`
parses the command line, then hands over here)."""

from __future__ import annotations

import argparse
import contextlib
import logging

import uvicorn

from tandem.config.compose import compose, user_errors
from tandem.models import load_tokenizer
from tandem.studio.app import Studio, create_app
from tandem.studio.cowrite import CowriteRoom
from tandem.studio.episodes import RunEpisodes

log = logging.getLogger("tandem")


def serve(args: argparse.Namespace) -> None:
    """Check every run directory, start the co-write room if asked, then serve until stopped."""
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
    # why here: they load vLLM and Ray, which a studio that only reads runs never needs
    from tandem import benchmarks, eval_models
    from tandem.runtime.cluster import connect

    config = compose([f"model.senior.path={args.senior}", *args.set])
    out_dir = args.cowrite_dir.resolve()
    checkpoint = eval_models.resolve_checkpoint(args.senior, config, out_dir)
    problems, instruction = [], None
    if args.problems:
        benchmark = benchmarks.load_benchmark(args.problems, config)
        problems, instruction = benchmark.problems, benchmark.instruction
    tokenizer = load_tokenizer(checkpoint.model_dir)
    log.info(cleanup.enter_context(connect(config)))
    engines = eval_models.start_engines_for(config, checkpoint.model_dir, "senior", tokenizer)
    cleanup.callback(eval_models.stop_engines, engines)
    log.info("studio: senior %s ready for co-write; sessions saved under %s",
             checkpoint.name, out_dir)
    room = CowriteRoom(config, engines[0], tokenizer, checkpoint.model_dir, out_dir, problems,
                       instruction)
    cleanup.callback(room.close)
    return room
