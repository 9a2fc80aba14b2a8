"""Lung segmentation: the segmenter (inference, post-processing, QC), its weights, training and evaluation."""
