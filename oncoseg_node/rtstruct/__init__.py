"""The RT Structure Set: contour tracing, encoding, writer, self-check, reader, profiles.

Imports only the shared parts and ``contouring.volume`` (the CT geometry it
maps contours into); never ``delivery`` or ``ops``.
"""
