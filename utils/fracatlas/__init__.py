"""FracAtlas: X-ray JPGs with COCO fracture polygons -> nnU-Net 2D segmentation + fracture classifiers."""
