"""The ``rome-edit`` command line."""
