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
import logging
import sys
from pathlib import Path

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
    # why here: `--help` and a bad option answer at once, before Starlette and transformers load
    from tandem.studio.serve import serve

    serve(args)


if __name__ == "__main__":
    main()
