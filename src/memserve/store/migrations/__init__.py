"""Alembic's scripts for the store: ``env.py`` and one file per revision under ``versions/``.

Every schema change is a new revision (never an edit of a shipped one); ``memserve.store.migrate`` runs
them at open, with no alembic.ini.
"""
