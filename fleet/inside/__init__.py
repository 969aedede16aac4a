"""What runs INSIDE an agent's container. Nothing in fleet imports these
modules: the supervisor's source is read as package data and passed to the
container's python3; `agent_image/` is the image's build context (the
Dockerfile and the demo agent)."""
