"""The HTTP face of memserve: OpenAI and management routes, and the proxy to runners and providers (no torch)."""
