"""Script-mode entry point of the test runtime: `python <release>/gateways/script.py`."""
import agent_cli.main

agent_cli.main.serve("script")
