#!/usr/bin/env bash
# Image folders end to end on 2 local ranks: write the digits (1,797 scans bundled with scikit-learn) as PNG class
# folders, train the CNN through `data.source: images`, then evaluate and write predictions with class names.
#
#   examples/images.sh            # data in data/digits-png, run in runs/digits-png; about a minute on 2 cores
#
# Swap in your own collection with --data.path/--data.test_path (one sub-directory of JPEG/PNG files per class).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
data="${DATA:-data/digits-png}"
run="${RUN:-runs/digits-png}"

if [ ! -f "$data/done" ]; then
  .venv/bin/python - "$data" <<'PY'
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

root = Path(sys.argv[1])
names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
digits = load_digits()
pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]            # 8x8, 0..16 -> 0..255
big = tf.cast(tf.round(tf.image.resize(pixels.astype(np.float32), (32, 32))), tf.uint8).numpy()
splits = train_test_split(big, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
for split, images, labels in (("train", splits[0], splits[2]), ("test", splits[1], splits[3])):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / split / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}-{i:04d}.png").write_bytes(tf.io.encode_png(image).numpy())
(root / "done").write_text("")
print(f"wrote {len(digits.target)} PNGs under {root}/train and {root}/test")
PY
fi

# Digits are grey and a flipped digit is another symbol: one channel, no augmentation.
scripts/launch.sh 2 hvdtrain train --config configs/images.yaml --data.path="$data/train" --data.test_path="$data/test" \
  --data.channels=1 --data.augment=false --model.width=16 --trainer.epochs=8 --trainer.run_dir="$run" "$@"
scripts/launch.sh 2 hvdtrain evaluate --run "$run"
scripts/launch.sh 2 hvdtrain predict --run "$run" --fields name,probs --output "$run/predictions.csv"
head -3 "$run/predictions.csv" | cut -c1-100
