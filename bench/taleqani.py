"""all-taleqani (4 ALL subtypes): duplicate-aware 80/10/10 split, trained from scratch on CPU.

    python bench/taleqani.py                      # the table in docs/benchmarks.md
    python bench/taleqani.py --models resnet18    # the best model alone (about 20 minutes)
"""

from classification import parse_args, run

if __name__ == "__main__":
    run(parse_args(__doc__, "all-taleqani", "tusar_convnet,mobilenet_v2,efficientnet_b0,resnet18",
                   image_size=128, epochs=18, minutes=20, lr=0.002, augmentation="geometric"), "taleqani")
