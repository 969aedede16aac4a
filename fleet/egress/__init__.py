"""Egress: agents reach the network only through fleet's proxy (mitmproxy,
`fleet/inside/proxy_image`), which allows each agent its destinations and
adds its injected credentials, so a real token never enters a container."""
