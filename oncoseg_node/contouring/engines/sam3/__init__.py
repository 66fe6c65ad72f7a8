"""The SAM3 engine (:mod:`.engine`) and its parts; the package itself imports no torch."""
