"""The ``qkv`` command line: one file per command, registered in :mod:`.app`."""
