"""Test helpers shipped with the package (the ahead-of-time compile check)."""
