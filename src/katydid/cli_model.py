"""``katydid model prepare|list|pull|import``: the speech models in the cache."""

from __future__ import annotations

import argparse
import sys

from katydid.config import Config


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_model(cfg: Config, args: argparse.Namespace) -> int:
    from katydid_worker import models

    if args.model_command == "prepare":
        name = args.name or cfg.model
        path = models.prepare(cfg.model_dir, name, progress=_say)
        print(path)
        return 0
    if args.model_command == "pull":
        from katydid_worker.model_pull import pull

        path = pull(
            cfg.model_dir, args.name, endpoint=args.endpoint, progress=_say, bar=sys.stderr.isatty()
        )
        print(path)
        return 0
    if args.model_command == "import":
        from katydid_worker.model_import import import_model

        name, path = import_model(
            cfg.model_dir, args.path, name=args.name, quant=args.quant, progress=_say
        )
        meta = models.sidecar_meta(cfg.model_dir, name) or {}
        if meta.get("english_only") and ".en" not in name:
            _say(
                f"note: {name} knows English only and its name does not say so (*.en): a server"
                " offers it for every language until one of its workers has announced itself"
            )
        _say(f"imported as {name}: katydid --model {name} ..., katydid serve --workers {name}=N")
        print(path)
        return 0
    from katydid_worker.hub_models import HUB_FILES

    statuses = models.statuses(cfg.model_dir)
    width = max(14, *(len(st.name) for st in statuses))
    print(
        f"{'model':<{width}} {'installed':<10} {'prepared':<9} {'languages':<10} {'source':<10} path"
    )
    for st in statuses:
        langs = "en" if st.english_only else "99"
        print(
            f"{st.name:<{width}} {'yes' if st.installed else 'no':<10}"
            f" {'yes' if st.prepared else 'no':<9} {langs:<10} {st.source:<10} {st.path}"
        )
    here = {st.name for st in statuses if st.prepared}
    pullable = [name for name in HUB_FILES if name not in here]
    if pullable:
        print(f"\nwhisper.cpp's published models (katydid model pull NAME): {', '.join(pullable)}")
    return 0
