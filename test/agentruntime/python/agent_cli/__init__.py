"""A tiny agent runtime for tests: it honours the gateway runtime contract and nothing more."""
