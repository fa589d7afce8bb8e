"""The segment-stop scheduler: runs inside vLLM's EngineCore process."""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from tandem.engine.api import (
    REASON_BOUNDARY,
    REASON_BOUNDARY_DROPPED,
    REASON_PAIR,
    STOP_KEY,
    TOKEN_SETS_KEY,
)


class _SegmentStops:
    """Scheduler mixin: after vLLM's own stop checks, apply the request's segment rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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
        rule = getattr(request, "_tandem_rule", None)
        # a streaming turn swaps in new sampling params: recompile and restart the count
        if rule is None or rule[0] is not request.sampling_params:
            rule = (request.sampling_params, *self._compile(request.sampling_params.extra_args))
            request._tandem_rule = rule
            request._tandem_boundaries = 0
        if request.num_output_tokens == 1:
            request._tandem_boundaries = 0
        _, boundary, k, keep, first, second = rule
        if boundary is not None and token in boundary:
            request._tandem_boundaries += 1
            if request._tandem_boundaries >= k:
                request.stop_reason = REASON_BOUNDARY if keep else REASON_BOUNDARY_DROPPED
                return True
        if second is not None and token in second:
            ids = request.all_token_ids
            if len(ids) >= 2 and ids[-2] in first:
                request.stop_reason = REASON_PAIR
                return True
        return False

    def _compile(self, extra_args: dict[str, Any]) -> tuple[Any, ...]:
        boundary, k, keep, first, second = extra_args[STOP_KEY]
        try:
            return (
                None if boundary is None else self._token_sets[boundary], k, keep,
                None if first is None else self._token_sets[first],
                None if second is None else self._token_sets[second],
            )
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

