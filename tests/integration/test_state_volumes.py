"""Agents run as uids of their own on the real engine: a state volume made
before that (all agents were 10001) is given to its agent's new uid, and
its files stay writable."""

from __future__ import annotations

import docker
import pytest
from support import MakeFleet

from fleet.container.manager import ContainerManager
from fleet.container.spec import container_name
from fleet.credentials.identity import AgentIdentities
from fleet.errors import EngineError
from fleet.record import State


def test_an_old_state_volume_is_given_to_the_agents_own_uid(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"alpha": {}, "beta": {}})
    identities = AgentIdentities(fleet.settings)
    assert (identities.uid("alpha"), identities.uid("beta")) == (10001, 10002)
    volume = f"{container_name(fleet.settings, 'beta')}-state"
    # As fleet before 0.3 left it: no uid label, its files 10001's.
    docker_client.volumes.create(volume, labels={"fleet.namespace": fleet.settings.namespace})
    docker_client.containers.run("fleet-agent:latest", ["sh", "-c", "echo old > /state/notes"],
                                 user="10001:10001", remove=True, network_mode="none",
                                 volumes={volume: {"bind": "/state", "mode": "rw"}})
    fleet.start_worker()
    client = fleet.client()
    shell = "echo new >> /state/notes && id -u && cat /state/notes"
    record = client.wait(client.submit("beta", {"shell": shell}), 60)
    assert record.state == State.SUCCEEDED, record
    out = "".join(e.fields.get("data", "") for e in client.store.events.output(record.id)).split()
    assert out[:3] == ["10002", "old", "new"]  # then the agent's result line


def test_a_state_quota_the_engine_cannot_enforce_is_refused_in_one_line(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    """This host's engine keeps volumes on ext4 without project quotas: a
    `state_size` is refused, naming what the host needs, and nothing is made."""
    fleet = make_fleet({"dev": {"state_size": "64m"}})
    with pytest.raises(EngineError, match="XFS mounted with pquota"):
        ContainerManager(docker_client, fleet.settings).ensure("dev")
    assert not docker_client.volumes.list(filters={"name": container_name(fleet.settings, "dev")})
