"""Commissioning: evaluation against reference structure sets, and the test phantom.

Imports ``contouring`` and ``rtstruct``; no stage imports it.
"""
