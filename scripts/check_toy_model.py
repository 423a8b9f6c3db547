"""Measure the bundled toy model against the foundation issue's acceptance figures.

    python scripts/check_toy_model.py [--model DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

from rome_edit.models.loading import load_model
from rome_edit.study.knowledge import knowledge_report
from rome_edit.study.names import load_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lm = load_model(args.model)
    names = load_names()
    report = {"all": knowledge_report(lm, names)}
    for split in ("edit", "heldout"):
        report[split] = knowledge_report(lm, [e for e in names if e.split == split])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
