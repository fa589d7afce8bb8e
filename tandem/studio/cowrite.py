r"""Co-write: a person takes the junior's seat and writes a solution with a loaded senior.

One `CowriteSession` is one episode. The senior writes through its engine exactly as in a
rollout (tandem/rollout.py `Rollout._episode`): a streaming session on the engine, a `StopRule`
from the episode's `Alternation`, `Alternation.advance` cutting an overshoot. Where the junior
engine would write, the person writes a whole turn instead: their text is encoded with the
senior's tokenizer (no special tokens, as a cross-tokenizer junior's text is) and sent to the
senior's session as the next turn's new tokens, as a junior turn is. `Alternation.hand_back`
counts their re-draw points without cutting their text.

Schedules (`SCHEDULES`): `alternate` is the evaluation's strict alternation at `\n\n`; `word`,
`sentence` and `step` let the senior write until the schedule's next re-draw point, then keep
the pen at each point with probability `handoff_p` (0: hand over at the first).

At the end (the senior's end-of-turn, the shared budget, or the person pressing Finish) the
team's last `\boxed{}` is graded by the training reward pool, and the episode is appended to
`<out dir>/episodes/step_000000.jsonl` as a row of the shape training saves (`author_mask` 2 for
the person's tokens, `HUMAN`), which the studio's episode viewer reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tandem.alternation import Alternation, Boundaries, episode_rng
from tandem.config.checks import InputError
from tandem.config.schema import TandemConfig
from tandem.data import Problem, format_prompt
from tandem.episode import AUTHOR_NAMES, HUMAN, JUNIOR, SENIOR, Episode
from tandem.protocols import eval_sampling, response_budget
from tandem.reward import RewardPool
from tandem.rollout import call_engine
from tandem.studio.episodes import COWRITE_META, EPISODES_DIR, token_pieces

SCHEDULES = ("alternate", "word", "sentence", "step")
FIRST_WRITERS = ("senior", "human")
COWRITE_FILE = "step_000000.jsonl"
"""Co-write rows are step 0: no training step produced them."""


class CowriteError(InputError):
    """A co-write request the session cannot take; the message says what to change."""


class CowriteSession:
    """One episode co-written by the senior engine and a person. Not thread-safe: the room
    serialises the calls of one session."""

    def __init__(self, room: CowriteRoom, problem: Problem, instruction: str, schedule: str,
                 handoff_p: float, first: str) -> None:
        if schedule not in SCHEDULES:
            raise CowriteError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        if not 0.0 <= handoff_p < 1.0:
            raise CowriteError(f"handoff_p must be in [0, 1) (the chance the senior keeps the "
                               f"pen at a re-draw point), got {handoff_p}")
        if first not in FIRST_WRITERS:
            raise CowriteError(f"first writer must be senior or human, got {first!r}")
        self.room, self.problem, self.schedule, self.handoff_p = room, problem, schedule, handoff_p
        self.id = secrets.token_hex(8)
        algorithm = dataclasses.replace(
            room.config.algorithm, name="tandem", schedule=schedule, handoff_p=handoff_p,
            first_writer="senior" if first == "senior" else "junior")
        rng = episode_rng(room.config.seed, 0, len(room.sessions))
        self.alternation = Alternation(algorithm, rng, room.boundaries)
        self.prompt_ids = format_prompt(room.tokenizer, problem.problem, instruction)
        self.budget = response_budget(len(self.prompt_ids), room.config)
        if self.budget < 1:
            raise CowriteError(f"the problem's prompt ({len(self.prompt_ids)} tokens) leaves no "
                               "response budget; shorten it or raise eval.context_tokens")
        self.context = list(self.prompt_ids)  # the senior engine's context
        self.sent = 0  # how much of it the engine's session has seen
        self.response: list[int] = []
        self.authors: list[int] = []
        self.logprobs: list[float] = []
        self.starts: list[int] = []
        self.version = 0
        self.finish: str | None = None  # set once the episode is over
        self.row: dict[str, Any] | None = None
        self._engine_session = f"studio-{self.id}"

    @property
    def writer(self) -> str:
        return "senior" if self.alternation.writer == SENIOR else "human"

    @property
    def left(self) -> int:
        return self.budget - len(self.response)

    async def senior_turn(self) -> None:
        """The senior writes until its hand-off (or the episode ends)."""
        if self.finish is not None or self.alternation.writer != SENIOR:
            raise CowriteError("it is not the senior's turn")
        room = self.room
        while self.left > 0:
            stop = self.alternation.stop_rule(self.left)
            segment = await call_engine(room.engine, "turn", self._engine_session,
                                        self.context[self.sent:], stop, room.sampling,
                                        timeout_s=room.config.cluster.call_timeout_s)
            turn = self.alternation.advance(segment.token_ids)
            kept = segment.token_ids[:turn.kept]
            if turn.kept < len(segment.token_ids):
                # the engine's session holds tokens we drop: restart it from our context
                await self._close_engine_session()
                self.sent = 0
            else:
                self.sent = len(self.context) + len(kept)
            self.version = segment.weight_version
            self._append(SENIOR, kept, segment.logprobs[:turn.kept])
            if segment.finish_reason == "eos" and turn.kept == len(segment.token_ids):
                return await self._end("eos")
            if segment.finish_reason == "abort":
                raise RuntimeError("the senior engine aborted the co-write turn")
            if not kept and not turn.handoff and segment.finish_reason == "length":
                return await self._end("length")  # the model's context is full
            if turn.handoff:
                return None
        await self._end("length")

    async def human_turn(self, text: str) -> None:
        """The person's turn: `text` in the senior's tokens, then the senior writes."""
        if self.finish is not None or self.alternation.writer != JUNIOR:
            raise CowriteError("it is not the person's turn")
        ids = self._encode(text)
        if not ids:
            raise CowriteError("the turn is empty: write something, or press Finish")
        self._append(HUMAN, ids, [0.0] * len(ids))
        self.alternation.hand_back(ids)
        if self.left <= 0:
            return await self._end("length")
        await self.senior_turn()

    async def end(self, text: str = "") -> None:
        """The person ends the episode, with a last piece of text of theirs if given."""
        if self.finish is not None:
            raise CowriteError("this episode is already over")
        ids = self._encode(text)
        if ids and self.alternation.writer != JUNIOR:
            raise CowriteError("it is the senior's turn: finish without text")
        self._append(HUMAN, ids, [0.0] * len(ids))
        await self._end("eos")

    def _encode(self, text: str) -> list[int]:
        ids = self.room.tokenizer.encode(text, add_special_tokens=False) if text else []
        if len(ids) > self.left:
            raise CowriteError(f"the turn is {len(ids)} tokens but only {self.left} are left of "
                               "the shared budget; shorten it")
        return ids

    def _append(self, author: int, ids: list[int], values: list[float]) -> None:
        if not ids:
            return
        if not self.authors or self.authors[-1] != author:
            self.starts.append(len(self.response))
        self.context += ids
        self.response += ids
        self.authors += [author] * len(ids)
        self.logprobs += values

    async def _close_engine_session(self) -> None:
        await call_engine(self.room.engine, "close_session", self._engine_session,
                          timeout_s=self.room.config.cluster.call_timeout_s)

    async def _end(self, finish: str) -> None:
        self.finish = finish
        await self._close_engine_session()
        self.row = await asyncio.to_thread(self.room.save, self)

    def episode(self) -> Episode:
        text = self.room.tokenizer.decode(self.response, skip_special_tokens=True)
        return Episode(prompt_ids=self.prompt_ids, response_ids=self.response,
                       author_mask=self.authors, logprobs=self.logprobs,
                       weight_version=self.version, segment_starts=self.starts,
                       finish_reason=self.finish or "eos", response_text=text)

    def state(self) -> dict[str, Any]:
        """What the page shows: the text so far, by author, and whose turn it is."""
        pieces = token_pieces(self.room.tokenizer, self.response)
        return {"id": self.id, "problem": self.problem.problem, "answer": self.problem.answer,
                "schedule": self.schedule, "writer": None if self.finish else self.writer,
                "left": self.left, "finish": self.finish,
                "tokens": [[t, AUTHOR_NAMES[a]] for t, a in zip(pieces, self.authors, strict=True)],
                "row": self.row}


class CowriteRoom:
    """A loaded senior (its engine replica, tokenizer and the reward pool) and the open
    co-write sessions. `engine`: a RolloutEngine Ray actor handle or the plain object; the
    caller starts and stops it, and closes the room (its reward pool)."""

    def __init__(self, config: TandemConfig, engine: Any, tokenizer: Any, senior_dir: str,
                 out_dir: str | Path, problems: list[Problem] | None = None,
                 instruction: str | None = None) -> None:
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        self.senior_dir = senior_dir
        self.out_dir = Path(out_dir).resolve()
        self.problems = problems or []
        self.instruction = config.data.instruction if instruction is None else instruction
        self.boundaries = Boundaries.from_tokenizer(tokenizer)
        self.sampling = eval_sampling(config)
        self.sessions: dict[str, CowriteSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._write = threading.Lock()
        reward = config.reward
        self.rewards = RewardPool(reward.num_workers, reward.timeout_s, reward.max_answer_chars,
                                  reward.answer_from)
        (self.out_dir / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
        (self.out_dir / COWRITE_META).write_text(json.dumps({"senior": senior_dir}) + "\n")

    def close(self) -> None:
        self.rewards.close()

    def problem(self, index: int | None, text: str, answer: str) -> Problem:
        """A listed problem by index, or one typed in (it needs its answer to be graded)."""
        if index is not None:
            if not 0 <= index < len(self.problems):
                raise CowriteError(f"problem {index} is not listed; pick one of "
                                   f"0..{len(self.problems) - 1}")
            return self.problems[index]
        if not text.strip():
            raise CowriteError("type a problem, or pick one from the list")
        if not answer.strip():
            raise CowriteError("type the problem's answer too: the team's \\boxed{} answer is "
                               "graded against it")
        return Problem(uid=f"typed/{len(self.sessions)}", problem=text.strip(),
                       answer=answer.strip())

    async def start(self, problem: Problem, schedule: str = "alternate", handoff_p: float = 0.0,
                    first: str = "senior") -> CowriteSession:
        session = CowriteSession(self, problem, self.instruction, schedule, handoff_p, first)
        self.sessions[session.id] = session
        self._locks[session.id] = asyncio.Lock()
        if session.alternation.writer == SENIOR:
            async with self._locks[session.id]:
                await session.senior_turn()
        return session

    def session(self, session_id: str) -> tuple[CowriteSession, asyncio.Lock]:
        if session_id not in self.sessions:
            raise CowriteError(f"no co-write session {session_id!r}; start a new one")
        return self.sessions[session_id], self._locks[session_id]

    def save(self, session: CowriteSession) -> dict[str, Any]:
        """Grade the team's answer and append the episode's row; returns the row."""
        episode = session.episode()
        verdict = self.rewards.score([episode.response_text], [session.problem.answer])[0]
        row = {"step": 0, **asdict(episode), "reward": verdict.reward, "verdict": verdict.status,
               "advantage": None, "uid": session.problem.uid, "problem": session.problem.problem,
               "answer": session.problem.answer, "schedule": session.schedule,
               "handoff_p": session.handoff_p, "senior_model": self.senior_dir}
        with self._write, open(self.out_dir / EPISODES_DIR / COWRITE_FILE, "a") as out:
            out.write(json.dumps(row) + "\n")
        return row
