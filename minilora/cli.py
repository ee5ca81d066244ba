"""What the command lines share (train.py, evaluate.py, `python -m minilora.demo`, `python -m minilora.inspect`):
log set-up and the --help layout.

Logs: one line per message. huggingface_hub puts its own handler on its loggers and lets them propagate as
well, so under `logging.basicConfig` each of its warnings (a retry while the hub is unreachable) would print
twice; it keeps its handler and stops propagating. rouge-score logs "Using default tokenizer." through absl
at INFO for every scorer it builds: absl is raised to WARNING.
"""
import argparse
import logging


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.disable_propagation()
    logging.getLogger("absl").setLevel(logging.WARNING)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is nothing to show: a required option says "(required)",
    an option without a default (None, "", False for a switch) says nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if action.default is None or action.default is False or action.default == "" or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
