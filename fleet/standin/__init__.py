"""Stand-ins for what fleet's agents reach outside (an upstream, a model
API, a forge), for the demo, the benchmark and the tests: containers on an
internal network of their own that only fleet's egress proxy joins. They
never hold a token: each knows the SHA-256 of the credential it accepts."""
