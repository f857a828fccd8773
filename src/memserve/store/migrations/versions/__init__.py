"""One module per schema revision, oldest first: ``0001_api_keys``, ``0002_usage``."""
