"""The Python API above the toolkit's layers: ``Editor`` (``editor``) and the end-to-end delta
study on any labelled sweep (``analyze``).  Import the names from ``rome_edit`` itself."""
