"""Readings of InFusion's feature injection, measured on the toy benchmark (docs/infusion.md has the figures).

The paper injects "the difference of features obtained with source and edit prompt" to "highlight edited
concepts" without saying its sign, scale or region. Each reading below is the "InFusion" row
(toy/methods_infusion.py) with the controller's plan switched (attention/infusion.py `inject_difference`):

    cd <pack root> && python -m toy.infusion_readings [--split dev] [--items a,b] [--readings a,b] [--json out.json]

Settings are chosen on the dev split only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import boot

READINGS = {
    # label: overrides of the InFusion row
    "source, everywhere (Plug-and-Play; the row before)": dict(feature_mode="source", feature_region="all"),
    "source, outside the concepts": dict(feature_mode="source", feature_region="outside"),
    "difference added, everywhere": dict(feature_mode="difference", feature_region="all"),
    "difference added, inside the concepts": dict(feature_mode="difference", feature_region="inside"),
    "difference added x0.5, everywhere": dict(feature_mode="difference", feature_region="all", strength=0.5),
    "no feature injection (strength 0)": dict(strength=0.0),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="dev", choices=["public", "dev"])
    p.add_argument("--items", default=None)
    p.add_argument("--readings", default=None, help="comma-separated indices into READINGS (default: all)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    boot.boot(threads=a.threads)
    from . import benchmark as bench
    from . import methods_infusion as mi
    from . import model as tm

    labels = list(READINGS)
    chosen = [labels[int(i)] for i in a.readings.split(",")] if a.readings else labels
    for lab in chosen:
        ov = READINGS[lab]

        def row(model, clip, vae, frames, src, edit, spec, ov=ov):
            return mi.infusion_edit(model, clip, vae, frames, src, edit, spec, **{"fresh_noise": False, **ov})

        bench.register(f"InFusion: {lab}")(row)
    model, clip, vae, _ = tm.load(tm.WEIGHTS)
    items = a.items.split(",") if a.items else None

    def save(res):
        if a.json:
            a.json.write_text(json.dumps(bench.to_json(res), indent=1))

    res = bench.run(model, clip, vae, [f"InFusion: {lab}" for lab in chosen], frames=a.frames, items=items,
                    split=a.split, on_row=save)
    print(bench.ci_table(res))
    print(bench.kind_table(res))


if __name__ == "__main__":
    main()
