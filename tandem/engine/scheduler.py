"""The segment-stop scheduler: runs inside vLLM's EngineCore process.

A segment ends by the request's `tandem.alternation.StopRule`; each rule is O(1) per sampled
token: max_tokens and EOS (vLLM's own), a short `stop_ids` list (vLLM's `stop_token_ids`), the
k-th token of a named token set (word starts: ~half the vocabulary), and a token pair (a
paragraph break that the tokenizer writes as two `\\n` tokens). A 32k-entry `stop_token_ids`
list costs half a core in vLLM's front end, and a logits processor that forces a sentinel
wastes a decode step per segment, so the set rules run here: `segment_stop_scheduler` (given as
`scheduler_cls`) subclasses vLLM's `Scheduler` (CPU) or `AsyncScheduler` (GPU; whichever
`async_scheduling` selected) and overrides `_update_request_with_output`, the per-token loop
around vLLM's `check_stop`. After vLLM's checks it applies the request's rule and, when it
fires, marks the request `FINISHED_STOPPED` with a `tandem:*` stop reason, as a stop token
would: the request ends before its next step (no overshoot, no abort round trip), for plain
requests and streaming turns alike. With `keep_boundary=False` the k-th boundary token is
sampled but left out of the segment and of the session (a word hand-off comes before the word's
first token).

How a rule gets here: token sets are registered once per engine (`EngineSettings.token_sets`)
and reach this process through `VllmConfig.additional_config`; the front end puts the request's
`StopRule` into `SamplingParams.extra_args` (`stop_args`), and this scheduler rebuilds it
(`read_stop_args`) and resolves its set names once per request or streaming turn.

vLLM internals used: `Scheduler._update_request_with_output`,
`Scheduler._update_request_as_session` (vLLM carries a turn's stop reason into the next turn; we
clear it), `Request.{sampling_params, all_token_ids, num_output_tokens, status, stop_reason}`,
`VllmConfig.additional_config`, `SamplingParams.extra_args`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgspec
from vllm import SamplingParams
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from tandem.alternation import StopRule
from tandem.engine.processes import die_with_parent

TOKEN_SETS_KEY = "tandem_token_sets"  # VllmConfig.additional_config: {set name: [token ids]}
STOP_KEY = "tandem_stop"  # SamplingParams.extra_args: the StopRule's fields
REASON_BOUNDARY = "tandem:boundary"
REASON_BOUNDARY_DROPPED = "tandem:boundary_dropped"
REASON_PAIR = "tandem:pair"


def stop_args(rule: StopRule) -> dict[str, Any] | None:
    """`SamplingParams.extra_args` that carry `rule` to this scheduler; None when vLLM's own
    checks (max_tokens, stop_ids) are all the rule asks for."""
    if rule.boundary_set is None and rule.pair is None:
        return None
    return {STOP_KEY: dataclasses.asdict(rule)}


def read_stop_args(extra_args: dict[str, Any]) -> StopRule:
    """The rule `stop_args` sent. vLLM's msgpack delivers its fields with tuples as lists:
    `msgspec.convert` restores the declared types (and validates, as the constructor does)."""
    return msgspec.convert(extra_args[STOP_KEY], StopRule)


@dataclass
class _Compiled:
    """A request's rule with its set names resolved: this scheduler's cache on the Request."""

    params: SamplingParams
    """The params it was read from: a streaming turn swaps in new ones."""
    rule: StopRule
    boundary: frozenset[int] | None
    first: frozenset[int] | None
    second: frozenset[int] | None
    seen: int = 0
    """Tokens of `boundary` sampled in this segment so far."""


class _SegmentStops:
    """Scheduler mixin: after vLLM's own stop checks, apply the request's segment rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        die_with_parent()  # built in the EngineCore process: tie it to the engine actor
        super().__init__(*args, **kwargs)
        sets = self.vllm_config.additional_config.get(TOKEN_SETS_KEY, {})
        self._token_sets = {name: frozenset(ids) for name, ids in sets.items()}

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], is_stale: bool = False
    ) -> tuple[list[int], bool]:
        params = request.sampling_params
        if params is None or not params.extra_args or STOP_KEY not in params.extra_args:
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        # One token at a time, so a rule that fires mid-list trims the rest like check_stop does.
        kept: list[int] = []
        for token in new_token_ids:
            tokens, stopped = super()._update_request_with_output(request, [token], is_stale)
            kept += tokens
            if stopped:
                return kept, True
            if self._segment_ends(request, token):
                request.status = RequestStatus.FINISHED_STOPPED
                return kept, True
        return kept, False

    def _update_request_as_session(self, session: Request, update: Any) -> None:
        super()._update_request_as_session(session, update)
        # vLLM keeps the previous turn's stop reason; a turn ending on length would report it
        session.stop_reason = None

    def _segment_ends(self, request: Request, token: int) -> bool:
        stop = getattr(request, "_tandem_stop", None)
        # a streaming turn swaps in new sampling params: recompile and restart the count
        if stop is None or stop.params is not request.sampling_params:
            stop = request._tandem_stop = self._compile(request.sampling_params)
        if request.num_output_tokens == 1:
            stop.seen = 0
        if stop.boundary is not None and token in stop.boundary:
            stop.seen += 1
            if stop.seen >= stop.rule.boundaries:
                request.stop_reason = (REASON_BOUNDARY if stop.rule.keep_boundary
                                       else REASON_BOUNDARY_DROPPED)
                return True
        if stop.second is not None and token in stop.second:
            ids = request.all_token_ids
            if len(ids) >= 2 and ids[-2] in stop.first:
                request.stop_reason = REASON_PAIR
                return True
        return False

    def _compile(self, params: SamplingParams) -> _Compiled:
        rule = read_stop_args(params.extra_args)
        boundary, (first, second) = rule.boundary_set, rule.pair or (None, None)
        sets = self._token_sets
        try:
            return _Compiled(params, rule, boundary=None if boundary is None else sets[boundary],
                             first=None if first is None else sets[first],
                             second=None if second is None else sets[second])
        except KeyError as missing:
            # the front end validates names, so this means the engine was built without the set
            raise ValueError(f"token set {missing} is not registered with this engine") from None


class _SegmentStopScheduler(_SegmentStops, Scheduler):
    pass


class _SegmentStopAsyncScheduler(_SegmentStops, AsyncScheduler):
    pass


def segment_stop_scheduler(*args: Any, vllm_config: Any, **kwargs: Any) -> Scheduler:
    """`scheduler_cls` entry: the segment-stop scheduler on top of the base vLLM picked."""
    if vllm_config.scheduler_config.async_scheduling:
        return _SegmentStopAsyncScheduler(*args, vllm_config=vllm_config, **kwargs)
    return _SegmentStopScheduler(*args, vllm_config=vllm_config, **kwargs)
