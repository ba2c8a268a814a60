"""Math as plain functions."""
