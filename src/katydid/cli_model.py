"""``katydid model prepare|list``: the speech models in the cache."""

from __future__ import annotations

import argparse
import sys

from katydid.config import Config


def cmd_model(cfg: Config, args: argparse.Namespace) -> int:
    from katydid_worker import models

    if args.model_command == "prepare":
        name = args.name or cfg.model
        path = models.prepare(cfg.model_dir, name, progress=lambda msg: print(msg, file=sys.stderr))
        print(path)
        return 0
    print(f"{'model':<14} {'installed':<10} {'prepared':<9} {'languages':<10} path")
    for st in models.statuses(cfg.model_dir):
        langs = "en" if st.english_only else "99"
        print(
            f"{st.name:<14} {'yes' if st.installed else 'no':<10} {'yes' if st.prepared else 'no':<9} {langs:<10} {st.path}"
        )
    return 0
