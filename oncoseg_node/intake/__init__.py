"""Stage 1, the wire in, in the order an instance meets them.

``wire`` bounds what a peer can make the node read (PDU length, deadlines,
per-peer connections); ``transport`` is the listener and its presentation
contexts; ``handlers`` answer C-STORE and C-ECHO; ``headers`` parses what
arrived and ``checks`` decides whether it may be kept; ``spool`` stores it
durably; ``assembly`` decides when a series is complete.

Imports the shared parts (``config``, ``errors``, ``durable``, ``dicom``) and
``ledger``; never ``contouring``, ``rtstruct``, ``delivery`` or ``ops``.
Later stages bind their own DICOM services through the receiver's
``extra_handlers`` extension point.
"""
