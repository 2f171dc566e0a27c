"""pbc (8 white-cell types): duplicate-aware 80/10/10 split, trained from scratch on CPU.

    python bench/pbc.py
"""

from classification import parse_args, run

if __name__ == "__main__":
    run(parse_args(__doc__, "pbc", "resnet18", image_size=128, epochs=18, minutes=25, lr=0.002,
                   augmentation="geometric"), "pbc")
