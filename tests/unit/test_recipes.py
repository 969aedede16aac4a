"""Which build makes which image: an error about a missing recipe image
names the command that builds it."""

from __future__ import annotations

from fleet.container.image import CONTEXT_DIR, PROXY_CONTEXT_DIR
from fleet.container.recipes import build_command, build_context, recipe_context, recipe_names
from fleet.settings import PROXY_IMAGE


def test_each_image_fleet_builds_has_its_context_and_command() -> None:
    assert recipe_names() == ["claude-code"]
    assert build_context("fleet-agent:latest") == CONTEXT_DIR
    assert build_context(PROXY_IMAGE) == PROXY_CONTEXT_DIR
    assert build_context("fleet-claude-code:latest") == recipe_context("claude-code")
    assert build_context("someone/else:1") is None
    assert build_command("fleet-claude-code:latest") == "fleet image build --recipe claude-code"
    assert build_command("fleet-agent:latest") == "fleet image build"
