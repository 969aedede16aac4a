"""Getting a job into the agent's container, on the worker's side: the
`Forwarder` interface and the job (`base`), one `docker exec` per task
(`exec`), and the persistent channel to the in-container supervisor
(`channel`)."""
