"""Write scikit-learn's bundled digits as an image folder, to try leanvit on "your own images" without any download.

    python scripts/digits_folder.py OUT            # OUT/train/<digit>/*.png and OUT/val/<digit>/*.png

The split is leanvit's fixed digits split (1,437 train / 360 val, stratified), so a run on the folder and a run on
the bundled digits see the same images; each 8 x 8 scan is saved as an 8-bit greyscale PNG, upscaled 4x (32 x 32)
with nearest-neighbour so that the pixels stay the scanner's.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from leanvit.io.data import digits_split


def main(out: Path) -> None:
    digits = load_digits()
    for split, indices in zip(('train', 'val'), digits_split()):
        for index in indices:
            folder = out / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(folder / f'{index:04d}.png')
    print(f'wrote {out}: {sum(len(i) for i in digits_split())} images in train/ and val/, 10 classes')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out', type=Path, help='folder to write train/ and val/ into')
    main(parser.parse_args().out)
