"""Predict with a trained ABMIL checkpoint: K resampled bags per slide or patient, mean and sd.

    python -m jobs.predict_mil --checkpoint <abmil.safetensors> (--embeddings <…> | --bags <dir>)
        --output <dir>

``--bags`` embeds the patients' images with the encoder recorded in the checkpoint's card. Writes
``<output>/mil_predictions/predictions.parquet`` and prints one JSON line per slide or patient.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from engine.models import MissingWeights
from engine.models.mil import load_mil, predict_bags
from jobs.common import fail
from jobs.train_mil import load_bags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.predict_mil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="process_slides output or its tiles folder")
    src.add_argument("--bags", help="folder of <patient_id>/…/<image> single-cell images")
    p.add_argument("--output", required=True)
    p.add_argument("--n-bags", type=int)
    p.add_argument("--bag-size", type=int)
    args = p.parse_args(argv)
    model, card = load_mil(args.checkpoint)
    n_bags, bag_size = args.n_bags or card.get("n_bags", 10), args.bag_size or card.get(
        "bag_size", 256)
    if args.bags:
        enc = card.get("encoder")
        if not enc:
            return fail(f"{args.checkpoint} was trained on slide embeddings, not --bags")
        from engine.bags import embed_patient_bags, find_patient_images

        try:
            bags = embed_patient_bags(find_patient_images(args.bags), enc["model"],
                                      enc["checkpoint"], enc["source_mpp"])
        except (FileNotFoundError, MissingWeights) as err:
            return fail(str(err))
    else:
        bags = load_bags(args.embeddings)
    key = "patient_id" if args.bags else "slide_id"
    rows = []
    for sid, bag in sorted(bags.items()):
        pred = predict_bags(model, bag, n_bags, bag_size)
        row = {key: sid, "task": card["task"], "n_bags": pred.n_bags,
               "bag_size": pred.bag_size, "n_instances": len(bag),
               "mean": pred.mean.tolist(), "sd": pred.sd.tolist(),
               "classes": card.get("classes") or None}
        rows.append(row)
        print(json.dumps(row))
    os.makedirs(os.path.join(args.output, "mil_predictions"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows),
                   os.path.join(args.output, "mil_predictions", "predictions.parquet"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
