"""The persistent channel into an agent's container: a supervisor started
once per container through one long-lived exec session (`agent_side.py`),
and the consumer's end of it (`forwarder.py`)."""
