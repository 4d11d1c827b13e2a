"""Defaults and names of the HTTP service's limits and authentication.

Kept apart from `serve.py` so that the command line can show them in `--help` without importing FastAPI and
uvicorn, which would slow every other command's start-up.
"""

API_KEY_ENV = "ANOMALYVFM_API_KEY"
API_KEY_HEADER = "X-API-Key"
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above common line cameras, below PIL's 89 MP bomb warning
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_FILES = 32
DEFAULT_MAX_CONNECTIONS = 64  # beyond this uvicorn answers 503 instead of queueing decoded images in memory
