"""Stage 2, series to masks: volume, geometry gate, protocols, engines, sanity flags.

Imports only the shared top-level modules (``config``, ``errors``,
``yamlfile``); never ``intake``, ``rtstruct``, ``delivery`` or ``ops``. It
neither reads the spool nor writes the ledger: the worker (``ops.worker``)
hands it files and takes its masks.
"""
