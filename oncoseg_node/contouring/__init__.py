"""Stage 2, series to masks: volume, geometry gate, protocols, engines, sanity, worker.

Imports ``intake`` (the spool it reads), ``ledger`` and ``rtstruct`` (the
worker writes the structure set it hands to delivery) and the shared parts;
never ``delivery`` or ``ops``.
"""
