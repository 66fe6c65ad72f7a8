"""Stage 4, out to the TPS: per-destination scheduler, C-STORE sender, Storage Commitment.

Imports ``ledger`` and the shared parts; it registers its Storage Commitment
report handler on the receiver through ``intake``'s extension point, and
imports nothing from ``ops``.
"""
