"""COVID-19 classification: the model artifact, inference (one base class for single models and ensembles),
the manifest loop with its mask cache, ensembles, training and Grad-CAM."""
