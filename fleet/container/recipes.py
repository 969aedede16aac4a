"""Recipes: images for real agent CLIs, each a build context under
`fleet/inside/recipes/<name>/` built on fleet's agent image (its non-root
users, no setuid files, the idle command). A recipe's `downloads.json`
pins what the host downloads into its context (fleet/container/downloads.py);
docs/real-agents.md says what each CLI needs writable, how a task's
settings reach it and how its exit maps onto the job protocol."""

from __future__ import annotations

from pathlib import Path

import docker

from fleet.container.image import CONTEXT_DIR, INSIDE, PROXY_CONTEXT_DIR, Report, build_image
from fleet.settings import AGENT_IMAGE, PROXY_IMAGE

RECIPES_DIR = INSIDE / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.name for p in RECIPES_DIR.iterdir() if (p / "Dockerfile").is_file())


def recipe_tag(name: str) -> str:
    """The image a recipe builds: `fleet-<name>:latest`."""
    return f"fleet-{name}:latest"


def recipe_context(name: str) -> Path:
    return RECIPES_DIR / name


def build_context(tag: str) -> Path | None:
    """The build context fleet makes the image `tag` from, if it makes it."""
    known = {AGENT_IMAGE: CONTEXT_DIR, PROXY_IMAGE: PROXY_CONTEXT_DIR}
    known.update({recipe_tag(name): recipe_context(name) for name in recipe_names()})
    return known.get(tag)


def build_command(tag: str) -> str:
    """What builds the image `tag`: for a recipe's, with its --recipe."""
    recipe = next((name for name in recipe_names() if recipe_tag(name) == tag), None)
    return f"fleet image build --recipe {recipe}" if recipe else "fleet image build"


def build_recipe(client: docker.DockerClient, name: str, *, report: Report, force: bool = False,
                 agent_image: str = AGENT_IMAGE) -> str:
    """Build the recipe's image, if missing or out of date, on `agent_image`,
    which the caller has built already. Returns the recipe's tag."""
    tag = recipe_tag(name)
    build_image(client, tag, report=report, force=force, base=agent_image, context=recipe_context(name))
    return tag


def build_recipe_and_base(client: docker.DockerClient, name: str, *, report: Report) -> str:
    """The agent image, then the recipe's image on it, each if missing or
    out of date. Returns the recipe's tag."""
    build_image(client, AGENT_IMAGE, report=report, context=CONTEXT_DIR)
    return build_recipe(client, name, report=report)
