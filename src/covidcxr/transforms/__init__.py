"""Image transforms: resizing, the joint image+mask transforms of segmentation, classifier augmentation, the
segmentation modes, and the one classifier preprocessing function (:mod:`covidcxr.transforms.preprocess`)."""
