"""The store: one database for what outlives the process (API keys, usage), on SQLite or Postgres.

SQLAlchemy 2 Core on its async engine (aiosqlite, asyncpg), migrated by Alembic at open. It imports
nothing from gateway/, pool/, cli/ or runner/, and no torch. See docs/store.md.
"""

from memserve.store.db import Store, database_url
from memserve.store.keys import ApiKey, KeyStore
from memserve.store.usage import UsageLog, UsageRow

__all__ = ["ApiKey", "KeyStore", "Store", "UsageLog", "UsageRow", "database_url"]
