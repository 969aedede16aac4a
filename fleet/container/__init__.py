"""The agent's container: the hardened spec as pure data (`spec`), applying
it to the engine (`manager`), the engine boundary (`engine`) and the agent
image (`image`, built from `fleet/inside/agent_image`)."""
