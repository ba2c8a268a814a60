"""Config files and ``--key=value`` overrides (``config_files``); files written atomically and
their hashes (``files``)."""
