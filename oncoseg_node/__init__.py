"""oncoseg-node: a silent-assistant DICOM node for radiation oncology.

A CT simulation series arrives by C-STORE, is stored durably, queued in a
crash-safe ledger, contoured per the physicists' protocol, written as an RT
Structure Set marked as an automatic draft, and sent to the planning system.
"""

__version__ = "0.1.0"
