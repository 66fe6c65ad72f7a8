"""Stage 1, the wire in: transport, C-STORE handlers, header checks, spool, assembly.

Imports the shared parts (``config``, ``errors``, ``durable``, ``dicom``) and
``ledger``; never ``contouring``, ``rtstruct``, ``delivery`` or ``ops``.
Later stages bind their own DICOM services through the receiver's
``extra_handlers`` extension point.
"""
