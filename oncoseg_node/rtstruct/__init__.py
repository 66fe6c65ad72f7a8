"""Stage 3, masks to a file: contour tracing and encoding, writer, self-check, reader, profiles.

Imports the shared parts and ``contouring`` (the CT geometry it maps contours
into, the contoured series it writes); never ``delivery`` or ``ops``.
"""
