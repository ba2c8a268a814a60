"""Small command modules that do not belong to a subsystem (demo, generate, bench)."""
