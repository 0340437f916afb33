"""``python -m utils.rsna.synthetic --out DIR --preset demo``: utils/rsna/synthetic/generator.py."""

from utils.rsna.synthetic.generator import main

main()
