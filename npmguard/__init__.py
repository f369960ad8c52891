"""npmguard: keep npm registry credentials in the OS keychain, not in files."""

__version__ = "0.1.0"
