#!/usr/bin/env python3
"""Turns run folders (moerl run --out DIR) into benchmark JSON lines: the validation curve and the final
numbers of each, for committing under bench/results/.

    scripts/run-curves.py RUN_DIR [RUN_DIR ...] > bench/results/DATE-NAME.jsonl
"""
import json
import subprocess
import sys
import datetime

rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
date = datetime.date.today().isoformat()
for run in sys.argv[1:]:
    summary = json.load(open(f"{run}/summary.json"))
    base = {"bench": "train.cpu", "rev": rev, "date": date, "run": run, "precision": summary["precision"],
            "recipe": summary["recipe"]}
    curve = []
    for line in open(f"{run}/metrics.jsonl"):
        m = json.loads(line)
        if "step" in m:
            curve.append([m["step"], m["loss"], m.get("validation_loss")])
    for stage in summary["stages"]:
        for key in ("validation_loss", "bigram_validation_loss", "train_loss", "tokens_per_s", "wall_s"):
            if key in stage:
                print(json.dumps({**base, "stage": stage["stage"], "metric": key, "value": stage[key],
                                  "stat": "final" if key.endswith("loss") else "mean"}))
    print(json.dumps({**base, "metric": "curve", "value": len(curve), "unit": "[step, train_loss, validation_loss]",
                      "stat": "series", "series": curve}))
