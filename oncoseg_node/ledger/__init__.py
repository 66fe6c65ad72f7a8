"""The SQLite ledger every stage records its progress in; survives kill -9.

Imports only the shared parts (``errors``, ``config``). Every stage may import
it; it imports no stage.
"""
