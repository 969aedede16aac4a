"""Tokens on the host and what protects them: the token store (`tokens`),
masking of captured output (`masking`), the per-agent circuit breaker
(`breaker`) and alerts (`alerts`)."""
