"""The studio's web app (Starlette): a JSON API over runs and co-write, and one static page.

Runs are addressed by their index in the list the studio was started with, never by a path
from the request, and a run's files (report plots) are served only from inside that run's
directory: a request for `../../etc/passwd` or a symlink leading out gets 404. The page and its
script are files of this package (`static/`): no CDN, no build step.

Every error a user can fix (`InputError`: an unknown step, a bad filter, a co-write turn out
of order) comes back as HTTP 400 with `{"error": "<what to change>"}`, which the page shows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tandem.config.checks import InputError
from tandem.output.tracking import MetricsError, read_metrics
from tandem.studio.cowrite import FIRST_WRITERS, SCHEDULES, CowriteRoom
from tandem.studio.episodes import EpisodeFilter, NoEpisodesError, RunEpisodes

log = logging.getLogger("tandem")

STATIC_DIR = Path(__file__).parent / "static"
SERVED_SUFFIXES = {".png", ".svg", ".jpg", ".md", ".json"}
"""Run files the page may show: plots and reports, never checkpoints or configs with secrets."""
REPORTS = ("report.md", "eval/report.md")


class Studio:
    """What the app serves: the runs it was given (opened lazily, in order) and an optional
    co-write room."""

    def __init__(self, run_dirs: list[Path], tokenizer: Any | None = None,
                 room: CowriteRoom | None = None) -> None:
        self.run_dirs = [Path(d).resolve() for d in run_dirs]
        if room is not None and room.out_dir not in self.run_dirs:
            self.run_dirs.append(room.out_dir)
        self.tokenizer = tokenizer
        self.room = room
        self._open: dict[int, RunEpisodes] = {}

    def run_dir(self, index: int) -> Path:
        if not 0 <= index < len(self.run_dirs):
            raise InputError(f"no run {index}; the studio serves runs 0..{len(self.run_dirs) - 1}")
        return self.run_dirs[index]

    def episodes(self, index: int) -> RunEpisodes:
        if index not in self._open:
            tokenizer = self.tokenizer
            if tokenizer is None and self.room is not None and self.run_dir(index) == \
                    self.room.out_dir:
                tokenizer = self.room.tokenizer
            self._open[index] = RunEpisodes(self.run_dir(index), tokenizer)
        return self._open[index]


def create_app(studio: Studio) -> Starlette:
    """The app for `studio`; uvicorn serves it (tandem/studio/__main__.py)."""

    async def runs(request: Request) -> Response:
        listed = []
        for index, path in enumerate(studio.run_dirs):
            files = sorted((path / "episodes").glob("step_*.jsonl")) if path.is_dir() else []
            listed.append({"id": index, "name": path.name, "path": str(path),
                           "episodes": bool(files), "metrics": (path / "metrics.jsonl").is_file(),
                           "cowrite": studio.room is not None and path == studio.room.out_dir})
        return JSONResponse({"runs": listed})

    async def steps(request: Request) -> Response:
        episodes = studio.episodes(_int(request.path_params["run"], "run"))
        return JSONResponse({"steps": list(episodes.step_files())})

    async def page(request: Request) -> Response:
        query = request.query_params
        episodes = studio.episodes(_int(request.path_params["run"], "run"))
        filters = EpisodeFilter(
            step=_opt(query, "step", int), min_reward=_opt(query, "min_reward", float),
            max_reward=_opt(query, "max_reward", float),
            min_senior=_opt(query, "min_senior", float),
            max_senior=_opt(query, "max_senior", float), text=query.get("q", ""))
        return JSONResponse(episodes.page(filters, _opt(query, "offset", int) or 0,
                                          _opt(query, "limit", int) or 20))

    async def group(request: Request) -> Response:
        query = request.query_params
        episodes = studio.episodes(_int(request.path_params["run"], "run"))
        return JSONResponse({"rows": episodes.group(_int(query.get("step"), "step"),
                                                    _int(query.get("group"), "group"))})

    async def metrics(request: Request) -> Response:
        path = studio.run_dir(_int(request.path_params["run"], "run"))
        try:
            rows = read_metrics(path)
        except MetricsError as error:
            return JSONResponse({"rows": [], "error": str(error)})
        return JSONResponse({"rows": [{k: _finite(v) for k, v in row.items()} for row in rows]})

    async def reports(request: Request) -> Response:
        run = _int(request.path_params["run"], "run")
        path = studio.run_dir(run)
        found = []
        markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
        for name in REPORTS:
            report = path / name
            if report.is_file() and _inside(report, path):
                plots = sorted(p.relative_to(path).as_posix()
                               for p in report.parent.glob("*.png") if _inside(p, path))
                found.append({"name": name, "html": markdown.render(report.read_text()),
                              "plots": [f"/api/runs/{run}/file/{p}" for p in plots]})
        if (path / "progress.png").is_file() and not found:
            found.append({"name": "progress", "html": "",
                          "plots": [f"/api/runs/{run}/file/progress.png"]})
        return JSONResponse({"reports": found})

    async def run_file(request: Request) -> Response:
        root = studio.run_dir(_int(request.path_params["run"], "run"))
        wanted = (root / request.path_params["path"]).resolve()
        if not _inside(wanted, root) or not wanted.is_file() \
                or wanted.suffix not in SERVED_SUFFIXES:
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(wanted)

    async def cowrite_info(request: Request) -> Response:
        room = studio.room
        if room is None:
            return JSONResponse({"enabled": False, "why": "start the studio with --senior "
                                 "<checkpoint or HF dir> to co-write"})
        return JSONResponse({
            "enabled": True, "senior": room.senior_dir, "schedules": list(SCHEDULES),
            "first_writers": list(FIRST_WRITERS),
            "run": studio.run_dirs.index(room.out_dir),
            "problems": [{"index": i, "uid": p.uid, "problem": p.problem, "answer": p.answer}
                         for i, p in enumerate(room.problems)]})

    async def cowrite_start(request: Request) -> Response:
        room = _room(studio)
        body = await _json(request)
        index = body.get("index")
        problem = room.problem(None if index in (None, "") else _int(index, "index"),
                               str(body.get("problem", "")), str(body.get("answer", "")))
        session = await room.start(problem, str(body.get("schedule", "alternate")),
                                   _float(body.get("handoff_p", 0.0), "handoff_p"),
                                   str(body.get("first", "senior")))
        return JSONResponse(session.state())

    def cowrite_step(method: str):
        """A route that sends the person's text to the session's `method` (a turn, or the
        end), one request at a time per session."""
        async def step(request: Request) -> Response:
            session, lock = _room(studio).session(request.path_params["session"])
            text = str((await _json(request)).get("text", ""))
            async with lock:
                await getattr(session, method)(text)
            return JSONResponse(session.state())
        return step

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    async def user_error(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": str(error)}, status_code=400)

    async def server_error(request: Request, error: Exception) -> Response:
        # an engine that timed out or died: the page shows the line, the log the traceback
        log.exception("studio: %s %s failed", request.method, request.url.path)
        line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return JSONResponse({"error": f"{type(error).__name__}: {line}"}, status_code=500)

    routes = [
        Route("/", index),
        Route("/api/runs", runs),
        Route("/api/runs/{run}/steps", steps),
        Route("/api/runs/{run}/episodes", page),
        Route("/api/runs/{run}/group", group),
        Route("/api/runs/{run}/metrics", metrics),
        Route("/api/runs/{run}/reports", reports),
        Route("/api/runs/{run}/file/{path:path}", run_file),
        Route("/api/cowrite", cowrite_info),
        Route("/api/cowrite/start", cowrite_start, methods=["POST"]),
        Route("/api/cowrite/{session}/turn", cowrite_step("human_turn"), methods=["POST"]),
        Route("/api/cowrite/{session}/finish", cowrite_step("end"), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(routes=routes,
                     exception_handlers={InputError: user_error, NoEpisodesError: user_error,
                                         Exception: server_error})


def _inside(path: Path, root: Path) -> bool:
    """`path`, with every symlink resolved, lies under `root`."""
    return path.resolve().is_relative_to(root.resolve())


def _room(studio: Studio) -> CowriteRoom:
    if studio.room is None:
        raise InputError("co-write is off: start the studio with --senior <checkpoint or HF dir>")
    return studio.room


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InputError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    return body


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def _float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None


def _opt(query: Any, name: str, kind: type) -> Any:
    value = query.get(name, "")
    if value == "":
        return None
    return _int(value, name) if kind is int else _float(value, name)


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
