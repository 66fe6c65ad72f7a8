"""The wire and the files: DICOM receiver, durable spool, sender."""
