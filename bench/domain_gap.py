"""Where does a source model's loss on the target come from: pixels or words? One run, one seed.

    python bench/domain_gap.py --out runs/domain_gap [--sources Finland,Germany] [--set ...]

Trains the source model as bench/adapt_controls.py does, then draws one gallery of new scenes
of the target country (its mix of land uses, layouts and sizes) four times: rendered in the
target's look or in the first source's, and captioned with the target's words (roof colours,
place names) or the source's. The mR of the four galleries splits the cross-domain loss into
appearance, vocabulary and content (what remains with the source's look and words).
Adapting from target images can close at most the appearance part: the meaning of words
that never occur in source captions is not in them.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from ablations import chance_mr  # bench/ is the script's folder
from adapt_controls import arguments, benchmark
from loops import test_mr, train_source
from urbancross.data import synth
from urbancross.data.ingest import read_split
from urbancross.data.manifest import encode_png, to_table


def restyled_gallery(cfg, scenes: list, look: str, words: str) -> pa.Table:
    """`scenes` drawn in the style of country `look` and captioned in that of `words`.

    Caption rngs are seeded per scene, so every (look, words) gets the same templates: only
    the style differs.
    """
    target = scenes[0].domain
    rows = []
    for i, scene in enumerate(scenes):
        captions = synth.describe(replace(scene, domain=words), synth.domain_rng(cfg.synth.seed, target, 3 + i),
                                  cfg.synth.captions_per_image)
        rows.append({"image_id": f"{target}_gap_{i:06d}", "image": encode_png(synth.render(replace(scene, domain=look), cfg.synth.image_size)),
                     "captions": captions, "domain": target, "split": "test", "source": f"synth:{target}:gap:{i}"})
    return to_table(rows)


def main() -> None:
    args = arguments(__doc__, "runs/domain_gap").parse_args()
    cfg = benchmark(args)
    sources, target = args.sources.split(","), cfg.data.target_domain
    model, _ = train_source(cfg, pa.concat_tables([read_split(cfg, "train", d) for d in sources]))
    test = read_split(cfg, "test")
    in_domain = test_mr(cfg, model, test)
    images = test.num_rows // len(in_domain)  # the gallery is as large as one country's test split
    rng = synth.domain_rng(cfg.synth.seed, target, 2)  # streams 0 and 1 make the benchmark itself
    scenes = [synth.make_scene(rng, synth.STYLES[target]) for _ in range(images)]
    print(f"\nsources {args.sources} -> target {target}; {images} images per gallery (chance mR {chance_mr(images):.2f}); seed {cfg.seed}")
    print("benchmark test split: " + ", ".join(f"{d} {mr:.2f}" for d, mr in sorted(in_domain.items())))
    print(f"| {target} scenes | {target} words | {sources[0]} words |\n|---|---|---|")
    for look in (target, sources[0]):
        mr = [test_mr(cfg, model, restyled_gallery(cfg, scenes, look, words))[target] for words in (target, sources[0])]
        print(f"| {look} look | {mr[0]:.2f} | {mr[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
